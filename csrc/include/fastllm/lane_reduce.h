// Lane reductions for the CPU kernels that compute many dot products along a contiguous
// axis (small_linear, decode_attention): each dot product accumulates in one vector of lanes,
// and L of them are reduced together, transposed, into one vector of L sums (log2(L) levels
// of two shuffles and an add) instead of L separate horizontal sums.
//
// The vector types are GCC/Clang vector extensions; inlined into a function compiled for a
// wider ISA (target attribute or clone) they become that ISA's registers.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastllm/cpu_simd.h"  // FASTLLM_ALWAYS_INLINE

#if defined(__GNUC__) || defined(__clang__)
#define FASTLLM_HAVE_VECTORS 1
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors pass only between always-inlined helpers

namespace fastllm::cpu {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef int32_t i8v __attribute__((vector_size(32)));

template <class V>
FASTLLM_ALWAYS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
FASTLLM_ALWAYS_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V>
FASTLLM_ALWAYS_INLINE float lane_sum(V v) {
  constexpr int L = sizeof(V) / sizeof(float);
  float lanes[L];
  std::memcpy(lanes, &v, sizeof(V));
  // pairwise tree: L/2 + L/4 + ... adds, which the compiler keeps in registers
  for (int width = L / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// One level of the transposed lane reduction: u and v hold L / g blocks of g partial sums
// each (block b of u: accumulator u_b, g lanes). The result holds blocks of g / 2 partial sums,
// u's and v's interleaved: block 2b is u_b, block 2b + 1 is v_b. log2(L) levels reduce L
// accumulators to one vector whose lane t is the sum of accumulator bitreverse(t).
template <class V, class I, int G>
FASTLLM_ALWAYS_INLINE V combine(V u, V v) {
  constexpr int L = sizeof(V) / sizeof(float);
  struct Masks {
    int32_t lo[L], hi[L];
  };
  constexpr Masks masks = [] {
    Masks m{};
    for (int l = 0; l < L; ++l) {
      const bool first = (l % (2 * G)) < G;  // first half of a 2G block: from u, else from v
      m.lo[l] = first ? l : L + l;
      m.hi[l] = first ? l + G : L + l - G;
    }
    return m;
  }();
  I lo, hi;
  std::memcpy(&lo, masks.lo, sizeof(I));
  std::memcpy(&hi, masks.hi, sizeof(I));
  return __builtin_shuffle(u, v, lo) + __builtin_shuffle(u, v, hi);
}

// The sums of L accumulators acc[0..L) into out[t] = sum of the lanes of acc[t].
template <class V, class I>
FASTLLM_ALWAYS_INLINE void reduce_all(V* acc, float* out) {
  constexpr int L = sizeof(V) / sizeof(float);
  int n = L;
  // level g = L / 2 combines acc[2i], acc[2i + 1]; each level halves the count
  if constexpr (L >= 16) {
    for (int i = 0; i < n / 2; ++i) acc[i] = combine<V, I, L / 2>(acc[2 * i], acc[2 * i + 1]);
    n /= 2;
  }
  for (int i = 0; i < n / 2; ++i) acc[i] = combine<V, I, (L >= 16 ? L / 4 : L / 2)>(acc[2 * i], acc[2 * i + 1]);
  n /= 2;
  for (int i = 0; i < n / 2; ++i) acc[i] = combine<V, I, (L >= 16 ? L / 8 : L / 4)>(acc[2 * i], acc[2 * i + 1]);
  n /= 2;
  acc[0] = combine<V, I, 1>(acc[0], acc[1]);
  float lanes[L];
  std::memcpy(lanes, &acc[0], sizeof(V));
  for (int t = 0; t < L; ++t) {
    int r = 0;  // bitreverse(t) over log2(L) bits
    for (int b = 1, c = L / 2; b < L; b <<= 1, c >>= 1) r |= (t & b) ? c : 0;
    out[r] = lanes[t];
  }
}

}  // namespace fastllm::cpu
#endif
