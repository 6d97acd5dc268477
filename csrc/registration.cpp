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

  // LoRA linear: x (rows, in), weight (out, in), bias (out,) or None, lora_a (r, in),
  // lora_b (out, r), keep bool (rows, in) or None. y = x W^T + b + scale * (xd A^T) B^T with
  // xd = x * keep / (1 - dropout_p). Returns (y (rows, out), u = xd A^T (rows, r)).
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scale, Tensor? keep, float dropout_p) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_lora_a, grad_lora_b); no gradient for the frozen weight and bias.
  m.def("lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor u, float scale, Tensor? keep, float dropout_p) -> (Tensor, Tensor, Tensor)");
}
