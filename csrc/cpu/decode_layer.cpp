// One decode step of a Llama-family block on the CPU, in one call from Python:
//
//   h = rms_norm(x, norm1);   q, k, v = h W_qkv^T (+ b_qkv)
//   q = rope(q); k_cache[b, p_b] = rope(k); v_cache[b, p_b] = v     (p_b = positions[b])
//   a = decode_attention(q, k_cache, v_cache, lengths, scale)
//   x = x + a W_o^T (+ b_o)
//   h = rms_norm(x, norm2);   g, u = h W_gate_up^T (+ b_gate_up)
//   y = x + swiglu(g, u) W_down^T (+ b_down)
//
// x (B, H) float32; the weights are the block's inference weights (q/k/v and gate/up fused,
// KVCache.fused_projection), float32 with unit stride along their input features. It runs
// exactly the kernels the decode branch calls one by one (rms_norm_fwd, small_linear_fwd,
// kv_append_rope_fwd, decode_attention_fwd, swiglu_fwd), in the same order, so its result
// is the per-op branch's bit for bit. What it saves is the Python between them: at batch 1 a
// block's ~12 op calls and module calls cost more than its kernels other than the products
// (bench/README.md). The kernels are called through the dispatcher, whose per-call cost in C++
// is well under a microsecond.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "fastllm/checks.h"

namespace fastllm::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> fastllm_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("fastllm::rms_norm_fwd");
  return op.call(x, weight, eps);
}

std::vector<at::Tensor> linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                               c10::IntArrayRef split) {
  static const auto op =
      fastllm_op<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::IntArrayRef)>(
          "fastllm::small_linear_fwd");
  return op.call(x, w, b, split);
}

// y += x elementwise (y a fresh output of the same shape): the residual add, in the order the
// per-op branch's x + y computes it (float addition commutes exactly).
void add_into(at::Tensor& y, const at::Tensor& x) {
  float* out = y.mutable_data_ptr<float>();
  const float* in = x.const_data_ptr<float>();
  const int64_t n = y.numel();
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] + out[i];
}

void check_weight(const at::Tensor& w, const char* name, int64_t rows, int64_t cols, const OptTensor& b,
                  const char* bias_name) {
  check_dim(w, name, 2);
  check_dtype(w, name, {at::kFloat});
  TORCH_CHECK(w.size(0) == rows && w.size(1) == cols, name, ": expected shape [", rows, ", ", cols, "], got ",
              w.sizes());
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == rows, bias_name, ": expected shape [", rows, "], got ", b->sizes());
  }
}

at::Tensor decode_layer_cpu(const at::Tensor& x, const at::Tensor& norm1, double eps1, const at::Tensor& w_qkv,
                            const OptTensor& b_qkv, const at::Tensor& w_o, const OptTensor& b_o,
                            const at::Tensor& norm2, double eps2, const at::Tensor& w_gate_up,
                            const OptTensor& b_gate_up, const at::Tensor& w_down, const OptTensor& b_down,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& positions,
                            const at::Tensor& lengths, const at::Tensor& inv_freq, double scale) {
  check_dim(x, "x", 2);
  check_dtype(x, "x", {at::kFloat});
  check_contiguous(x, "x");
  check_dim(k_cache, "k_cache", 4);
  const int64_t B = x.size(0), H = x.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(w_qkv.dim() == 2 && w_qkv.size(0) > 2 * Hkv * D && (w_qkv.size(0) - 2 * Hkv * D) % D == 0,
              "w_qkv: expected shape [(Hq + 2 * ", Hkv, ") * ", D, ", ", H,
              "] (q, k and v rows; Hkv and head_dim from k_cache), got ", w_qkv.sizes());
  const int64_t Hq = (w_qkv.size(0) - 2 * Hkv * D) / D;
  check_weight(w_qkv, "w_qkv", (Hq + 2 * Hkv) * D, H, b_qkv, "b_qkv");
  check_weight(w_o, "w_o", H, Hq * D, b_o, "b_o");
  TORCH_CHECK(w_gate_up.dim() == 2 && w_gate_up.size(0) % 2 == 0, "w_gate_up: expected shape [2 * intermediate, ",
              H, "] (gate rows, then up rows), got ", w_gate_up.sizes());
  const int64_t inter = w_gate_up.size(0) / 2;
  check_weight(w_gate_up, "w_gate_up", 2 * inter, H, b_gate_up, "b_gate_up");
  check_weight(w_down, "w_down", H, inter, b_down, "b_down");

  static const auto append_rope =
      fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor,
                            const at::Tensor&, const at::Tensor&)>("fastllm::kv_append_rope_fwd");
  static const auto attention =
      fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "fastllm::decode_attention_fwd");
  static const auto swiglu = fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastllm::swiglu_fwd");

  // attention
  auto qkv = linear(rms_norm(x, norm1, eps1), w_qkv, b_qkv, {Hq * D, Hkv * D, Hkv * D});
  at::Tensor q = append_rope.call(qkv[0].view({B, Hq, D}), qkv[1].view({B, Hkv, D}), qkv[2].view({B, Hkv, D}),
                                  k_cache, v_cache, positions, inv_freq);
  at::Tensor a = attention.call(q, k_cache, v_cache, lengths, scale);
  at::Tensor h = std::move(linear(a.view({B, Hq * D}), w_o, b_o, {H})[0]);
  add_into(h, x);
  // MLP
  auto gate_up = linear(rms_norm(h, norm2, eps2), w_gate_up, b_gate_up, {inter, inter});
  at::Tensor y = std::move(linear(swiglu.call(gate_up[0], gate_up[1]), w_down, b_down, {H})[0]);
  add_into(y, h);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("decode_layer_fwd", &decode_layer_cpu); }

}  // namespace fastllm::cpu
