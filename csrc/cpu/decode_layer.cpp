// One decode step of a Llama-family block on the CPU, in one call from Python:
//
//   h = rms_norm(x, norm1);   q, k, v = h W_qkv^T (+ b_qkv)
//   q = rope(q); k_cache[b, p_b] = rope(k); v_cache[b, p_b] = v     (p_b = positions[b])
//   a = decode_attention(q, k_cache, v_cache, lengths, scale)
//   x = x + a W_o^T (+ b_o)
//   h = rms_norm(x, norm2);   g, u = h W_gate_up^T (+ b_gate_up)
//   y = x + swiglu(g, u) W_down^T (+ b_down)
//
// x (B, H) float32; the weights are the block's inference weights (KVCache.fused_projection),
// float32 with unit stride along their input features: W_qkv and W_gate_up each one fused
// tensor, or its parts (q, k, v; gate, up) as separate tensors, multiplied one by one (where one
// row goes to BLAS, the cache keeps the parts: no concatenated copy per generate call). It runs
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
#include <string>
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

// x through a projection group given as one fused weight (split into `split` outputs) or as
// its parts (one weight per output, the bias sliced to match).
std::vector<at::Tensor> linear_parts(const at::Tensor& x, at::TensorList parts, const OptTensor& b,
                                     c10::IntArrayRef split) {
  if (parts.size() == 1) return linear(x, parts[0], b, split);
  std::vector<at::Tensor> outs;
  int64_t start = 0;
  for (size_t s = 0; s < parts.size(); ++s) {
    const int64_t n = parts[s].size(0);
    const OptTensor bs = b.has_value() ? OptTensor(b->narrow(0, start, n)) : std::nullopt;
    outs.push_back(std::move(linear(x, parts[s], bs, {n})[0]));
    start += n;
  }
  return outs;
}

// A projection group's weight checked: one fused (sum of sizes, cols) float32 matrix, or one
// (sizes[s], cols) matrix per part; its bias, if any, (sum of sizes,). A single projection is a
// group of one (sizes = {rows}).
void check_group(at::TensorList parts, const char* name, c10::IntArrayRef sizes, int64_t cols, const OptTensor& b,
                 const char* bias_name) {
  int64_t rows = 0;
  for (int64_t n : sizes) rows += n;
  TORCH_CHECK(parts.size() == 1 || parts.size() == sizes.size(), name, ": expected one fused tensor or ",
              sizes.size(), " parts, got ", parts.size(), " tensors");
  for (size_t s = 0; s < parts.size(); ++s) {
    check_dim(parts[s], name, 2);
    check_dtype(parts[s], name, {at::kFloat});
    const int64_t want = parts.size() == 1 ? rows : sizes[s];
    TORCH_CHECK(parts[s].size(0) == want && parts[s].size(1) == cols, name, ": expected ",
                parts.size() == 1 ? "shape [" : "part " + std::to_string(s) + " of shape [", want, ", ", cols,
                "], got ", parts[s].sizes());
  }
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == rows, bias_name, ": expected shape [", rows, "], got ", b->sizes());
  }
}

// y += x elementwise (y a fresh output of the same shape): the residual add, in the order the
// per-op branch's x + y computes it (float addition commutes exactly).
void add_into(at::Tensor& y, const at::Tensor& x) {
  float* out = y.mutable_data_ptr<float>();
  const float* in = x.const_data_ptr<float>();
  const int64_t n = y.numel();
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] + out[i];
}

at::Tensor decode_layer_cpu(const at::Tensor& x, const at::Tensor& norm1, double eps1, at::TensorList w_qkv,
                            const OptTensor& b_qkv, const at::Tensor& w_o, const OptTensor& b_o,
                            const at::Tensor& norm2, double eps2, at::TensorList w_gate_up,
                            const OptTensor& b_gate_up, const at::Tensor& w_down, const OptTensor& b_down,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& positions,
                            const at::Tensor& lengths, const at::Tensor& inv_freq, double scale) {
  check_dim(x, "x", 2);
  check_dtype(x, "x", {at::kFloat});
  check_contiguous(x, "x");
  check_dim(k_cache, "k_cache", 4);
  const int64_t B = x.size(0), H = x.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  // Hq from the q rows (the first of three parts, or the fused rows less k's and v's); the
  // intermediate size likewise from gate's rows
  TORCH_CHECK(!w_qkv.empty() && w_qkv[0].dim() == 2, "w_qkv: expected one (rows, ", H, ") tensor or three, got ",
              w_qkv.size(), " tensors");
  const int64_t q_rows = w_qkv.size() == 3 ? w_qkv[0].size(0) : w_qkv[0].size(0) - 2 * Hkv * D;
  TORCH_CHECK(q_rows > 0 && q_rows % D == 0, "w_qkv: expected (Hq + 2 * ", Hkv, ") * ", D, " rows of ", H,
              " columns in all (q, k and v rows; Hkv and head_dim from k_cache), got ", w_qkv[0].sizes(),
              w_qkv.size() == 3 ? " as q" : "");
  const int64_t Hq = q_rows / D;
  check_group(w_qkv, "w_qkv", {Hq * D, Hkv * D, Hkv * D}, H, b_qkv, "b_qkv");
  check_group(w_o, "w_o", {H}, Hq * D, b_o, "b_o");
  TORCH_CHECK(!w_gate_up.empty() && w_gate_up[0].dim() == 2, "w_gate_up: expected one (rows, ", H,
              ") tensor or two, got ", w_gate_up.size(), " tensors");
  const int64_t inter = w_gate_up.size() == 2 ? w_gate_up[0].size(0) : w_gate_up[0].size(0) / 2;
  check_group(w_gate_up, "w_gate_up", {inter, inter}, H, b_gate_up, "b_gate_up");
  check_group(w_down, "w_down", {H}, inter, b_down, "b_down");

  static const auto append_rope =
      fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor,
                            const at::Tensor&, const at::Tensor&)>("fastllm::kv_append_rope_fwd");
  static const auto attention =
      fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "fastllm::decode_attention_fwd");
  static const auto swiglu = fastllm_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastllm::swiglu_fwd");

  // attention
  auto qkv = linear_parts(rms_norm(x, norm1, eps1), w_qkv, b_qkv, {Hq * D, Hkv * D, Hkv * D});
  at::Tensor q = append_rope.call(qkv[0].view({B, Hq, D}), qkv[1].view({B, Hkv, D}), qkv[2].view({B, Hkv, D}),
                                  k_cache, v_cache, positions, inv_freq);
  at::Tensor a = attention.call(q, k_cache, v_cache, lengths, scale);
  at::Tensor h = std::move(linear(a.view({B, Hq * D}), w_o, b_o, {H})[0]);
  add_into(h, x);
  // MLP
  auto gate_up = linear_parts(rms_norm(h, norm2, eps2), w_gate_up, b_gate_up, {inter, inter});
  at::Tensor y = std::move(linear(swiglu.call(gate_up[0], gate_up[1]), w_down, b_down, {H})[0]);
  add_into(y, h);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("decode_layer_fwd", &decode_layer_cpu); }

}  // namespace fastllm::cpu
