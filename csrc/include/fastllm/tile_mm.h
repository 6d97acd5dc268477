// A register-blocked float matrix product for the CPU kernels: the attention's tiles
// (csrc/cpu/attention.cpp) and the large products of training (gemm_f32 below, csrc/cpu/gemm.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

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
  // C's lines fetched as the products start, so that their misses overlap the sum
  for (int i = 0; i < MR; ++i) __builtin_prefetch(p.c + (i0 + i) * p.ldc + j0, 1);
  for (int64_t kk = 0; kk < p.k; ++kk) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load<V>(b + kk * p.ldb + j * L);
    const float* ak = a + kk * p.a_cs;
    for (int i = 0; i < MR; ++i) {
      // scalar times vector: one broadcast load. (V{} + a would add a zero to the scalar first,
      // which the compiler may not drop (-0.0 + 0.0 is +0.0): an add and a register broadcast
      // on the FP pipes the products need, for every element.)
      const float av = ak[i * p.a_rs];
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
  j += rest * L;
  if constexpr (L == 16) {  // 8 columns left (a rank-8 LoRA term): one 8-lane vector
    if (p.n - j >= 8) {
      tmm_panel<v8, 6, 1>(p, j);
      j += 8;
    }
  }
  for (; j < p.n; ++j) {
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

// One term of a product sum: alpha A B, A (M x k) with A(i, p) at a[i * a_rs + p * a_cs], B (k x N)
// with B(p, n) at b[p * b_rs + n * b_cs]: row-major (b_cs == 1), or a row-major matrix read
// transposed (b_rs == 1: a weight's or a LoRA factor's .t()), transposed as it is packed.
struct GemmTerm {
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t b_rs, b_cs;
  int64_t k;
  float alpha;
};

namespace tile_mm_detail {
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
// dst (8 rows, row stride ldd) = the transpose of src's 8 x 8 block (row stride ld): 8 row loads,
// 24 in-register shuffles, 8 row stores.
__attribute__((target("avx2"))) inline void transpose_8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  v8 r[8], t[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * ld, sizeof(v8));
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      r[i + h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      r[i + h + 2] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  // r[0..3] hold rows (0, 2, 1, 3) of the 128-bit halves' transposes for source rows 0-3, r[4..7]
  // the same for rows 4-7; joining their halves gives the destination rows
  constexpr int order[4] = {0, 2, 1, 3};
  for (int q = 0; q < 4; ++q) {
    const v8 lo = __builtin_shufflevector(r[order[q]], r[4 + order[q]], 0, 1, 2, 3, 8, 9, 10, 11);
    const v8 hi = __builtin_shufflevector(r[order[q]], r[4 + order[q]], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(dst + q * ldd, &lo, sizeof(v8));
    std::memcpy(dst + (q + 4) * ldd, &hi, sizeof(v8));
  }
}

// dst (kc rows of w floats) = the transpose of src's w rows (row stride ld) x kc columns, in 8 x 8
// blocks; returns the whole blocks' extent (kc8, w8) for the caller to finish the edges.
__attribute__((target("avx2"))) inline void pack_transposed_8x8(float* dst, const float* src, int64_t ld, int64_t kc8,
                                                               int64_t w8, int64_t w) {
  for (int64_t kk = 0; kk < kc8; kk += 8) {
    for (int64_t j = 0; j < w8; j += 8) transpose_8x8(src + j * ld + kk, ld, dst + kk * w + j, w);
  }
}
inline const bool kTranspose8 = cpu_isa() != CpuIsa::kNone;
#else
inline const bool kTranspose8 = false;
#endif

// B's rows [k0, k0 + kc) x columns [n0, n0 + w) into dst as kc rows of w floats, ldd >= w
// apart. A transposed B (b_rs == 1: a weight's or a LoRA factor's .t()) is read as
// the rows of the matrix it views, in 8 x 8 blocks transposed in registers, so packing it costs
// what packing a row-major B does.
inline void pack_panel(float* dst, const GemmTerm& t, int64_t k0, int64_t kc, int64_t n0, int64_t w, int64_t ldd) {
  if (t.b_cs == 1) {
    for (int64_t kk = 0; kk < kc; ++kk) std::memcpy(dst + kk * ldd, t.b + (k0 + kk) * t.b_rs + n0, w * sizeof(float));
    return;
  }
  const float* src = t.b + n0 * t.b_cs + k0 * t.b_rs;  // B(k0, n0): row n0 of the viewed matrix
  int64_t kc8 = 0, w8 = 0;
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
  if (kTranspose8 && t.b_rs == 1) {
    kc8 = kc / 8 * 8;
    w8 = w / 8 * 8;
    pack_transposed_8x8(dst, src, t.b_cs, kc8, w8, ldd);
  }
#endif
  for (int64_t kk = 0; kk < kc; ++kk) {  // what the 8 x 8 blocks left: the last rows and columns
    for (int64_t j = (kk < kc8 ? w8 : 0); j < w; ++j) dst[kk * ldd + j] = src[kk * t.b_rs + j * t.b_cs];
  }
}

// The calling thread's buffer for gemm_f32's packed B (kPackingFloats floats: the most either
// layout packs at once), allocated on the thread's first product and kept for its next ones, so
// no product allocates (or, past malloc's mmap threshold, maps and first-touches) its own.
constexpr int64_t kPackingFloats = 320 * 1024;
inline float* packing_buffer() {
  thread_local std::unique_ptr<float[]> buf(new float[kPackingFloats]);
  return buf.get();
}

#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
// One task of the AVX2 products (gemm_f32 below): C's rows [i0, i1) x columns [j0, j1) = the sum
// of the terms. For each slice of kc of a term's K (kc from K alone, so a row's rounding never
// depends on how many rows the product has or how they are split), the task packs its columns
// of B into strips of 16 (`buf`; kc x 16 contiguous, which L1 holds), then sweeps blocks of kMC
// rows of A (L2 holds a block's slice), each strip over the block's rows through the tile
// kernel's 6 x 16 register blocks, A read in place.
__attribute__((target("avx2,fma"))) inline void strips_task(int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                                           const GemmTerm* terms, int nterms, float* c, int64_t ldc,
                                                           bool accumulate, int64_t kc_max, float* buf) {
  constexpr int64_t kMC = 96;
  bool acc = accumulate;
  for (int t = 0; t < nterms; ++t) {
    const GemmTerm& term = terms[t];
    const int64_t slices = (term.k + kc_max - 1) / kc_max, kc_even = (term.k + slices - 1) / slices;
    for (int64_t k0 = 0; k0 < term.k; k0 += kc_even) {
      const int64_t kc = std::min(kc_even, term.k - k0);
      for (int64_t j = j0; j < j1; j += 16) pack_panel(buf + (j - j0) * kc, term, k0, kc, j, std::min<int64_t>(16, j1 - j), 16);
      for (int64_t ib = i0; ib < i1; ib += kMC) {
        const int64_t rows = std::min(kMC, i1 - ib);
        for (int64_t j = j0; j < j1; j += 16) {
          tmm_all<v8, 2>(TileMM{rows, std::min<int64_t>(16, j1 - j), kc, term.alpha,
                                term.a + ib * term.a_rs + k0 * term.a_cs, term.a_rs, term.a_cs, buf + (j - j0) * kc, 16,
                                c + ib * ldc + j, ldc, acc});
        }
      }
      acc = true;
    }
  }
}
#endif
}  // namespace tile_mm_detail

// C (M x N, leading dimension ldc) = the sum of the terms' alpha A B (+ C when `accumulate`),
// through the tile kernel: the LoRA op's base product and low-rank term in one pass (x W^T +
// s u B^T, dy W + g A). Returns false (nothing done) where the tile kernel does not run (no
// AVX2); the caller then uses BLAS.
//
// On AVX2: 16-column strips (strips_task, the branch below). On AVX-512: tasks are groups of
// 64-column panels of B, split into parts of at most kMaxRows rows when the
// groups are too few to keep every thread busy (or the rows too many for L2). For each K slice
// of kKC a task copies its panels of B into one contiguous buffer, panel-major (kKC rows of 64
// floats per panel, which L2 holds; a transposed B is transposed in this copy), and the kernel
// sweeps each panel once per block of 6 of the part's rows, their A values coming from L2. So
// each slice of B is read from memory once per part, however large B is, and the panels' rows
// sit next to each other: read in place, a panel strides by B's row length, which for the LM
// head transposed (196 KB) maps its rows onto a few cache sets. Side by side with torch's own
// BLAS call (MKL) in one process, 2 cores: on an AMD Zen 4 the head's 256-row chunks at 180-188
// GFLOP/s (BLAS 131-181), the training step's products on par to 10% faster at 2048 rows and
// 3-25% faster at 64-512 rows; on an AMD Zen 5 the step's products at 2048 rows at 309-374
// GFLOP/s (82-87% of the cores' FMA peak) against MKL's 164-187 (bench/README.md).
inline bool gemm_f32(int64_t M, int64_t N, const GemmTerm* terms, int nterms, float* c, int64_t ldc,
                     bool accumulate) {
  if (kTileMM == nullptr) return false;
  if (M == 0 || N == 0) return true;
  int64_t K = 0, kc_max = 0;
  constexpr int64_t kNP = 64, kKC = 256, kMaxRows = 480, kMaxPanels = 4;
  for (int t = 0; t < nterms; ++t) {
    K += terms[t].k;
    kc_max = std::max(kc_max, std::min(kKC, terms[t].k));
  }
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill_n(c + i * ldc, N, 0.0f);
    }
    return true;
  }
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
  if (cpu_isa() == CpuIsa::kAvx2) {
    // Strips of 16 columns (tile_mm_detail::strips_task). Each thread takes a share of the strips
    // (of the rows too when the strips are fewer than the threads: a LoRA factor's 16 columns),
    // in column chunks of kNC whose packed slice of B (kc x kNC, 1.3 MiB) stays in L2 and L3
    // while the rows go by.
    constexpr int64_t kKC = 320, kNC = 1024;
    const int64_t threads = at::get_num_threads(), strips = (N + 15) / 16;
    int64_t n_parts = std::min(threads, strips), m_parts = 1;
    if (n_parts < threads) m_parts = std::min((threads + n_parts - 1) / n_parts, (M + 5) / 6);
    if (M * N * K / 8 < 2 * kMinWorkPerThread) n_parts = m_parts = 1;  // not worth a fork
    const int64_t rows_per = ((M + m_parts - 1) / m_parts + 5) / 6 * 6;
    at::parallel_for(0, n_parts * m_parts, 1, [&](int64_t begin, int64_t end) {
      static_assert(kKC * kNC <= tile_mm_detail::kPackingFloats, "packing_buffer() holds the strips of one column chunk");
      float* buf = tile_mm_detail::packing_buffer();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t np = task % n_parts, mp = task / n_parts;
        const int64_t i0 = std::min(M, mp * rows_per), i1 = std::min(M, i0 + rows_per);
        const int64_t j0 = std::min(N, strips * np / n_parts * 16), j1 = std::min(N, strips * (np + 1) / n_parts * 16);
        for (int64_t jc = j0; jc < j1; jc += kNC) {
          tile_mm_detail::strips_task(i0, i1, jc, std::min(j1, jc + kNC), terms, nterms, c, ldc, accumulate, kKC,
                                      buf);
        }
      }
    });
    return true;
  }
#endif
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t panels = (N + kNP - 1) / kNP;
  const int64_t per_group = std::clamp<int64_t>(panels / want, 1, kMaxPanels);
  const int64_t groups = (panels + per_group - 1) / per_group;
  int64_t parts = (M + kMaxRows - 1) / kMaxRows;
  while (groups * parts < 2 * want && M / (2 * parts) >= 48) parts *= 2;
  const int64_t part_rows = ((M + parts - 1) / parts + 5) / 6 * 6;  // whole 6-row blocks
  parts = (M + part_rows - 1) / part_rows;
  at::parallel_for(0, groups * parts, grain_for(part_rows * per_group * kNP * K / 8), [&](int64_t begin, int64_t end) {
    static_assert(kKC * kMaxPanels * kNP <= tile_mm_detail::kPackingFloats, "packing_buffer() holds a task's panels");
    float* buf = tile_mm_detail::packing_buffer();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task % parts * part_rows, rows = std::min(part_rows, M - i0);
      const int64_t p0 = task / parts * per_group, p1 = std::min(panels, p0 + per_group);
      bool acc = accumulate;
      for (int t = 0; t < nterms; ++t) {
        const GemmTerm& term = terms[t];
        for (int64_t k0 = 0; k0 < term.k; k0 += kKC) {
          const int64_t kc = std::min(kKC, term.k - k0);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t w = std::min(kNP, N - p * kNP);
            tile_mm_detail::pack_panel(buf + (p - p0) * kc_max * kNP, term, k0, kc, p * kNP, w, w);
          }
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t w = std::min(kNP, N - p * kNP);
            kTileMM(TileMM{rows, w, kc, term.alpha, term.a + i0 * term.a_rs + k0 * term.a_cs, term.a_rs, term.a_cs,
                           buf + (p - p0) * kc_max * kNP, w, c + i0 * ldc + p * kNP, ldc, acc});
          }
          acc = true;
        }
      }
    }
  });
  return true;
}

}  // namespace fastllm::cpu
