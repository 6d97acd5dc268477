// Small vectorised helpers for the CPU kernels, on ATen's portable Vectorized<T>.
// Rows of reduced-precision inputs are widened into a float scratch row first, so every
// kernel body works on acc_t (float, or double for float64) and stays short.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastllm::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Accumulation type: double for double inputs, float otherwise.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// sum(a[i] * b[i]) with two vector accumulators to hide FMA latency.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i), Vec<T>::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + i + W), Vec<T>::loadu(b + i + W), acc1);
  }
  for (; i + W <= n; i += W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + i), Vec<T>::loadu(b + i), acc0);
  }
  alignas(64) T lanes[W];
  (acc0 + acc1).store(lanes);
  T s = T(0);
  for (int64_t l = 0; l < W; ++l) s += lanes[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// bfloat16 <-> float as integer bit operations, which the compiler vectorises (the
// c10::BFloat16 conversions go through a per-element call).
inline void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
inline void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(float));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    d[i] = src[i] != src[i] ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

// Returns a pointer to row `src` as acc_t: the row itself when no conversion is needed,
// otherwise `scratch` filled with the widened values.
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, int64_t n, std::vector<acc_t>& scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    scratch.resize(n);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      bf16_to_float(src, scratch.data(), n);
    } else {
      for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<acc_t>(src[i]);
    }
    return scratch.data();
  }
}

// dst[i] = scalar_t(src[i]) for a row computed in acc_t.
template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    float_to_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace fastllm::cpu
