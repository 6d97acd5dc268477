// RMSNorm on the CPU: one pass per row, rows split across threads.
//   forward : y = x * r * w,            r = rsqrt(mean(x^2) + eps)
//   backward: dx = r * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_rows(dy * xhat),
//             xhat = x * r (recomputed from x: cheaper than storing r and re-reading it).
// x, dy: (rows, H) contiguous; w: (H,). Work is done in float (double for float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_mm.h"  // output_empty
#include "fastllm/rms_norm_checks.h"
#include "fastllm/cpu_simd.h"  // FASTLLM_CLONES_X86_64_V4
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // v16, load, store, lane_sum

namespace fastllm::cpu {
namespace {

#ifdef FASTLLM_HAVE_VECTORS
// float rows on 16-lane vectors, compiled for AVX-512, AVX2+FMA and the baseline (picked at load
// time). ATen's Vectorized<float> is scalar in this extension's build: the generic rows below
// took ~5 us for the 16 x 576 rows of a decode step, twice per layer.

// sum(a[i] * b[i]) over n floats, two vector accumulators, the tail in order after them.
FASTLLM_ALWAYS_INLINE float dot_f32(const float* a, const float* b, int64_t n) {
  v16 s0{}, s1{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load<v16>(a + i) * load<v16>(b + i);
    s1 += load<v16>(a + i + 16) * load<v16>(b + i + 16);
  }
  for (; i + 16 <= n; i += 16) s0 += load<v16>(a + i) * load<v16>(b + i);
  float s = lane_sum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = x * r * w for one row.
FASTLLM_CLONES_X86_64_V4 void rms_norm_row_f32(const float* x, const float* w, float* y, int64_t H, float eps) {
  const float r = 1.0f / std::sqrt(dot_f32(x, x, H) / float(H) + eps);
  int64_t i = 0;
  for (; i + 16 <= H; i += 16) store<v16>(y + i, load<v16>(x + i) * r * load<v16>(w + i));
  for (; i < H; ++i) y[i] = x[i] * r * w[i];
}

// dx = r * (dy*w) - r * (r*c) * x for one row, c = r * mean(dy*w*x); dw += dy * (x * r).
// gw: an H-float scratch row.
FASTLLM_CLONES_X86_64_V4 void rms_norm_bwd_row_f32(const float* dy, const float* x, const float* w, float* dx,
                                                   float* dw, float* gw, int64_t H, float eps) {
  const float r = 1.0f / std::sqrt(dot_f32(x, x, H) / float(H) + eps);
  int64_t i = 0;
  for (; i + 16 <= H; i += 16) store<v16>(gw + i, load<v16>(dy + i) * load<v16>(w + i));
  for (; i < H; ++i) gw[i] = dy[i] * w[i];
  const float c = r * dot_f32(gw, x, H) / float(H);
  const float rc = r * c;
  for (i = 0; i + 16 <= H; i += 16) {
    const v16 xv = load<v16>(x + i);
    store<v16>(dx + i, r * load<v16>(gw + i) - r * rc * xv);
    store<v16>(dw + i, load<v16>(dw + i) + load<v16>(dy + i) * (xv * r));
  }
  for (; i < H; ++i) {
    dx[i] = r * gw[i] - r * rc * x[i];
    dw[i] += dy[i] * (x[i] * r);
  }
}
#endif

template <typename scalar_t>
void rms_norm_fwd_rows(const scalar_t* x, const acc_type_t<scalar_t>* w, scalar_t* y,
                       int64_t rows, int64_t H, double eps) {
  using acc_t = acc_type_t<scalar_t>;
#ifdef FASTLLM_HAVE_VECTORS
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) rms_norm_row_f32(x + row * H, w, y + row * H, H, float(eps));
    });
    return;
  }
