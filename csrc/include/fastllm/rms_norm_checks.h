// Argument checks of the RMSNorm kernels, shared by the CPU kernel and the CUDA binding.
#pragma once

#include <ATen/core/Tensor.h>

#include "fastllm/checks.h"

namespace fastllm {

inline void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_dtype(x, "x", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_dtype(weight, "weight", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_same_device(x, "x", weight, "weight");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got shape ", x.sizes());
  check_dim(weight, "weight", 1);
  TORCH_CHECK(weight.size(0) == x.size(-1), "weight: expected shape [", x.size(-1),
              "] (the last dimension of x), got ", weight.sizes());
  check_contiguous(x, "x");
  TORCH_CHECK(eps > 0, "eps: expected a positive value, got ", eps);
}

inline void check_rms_norm_grad(const at::Tensor& grad_out, const at::Tensor& x) {
  check_contiguous(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out: expected shape ", x.sizes(),
              " (same as x), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ",
              x.scalar_type(), " (same as x), got ", grad_out.scalar_type());
}

}  // namespace fastllm
