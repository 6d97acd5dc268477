// SwiGLU on the CPU, elementwise over flat contiguous tensors, in chunks split across threads.
//   forward : y = g * s * u,                     s = sigmoid(g) = 1 / (1 + exp(-g))
//   backward: dg = dy * u * s * (1 + g*(1-s)),   du = dy * g * s
// One pass over memory each way, where eager PyTorch makes two (forward) or six (backward).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "fastllm/checks.h"
#include "fastllm/cpu_vec.h"

namespace fastllm::cpu {
namespace {

constexpr int64_t kChunk = 256;  // elements widened to acc_t at a time (fits in L1)

template <typename scalar_t>
void swiglu_fwd_flat(const scalar_t* g, const scalar_t* u, scalar_t* y, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t begin, int64_t end) {
    acc_t gs[kChunk], us[kChunk], ys[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      for (int64_t i = 0; i < len; ++i) {
        gs[i] = static_cast<acc_t>(g[off + i]);
        us[i] = static_cast<acc_t>(u[off + i]);
      }
      int64_t i = 0;
      const Vec<acc_t> one(acc_t(1));
      for (; i + Vec<acc_t>::size() <= len; i += Vec<acc_t>::size()) {
        const auto gv = Vec<acc_t>::loadu(gs + i);
        (gv / (one + gv.neg().exp()) * Vec<acc_t>::loadu(us + i)).store(ys + i);
      }
      for (; i < len; ++i) ys[i] = gs[i] / (acc_t(1) + std::exp(-gs[i])) * us[i];
      for (i = 0; i < len; ++i) y[off + i] = static_cast<scalar_t>(ys[i]);
    }
  });
}

template <typename scalar_t>
void swiglu_bwd_flat(const scalar_t* dy, const scalar_t* g, const scalar_t* u, scalar_t* dg,
                     scalar_t* du, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t begin, int64_t end) {
    acc_t dys[kChunk], gs[kChunk], us[kChunk], dgs[kChunk], dus[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      for (int64_t i = 0; i < len; ++i) {
        dys[i] = static_cast<acc_t>(dy[off + i]);
        gs[i] = static_cast<acc_t>(g[off + i]);
        us[i] = static_cast<acc_t>(u[off + i]);
      }
      int64_t i = 0;
      const Vec<acc_t> one(acc_t(1));
      for (; i + Vec<acc_t>::size() <= len; i += Vec<acc_t>::size()) {
        const auto gv = Vec<acc_t>::loadu(gs + i), dyv = Vec<acc_t>::loadu(dys + i);
        const auto s = one / (one + gv.neg().exp());
        const auto gs_ = gv * s;
        (dyv * Vec<acc_t>::loadu(us + i) * s * (one + gv * (one - s))).store(dgs + i);
        (dyv * gs_).store(dus + i);
      }
      for (; i < len; ++i) {
        const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-gs[i]));
        dgs[i] = dys[i] * us[i] * s * (acc_t(1) + gs[i] * (acc_t(1) - s));
        dus[i] = dys[i] * gs[i] * s;
      }
      for (i = 0; i < len; ++i) {
        dg[off + i] = static_cast<scalar_t>(dgs[i]);
        du[off + i] = static_cast<scalar_t>(dus[i]);
      }
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
  at::Tensor out = at::empty(like.sizes(), like.options());
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
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
