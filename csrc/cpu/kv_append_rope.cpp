// RoPE on the new token's q and k, fused with the KV-cache append, on the CPU.
// For sequence b at position p = positions[b], angle_i = p * inv_freq_i (i < D/2), in the
// rotate-half layout (x1 = x[:D/2], x2 = x[D/2:]):
//   y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin
// q_out[b] = rope(q[b]); k_cache[b, p] = rope(k[b]); v_cache[b, p] = v[b].
// The angle is formed in float32 (float64 for float64 inputs), as the model's rope_cos_sin
// does, so a decode step rotates exactly as a full forward would.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fastllm/kv_append_rope_checks.h"
#include "fastllm/checks.h"
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"

namespace fastllm::cpu {
namespace {

template <typename scalar_t, typename acc_t>
inline void rotate(const scalar_t* x, scalar_t* y, const acc_t* cos, const acc_t* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const acc_t x1 = static_cast<acc_t>(x[i]), x2 = static_cast<acc_t>(x[i + half]);
    y[i] = static_cast<scalar_t>(x1 * cos[i] - x2 * sin[i]);
    y[i + half] = static_cast<scalar_t>(x2 * cos[i] + x1 * sin[i]);
  }
}

at::Tensor kv_append_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& positions,
                              const at::Tensor& inv_freq) {
  check_dtype(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_kv_append_rope_inputs(q, k, v, k_cache, v_cache, positions, inv_freq);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t Smax = k_cache.size(1), half = D / 2;
  const int32_t* pos = positions.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < Smax, "positions: expected values in [0, ", Smax,
                ") (the cache length), got ", pos[b], " at index ", b);
  }
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  maybe_poison(q_out);
  const float* freq = inv_freq.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "kv_append_rope", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
    scalar_t* kc = k_cache.mutable_data_ptr<scalar_t>();
    scalar_t* vc = v_cache.mutable_data_ptr<scalar_t>();
    // A token's heads are little work: batch them so small steps run inline.
    at::parallel_for(0, B, grain_for((Hq + 2 * Hkv) * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> cos(half), sin(half);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t i = 0; i < half; ++i) {
          const acc_t angle = static_cast<acc_t>(pos[b]) * static_cast<acc_t>(freq[i]);
          cos[i] = std::cos(angle);
          sin[i] = std::sin(angle);
        }
        for (int64_t h = 0; h < Hq; ++h) {
          rotate(qp + (b * Hq + h) * D, qo + (b * Hq + h) * D, cos.data(), sin.data(), half);
        }
        const int64_t slot = (b * Smax + pos[b]) * Hkv * D;
        for (int64_t h = 0; h < Hkv; ++h) {
          rotate(kp + (b * Hkv + h) * D, kc + slot + h * D, cos.data(), sin.data(), half);
        }
        std::copy(vp + b * Hkv * D, vp + (b + 1) * Hkv * D, vc + slot);
      }
    });
  });
  return q_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("kv_append_rope_fwd", &kv_append_rope_cpu); }

}  // namespace fastllm::cpu
