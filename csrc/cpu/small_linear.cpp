// A linear layer for a few rows on the CPU: y (M, N) = x (M, K) W^T + b, with W (N, K)
// row-major as nn.Linear holds it, its columns optionally written as several contiguous
// outputs (`split`: a fused q/k/v or gate/up product straight into its parts, no copies).
// This is the decode step's product: M is the batch (1-64 rows), and W (a layer's projections, the LM head) is far larger than the caches, so the
// step streams every weight once from memory.
//
// Why not BLAS: for these shapes the BLAS in the torch wheel reads the weights at ~12 GB/s at
// M = 1 (a third of the machine's read bandwidth) and reaches ~45 GFLOP/s per core at M = 16
// (half the FMA peak) on an AMD CPU; bench/README.md has the numbers. Where the CPU's products
// engine is BLAS on an Intel CPU (MKL, fastllm/cpu_isa.h), one row (M = 1) goes to it: MKL's
// matrix-vector product streams the decode step's weights ~4% faster than this kernel there,
// while from 2 rows on this kernel is faster (at M = 16, 35 against 47 ms a step). On an AMD
// Zen 3 MKL's one-row product took 1.8x this kernel's time, so one row stays here
// (small_linear_on_blas, fastllm/cpu_mm.h).
//
// Here each tile of NR weight rows is read once from memory into L1 and multiplied there by
// every row of x, as dot products along K (no packing, no transposed copy of W), MR rows of x x
// NR rows of W at a time in vector accumulators, reduced across lanes at the end of the row.
// Threads split N.
//
// The sums run in a different order from BLAS (lane-wise partial sums, then a tree across
// lanes), so results match F.linear to float32 rounding, not bit for bit.
//
// ISA: an AVX-512 body (16-lane vectors, 4 x 4 tiles: 16 accumulators + 5 operands of the 32
// registers), an AVX2+FMA body (8 lanes, 2 x 4 tiles: 13 of 16 registers) and a portable
// body, picked once at load time from the CPU's features.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastllm/balanced_for.h"
#include "fastllm/checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/cpu_mm.h"  // small_linear_on_blas
#include "fastllm/cpu_simd.h"  // FASTLLM_ALWAYS_INLINE
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // load, lane_sum, reduce_all

namespace fastllm::cpu {
namespace {


constexpr int kMaxSplit = 8;

struct Problem {
  const float* x;
  int64_t ldx;  // row stride of x
  const float* w;
  int64_t ldw;  // row stride of W
  const float* bias;  // (N,) or nullptr
  int64_t M, N, K;
  // the output columns in nseg contiguous (M, start[s + 1] - start[s]) tensors
  int nseg;
  int64_t start[kMaxSplit + 1];
  float* out[kMaxSplit];

