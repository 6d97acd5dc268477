// Argument checks shared by every op's host code. Each message names the argument and
// gives the expected and the actual value, so a user can fix the call without reading C++.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

namespace fastllm {

inline std::string dtype_list(std::initializer_list<c10::ScalarType> dtypes) {
  std::string out;
  for (auto d : dtypes) {
    if (!out.empty()) out += ", ";
    out += c10::toString(d);
  }
  return out;
}

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<c10::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK(false, name, ": expected dtype in {", dtype_list(allowed), "}, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, ": expected device ", a.device(),
              " (same as ", a_name, "), got ", b.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
              t.strides(), " for shape ", t.sizes(), " (call .contiguous() first)");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, "-D tensor, got shape ", t.sizes());
}

// FASTLLM_POISON=1 fills freshly allocated outputs with NaN before a kernel runs, so a
// test catches any element the kernel forgot to write.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("FASTLLM_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

// Fills a freshly allocated output with NaN under FASTLLM_POISON=1; returns it.
inline at::Tensor& maybe_poison(at::Tensor& out) {
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastllm
