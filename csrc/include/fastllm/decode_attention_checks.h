// Argument checks of decode attention, shared by the CPU kernel and the CUDA binding.
//   q (B, Hq, D), k_cache/v_cache (B, Smax, Hkv, D) with Hkv dividing Hq, lengths (B,) int32.
// The dtype of q is checked by each device (float64 exists only on the CPU).
#pragma once

#include <ATen/core/Tensor.h>

#include "fastllm/checks.h"

namespace fastllm {

inline void check_decode_attention_inputs(const at::Tensor& q, const at::Tensor& k_cache,
                                          const at::Tensor& v_cache, const at::Tensor& lengths) {
  check_dim(q, "q", 3);
  check_dim(k_cache, "k_cache", 4);
  check_dim(lengths, "lengths", 1);
  check_same_device(q, "q", k_cache, "k_cache");
  check_same_device(q, "q", v_cache, "v_cache");
  check_same_device(q, "q", lengths, "lengths");
  check_dtype(lengths, "lengths", {at::kInt});
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "k_cache: expected dtype ", q.scalar_type(),
              " (same as q), got ", k_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "v_cache: expected shape ", k_cache.sizes(), " and dtype ", k_cache.scalar_type(),
              " (same as k_cache), got ", v_cache.sizes(), " ", v_cache.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, "k_cache: expected shape [", B,
              ", Smax, Hkv, ", D, "] (batch and head_dim of q), got ", k_cache.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "k_cache: the number of kv heads (", Hkv,
              ") must divide the number of query heads (", Hq, ")");
  TORCH_CHECK(lengths.size(0) == B, "lengths: expected shape [", B, "], got ", lengths.sizes());
}

}  // namespace fastllm
