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