  // the part holding output column n
  inline int segment(int64_t n) const {
    int s = 0;
    while (s + 1 < nseg && n >= start[s + 1]) ++s;
    return s;
  }
  inline float* at(int64_t m, int64_t n) const {
    const int s = segment(n);
    return out[s] + m * (start[s + 1] - start[s]) + (n - start[s]);
  }
};

// How many weight tiles ahead `tile` prefetches, into L2 (locality hint 2: prefetcht1). One tile
// ahead into L1 (prefetcht0) left the weight stream short of the memory: alternating processes on
// the development CPU (2 threads, the SmolLM2 decode step's 121 products), 4 tiles ahead into L2
// took batch 1 from 28-33 to 22-24 ms and batch 16 from 43-46 to 33-40 ms (bench/README.md).
// From 5 rows of x on, each weight tile is multiplied in several passes (one per MR rows of x),
// and the prefetches are spread over all of them: issued in the first pass only, they kept the
// memory busy a quarter of the time at 16 rows. Spread, the SmolLM2 decode step's 121 products
// took 31.3-31.6 against 46.4-46.9 ms at 16 rows, 102 against 144-151 ms at 64 and 25.5-26.7
// against 29.5-29.8 ms at 8 (Intel Xeon, 2 threads; 2, 8 and 16 tiles ahead, and the other
// locality hints, measured no better). Whole rows (or row segments) per pass, with no
// schedule kept in the loop, took 75.6-77.5 against 79.4-80.8 ms at 64 rows and 24.5-24.6
// against 24.9-25.3 ms at 8, the same at 16 (bench/README.md).
constexpr int64_t kPrefetchTiles = 4;

// s (MR x NR) into y[m:m+MR, n:n+NR]: straight into one output when the tile's columns lie in
// one part of the split (every tile but those across a boundary), else value by value.
template <int MR, int NR>
FASTLLM_ALWAYS_INLINE void store_tile(const Problem& p, int64_t m, int64_t n, const float* s) {
  const int seg = p.segment(n);
  if (n + NR <= p.start[seg + 1]) {
    const int64_t width = p.start[seg + 1] - p.start[seg];
    float* y = p.out[seg] + m * width + (n - p.start[seg]);
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) y[i * width + j] = s[i * NR + j];
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) *p.at(m + i, n + j) = s[i * NR + j];
  }
}

#ifdef FASTLLM_HAVE_VECTORS
// acc[i * NR + j] += x_i[k] * w_j[k], lane by lane, over the whole vectors k in [k0, k1): x_i
// row i of x at x, w_j row j of W at w. While it multiplies it prefetches R weight rows from pf
// (row j at pf + j * ldw), one 64-byte line of each per vector step while k - k0 < k_pf. The
// loop holds nothing but its pointers and one bound: an earlier version kept a general prefetch
// schedule in the loop, which spilled the row pointers to the stack (~45 instructions per 16
// multiply-adds, ~32 now).
template <class V, int MR, int NR, int R>
FASTLLM_ALWAYS_INLINE void multiply(const Problem& p, const float* x, const float* w, int64_t k0, int64_t k1,
                                    const float* pf, int64_t k_pf, V* acc) {
  constexpr int L = sizeof(V) / sizeof(float);
  constexpr int kStep = 16 / L;  // lines are 16 floats: k advances a line every kStep steps
  for (int64_t k = k0; k < k1; k += L) {
    if (k - k0 < k_pf) {
      for (int j = 0; j < R; ++j) __builtin_prefetch(pf + j * p.ldw + (k - k0) * kStep, 0, 2);
    }
    V wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load<V>(w + j * p.ldw + k);
    for (int i = 0; i < MR; ++i) {
      const V xv = load<V>(x + i * p.ldx + k);
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += xv * wv[j];
    }
  }
}

// y[m:m+MR, n:n+NR] from the tile's lane accumulators: summed across lanes, plus the products of
// the K tail from k on (fewer than a vector), plus the bias.
template <class V, class I, int MR, int NR>
FASTLLM_ALWAYS_INLINE void finish(const Problem& p, int64_t m, int64_t n, const float* x, const float* w, int64_t k,
                                  V* acc) {
  constexpr int L = sizeof(V) / sizeof(float);
  float s[MR * NR];
  if constexpr (MR * NR == L) {
    reduce_all<V, I>(acc, s);
  } else {
    for (int a = 0; a < MR * NR; ++a) s[a] = lane_sum(acc[a]);
  }
  for (; k < p.K; ++k) {
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) s[i * NR + j] += x[i * p.ldx + k] * w[j * p.ldw + k];
    }
  }
  if (p.bias) {
    for (int a = 0; a < MR * NR; ++a) s[a] += p.bias[n + a % NR];
  }
  store_tile<MR, NR>(p, m, n, s);
}

