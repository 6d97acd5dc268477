// Every schema of the compiled ops, defined once. Implementations register themselves per
// device with TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
// Autograd, fake (meta) implementations and backend choice live in fastllm/ops/<op>.py.
#include <torch/library.h>

#include <string>

#include "fastllm/cpu_isa.h"
#include "fastllm/cpu_mm.h"

// Python's `import fastllm._C` needs a module init function; the ops themselves are
// registered by the static initialisers below when the shared library is loaded.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

std::string cpu_isa_op() { return fastllm::cpu::cpu_isa_name(); }

TORCH_LIBRARY(fastllm, m) {
  // c = a b (+ c when accumulate) in float32 on the CPU (csrc/cpu/gemm.cpp): a and b each
  // row-major or a transposed view, c with unit column stride; the chunked logits-free ops'
  // products and fastllm.ops.linear's.
  m.def("mm_f32_out_(Tensor(a!) c, Tensor a, Tensor b, bool accumulate) -> ()");
  // An uninitialised CPU tensor, from the CPU ops' output pool where it is one of at least 1 MiB
  // (output_empty, fastllm/cpu_mm.h): the Python ops' outputs and scratch blocks on the CPU
  // (fastllm.ops._backend.new_output).
  m.def("pooled_empty(int[] size, ScalarType dtype) -> Tensor", &fastllm::cpu::pooled_empty);
  // The vector ISA of the CPU kernels' dispatched bodies: "avx512", "avx2" or "none" (the CPU's
  // widest, capped by FASTLLM_CPU_ISA; csrc/include/fastllm/cpu_isa.h).
  m.def("cpu_isa() -> str", &cpu_isa_op);
  // Who runs the large float32 products of the CPU ops: "tile" (the tile kernel) or "blas"
  // (torch's BLAS); the CPU's default, or FASTLLM_CPU_PRODUCTS (csrc/include/fastllm/cpu_isa.h),
  // until set_cpu_products("tile" | "blas" | "default") changes it for the process.
  m.def("cpu_products() -> str", &fastllm::cpu::cpu_products_name);
  m.def("set_cpu_products(str name) -> ()", &fastllm::cpu::set_cpu_products);
  // RMSNorm: x (..., H) contiguous, weight (H,). y = x * rsqrt(mean(x^2) + eps) * weight,
  // computed in float32 (float64 for float64 inputs).
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> Tensor");
  // Returns (grad_x, grad_weight); rsqrt(mean(x^2) + eps) is recomputed, not stored.
  m.def("rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");

  // RoPE (rotate-half layout): q (N, Hq, D), k (N, Hkv, D) contiguous; cos, sin (N, D/2) in
  // float32 (float64 for float64 q). Returns (rotated q, rotated k); inverse=True negates
  // sin, which is the backward.
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
  // SwiGLU: y = silu(gate) * up elementwise; gate and up contiguous, same shape and dtype.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  // Returns (grad_gate, grad_up); sigmoid(gate) is recomputed.
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");

  // Linear for a few rows (a decode step's projections and LM head), CPU: x (M, K) float32
  // with unit stride along K, weight (N, K) float32 with unit stride along K (nn.Linear's
  // layout), bias (N,) or None, split: output widths summing to N ([]: one output). Returns
  // y = x weight^T + bias (M, N) as contiguous (M, split[i]) column blocks. Inference only.
  m.def("small_linear_fwd(Tensor x, Tensor weight, Tensor? bias, int[] split) -> Tensor[]");
  // Whether small_linear_fwd hands a product of `rows` rows of x to torch's BLAS (one row on an
  // Intel CPU whose products engine is BLAS; csrc/cpu/small_linear.cpp) instead of its own kernel.
  m.def("small_linear_on_blas(int rows) -> bool", &fastllm::cpu::small_linear_on_blas);

  // LoRA linear: x (rows, in), weight (out, in), bias (out,) or None, lora_a (r, in),
  // lora_b (out, r), keep bool (rows, in) or None. y = x W^T + b + scale * (xd A^T) B^T with
  // xd = x * keep / (1 - dropout_p). Returns (y (rows, out), u = xd A^T (rows, r)).
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scale, Tensor? keep, float dropout_p) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_lora_a, grad_lora_b); no gradient for the frozen weight and bias.
  m.def("lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor u, float scale, Tensor? keep, float dropout_p) -> (Tensor, Tensor, Tensor)");
  // A group of LoRA linears on the same x (a layer's q/k/v, gate/up), no dropout: weights[i],
  // biases[i], lora_a[i], lora_b[i], scales[i] as above. Returns [y_0 .. y_n-1, u_0 .. u_n-1];
  // the backward [grad_x (summed over the group), grad_lora_a_0 .., grad_lora_b_0 ..].
  m.def("lora_linear_group_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] lora_a, "
        "Tensor[] lora_b, float[] scales) -> Tensor[]");
  m.def("lora_linear_group_bwd(Tensor[] grad_outs, Tensor x, Tensor[] weights, Tensor[] lora_a, "
        "Tensor[] lora_b, Tensor[] us, float[] scales) -> Tensor[]");

  // Attention (flash-style, online softmax) on the packed layout of
  // fastllm/ops/_attention_layout.py: q (total_q, Hq, D), k/v (total_k, Hkv, D) contiguous,
  // cu_q/cu_k (B+1,) int32 offsets, keep (total_k,) int8 (0 = padded key) or None, and the
  // first n_prefix keys of each sequence visible to every query. Causal: query i sees key j
  // when j < n_prefix or j <= i + k_len - q_len. Returns (out, lse (Hq, total_q) float32,
  // float64 for float64 inputs; +inf for a query that sees no key).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, Tensor? keep, "
        "int n_prefix, bool causal, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v); deterministic (no atomics), scores recomputed from lse.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_q, Tensor cu_k, Tensor? keep, int n_prefix, bool causal, float scale) "
        "-> (Tensor, Tensor, Tensor)");

  // Cross-entropy family (csrc/cpu/cross_entropy.cpp): row kernels for one chunk of logits
  // (rows, V) with unit stride along V; the chunked matmuls around them stay in ATen.
  // Per row: loss = (1-eps)(lse - z_y) + eps (lse - mean z) + z_loss lse^2 with
  // z = softcap * tanh(x / softcap) (softcap 0: z = x). Returns (loss, lse) in float32
  // (float64 for float64 logits); with compute_grad the gradient times row_scale
  // overwrites logits. Rows labelled ignore_index: loss 0, zero gradient.
  m.def("xent_rows_(Tensor(a!) logits, Tensor labels, Tensor row_scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap, bool compute_grad) -> (Tensor, Tensor)");
  // z = logits * inv_temperature: returns (log p(target), entropy); logprob 0 for ignore_index.
  m.def("logprob_rows(Tensor logits, Tensor targets, int ignore_index, float inv_temperature) "
        "-> (Tensor, Tensor)");
  // Overwrites logits with d(sum g*logprob + h*entropy)/d(logits) for the given g, h.
  m.def("logprob_rows_bwd_(Tensor(a!) logits, Tensor targets, Tensor grad_logprob, "
        "Tensor grad_entropy, int ignore_index, float inv_temperature) -> ()");
}

