// Argument checks of the fused sampler, shared by the CPU kernel and the CUDA binding.
//   logits (B, V) float32; temperature, top_p, uniforms (B,) float32; top_k (B,) int32.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "fastllm/checks.h"

namespace fastllm {

inline void check_sampling_inputs(const at::Tensor& logits, const at::Tensor& temperature,
                                  const at::Tensor& top_k, const at::Tensor& top_p,
                                  const at::Tensor& uniforms) {
  check_dim(logits, "logits", 2);
  check_dtype(logits, "logits", {at::kFloat});
  check_contiguous(logits, "logits");
  const int64_t B = logits.size(0);
  TORCH_CHECK(logits.size(1) > 0, "logits: expected a non-empty vocabulary, got shape ", logits.sizes());
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&temperature, "temperature"}, {&top_k, "top_k"}, {&top_p, "top_p"}, {&uniforms, "uniforms"}};
  for (const auto& [t, name] : params) {
    check_same_device(logits, "logits", *t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, name, ": expected shape [", B, "], got ", t->sizes());
    check_contiguous(*t, name);
  }
  check_dtype(temperature, "temperature", {at::kFloat});
  check_dtype(top_k, "top_k", {at::kInt});
  check_dtype(top_p, "top_p", {at::kFloat});
  check_dtype(uniforms, "uniforms", {at::kFloat});
}

}  // namespace fastllm