// y[i, j] for i < MR rows of x from row m, j < NR rows of W from row n, prefetching as
// `multiply` does (pf == nullptr: no prefetch).
template <class V, class I, int MR, int NR, int R>
FASTLLM_ALWAYS_INLINE void tile(const Problem& p, int64_t m, int64_t n, const float* pf, int64_t k_pf) {
  constexpr int L = sizeof(V) / sizeof(float);
  const float* x = p.x + m * p.ldx;
  const float* w = p.w + n * p.ldw;
  V acc[MR * NR];
  for (int a = 0; a < MR * NR; ++a) acc[a] = V{};
  const int64_t whole = p.K / L * L;
  multiply<V, MR, NR, R>(p, x, w, 0, whole, pf, pf == nullptr ? 0 : k_pf, acc);
  finish<V, I, MR, NR>(p, m, n, x, w, whole, acc);
}

// Where pass q of `phases` (MR rows of x each) over the weight tile at row n prefetches: from
// *pf, R rows while k < *k_pf (see tile). The tile kPrefetchTiles ahead is prefetched over all
// the passes, so the memory stream runs during every pass: pass q takes R = ceil(NR / phases)
// whole rows of it (phases <= NR), or one segment of a row, phases / NR passes sharing each row
// (phases > NR).
template <int NR, int R>
FASTLLM_ALWAYS_INLINE void prefetch_share(const Problem& p, int64_t n, int64_t q, int64_t phases, int lanes,
                                          const float** pf, int64_t* k_pf) {
  const int64_t row_lines = (p.K + 15) / 16;
  const float* ahead = p.w + (n + kPrefetchTiles * NR) * p.ldw;
  if (phases <= NR) {
    const int64_t row = q * R;
    *pf = row < NR ? ahead + row * p.ldw : nullptr;
    *k_pf = row_lines * lanes;
    return;
  }
  const int64_t share = (phases + NR - 1) / NR;  // passes per row
  const int64_t seg_lines = (row_lines + share - 1) / share;
  const int64_t first = (q % share) * seg_lines;
  *pf = ahead + (q / share) * p.ldw + first * 16;
  *k_pf = std::max<int64_t>(0, std::min(seg_lines, row_lines - first)) * lanes;
}

// W rows [n, n + NR) against every row of x, MR rows at a time, while the tile sits in L1.
template <class V, class I, int MR, int NR, int R>
FASTLLM_ALWAYS_INLINE void tile_passes(const Problem& p, int64_t n) {
  constexpr int L = sizeof(V) / sizeof(float);
  const int64_t phases = (p.M + MR - 1) / MR;
  const float* pf = nullptr;
  int64_t k_pf = 0;
  int64_t m = 0;
  for (; m + MR <= p.M; m += MR) {
    prefetch_share<NR, R>(p, n, m / MR, phases, L, &pf, &k_pf);
    tile<V, I, MR, NR, R>(p, m, n, pf, k_pf);
  }
  const int64_t rest = p.M - m;
  if (rest > 0) prefetch_share<NR, R>(p, n, m / MR, phases, L, &pf, &k_pf);
  if constexpr (MR > 3) {
    if (rest == 3) tile<V, I, 3, NR, R>(p, m, n, pf, k_pf);
  }
  if constexpr (MR > 2) {
    if (rest == 2) tile<V, I, 2, NR, R>(p, m, n, pf, k_pf);
  }
  if constexpr (MR > 1) {
    if (rest == 1) tile<V, I, 1, NR, R>(p, m, n, pf, k_pf);
  }
}

// W rows [n, n + NR) against every row of x, with R, the rows of prefetch a pass issues per
// vector step, fixed at compile time (the loop stays free of bookkeeping): all NR rows of the
// tile ahead in one pass, half of them in each of 2-3 passes, one row (or a segment of one)
// from 4 passes on.
template <class V, class I, int MR, int NR>
FASTLLM_ALWAYS_INLINE void tile_column(const Problem& p, int64_t n) {
  const int64_t phases = (p.M + MR - 1) / MR;
  if (NR == 1 || phases >= NR) {
    tile_passes<V, I, MR, NR, 1>(p, n);
  } else if (phases == 1) {
    tile_passes<V, I, MR, NR, NR>(p, n);
  } else {
    tile_passes<V, I, MR, NR, (NR + 1) / 2>(p, n);
  }
}

