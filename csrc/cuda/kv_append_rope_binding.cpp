// Torch binding of the fused RoPE + KV-cache append kernel (csrc/cuda/kv_append_rope.cu).
// Positions are not range-checked here (that would wait on the device); the kernel skips
// sequences whose position is outside [0, Smax).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <utility>

#include "fastllm/kv_append_rope_checks.h"
#include "fastllm/cuda/generation.h"
#include "fastllm/cuda_binding.h"

namespace fastllm::cuda {
namespace {

at::Tensor kv_append_rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   at::Tensor k_cache, at::Tensor v_cache,
                                   const at::Tensor& positions, const at::Tensor& inv_freq) {
  check_cuda(q, "q");
  check_dtype(q, "q", {at::kFloat, at::kBFloat16, at::kHalf});
  check_kv_append_rope_inputs(q, k, v, k_cache, v_cache, positions, inv_freq);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t Smax = k_cache.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  maybe_poison(q_out);
  C10_CUDA_CHECK(kv_append_rope_fwd(
      q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), k_cache.mutable_data_ptr(),
      v_cache.mutable_data_ptr(), q_out.mutable_data_ptr(), positions.const_data_ptr<int32_t>(),
      inv_freq.const_data_ptr<float>(), B, Hq, Hkv, Smax, D, to_dtype(q, "q"),
      c10::cuda::getCurrentCUDAStream()));
  return q_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("kv_append_rope_fwd", &kv_append_rope_fwd_cuda); }

}  // namespace fastllm::cuda