#endif
  at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs, ys(H);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* xr = widen<scalar_t, acc_t>(x + row * H, H, xs);
      const acc_t r = acc_t(1) / std::sqrt(dot(xr, xr, H) / acc_t(H) + acc_t(eps));
      const Vec<acc_t> rv(r);
      int64_t i = 0;
      for (; i + Vec<acc_t>::size() <= H; i += Vec<acc_t>::size()) {
        (Vec<acc_t>::loadu(xr + i) * rv * Vec<acc_t>::loadu(w + i)).store(ys.data() + i);
      }
      for (; i < H; ++i) ys[i] = xr[i] * r * w[i];
      narrow<scalar_t, acc_t>(ys.data(), y + row * H, H);
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_rows(const scalar_t* dy, const scalar_t* x, const acc_type_t<scalar_t>* w,
                       scalar_t* dx, acc_type_t<scalar_t>* dw_partial, int64_t rows, int64_t H,
                       double eps) {
  using acc_t = acc_type_t<scalar_t>;
  // dw_partial: (num_threads, H); each thread sums its own rows, then they are added up.
#ifdef FASTLLM_HAVE_VECTORS
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
      float* dw = dw_partial + at::get_thread_num() * H;
      std::vector<float> gw(H);
      for (int64_t row = begin; row < end; ++row) {
        rms_norm_bwd_row_f32(dy + row * H, x + row * H, w, dx + row * H, dw, gw.data(), H, float(eps));
      }
    });
    return;
  }
#endif
  at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
    acc_t* dw = dw_partial + at::get_thread_num() * H;
    std::vector<acc_t> xs, dys, gw(H), out(H);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* xr = widen<scalar_t, acc_t>(x + row * H, H, xs);
      const acc_t* dyr = widen<scalar_t, acc_t>(dy + row * H, H, dys);
      const acc_t r = acc_t(1) / std::sqrt(dot(xr, xr, H) / acc_t(H) + acc_t(eps));
      for (int64_t i = 0; i < H; ++i) gw[i] = dyr[i] * w[i];  // dy * w
      // mean(dy*w*xhat) = r * mean(dy*w*x)
      const acc_t c = r * dot(gw.data(), xr, H) / acc_t(H);
      const Vec<acc_t> rv(r), rcv(r * c);
      int64_t i = 0;
      for (; i + Vec<acc_t>::size() <= H; i += Vec<acc_t>::size()) {
        const auto xv = Vec<acc_t>::loadu(xr + i);
        const auto dyv = Vec<acc_t>::loadu(dyr + i);
        (rv * Vec<acc_t>::loadu(gw.data() + i) - rv * rcv * xv).store(out.data() + i);
        at::vec::fmadd(dyv, xv * rv, Vec<acc_t>::loadu(dw + i)).store(dw + i);
      }
      for (; i < H; ++i) {
        out[i] = r * gw[i] - r * r * c * xr[i];
        dw[i] += dyr[i] * xr[i] * r;
      }
      narrow<scalar_t, acc_t>(out.data(), dx + row * H, H);
    }
  });
}

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = output_empty(like.sizes(), like.options());
  maybe_poison(out);
  return out;
}

at::Tensor rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight, eps);
  const int64_t H = x.size(-1);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  at::Tensor y = new_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    rms_norm_fwd_rows<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                y.mutable_data_ptr<scalar_t>(), rows, H, eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out,
                                                    const at::Tensor& x,
                                                    const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight, eps);
  check_rms_norm_grad(grad_out, x);
  const int64_t H = x.size(-1);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  at::Tensor dx = new_output(x);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w = weight.to(acc_dtype).contiguous();
    at::Tensor partial = at::zeros({at::get_num_threads(), H}, x.options().dtype(acc_dtype));
    rms_norm_bwd_rows<scalar_t>(grad_out.const_data_ptr<scalar_t>(),
                                x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                dx.mutable_data_ptr<scalar_t>(),
                                partial.mutable_data_ptr<acc_t>(), rows, H, eps);
    dw = partial.sum(0).to(weight.scalar_type());
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace fastllm::cpu
