// The CPU kernels' float exp approximations, 8-lane vector helpers and target_clones sets,
// defined once.
//
// Each exp is a range reduction x = k ln2 + r, a polynomial in r and 2^k built in the exponent
// bits, written with plain arithmetic and no branches so that the loops calling it vectorise.
// The variants differ on purpose (polynomial, clamp range, what happens below the range); each
// kernel keeps the one its accuracy statement was checked with:
//   exp_nonpos / exp8_nonpos / exp_nonpos_masked   Cephes polynomial (~1 ulp), x clamped at -87;
//                                                  attention, decode attention
//   exp_neg_flush                                  degree-6 polynomial (<= 2.6e-7), 0 below -87.3;
//                                                  sampling
//   exp_bounded                                    the same polynomial, x clamped to [-87.3, 88.7];
//                                                  cross-entropy, log-probs
//   exp_taylor                                     Taylor polynomial (< 3e-7), x clamped to
//                                                  [-87, 88]; SwiGLU
// The double overloads are std::exp (the float64 paths are for gradchecks, not speed).
//
// GCC inlines a function only into callers compiled with the same FP options, and it
// vectorises the clamps of the scalar exps only where comparisons may not trap. So the helpers
// come in two groups, each compiled with the options of the kernels that use it: the attention
// group (f8 helpers, exp_nonpos) with the defaults, the exp_neg_flush / exp_bounded /
// exp_taylor group with no-trapping-math, as in the files that call them (their loops carry
// `#pragma GCC optimize("no-trapping-math")` too). pow2i, used by both, is always inlined.
// Inlined, each body is compiled for its caller's target: the AVX2 clone of a target_clones
// function gets AVX2 code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) || defined(__clang__)
#define FASTLLM_ALWAYS_INLINE static inline __attribute__((always_inline))
#define FASTLLM_FLOORF __builtin_floorf
#else
#define FASTLLM_ALWAYS_INLINE static inline
#define FASTLLM_FLOORF std::floor
#endif

// target_clones: the function is compiled for the baseline and for a wider ISA, picked at load
// time, so one wheel runs everywhere. Three sets, kept as the kernels were checked with them:
// AVX2 alone (no FMA contraction: the f8 kernels), x86-64-v3 (AVX2 + FMA: the loops the
// compiler vectorises), and x86-64-v4 before it (AVX-512 first: the SwiGLU and cross-entropy
// loops).
#if defined(__x86_64__) && !defined(__clang__)
#define FASTLLM_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define FASTLLM_CLONES_AVX2
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define FASTLLM_CLONES_X86_64_V3 __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FASTLLM_CLONES_X86_64_V4 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLLM_CLONES_X86_64_V3
#define FASTLLM_CLONES_X86_64_V4
#endif

namespace fastllm::cpu {

#if defined(__GNUC__) || defined(__clang__)
// f8 values pass between always-inlined helpers, never across a real call, so the AVX
// argument-passing ABI note GCC gives for 32-byte vectors does not apply. It is reported at the
// call sites, in the including file, so it stays off for the rest of that file.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// 2^k for an integral k in [-126, 127].
FASTLLM_ALWAYS_INLINE float pow2i(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}
static inline float splat_as(float, float a) { return a; }

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector types: 8 floats, and their integer lanes (comparison results). Outside a
// target_clones AVX2 clone an f8 is a pair of SSE registers.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

static inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
static inline f8 splat8(float a) { return f8{a, a, a, a, a, a, a, a}; }
static inline f8 splat_as(f8, float a) { return splat8(a); }

// 2^n on 8 lanes, n integral in [-126, 127].
FASTLLM_ALWAYS_INLINE f8 pow2i(f8 n) {
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  return (f8)bits;
}

// The same on 16 lanes (one AVX-512 register in a function compiled for it; the same type as
// lane_reduce.h's v16), for exp_cephes.
typedef float f16l __attribute__((vector_size(64)));
typedef int32_t i16l __attribute__((vector_size(64)));
FASTLLM_ALWAYS_INLINE f16l splat_as(f16l, float a) { return f16l{} + a; }
FASTLLM_ALWAYS_INLINE f16l pow2i(f16l n) {
  const i16l bits = (__builtin_convertvector(n, i16l) + 127) << 23;
  return (f16l)bits;
}
#endif

// The Cephes expf polynomial on float or f8 lanes, for x in [-87, 88] (clamped by the
// caller): k rounded to nearest by the 1.5 * 2^23 trick, r = x - k ln2 with ln2 split in two.
template <typename F>
FASTLLM_ALWAYS_INLINE F exp_cephes(F x) {
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = splat_as(x, 1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2i(n);
}

// exp(x) for x <= 0 in float; below -87 it returns exp(-87) (~1.6e-38).
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  return exp_cephes(x);
}

#if defined(__GNUC__) || defined(__clang__)
// exp_nonpos on 8 lanes.
static inline f8 exp8_nonpos(f8 x) {
  x = x < splat8(-87.0f) ? splat8(-87.0f) : x;
  return exp_cephes(x);
}

// exp(x) on the lanes of an f8 (or an f16l) for the scores of a masked softmax: x clamped to
// [-87, 0], and -inf (a masked score) gives exactly 0.
template <typename V>
FASTLLM_ALWAYS_INLINE V exp_nonpos_masked(V x) {
  const V zero = splat_as(x, 0.0f), lo = splat_as(x, -87.0f);
  const V e = exp_cephes(x < lo ? lo : (x > zero ? zero : x));
  return x == splat_as(x, -std::numeric_limits<float>::infinity()) ? zero : e;
}
#endif
static inline double exp_nonpos(double x) { return std::exp(x); }

// The no-trapping-math group.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// The degree-6 polynomial of exp_neg_flush and exp_bounded, for x in [-87.3, 88.7] (clamped
// by the caller): k = floor(x / ln2 + 1/2), r = x - k ln2 with ln2 split in two.
static inline float exp_deg6(float x) {
  const float k = FASTLLM_FLOORF(x * 1.44269504f + 0.5f);
  const float r = x - k * 0.693145752f - k * 1.42860677e-6f;
  float p = 1.3981999e-3f;
  p = p * r + 8.3334519e-3f;
  p = p * r + 4.1665795e-2f;
  p = p * r + 1.6666665e-1f;
  p = p * r + 5.0000001e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2i(k);
}

// exp(x) for x <= 0, relative error <= 2.6e-7 (checked over every float in [-87.3, 0], with
// and without FMA). Below -87.3 (under the smallest normal float) it returns 0, so -inf
// logits carry no mass.
static inline float exp_neg_flush(float x) {
  const bool under = x < -87.3f;
  x = under ? -87.3f : x;
  const float e = exp_deg6(x);
  return under ? 0.0f : e;
}

// exp(x) with x clamped to [-87.3, 88.7] (relative error ~2e-7 inside): below, exp is under
// the smallest normal float and is returned as ~1e-38 (softmax probabilities that small do not
// change any sum).
static inline float exp_bounded(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  return exp_deg6(x);
}
static inline double exp_bounded(double x) { return std::exp(x); }

// exp(x) with x clamped to [-87, 88], where exp is a normal float: k rounded by the
// 1.5 * 2^23 trick, ln2 split in two for an exact k ln2, exp(r) by a degree-6 Taylor polynomial
// (relative error < 3e-7 on |r| <= ln2/2).
static inline float exp_taylor(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2i(k);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace fastllm::cpu
