// A register-blocked float matrix product for the CPU kernels: the attention's tiles
// (csrc/cpu/attention.cpp) and the large products of training (gemm_f32 below, csrc/cpu/gemm.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastllm/cpu_isa.h"
#include "fastllm/grain.h"
#include "fastllm/cpu_simd.h"     // FASTLLM_ALWAYS_INLINE
#include "fastllm/lane_reduce.h"  // v8, v16, load, FASTLLM_HAVE_VECTORS

namespace fastllm::cpu {

// Float tile products without BLAS. BLAS packs both operands of every call into its own
// panels, and for the attention's tiles (64 x 128 x 64) that copy costs about a third of the
// product. Here C (m x n) = alpha A B (+ C) reads A by element through two strides (A(i, p) at
// a[i * a_rs + p * a_cs]: a row-major tile or a transposed one) and B (k x n) as rows of
// vectors, in blocks of MR rows x NV vectors of accumulators (6 x 4 x 16 lanes on AVX-512,
// 6 x 2 x 8 on AVX2+FMA: the register file), each A element broadcast against the block's B
// vectors. Columns past the last whole vector go through a scalar loop. Picked at load time;
// without AVX2 the tiles go to BLAS.
struct TileMM {
  int64_t m, n, k;
  float alpha;
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool accumulate;  // C += alpha A B, else C = alpha A B
};

#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
namespace tile_mm_detail {
template <class V, int MR, int NV>
FASTLLM_ALWAYS_INLINE void tmm_block(const TileMM& p, int64_t i0, int64_t j0) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  }
  const float* a = p.a + i0 * p.a_rs;
  const float* b = p.b + j0;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load<V>(b + kk * p.ldb + j * L);
    const float* ak = a + kk * p.a_cs;
    for (int i = 0; i < MR; ++i) {
      const V av = V{} + ak[i * p.a_rs];
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* c = p.c + (i0 + i) * p.ldc + j0;
    for (int j = 0; j < NV; ++j) {
      V r = acc[i][j] * p.alpha;
      if (p.accumulate) r += load<V>(c + j * L);
      std::memcpy(c + j * L, &r, sizeof(V));
    }
  }
}

template <class V, int MR, int NV>
FASTLLM_ALWAYS_INLINE void tmm_panel(const TileMM& p, int64_t j0) {
  int64_t i = 0;
  for (; i + MR <= p.m; i += MR) tmm_block<V, MR, NV>(p, i, j0);
  switch (p.m - i) {
    case 5: tmm_block<V, 5, NV>(p, i, j0); break;
    case 4: tmm_block<V, 4, NV>(p, i, j0); break;
    case 3: tmm_block<V, 3, NV>(p, i, j0); break;
    case 2: tmm_block<V, 2, NV>(p, i, j0); break;
    case 1: tmm_block<V, 1, NV>(p, i, j0); break;
    default: break;
  }
}

template <class V, int NV>
FASTLLM_ALWAYS_INLINE void tmm_all(const TileMM& p) {
  constexpr int L = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + NV * L <= p.n; j += NV * L) tmm_panel<V, 6, NV>(p, j);
  const int64_t rest = (p.n - j) / L;  // whole vectors left, fewer than NV
  if constexpr (NV > 3) {
    if (rest == 3) tmm_panel<V, 6, 3>(p, j);
  }
  if constexpr (NV > 2) {
    if (rest == 2) tmm_panel<V, 6, 2>(p, j);
  }
  if constexpr (NV > 1) {
    if (rest == 1) tmm_panel<V, 6, 1>(p, j);
  }
  for (j += rest * L; j < p.n; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      float sum = 0.0f;
      for (int64_t kk = 0; kk < p.k; ++kk) sum += p.a[i * p.a_rs + kk * p.a_cs] * p.b[kk * p.ldb + j];
      float* c = p.c + i * p.ldc + j;
      *c = p.accumulate ? *c + p.alpha * sum : p.alpha * sum;
    }
  }
}

}  // namespace tile_mm_detail

__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) inline void tile_mm_avx512(const TileMM& p) {
  tile_mm_detail::tmm_all<v16, 4>(p);
}
__attribute__((target("avx2,fma"))) inline void tile_mm_avx2(const TileMM& p) {
  tile_mm_detail::tmm_all<v8, 2>(p);
}
#endif

using TileMMFn = void (*)(const TileMM&);

inline TileMMFn pick_tile_mm() {
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
  if (cpu_isa() == CpuIsa::kAvx512) return tile_mm_avx512;
  if (cpu_isa() == CpuIsa::kAvx2) return tile_mm_avx2;
#endif
  return nullptr;
}

inline const TileMMFn kTileMM = pick_tile_mm();

// C (M x N, leading dimension ldc) = alpha A B (+ C when `accumulate`), A(i, p) at
// a[i * a_rs + p * a_cs], B row-major (K x N, ldb), through the tile kernel: threads take
// blocks of kMC rows (and column chunks when the rows are few), each walks K in slices of kKC
// so that the slice of B it sweeps stays in L2 while its rows' A values come from L1. Returns false (nothing done) where the tile kernel
// does not run (no AVX2); the caller then uses BLAS. On the 2-core AVX-512 development CPU it
// runs the training step's products at 179-195 GFLOP/s; torch's own BLAS call, side by side in
// the same process, ran x W^T at 121-198 and dy W 6-13% slower (bench/README.md).
inline bool gemm_f32(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (kTileMM == nullptr) return false;
  constexpr int64_t kMC = 48, kKC = 256;
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill_n(c + i * ldc, N, 0.0f);
    }
    return true;
  }
  // Tasks: row blocks, and column chunks (whole 64-column panels) when there are too few row
  // blocks to keep every thread busy (a few rows against a wide B: the logits of short chunks).
  const int64_t blocks = (M + kMC - 1) / kMC;
  const int64_t want = 4 * int64_t(at::get_num_threads());
  int64_t chunks = blocks >= want ? 1 : std::min((N + 63) / 64, (want + blocks - 1) / blocks);
  const int64_t nc = ((N + chunks - 1) / chunks + 63) / 64 * 64;
  chunks = (N + nc - 1) / nc;
  at::parallel_for(0, blocks * chunks, grain_for(kMC * nc * K / 8), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task / chunks * kMC, rows = std::min(kMC, M - i0);
      const int64_t j0 = task % chunks * nc, cols = std::min(nc, N - j0);
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        kTileMM(TileMM{rows, cols, std::min(kKC, K - k0), alpha, a + i0 * a_rs + k0 * a_cs, a_rs, a_cs,
                       b + k0 * ldb + j0, ldb, c + i0 * ldc + j0, ldc, accumulate || k0 > 0});
      }
    }
  });
  return true;
}

}  // namespace fastllm::cpu
