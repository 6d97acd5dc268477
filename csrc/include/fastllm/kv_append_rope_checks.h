// Argument checks of the fused KV-cache append + RoPE, shared by the CPU kernel and the CUDA
// binding. q (B, Hq, D), k/v (B, Hkv, D), k_cache/v_cache (B, Smax, Hkv, D), positions (B,)
// int32, inv_freq (D/2,) float32. The dtype of q is checked by each device.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "fastllm/checks.h"

namespace fastllm {

inline void check_kv_append_rope_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& positions, const at::Tensor& inv_freq) {
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
  const int64_t B = q.size(0), D = q.size(2), Hkv = k.size(1), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "q: expected an even head_dim, got ", D);
  TORCH_CHECK(k.size(0) == B && k.size(2) == D, "k: expected shape [", B, ", Hkv, ", D, "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (same as k), got ", v.sizes());
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == Hkv && k_cache.size(3) == D,
              "k_cache: expected shape [", B, ", Smax, ", Hkv, ", ", D, "], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected shape ", k_cache.sizes(),
              " (same as k_cache), got ", v_cache.sizes());
  TORCH_CHECK(positions.size(0) == B, "positions: expected shape [", B, "], got ", positions.sizes());
  TORCH_CHECK(inv_freq.size(0) == half, "inv_freq: expected shape [", half, "] (head_dim / 2), got ",
              inv_freq.sizes());
}

}  // namespace fastllm