// ---------------------------------------------------------------------------- generation
// Inference-only ops of the rollout engine (no autograd). Shapes and semantics are
// documented in fastllm/ops/{decode_attention,sampling,kv_append_rope,decode_layer}.py.
TORCH_LIBRARY_FRAGMENT(fastllm, m) {
  // One new query per sequence against a preallocated cache: q (B, Hq, D), k_cache/v_cache
  // (B, Smax, Hkv, D), lengths (B,) int32 keys to attend to -> out (B, Hq, D).
  m.def("decode_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
  // Temperature / top-k / top-p sampling from given uniforms: logits (B, V) float32,
  // temperature (B,) float32 (0: greedy), top_k (B,) int32 (0: off), top_p (B,) float32
  // (>= 1: off), uniforms (B,) float32 in [0, 1) -> (tokens (B,) int64, logprobs (B,) float32).
  m.def("sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniforms) -> (Tensor, Tensor)");
  // RoPE on the new q and k at positions (B,) int32, k and v written into the caches at
  // those positions: q (B, Hq, D), k/v (B, Hkv, D), caches (B, Smax, Hkv, D),
  // inv_freq (D/2,) float32 -> rotated q (B, Hq, D).
  m.def("kv_append_rope_fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor inv_freq) -> Tensor");
  // One Llama-family block's decode step in one call (CPU; csrc/cpu/decode_layer.cpp):
  // x (B, H) float32, the block's norms and inference weights (q/k/v rows and gate/up rows, each
  // group one fused tensor or its parts), the layer's caches as for kv_append_rope_fwd -> the
  // block's output (B, H).
  m.def("decode_layer_fwd(Tensor x, Tensor norm1, float eps1, Tensor[] w_qkv, Tensor? b_qkv, Tensor w_o, "
        "Tensor? b_o, Tensor norm2, float eps2, Tensor[] w_gate_up, Tensor? b_gate_up, Tensor w_down, "
        "Tensor? b_down, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor lengths, "
        "Tensor inv_freq, float scale) -> Tensor");
}