// x too large to stay in L1 beside a weight tile (16 rows of 1536 features: 96 KiB; L1 holds
// 48): every pass over a tile then reads its rows of x from L2 again. Where x is exactly one
// pass per tile row (M = MR * NR) and K a whole number of slices, a block of
// kPrefetchTiles tiles goes K-slice by K-slice instead: each slice of x (M x kSliceK) stays in
// L1 for the block's tiles, and the accumulators wait in a scratch block between slices. Every
// lane still sums its products in order of k, so the results are the one-slice order's bit
// for bit. The block kPrefetchTiles tiles ahead is prefetched over all its slices and passes,
// one line per vector step (row q of tile t, slice c, in pass q of tile t in slice c).
constexpr int64_t kSliceK = 256;
constexpr int64_t kSliceMinBytes = 40 * 1024;  // x at least this large goes by slices

template <int MR, int NR>
inline bool use_slices(const Problem& p) {
  return p.M == MR * NR && p.K % kSliceK == 0 && p.M * p.K * int64_t(sizeof(float)) >= kSliceMinBytes;
}

template <class V, class I, int MR, int NR>
FASTLLM_ALWAYS_INLINE void block_by_slices(const Problem& p, int64_t n) {
  constexpr int L = sizeof(V) / sizeof(float);
  constexpr int64_t T = kPrefetchTiles, A = MR * NR;  // tiles per block; accumulators per pass
  alignas(64) V scratch[T * NR * A];
  for (int64_t c0 = 0; c0 < p.K; c0 += kSliceK) {
    for (int64_t t = 0; t < T; ++t) {
      const float* w = p.w + (n + t * NR) * p.ldw;
      for (int64_t q = 0; q < NR; ++q) {  // pass q: rows [q * MR, q * MR + MR) of x
        V* keep = scratch + (t * NR + q) * A;
        V acc[A];
        for (int a = 0; a < A; ++a) acc[a] = c0 == 0 ? V{} : keep[a];
        const float* x = p.x + q * MR * p.ldx;
        const float* pf = p.w + (n + (T + t) * NR + q) * p.ldw + c0;  // row q of tile t + T, slice c0
        multiply<V, MR, NR, 1>(p, x, w, c0, c0 + kSliceK, pf, kSliceK * L / 16, acc);
        if (c0 + kSliceK < p.K) {
          for (int a = 0; a < A; ++a) keep[a] = acc[a];
        } else {
          finish<V, I, MR, NR>(p, q * MR, n + t * NR, x, w, p.K, acc);
        }
      }
    }
  }
}

// Every row of x against W rows [n0, n1): tiles of NR weight rows, the last ones one by one.
// (Plain always-inline templates, no lambdas: a lambda is compiled for the default target and
// would not get the caller's vector ISA.)
template <class V, class I, int MR, int NR>
FASTLLM_ALWAYS_INLINE void rows_range(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (use_slices<MR, NR>(p)) {
    for (; n + kPrefetchTiles * NR <= n1; n += kPrefetchTiles * NR) block_by_slices<V, I, MR, NR>(p, n);
  }
  for (; n + NR <= n1; n += NR) tile_column<V, I, MR, NR>(p, n);
  for (; n < n1; ++n) tile_column<V, I, MR, 1>(p, n);
}
#endif

void rows_range_portable(const Problem& p, int64_t n0, int64_t n1) {
#ifdef FASTLLM_HAVE_VECTORS
  rows_range<v8, i8v, 2, 4>(p, n0, n1);
#else
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) s += p.x[m * p.ldx + k] * p.w[n * p.ldw + k];
      *p.at(m, n) = p.bias ? s + p.bias[n] : s;
    }
  }
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) void rows_range_avx2(const Problem& p, int64_t n0, int64_t n1) {
  rows_range<v8, i8v, 2, 4>(p, n0, n1);
}
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void rows_range_avx512(const Problem& p,
                                                                                      int64_t n0,
                                                                                      int64_t n1) {
  rows_range<v16, i16v, 4, 4>(p, n0, n1);
}
#endif

