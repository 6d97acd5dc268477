// c = a b (+ c) for float32 CPU matrices through the tile kernel (fastllm/tile_mm.h), for the
// Python loops that run large products themselves (the chunked logits-free ops,
// fastllm/ops/_chunked.py, fastllm/ops/linear.py): side by side with torch's own BLAS call on the
// development CPU, on par for x W^T and 6-13% faster for dy W; a transposed a (a weight
// gradient) runs no faster.
// a is row-major or a transposed view (either stride 1), b and c have unit column stride.
// Anything else (other strides, no AVX2) goes to ATen's mm, so the result never depends on
// the layout the caller happened to have.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "fastllm/checks.h"
#include "fastllm/cpu_mm.h"
#include "fastllm/tile_mm.h"

namespace fastllm::cpu {

void tiled_mm_into(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool fits = c.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() &&
                    c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                    b.scalar_type() == at::kFloat && (a.stride(1) == 1 || a.stride(0) == 1) &&
                    b.stride(1) == 1 && c.stride(1) == 1;
  if (fits && gemm_f32(a.size(0), b.size(1), a.size(1), 1.0f, a.const_data_ptr<float>(), a.stride(0),
                       a.stride(1), b.const_data_ptr<float>(), b.stride(0), c.mutable_data_ptr<float>(),
                       c.stride(0), accumulate)) {
    return;
  }
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

at::Tensor tiled_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  tiled_mm_into(c, a, b, false);
  return c;
}

namespace {

void mm_f32_out_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&c, "c"}, {&a, "a"}, {&b, "b"}}) {
    check_dtype(*t, name, {at::kFloat});
    check_dim(*t, name, 2);
  }
  check_same_device(c, "c", a, "a");
  check_same_device(c, "c", b, "b");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, "b: expected ", K, " rows (a's columns), got ", b.size(0));
  TORCH_CHECK(c.size(0) == M && c.size(1) == N, "c: expected shape [", M, ", ", N, "], got ", c.sizes());
  tiled_mm_into(c, a, b, accumulate);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("mm_f32_out_", &mm_f32_out_cpu); }

}  // namespace fastllm::cpu
