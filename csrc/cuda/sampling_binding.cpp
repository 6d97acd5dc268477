// Torch binding of the fused sampling kernel (csrc/cuda/sampling.cu): checks, outputs, stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

#include "fastllm/sampling_checks.h"
#include "fastllm/cuda/generation.h"
#include "fastllm/cuda_binding.h"

namespace fastllm::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits,
                                                      const at::Tensor& temperature,
                                                      const at::Tensor& top_k,
                                                      const at::Tensor& top_p,
                                                      const at::Tensor& uniforms) {
  check_cuda(logits, "logits");
  check_sampling_inputs(logits, temperature, top_k, top_p, uniforms);
  const int64_t B = logits.size(0), V = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options());
  C10_CUDA_CHECK(sample_tokens(logits.const_data_ptr<float>(), temperature.const_data_ptr<float>(),
                               top_k.const_data_ptr<int32_t>(), top_p.const_data_ptr<float>(),
                               uniforms.const_data_ptr<float>(), tokens.mutable_data_ptr<int64_t>(),
                               logprobs.mutable_data_ptr<float>(), B, V,
                               c10::cuda::getCurrentCUDAStream()));
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("sample_tokens", &sample_tokens_cuda); }

}  // namespace fastllm::cuda
