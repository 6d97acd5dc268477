// Every schema of the compiled ops, defined once. Implementations register themselves per
// device with TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
// Autograd, fake (meta) implementations and backend choice live in fastllm/ops/<op>.py.
#include <torch/library.h>

// Python's `import fastllm._C` needs a module init function; the ops themselves are
// registered by the static initialisers below when the shared library is loaded.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastllm, m) {
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
}

// ---------------------------------------------------------------------------- generation
// Inference-only ops of the rollout engine (no autograd). Shapes and semantics are
// documented in fastllm/ops/{decode_attention,sampling,kv_append_rope}.py.
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
}