using RangeFn = void (*)(const Problem&, int64_t, int64_t);

RangeFn pick_body() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cpu_isa() == CpuIsa::kAvx512) return rows_range_avx512;
  if (cpu_isa() == CpuIsa::kAvx2) return rows_range_avx2;
#endif
  return rows_range_portable;
}

const RangeFn kBody = pick_body();

std::vector<at::Tensor> small_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, at::IntArrayRef split) {
  check_dim(x, "x", 2);
  check_dim(weight, "weight", 2);
  check_dtype(x, "x", {at::kFloat});
  check_dtype(weight, "weight", {at::kFloat});
  check_same_device(x, "x", weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "weight: expected ", x.size(1),
              " columns (x has that many features), got shape ", weight.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x: expected unit stride along features, got strides ",
              x.strides());
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1,
              "weight: expected unit stride along features, got strides ", weight.strides());
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  const float* b = nullptr;
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    check_dtype(*bias, "bias", {at::kFloat});
    check_same_device(x, "x", *bias, "bias");
    check_contiguous(*bias, "bias");
    TORCH_CHECK(bias->size(0) == N, "bias: expected ", N, " values (weight rows), got ", bias->size(0));
    b = bias->const_data_ptr<float>();
  }
  std::vector<int64_t> sizes(split.begin(), split.end());
  if (sizes.empty()) sizes.push_back(N);
  TORCH_CHECK(static_cast<int>(sizes.size()) <= kMaxSplit, "split: expected at most ", kMaxSplit,
              " output widths, got ", sizes.size());
  int64_t total = 0;
  for (int64_t n : sizes) {
    TORCH_CHECK(n >= 0, "split: expected non-negative widths, got ", split);
    total += n;
  }
  TORCH_CHECK(total == N, "split: expected widths summing to ", N, " (weight rows), got ", split);
  std::vector<at::Tensor> outs;
  if (N > 0 && K > 0 && small_linear_on_blas(M)) {  // one row on BLAS: see the top of the file
    at::Tensor y = b ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    int64_t start = 0;
    for (int64_t n : sizes) {
      outs.push_back(y.narrow(1, start, n));  // a (1, n) slice of one row: contiguous
      start += n;
    }
    return outs;
  }
  Problem p{x.const_data_ptr<float>(), x.stride(0), weight.const_data_ptr<float>(), weight.stride(0), b, M, N, K,
            static_cast<int>(sizes.size()), {}, {}};
  for (size_t s = 0; s < sizes.size(); ++s) {
    outs.push_back(at::empty({M, sizes[s]}, x.options()));
    p.start[s + 1] = p.start[s] + sizes[s];
    p.out[s] = outs.back().mutable_data_ptr<float>();
  }
  if (M == 0 || N == 0) return outs;
  if (K == 0) {
    for (size_t s = 0; s < sizes.size(); ++s) {
      if (b) {
        outs[s].copy_(bias->narrow(0, p.start[s], sizes[s]).unsqueeze(0));
      } else {
        outs[s].zero_();
      }
    }
    return outs;
  }
  // items: blocks of 16 weight rows (whole tiles for both bodies); work: multiply-adds / 8
  constexpr int64_t kBlock = 16;
  balanced_for((N + kBlock - 1) / kBlock, grain_for(kBlock * M * K / 8), [&](int64_t begin, int64_t end, int64_t) {
    kBody(p, begin * kBlock, std::min(N, end * kBlock));
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("small_linear_fwd", &small_linear_fwd_cpu); }

}  // namespace fastllm::cpu
