// Torch binding of the fused RoPE + KV-cache append kernel (csrc/cuda/kv_append_rope.cu).
// Positions are not range-checked here (that would wait on the device); the kernel skips
// sequences whose position is outside [0, Smax).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <utility>

#include "fastllm/cuda/generation.h"
#include "fastllm/cuda_binding.h"

namespace fastllm::cuda {
namespace {

at::Tensor kv_append_rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   at::Tensor k_cache, at::Tensor v_cache,
                                   const at::Tensor& positions, const at::Tensor& inv_freq) {
  check_cuda(q, "q");
  check_dtype(q, "q", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dim(q, "q", 3);
  check_dim(k, "k", 3);
  check_dim(k_cache, "k_cache", 4);
  check_dim(positions, "positions", 1);
  check_dim(inv_freq, "inv_freq", 1);
  check_dtype(positions, "positions", {at::kInt});
  check_dtype(inv_freq, "inv_freq", {at::kFloat});
  const std::pair<const at::Tensor*, const char*> same[] = {
      {&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}};
  for (const auto& [t, name] : same) {
    check_same_device(q, "q", *t, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
                " (same as q), got ", t->scalar_type());
    check_contiguous(*t, name);
  }
  check_same_device(q, "q", positions, "positions");
  check_same_device(q, "q", inv_freq, "inv_freq");
  check_contiguous(q, "q");
  check_contiguous(positions, "positions");
  check_contiguous(inv_freq, "inv_freq");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t Smax = k_cache.size(1);
  TORCH_CHECK(D % 2 == 0, "q: expected an even head_dim, got ", D);
  TORCH_CHECK(k.size(0) == B && k.size(2) == D, "k: expected shape [", B, ", Hkv, ", D, "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (same as k), got ", v.sizes());
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == Hkv && k_cache.size(3) == D,
              "k_cache: expected shape [", B, ", Smax, ", Hkv, ", ", D, "], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected shape ", k_cache.sizes(),
              " (same as k_cache), got ", v_cache.sizes());
  TORCH_CHECK(positions.size(0) == B, "positions: expected shape [", B, "], got ", positions.sizes());
  TORCH_CHECK(inv_freq.size(0) == D / 2, "inv_freq: expected shape [", D / 2,
              "] (head_dim / 2), got ", inv_freq.sizes());
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
