// Torch binding of the split-K decode attention kernel (csrc/cuda/decode_attention.cu):
// checks, the split count, scratch allocation and the stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "fastllm/decode_attention_checks.h"
#include "fastllm/cuda/generation.h"
#include "fastllm/cuda_binding.h"

namespace fastllm::cuda {
namespace {

// Enough (sequence, kv head, split) blocks to fill the GPU twice over, but at least 32 keys
// per warp. Depends only on shapes, never on the lengths, so CUDA graphs stay valid.
int choose_splits(int64_t B, int64_t Hkv, int64_t Smax, int sms) {
  const int64_t want = (2 * static_cast<int64_t>(sms) + B * Hkv - 1) / (B * Hkv);
  const int64_t most = std::max<int64_t>(1, Smax / (32 * kDecodeWarps));
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 64)));
}

at::Tensor decode_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& lengths,
                                     double scale) {
  check_cuda(q, "q");
  check_dtype(q, "q", {at::kFloat, at::kBFloat16, at::kHalf});
  check_decode_attention_inputs(q, k_cache, v_cache, lengths);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Smax = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq / Hkv <= kDecodeMaxGroup, "q: at most ", kDecodeMaxGroup,
              " query heads per kv head are supported on CUDA, got ", Hq / Hkv);
  TORCH_CHECK(D <= kDecodeMaxHeadDim, "q: head_dim at most ", kDecodeMaxHeadDim,
              " is supported on CUDA, got ", D);
  check_contiguous(q, "q");
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_contiguous(lengths, "lengths");
  const c10::cuda::CUDAGuard guard(q.device());
  const int splits = choose_splits(B, Hkv, Smax, sm_count(q));
  const int64_t P = static_cast<int64_t>(splits) * kDecodeWarps;
  at::Tensor out = at::empty(q.sizes(), q.options());
  maybe_poison(out);
  at::Tensor part_acc = at::empty({B, Hq, P, D}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({B, Hq, P, 2}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(decode_attention_fwd(
      q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
      lengths.const_data_ptr<int32_t>(), out.mutable_data_ptr(), part_acc.mutable_data_ptr<float>(),
      part_ml.mutable_data_ptr<float>(), B, Hq, Hkv, Smax, D, splits, static_cast<float>(scale),
      to_dtype(q, "q"), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cuda); }

}  // namespace fastllm::cuda
