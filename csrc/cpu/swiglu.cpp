// SwiGLU on the CPU, elementwise over flat contiguous tensors, in chunks split across threads.
//   forward : y = g * s * u,                     s = sigmoid(g) = 1 / (1 + exp(-g))
//   backward: dg = dy * u * s * (1 + g*(1-s)),   du = dy * g * s
// One pass over memory each way, where eager PyTorch makes two (forward) or six (backward).
// Float math runs through plain loops over chunks of kChunk elements with an exp written
// out as a polynomial, compiled three times (x86-64-v4, i.e. AVX-512; x86-64-v3, i.e. AVX2+FMA; and
// baseline x86-64, chosen at load time by target_clones), so the compiler vectorises it: the
// AVX-512 clone took the forward of 16 x 1536 values from 44 to 25 us, and exp in a loop of its
// own 25 to 11 us (bench/README.md). ATen's Vectorized<float> is only
// vectorised in builds that compile it per CPU capability, which this extension does not.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fastllm/checks.h"
#include "fastllm/cpu_mm.h"  // output_empty
#include "fastllm/cpu_simd.h"  // exp_taylor
#include "fastllm/cpu_vec.h"  // acc_type_t, bf16_to_float, float_to_bf16
#include "fastllm/grain.h"

namespace fastllm::cpu {
namespace {

constexpr int64_t kChunk = 256;  // elements widened to acc_t at a time (fits in L1)

// The float loops below are written to be vectorised by the compiler: no branches, no
// library calls. GCC only if-converts the clamps when comparisons may not trap.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

FASTLLM_CLONES_X86_64_V4 void silu_mul_f32(const float* __restrict g, const float* __restrict u,
                                           float* __restrict y, int64_t n) {
  // exp in its own loop: in one loop with the division, GCC if-converts exp_taylor's clamps
  // into a second division per vector (twice the time); the values are the same
  constexpr int64_t kBlock = 64;
  float e[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t i = 0; i < len; ++i) e[i] = exp_taylor(-g[i0 + i]);
    for (int64_t i = 0; i < len; ++i) y[i0 + i] = g[i0 + i] / (1.0f + e[i]) * u[i0 + i];
  }
}

FASTLLM_CLONES_X86_64_V4 void silu_mul_bwd_f32(const float* __restrict dy, const float* __restrict g,
                                               const float* __restrict u, float* __restrict dg,
                                               float* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + exp_taylor(-g[i]));
    dg[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = dy[i] * g[i] * s;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Chunk conversions; bfloat16 goes through the vectorisable bit-operation helpers.
template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    bf16_to_float(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    float_to_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename scalar_t>
void swiglu_fwd_flat(const scalar_t* g, const scalar_t* u, scalar_t* y, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, grain_for(kChunk), [&](int64_t begin, int64_t end) {
    acc_t gs[kChunk], us[kChunk], ys[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      if constexpr (std::is_same_v<scalar_t, float>) {  // no widening needed
        silu_mul_f32(g + off, u + off, y + off, len);
        continue;
      }
      load_chunk(g + off, gs, len);
      load_chunk(u + off, us, len);
      if constexpr (std::is_same_v<acc_t, float>) {
        silu_mul_f32(gs, us, ys, len);
      } else {
        for (int64_t i = 0; i < len; ++i) ys[i] = gs[i] / (acc_t(1) + std::exp(-gs[i])) * us[i];
      }
      store_chunk(ys, y + off, len);
    }
  });
}

template <typename scalar_t>
void swiglu_bwd_flat(const scalar_t* dy, const scalar_t* g, const scalar_t* u, scalar_t* dg,
                     scalar_t* du, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, grain_for(kChunk), [&](int64_t begin, int64_t end) {
    acc_t dys[kChunk], gs[kChunk], us[kChunk], dgs[kChunk], dus[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      if constexpr (std::is_same_v<scalar_t, float>) {  // no widening needed
        silu_mul_bwd_f32(dy + off, g + off, u + off, dg + off, du + off, len);
        continue;
      }
      load_chunk(dy + off, dys, len);
      load_chunk(g + off, gs, len);
      load_chunk(u + off, us, len);
      if constexpr (std::is_same_v<acc_t, float>) {
        silu_mul_bwd_f32(dys, gs, us, dgs, dus, len);
      } else {
        for (int64_t i = 0; i < len; ++i) {
          const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-gs[i]));
          dgs[i] = dys[i] * us[i] * s * (acc_t(1) + gs[i] * (acc_t(1) - s));
          dus[i] = dys[i] * gs[i] * s;
        }
      }
      store_chunk(dgs, dg + off, len);
      store_chunk(dus, du + off, len);
    }
  });
}

void check_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_dtype(a, a_name, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_same_device(a, a_name, b, b_name);
  TORCH_CHECK(b.sizes() == a.sizes(), b_name, ": expected shape ", a.sizes(), " (same as ",
              a_name, "), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), b_name, ": expected dtype ", a.scalar_type(),
              " (same as ", a_name, "), got ", b.scalar_type());
  check_contiguous(a, a_name);
  check_contiguous(b, b_name);
}

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = output_empty(like.sizes(), like.options());
  maybe_poison(out);
  return out;
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, "gate", up, "up");
  at::Tensor y = new_output(gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_flat<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                              y.mutable_data_ptr<scalar_t>(), gate.numel());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out,
                                                  const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, "gate", up, "up");
  check_pair(gate, "gate", grad_out, "grad_out");
  at::Tensor dg = new_output(gate), du = new_output(up);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_flat<scalar_t>(grad_out.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                              up.const_data_ptr<scalar_t>(), dg.mutable_data_ptr<scalar_t>(),
                              du.mutable_data_ptr<scalar_t>(), gate.numel());
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

}  // namespace fastllm::cpu
