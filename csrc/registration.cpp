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
}
