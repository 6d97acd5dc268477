// Flash-style attention on the CPU: tiled, online softmax, forward and backward.
// The T x S score matrix never exists: one (BLOCK_M x BLOCK_N) tile per thread at a time.
//
// Packed layout (fastllm/ops/_attention_layout.py brings every call to it):
//   q, out (total_q, Hq, D); k, v (total_k, Hkv, D); cu_q, cu_k (B+1,) int32 offsets;
//   keep (total_k,) int8 or None: 0 marks a padded key; the first n_prefix keys of every
//   sequence are prefix keys, visible to every query.
//   visible(i, j) = keep[j] && (!causal || j < n_prefix || j <= i + k_len - q_len)
// Forward, per row i:  o_i = sum_j softmax_j(scale * q_i . k_j) v_j,  lse_i = log sum_j exp(...)
//   (lse_i = +inf and o_i = 0 when row i sees no key).
// Backward, with p_ij = exp(s_ij - lse_i) and delta_i = dO_i . O_i:
//   dV_j = sum_i p_ij dO_i;  dS_ij = p_ij (dO_i . v_j - delta_i);
//   dQ_i = scale sum_j dS_ij k_j;  dK_j = scale sum_i dS_ij q_i.
// No atomics (deterministic), in one of two ways (plan_bwd picks): one pass with a task per
// (batch, kv head) that owns its keys' dK/dV and its query heads' dQ (5 tile products per score),
// or two passes, dQ over (batch, head, query block), then dK/dV over (batch, kv head, key block)
// walking the query heads of its group (7 products, but many more tasks to spread over threads).
// Both walk a group's query heads against one K/V tile (GQA without repeating K/V).
//
// Float tile products go through the tile kernel below (AVX-512 or AVX2+FMA, no packing) where
// their B operand is row-major: P V, P^T dO, dS^T Q, dS K always, and the score products q k^T
// and dO v^T on a transposed K/V tile wherever one transpose serves several products (a group's
// heads, a key tile's query tiles). The rest, float64, CPUs without AVX2, and every tile where
// the CPU's products engine is BLAS (tile_products(), fastllm/cpu_mm.h: MKL on an Intel CPU,
// where MKL's tiles made the step's attention forward and backward ~8% faster) use BLAS
// (sgemm_/dgemm_, exported by the MKL that torch links) when that symbol is present, and a
// plain loop otherwise. Reduced-precision inputs are widened to float tiles first; all
// accumulation is float (double for float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/cpu_mm.h"  // tile_products
#include "fastllm/cpu_simd.h"
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // load
#include "fastllm/tile_mm.h"

// Fortran BLAS, resolved at load time if the process has it (torch's MKL does); weak so the
// extension still loads, and falls back to the loop below, where it does not.
extern "C" {
__attribute__((weak)) void sgemm_(const char*, const char*, const int*, const int*, const int*,
                                  const float*, const float*, const int*, const float*,
                                  const int*, const float*, float*, const int*);
__attribute__((weak)) void dgemm_(const char*, const char*, const int*, const int*, const int*,
                                  const double*, const double*, const int*, const double*,
                                  const int*, const double*, double*, const int*);
// MKL's per-thread thread count, C interface (the lowercase symbol is the Fortran one, by
// pointer): returns the previous value; 0 means the global setting.
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int);
}

namespace fastllm::cpu {
namespace {

constexpr int64_t BLOCK_M = 64;   // queries per tile
constexpr int64_t BLOCK_N = 128;  // keys per tile

// Tile products are small: BLAS must not start threads of its own inside a task. MKL does,
// for every tile, when a task loop runs inline (outside an OpenMP parallel region), which is
// what small shapes do. Held for the duration of a task loop.
struct SerialBlas {
  int previous = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};

// Row-major C (m x n) = alpha * op(A) * op(B) + beta * C, op(A) is m x k, op(B) is k x n.
// Row-major C is column-major C^T = op(B)^T op(A)^T, hence the swapped BLAS call.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (kTileMM != nullptr && tile_products() && !trans_b && (beta == 0.0f || beta == 1.0f)) {
      kTileMM(TileMM{m, n, k, alpha, a, trans_a ? 1 : lda, trans_a ? lda : 1, b, ldb, c, ldc, beta == 1.0f});
      return;
    }
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
      return;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const T av = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j * ldb + p];
      } else {
        const T* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
      }
    }
  }
}

// Score columns through the tile kernel are computed in multiples of the widest vector (16),
// up to BLOCK_N: the columns past `cols` are scratch.
inline int64_t padded_cols(int64_t cols) { return std::min<int64_t>(BLOCK_N, (cols + 15) / 16 * 16); }

// A key tile's transpose (D x BLOCK_N, the padded columns zeroed) for the tile kernel's B
// operand: what lets the score products s = q k^T and dp = dO v^T skip BLAS. Worth it where one
// transpose serves many products (a group's heads, every query tile of the one-pass backward);
// nullptr where the tile kernel does not run (float64, no AVX2).
template <typename acc_t>
const acc_t* transposed(const acc_t* y, int64_t ldy, int64_t cols, int64_t D, std::vector<acc_t>& buf) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return nullptr;
  } else {
    if (kTileMM == nullptr || !tile_products()) return nullptr;
    buf.resize(D * BLOCK_N);
    const int64_t padded = padded_cols(cols);
    for (int64_t d = 0; d < D; ++d) {
      float* row = buf.data() + d * BLOCK_N;
      for (int64_t j = 0; j < cols; ++j) row[j] = y[j * ldy + d];
      std::fill(row + cols, row + padded, 0.0f);
    }
    return buf.data();
  }
}

// s (rows x cols, leading dimension BLOCK_N) = alpha x y^T, x a (rows x D) tile, y a key tile
// (cols x D) and yT its transpose from `transposed` or nullptr.
template <typename acc_t>
void scores_mm(int64_t rows, int64_t cols, int64_t D, acc_t alpha, const acc_t* x, int64_t ldx, const acc_t* y,
               int64_t ldy, const acc_t* yT, acc_t* s) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (yT != nullptr) {
      kTileMM(TileMM{rows, padded_cols(cols), D, alpha, x, ldx, 1, yT, BLOCK_N, s, BLOCK_N, false});
      return;
    }
  }
  gemm<acc_t>(false, true, rows, cols, D, alpha, x, ldx, y, ldy, acc_t(0), s, BLOCK_N);
}

struct Seq {
  int64_t q_start, q_len, k_start, k_len;
};

inline Seq seq_of(const int32_t* cu_q, const int32_t* cu_k, int64_t b) {
  return {cu_q[b], int64_t(cu_q[b + 1]) - cu_q[b], cu_k[b], int64_t(cu_k[b + 1]) - cu_k[b]};
}

struct Problem {
  int64_t batch, n_heads, n_kv_heads, group, D, n_prefix, total_q;
  bool causal;
  double scale;
  const int32_t *cu_q, *cu_k;
  const int8_t* keep;  // nullptr: every key is real
  int64_t q_row, k_row;  // row strides (elements) of q/out and of k/v

  // Keys [0, hi) can be visible to queries [m0, m1) of `s`.
  int64_t key_end(const Seq& s, int64_t m1) const {
    if (!causal) return s.k_len;
    return std::min(s.k_len, std::max(m1 + s.k_len - s.q_len, n_prefix));
  }
  // False when every query of the tile sees every key of it (no per-element mask needed).
  bool tile_needs_mask(const Seq& s, int64_t m0, int64_t rows, int64_t n0, int64_t cols) const {
    if (keep != nullptr) return true;
    if (!causal || n0 + cols <= n_prefix) return false;
    return n0 + cols - 1 > m0 + s.k_len - s.q_len;
  }
};

template <typename acc_t>
constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();

// Row loops of the online softmax. The float versions run on 8-wide GCC/Clang vector types
// (fastllm/cpu_simd.h; SSE pairs by default; an AVX2 clone is picked at load time where the CPU has it), since
// without fast-math the compiler will not vectorise the exp, max and sum loops by itself.
// The double versions (float64: gradchecks, not speed) stay scalar.

// x[c] = exp(x[c] - shift) (0 for x[c] = -inf), for x[c] <= shift (clamped at 0).
inline void exp_shifted(double* x, int64_t n, double shift) {
  for (int64_t c = 0; c < n; ++c) x[c] = x[c] == NEG_INF<double> ? 0.0 : std::exp(std::min(x[c] - shift, 0.0));
}
inline double row_max(const double* x, int64_t n, double init) {
  for (int64_t c = 0; c < n; ++c) init = std::max(init, x[c]);
  return init;
}
inline double row_sum(const double* x, int64_t n) {
  double s = 0;
  for (int64_t c = 0; c < n; ++c) s += x[c];
  return s;
}

#if defined(__GNUC__) || defined(__clang__)
// exp_shifted and row_max on the lanes of V (f8; f16l on AVX-512), inlined into each ISA's copy
// below. The 16-lane copies run the same per-lane operations as the 8-lane ones (no FMA
// contraction), so they give the same results bit for bit in half the instructions (the
// exponential is ~15% of the attention's time); picked per call from cpu_isa().
template <typename V>
FASTLLM_ALWAYS_INLINE void exp_shifted_lanes(float* x, int64_t n, float shift) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    const V e = exp_nonpos_masked(load<V>(x + c) - shift);
    std::memcpy(x + c, &e, sizeof(e));
  }
  for (; c < n; ++c) x[c] = x[c] == NEG_INF<float> ? 0.0f : exp_nonpos(std::min(x[c] - shift, 0.0f));
}

template <typename V>
FASTLLM_ALWAYS_INLINE float row_max_lanes(const float* x, int64_t n, float init) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  V m = splat_as(V{}, init);
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    const V v = load<V>(x + c);
    m = v > m ? v : m;
  }
  for (int64_t l = 0; l < L; ++l) init = std::max(init, m[l]);
  for (; c < n; ++c) init = std::max(init, x[c]);
  return init;
}

FASTLLM_CLONES_AVX2 void exp_shifted_8(float* x, int64_t n, float shift) { exp_shifted_lanes<f8>(x, n, shift); }
FASTLLM_CLONES_AVX2 float row_max_8(const float* x, int64_t n, float init) { return row_max_lanes<f8>(x, n, init); }

#if defined(__x86_64__)
#if defined(__clang__)
#define FASTLLM_AVX512_NO_CONTRACT __attribute__((target("avx512f,avx512dq,avx512vl,avx2")))
#else
#define FASTLLM_AVX512_NO_CONTRACT \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx2"), optimize("fp-contract=off")))
#endif
FASTLLM_AVX512_NO_CONTRACT void exp_shifted_16(float* x, int64_t n, float shift) {
  exp_shifted_lanes<f16l>(x, n, shift);
}
FASTLLM_AVX512_NO_CONTRACT float row_max_16(const float* x, int64_t n, float init) {
  return row_max_lanes<f16l>(x, n, init);
}

const bool kAttentionAvx512 = cpu_isa() == CpuIsa::kAvx512;

inline void exp_shifted(float* x, int64_t n, float shift) {
  kAttentionAvx512 ? exp_shifted_16(x, n, shift) : exp_shifted_8(x, n, shift);
}
inline float row_max(const float* x, int64_t n, float init) {
  return kAttentionAvx512 ? row_max_16(x, n, init) : row_max_8(x, n, init);
}
#else
inline void exp_shifted(float* x, int64_t n, float shift) { exp_shifted_8(x, n, shift); }
inline float row_max(const float* x, int64_t n, float init) { return row_max_8(x, n, init); }
#endif

FASTLLM_CLONES_AVX2 float row_sum(const float* x, int64_t n) {
  f8 s = splat8(0.0f);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) s += load8(x + c);
  float total = 0.0f;
  for (int l = 0; l < 8; ++l) total += s[l];
  for (; c < n; ++c) total += x[c];
  return total;
}
#else
inline void exp_shifted(float* x, int64_t n, float shift) {
  for (int64_t c = 0; c < n; ++c) x[c] = x[c] == NEG_INF<float> ? 0.0f : exp_nonpos(std::min(x[c] - shift, 0.0f));
}
inline float row_max(const float* x, int64_t n, float init) {
  for (int64_t c = 0; c < n; ++c) init = std::max(init, x[c]);
  return init;
}
inline float row_sum(const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += x[c];
  return s;
}
#endif

template <typename acc_t>
inline acc_t exp_shifted_one(acc_t x, acc_t shift) {
  return x == NEG_INF<acc_t> ? acc_t(0) : exp_nonpos(std::min(x - shift, acc_t(0)));
}

// Sets the scores of keys a query may not see to -inf (only tiles that need it): visible(i, j) of
// the file's header, row by row. Causally, query i sees keys j < max(n_prefix, i + k_len - q_len
// + 1), so a row's hidden keys are one run at its end; padded keys (keep) wherever they are.
template <typename acc_t>
void mask_tile(const Problem& pb, const Seq& sq, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
               acc_t* s) {
  const int8_t* keep = pb.keep != nullptr ? pb.keep + sq.k_start + n0 : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * BLOCK_N;
    if (pb.causal) {
      const int64_t seen = std::max(pb.n_prefix, m0 + r + sq.k_len - sq.q_len + 1) - n0;
      std::fill(sr + std::clamp<int64_t>(seen, 0, cols), sr + cols, NEG_INF<acc_t>);
    }
    if (keep != nullptr) {
      for (int64_t c = 0; c < cols; ++c) {
        if (keep[c] == 0) sr[c] = NEG_INF<acc_t>;
      }
    }
  }
}

// Rows [r0, r0+n) of a (rows, H, D) tensor, head h, as a contiguous-row tile of acc_t with
// leading dimension `ld`: a pointer into the tensor when no conversion is needed.
template <typename scalar_t, typename acc_t>
const acc_t* tile(const scalar_t* base, int64_t row_stride, int64_t r0, int64_t n, int64_t h,
                  int64_t D, std::vector<acc_t>& buf, int64_t& ld) {
  const scalar_t* src = base + r0 * row_stride + h * D;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = row_stride;
    return src;
  } else {
    buf.resize(std::max<int64_t>(n, 1) * D);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<acc_t>(src[r * row_stride + d]);
    }
    ld = D;
    return buf.data();
  }
}

int64_t max_len(const int32_t* cu, int64_t B);

// Tasks per thread chunk. A task is one tile of up to `rows` queries (or keys) of one head
// against up to `others` keys (or queries), `gemms` tile products of depth D; a vectorised
// multiply-add counts as 1/8 of a unit of grain_for's work.
inline int64_t tile_grain(const Problem& pb, int64_t rows, int64_t others, int64_t gemms) {
  return grain_for(std::max<int64_t>(1, rows * others * pb.D * gemms / 8));
}

// A task is one query tile of one sequence for every query head of a kv head's group: each
// K/V tile is read (and transposed, for the tile kernel) once for the G heads.
template <typename scalar_t>
void fwd_kernel(const Problem& pb, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                scalar_t* out, acc_type_t<scalar_t>* lse, int64_t max_q) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = pb.D, G = pb.group, m_blocks = (max_q + BLOCK_M - 1) / BLOCK_M;
  const acc_t scale = acc_t(pb.scale);
  const int64_t grain = tile_grain(pb, std::min(BLOCK_M, max_q), max_len(pb.cu_k, pb.batch), 2 * G);
  at::parallel_for(0, pb.batch * pb.n_kv_heads * m_blocks, grain, [&](int64_t begin, int64_t end) {
    const SerialBlas serial_blas;
    std::vector<acc_t> qbuf, kbuf, vbuf, kT_buf, s(BLOCK_M * BLOCK_N), acc(G * BLOCK_M * D), m(G * BLOCK_M),
        l(G * BLOCK_M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % m_blocks, bh = task / m_blocks;
      const int64_t b = bh / pb.n_kv_heads, hk = bh % pb.n_kv_heads;
      const Seq sq = seq_of(pb.cu_q, pb.cu_k, b);
      const int64_t m0 = mb * BLOCK_M;
      if (m0 >= sq.q_len) continue;
      const int64_t rows = std::min(BLOCK_M, sq.q_len - m0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t hi = pb.key_end(sq, m0 + rows);
      for (int64_t n0 = 0; n0 < hi; n0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, hi - n0);
        int64_t ldk, ldv, ldq;
        const acc_t* kt = tile<scalar_t, acc_t>(k, pb.k_row, sq.k_start + n0, cols, hk, D, kbuf, ldk);
        const acc_t* vt = tile<scalar_t, acc_t>(v, pb.k_row, sq.k_start + n0, cols, hk, D, vbuf, ldv);
        const acc_t* kT = G > 1 ? transposed(kt, ldk, cols, D, kT_buf) : nullptr;  // one use: BLAS is as fast
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          const acc_t* qt = tile<scalar_t, acc_t>(q, pb.q_row, sq.q_start + m0, rows, h, D, qbuf, ldq);
          acc_t* mg = m.data() + g * BLOCK_M;
          acc_t* lg = l.data() + g * BLOCK_M;
          acc_t* ag = acc.data() + g * BLOCK_M * D;
          scores_mm<acc_t>(rows, cols, D, scale, qt, ldq, kt, ldk, kT, s.data());
          if (pb.tile_needs_mask(sq, m0, rows, n0, cols)) mask_tile<acc_t>(pb, sq, m0, rows, n0, cols, s.data());
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* sr = s.data() + r * BLOCK_N;
            const acc_t mx = row_max(sr, cols, mg[r]);
            if (mx == NEG_INF<acc_t>) {  // nothing visible yet
              std::fill(sr, sr + cols, acc_t(0));
              continue;
            }
            exp_shifted(sr, cols, mx);
            const acc_t alpha = exp_shifted_one(mg[r], mx);
            lg[r] = lg[r] * alpha + row_sum(sr, cols);
            mg[r] = mx;
            acc_t* ar = ag + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
          gemm<acc_t>(false, false, rows, D, cols, acc_t(1), s.data(), BLOCK_N, vt, ldv, acc_t(1), ag, D);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = sq.q_start + m0 + r;
          const acc_t lr = l[g * BLOCK_M + r];
          const bool empty = lr == acc_t(0);
          const acc_t inv = empty ? acc_t(0) : acc_t(1) / lr;
          scalar_t* o = out + row * pb.q_row + h * D;
          const acc_t* ar = acc.data() + (g * BLOCK_M + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(ar[d] * inv);
          lse[h * pb.total_q + row] =
              empty ? std::numeric_limits<acc_t>::infinity() : m[g * BLOCK_M + r] + std::log(lr);
        }
      }
    }
  });
}

// p_ij (masked) for one (query tile, key tile), in place over the scores s = scale * q k^T.
template <typename acc_t>
void probs(const Problem& pb, const Seq& sq, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
           const acc_t* lse_rows, acc_t* s) {
  if (pb.tile_needs_mask(sq, m0, rows, n0, cols)) mask_tile<acc_t>(pb, sq, m0, rows, n0, cols, s);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = s + r * BLOCK_N;
    if (lse_rows[r] == -NEG_INF<acc_t>) {  // the row sees no key
      std::fill(sr, sr + cols, acc_t(0));
    } else {
      exp_shifted(sr, cols, lse_rows[r]);  // lse_i >= s_ij up to rounding: clamped at 0
    }
  }
}

// dS = P * (dP - delta), in place over dP.
template <typename acc_t>
void dscores(int64_t rows, int64_t cols, const acc_t* p, const acc_t* delta, acc_t* dp) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dp[r * BLOCK_N + c] = p[r * BLOCK_N + c] * (dp[r * BLOCK_N + c] - delta[r]);
    }
  }
}

template <typename scalar_t>
void bwd_dq_kernel(const Problem& pb, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                   const scalar_t* v, const scalar_t* out, const acc_type_t<scalar_t>* lse,
                   acc_type_t<scalar_t>* delta, scalar_t* dq, int64_t max_q) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = pb.D, m_blocks = (max_q + BLOCK_M - 1) / BLOCK_M;
  const acc_t scale = acc_t(pb.scale);
  const int64_t grain = tile_grain(pb, std::min(BLOCK_M, max_q), max_len(pb.cu_k, pb.batch), 3);
  at::parallel_for(0, pb.batch * pb.n_heads * m_blocks, grain, [&](int64_t begin, int64_t end) {
    const SerialBlas serial_blas;
    std::vector<acc_t> qbuf, dobuf, obuf, kbuf, vbuf, s(BLOCK_M * BLOCK_N), dp(BLOCK_M * BLOCK_N),
        acc(BLOCK_M * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % m_blocks, bh = task / m_blocks;
      const int64_t b = bh / pb.n_heads, h = bh % pb.n_heads, hk = h / pb.group;
      const Seq sq = seq_of(pb.cu_q, pb.cu_k, b);
      const int64_t m0 = mb * BLOCK_M;
      if (m0 >= sq.q_len) continue;
      const int64_t rows = std::min(BLOCK_M, sq.q_len - m0), row0 = sq.q_start + m0;
      int64_t ldq, lddo, ldo, ldk, ldv;
      const acc_t* qt = tile<scalar_t, acc_t>(q, pb.q_row, row0, rows, h, D, qbuf, ldq);
      const acc_t* gt = tile<scalar_t, acc_t>(dout, pb.q_row, row0, rows, h, D, dobuf, lddo);
      const acc_t* ot = tile<scalar_t, acc_t>(out, pb.q_row, row0, rows, h, D, obuf, ldo);
      acc_t* delta_rows = delta + h * pb.total_q + row0;
      const acc_t* lse_rows = lse + h * pb.total_q + row0;
      for (int64_t r = 0; r < rows; ++r) delta_rows[r] = dot(gt + r * lddo, ot + r * ldo, D);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t hi = pb.key_end(sq, m0 + rows);
      for (int64_t n0 = 0; n0 < hi; n0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, hi - n0);
        const acc_t* kt = tile<scalar_t, acc_t>(k, pb.k_row, sq.k_start + n0, cols, hk, D, kbuf, ldk);
        const acc_t* vt = tile<scalar_t, acc_t>(v, pb.k_row, sq.k_start + n0, cols, hk, D, vbuf, ldv);
        gemm<acc_t>(false, true, rows, cols, D, scale, qt, ldq, kt, ldk, acc_t(0), s.data(), BLOCK_N);
        probs<acc_t>(pb, sq, m0, rows, n0, cols, lse_rows, s.data());
        gemm<acc_t>(false, true, rows, cols, D, acc_t(1), gt, lddo, vt, ldv, acc_t(0), dp.data(), BLOCK_N);
        dscores<acc_t>(rows, cols, s.data(), delta_rows, dp.data());
        gemm<acc_t>(false, false, rows, D, cols, scale, dp.data(), BLOCK_N, kt, ldk, acc_t(1), acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = dq + (row0 + r) * pb.q_row + h * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[r * D + d]);
      }
    }
  });
}

// A key tile of kv head hk for the backward: K and V rows as acc_t (pointers into the tensors
// when no widening is needed) and their transposes for the score products (nullptr where the
// tile kernel does not run).
template <typename acc_t>
struct KeyTile {
  const acc_t *k, *v, *kT, *vT;
  int64_t ldk, ldv;
};

template <typename scalar_t, typename acc_t>
KeyTile<acc_t> key_tile(const Problem& pb, const scalar_t* k, const scalar_t* v, int64_t krow0, int64_t cols,
                        int64_t hk, std::vector<acc_t>& kbuf, std::vector<acc_t>& vbuf, std::vector<acc_t>& kT_buf,
                        std::vector<acc_t>& vT_buf) {
  KeyTile<acc_t> t{};
  t.k = tile<scalar_t, acc_t>(k, pb.k_row, krow0, cols, hk, pb.D, kbuf, t.ldk);
  t.v = tile<scalar_t, acc_t>(v, pb.k_row, krow0, cols, hk, pb.D, vbuf, t.ldv);
  t.kT = transposed(t.k, t.ldk, cols, pb.D, kT_buf);
  t.vT = transposed(t.v, t.ldv, cols, pb.D, vT_buf);
  return t;
}

// The first query that can see key n0 of `sq` (earlier ones see none of the keys from n0 on,
// unless those are prefix keys).
inline int64_t first_query(const Problem& pb, const Seq& sq, int64_t n0) {
  if (!pb.causal || n0 < pb.n_prefix) return 0;
  return std::max<int64_t>(0, n0 - (sq.k_len - sq.q_len));
}

// Writes a key tile's accumulated dK/dV rows (cols x D, acc_t) into dk, dv at kv head hk.
template <typename scalar_t, typename acc_t>
void store_key_grads(const Problem& pb, int64_t krow0, int64_t cols, int64_t hk, const acc_t* dk_acc,
                     const acc_t* dv_acc, scalar_t* dk, scalar_t* dv) {
  const int64_t D = pb.D;
  for (int64_t c = 0; c < cols; ++c) {
    scalar_t* dkr = dk + (krow0 + c) * pb.k_row + hk * D;
    scalar_t* dvr = dv + (krow0 + c) * pb.k_row + hk * D;
    for (int64_t d = 0; d < D; ++d) {
      dkr[d] = static_cast<scalar_t>(dk_acc[c * D + d]);
      dvr[d] = static_cast<scalar_t>(dv_acc[c * D + d]);
    }
  }
}

// The key tile's columns [0, n) that queries [m0, m0 + rows) can see, n <= cols: causally, the
// first query tile on a key tile's diagonal sees only the keys up to its last query (64 of the
// 128 columns at the default tiles), and the columns past them would only multiply zeros.
inline int64_t visible_cols(const Problem& pb, const Seq& sq, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
  return std::clamp<int64_t>(pb.key_end(sq, m0 + rows) - n0, 0, cols);
}

// One (query tile, key tile) of the dK/dV accumulation for query head h: s <- P, dV += P^T dO,
// dp <- dS, dK += scale dS^T q (the one-pass kernel then adds scale dS k to dQ from dp). `cols`
// is the visible part of the key tile (visible_cols).
template <typename acc_t>
void dkdv_tile(const Problem& pb, const Seq& sq, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
               const acc_t* qt, int64_t ldq, const acc_t* gt, int64_t lddo, const KeyTile<acc_t>& kv,
               const acc_t* lse, const acc_t* delta, acc_t* s, acc_t* dp, acc_t* dk_acc, acc_t* dv_acc) {
  const int64_t D = pb.D, row0 = sq.q_start + m0;
  const acc_t scale = acc_t(pb.scale);
  scores_mm<acc_t>(rows, cols, D, scale, qt, ldq, kv.k, kv.ldk, kv.kT, s);
  probs<acc_t>(pb, sq, m0, rows, n0, cols, lse + h * pb.total_q + row0, s);
  gemm<acc_t>(true, false, cols, D, rows, acc_t(1), s, BLOCK_N, gt, lddo, acc_t(1), dv_acc, D);  // dV += P^T dO
  scores_mm<acc_t>(rows, cols, D, acc_t(1), gt, lddo, kv.v, kv.ldv, kv.vT, dp);
  dscores<acc_t>(rows, cols, s, delta + h * pb.total_q + row0, dp);
  gemm<acc_t>(true, false, cols, D, rows, scale, dp, BLOCK_N, qt, ldq, acc_t(1), dk_acc, D);  // dK += scale dS^T Q
}

template <typename scalar_t>
void bwd_dkdv_kernel(const Problem& pb, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const acc_type_t<scalar_t>* lse,
                     const acc_type_t<scalar_t>* delta, scalar_t* dk, scalar_t* dv, int64_t max_k) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = pb.D, n_blocks = (max_k + BLOCK_N - 1) / BLOCK_N;
  // A key tile meets every query head of its group.
  const int64_t grain = tile_grain(pb, std::min(BLOCK_N, max_k), max_len(pb.cu_q, pb.batch), 4 * pb.group);
  at::parallel_for(0, pb.batch * pb.n_kv_heads * n_blocks, grain, [&](int64_t begin, int64_t end) {
    const SerialBlas serial_blas;
    std::vector<acc_t> qbuf, dobuf, kbuf, vbuf, kT_buf, vT_buf, s(BLOCK_M * BLOCK_N), dp(BLOCK_M * BLOCK_N),
        dk_acc(BLOCK_N * D), dv_acc(BLOCK_N * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task % n_blocks, bh = task / n_blocks;
      const int64_t b = bh / pb.n_kv_heads, hk = bh % pb.n_kv_heads;
      const Seq sq = seq_of(pb.cu_q, pb.cu_k, b);
      const int64_t n0 = nb * BLOCK_N;
      if (n0 >= sq.k_len) continue;
      const int64_t cols = std::min(BLOCK_N, sq.k_len - n0), krow0 = sq.k_start + n0;
      int64_t ldq, lddo;
      const KeyTile<acc_t> kv = key_tile<scalar_t, acc_t>(pb, k, v, krow0, cols, hk, kbuf, vbuf, kT_buf, vT_buf);
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      const int64_t lo = first_query(pb, sq, n0);
      for (int64_t g = 0; g < pb.group; ++g) {
        const int64_t h = hk * pb.group + g;
        for (int64_t m0 = lo; m0 < sq.q_len; m0 += BLOCK_M) {
          const int64_t rows = std::min(BLOCK_M, sq.q_len - m0), row0 = sq.q_start + m0;
          const acc_t* qt = tile<scalar_t, acc_t>(q, pb.q_row, row0, rows, h, D, qbuf, ldq);
          const acc_t* gt = tile<scalar_t, acc_t>(dout, pb.q_row, row0, rows, h, D, dobuf, lddo);
          const int64_t seen = visible_cols(pb, sq, m0, rows, n0, cols);
          if (seen == 0) continue;
          dkdv_tile<acc_t>(pb, sq, h, m0, rows, n0, seen, qt, ldq, gt, lddo, kv, lse, delta, s.data(), dp.data(),
                           dk_acc.data(), dv_acc.data());
        }
      }
      store_key_grads(pb, krow0, cols, hk, dk_acc.data(), dv_acc.data(), dk, dv);
    }
  });
}

// One pass over the tiles: a task owns a (sequence, kv head): the dK/dV of its keys and the dQ
// of the query heads of its group, so no two tasks write the same row and nothing is atomic.
// Per (key tile, query head, query tile): s = scale q k^T -> P; dV += P^T dO; dP = dO v^T;
// dS = P (dP - delta); dK += scale dS^T q; dQ += scale dS k: five tile products and one exp
// per score, where the two passes above take seven and two. delta is computed per task first.
// `tasks` lists the (b * n_kv_heads + hk) indices each worker runs, in order (see plan_bwd).
template <typename scalar_t>
void bwd_fused_kernel(const Problem& pb, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                      const scalar_t* v, const scalar_t* out, const acc_type_t<scalar_t>* lse,
                      acc_type_t<scalar_t>* delta, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                      const std::vector<std::vector<int64_t>>& tasks) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool direct_dq = std::is_same_v<scalar_t, acc_t>;  // accumulate into dq itself
  const int64_t D = pb.D, G = pb.group;
  const acc_t scale = acc_t(pb.scale);
  const int64_t workers = int64_t(tasks.size());
  at::parallel_for(0, workers, 1, [&](int64_t wbegin, int64_t wend) {
    const SerialBlas serial_blas;
    std::vector<acc_t> qbuf, dobuf, obuf, kbuf, vbuf, kT_buf, vT_buf, dq_buf, s(BLOCK_M * BLOCK_N),
        dp(BLOCK_M * BLOCK_N), dk_acc(BLOCK_N * D), dv_acc(BLOCK_N * D);
    for (int64_t w = wbegin; w < wend; ++w) {
      for (const int64_t task : tasks[w]) {
        const int64_t b = task / pb.n_kv_heads, hk = task % pb.n_kv_heads;
        const Seq sq = seq_of(pb.cu_q, pb.cu_k, b);
        // delta_i = dO_i . O_i for the group's heads; dQ accumulators cleared.
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          for (int64_t m0 = 0; m0 < sq.q_len; m0 += BLOCK_M) {
            const int64_t rows = std::min(BLOCK_M, sq.q_len - m0), row0 = sq.q_start + m0;
            int64_t lddo, ldo;
            const acc_t* gt = tile<scalar_t, acc_t>(dout, pb.q_row, row0, rows, h, D, dobuf, lddo);
            const acc_t* ot = tile<scalar_t, acc_t>(out, pb.q_row, row0, rows, h, D, obuf, ldo);
            for (int64_t r = 0; r < rows; ++r) delta[h * pb.total_q + row0 + r] = dot(gt + r * lddo, ot + r * ldo, D);
            if constexpr (direct_dq) {
              for (int64_t r = 0; r < rows; ++r) std::fill_n(dq + (row0 + r) * pb.q_row + h * D, D, acc_t(0));
            }
          }
        }
        if constexpr (!direct_dq) dq_buf.assign(G * sq.q_len * D, acc_t(0));  // [g][row][D]
        for (int64_t n0 = 0; n0 < sq.k_len; n0 += BLOCK_N) {
          const int64_t cols = std::min(BLOCK_N, sq.k_len - n0), krow0 = sq.k_start + n0;
          const KeyTile<acc_t> kv = key_tile<scalar_t, acc_t>(pb, k, v, krow0, cols, hk, kbuf, vbuf, kT_buf, vT_buf);
          std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
          std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
          const int64_t lo = first_query(pb, sq, n0);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = hk * G + g;
            for (int64_t m0 = lo; m0 < sq.q_len; m0 += BLOCK_M) {
              const int64_t rows = std::min(BLOCK_M, sq.q_len - m0), row0 = sq.q_start + m0;
              int64_t ldq, lddo;
              const acc_t* qt = tile<scalar_t, acc_t>(q, pb.q_row, row0, rows, h, D, qbuf, ldq);
              const acc_t* gt = tile<scalar_t, acc_t>(dout, pb.q_row, row0, rows, h, D, dobuf, lddo);
              const int64_t seen = visible_cols(pb, sq, m0, rows, n0, cols);
              if (seen == 0) continue;
              dkdv_tile<acc_t>(pb, sq, h, m0, rows, n0, seen, qt, ldq, gt, lddo, kv, lse, delta, s.data(),
                               dp.data(), dk_acc.data(), dv_acc.data());
              // dQ += scale dS K, into dq itself (float, double) or the task's float rows
              acc_t* dq_rows;
              int64_t ld_dq;
              if constexpr (direct_dq) {
                dq_rows = dq + row0 * pb.q_row + h * D;
                ld_dq = pb.q_row;
              } else {
                dq_rows = dq_buf.data() + (g * sq.q_len + m0) * D;
                ld_dq = D;
              }
              gemm<acc_t>(false, false, rows, D, seen, scale, dp.data(), BLOCK_N, kv.k, kv.ldk, acc_t(1), dq_rows, ld_dq);
            }
          }
          store_key_grads(pb, krow0, cols, hk, dk_acc.data(), dv_acc.data(), dk, dv);
        }
        if constexpr (!direct_dq) {
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t r = 0; r < sq.q_len; ++r) {
              narrow(dq_buf.data() + (g * sq.q_len + r) * D, dq + (sq.q_start + r) * pb.q_row + (hk * G + g) * D, D);
            }
          }
        }
      }
    }
  });
}

// Which backward runs, and how the one-pass kernel's tasks are spread. The one pass does 5/7 of
// the two passes' tile products but has only batch * n_kv_heads tasks of unequal size (a
// sequence's work grows with q_len * k_len), so with many threads and few tasks its slowest
// worker can take longer than the evenly split two passes. Tasks go to workers largest first,
// each to the least loaded (deterministic: a task's arithmetic does not depend on its worker);
// the one pass is chosen when its slowest worker's 5 products per score cost no more than the
// two passes' 7 spread over every worker. Empty when the two passes are chosen.
std::vector<std::vector<int64_t>> plan_bwd(const Problem& pb) {
  const int64_t n_tasks = pb.batch * pb.n_kv_heads;
  std::vector<double> work(n_tasks);
  double total = 0;
  for (int64_t t = 0; t < n_tasks; ++t) {
    const Seq sq = seq_of(pb.cu_q, pb.cu_k, t / pb.n_kv_heads);
    const double ql = double(sq.q_len), kl = double(sq.k_len);
    // visible (query, key) pairs: all of them, or the causal band (queries see k_len - q_len + i + 1 keys)
    double pairs = ql * kl;
    if (pb.causal) pairs = ql * std::max(0.0, kl - ql) + ql * (std::min(ql, kl) + 1) / 2;
    work[t] = std::max(pairs, 1.0) * double(pb.group);
    total += work[t];
  }
  // As many threads as the work pays for (the grain rule: 5 products of depth D per pair).
  const int64_t max_threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const double units = total * double(pb.D) * 5 / 8;
  const int64_t threads = std::clamp<int64_t>(int64_t(units / double(kMinWorkPerThread)), 1, max_threads);
  const int64_t workers = std::min<int64_t>(threads, std::max<int64_t>(n_tasks, 1));
  std::vector<int64_t> order(n_tasks);
  for (int64_t t = 0; t < n_tasks; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  std::vector<std::vector<int64_t>> tasks(workers);
  std::vector<double> load(workers, 0.0);
  for (const int64_t t : order) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    tasks[w].push_back(t);
    load[w] += work[t];
  }
  const double slowest = *std::max_element(load.begin(), load.end());
  if (threads > 1 && 5 * slowest > 7 * total / double(threads)) return {};
  return tasks;
}

// ---------------------------------------------------------------------------- host code

Problem check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cu_q, const at::Tensor& cu_k,
                      const c10::optional<at::Tensor>& keep, int64_t n_prefix, bool causal,
                      double scale) {
  check_dtype(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_dim(q, "q", 3);
  check_dim(k, "k", 3);
  TORCH_CHECK(k.sizes() == v.sizes(), "v: expected shape ", k.sizes(), " (same as k), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: expected dtype ", q.scalar_type(), " (same as q), got ", k.scalar_type(), " and ",
              v.scalar_type());
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  check_contiguous(q, "q");
  check_contiguous(k, "k");
  check_contiguous(v, "v");
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(k.size(2) == D, "k: expected head dim ", D, " (same as q), got ", k.size(2));
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "k: expected a number of heads dividing q's ", Hq, ", got ", Hkv);
  for (const auto* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous(),
                "cu_seqlens: expected a contiguous 1-D int32 tensor, got ", cu->scalar_type(), " of shape ",
                cu->sizes());
    check_same_device(q, "q", *cu, "cu_seqlens");
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, "cu_k: expected ", cu_q.numel(),
              " offsets (same as cu_q), got ", cu_k.numel());
  const int64_t B = cu_q.numel() - 1;
  const int32_t* cq = cu_q.const_data_ptr<int32_t>();
  const int32_t* ck = cu_k.const_data_ptr<int32_t>();
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0, "cu_seqlens: expected to start at 0, got ", cq[0], " and ", ck[0]);
  TORCH_CHECK(cq[B] == q.size(0) && ck[B] == k.size(0), "cu_seqlens: expected to end at the row counts ",
              q.size(0), " and ", k.size(0), ", got ", cq[B], " and ", ck[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "cu_seqlens: expected non-decreasing offsets, at ", b);
    TORCH_CHECK(ck[b + 1] - ck[b] >= n_prefix, "n_prefix: expected at most the keys of sequence ", b, " (",
                ck[b + 1] - ck[b], "), got ", n_prefix);
  }
  const int8_t* keep_ptr = nullptr;
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kChar && keep->dim() == 1 && keep->numel() == k.size(0) &&
                    keep->is_contiguous(),
                "keep: expected a contiguous int8 tensor of shape [", k.size(0), "], got ", keep->scalar_type(),
                " of shape ", keep->sizes());
    keep_ptr = keep->const_data_ptr<int8_t>();
  }
  TORCH_CHECK(n_prefix >= 0, "n_prefix: expected a non-negative value, got ", n_prefix);
  return Problem{B, Hq, Hkv, Hq / Hkv, D, n_prefix, q.size(0), causal, scale, cq, ck, keep_ptr, Hq * D, Hkv * D};
}

int64_t max_len(const int32_t* cu, int64_t B) {
  int64_t mx = 0;
  for (int64_t b = 0; b < B; ++b) mx = std::max<int64_t>(mx, cu[b + 1] - cu[b]);
  return mx;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = output_empty(sizes, options);
  maybe_poison(out);
  return out;
}

at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const at::Tensor& cu_q,
                                                     const at::Tensor& cu_k,
                                                     const c10::optional<at::Tensor>& keep,
                                                     int64_t n_prefix, bool causal, double scale) {
  const Problem pb = check_problem(q, k, v, cu_q, cu_k, keep, n_prefix, causal, scale);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({pb.n_heads, pb.total_q}, q.options().dtype(acc_scalar(q.scalar_type())));
  const int64_t max_q = max_len(pb.cu_q, pb.batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    fwd_kernel<scalar_t>(pb, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                         v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                         lse.mutable_data_ptr<acc_t>(), max_q);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    const c10::optional<at::Tensor>& keep, int64_t n_prefix, bool causal, double scale) {
  const Problem pb = check_problem(q, k, v, cu_q, cu_k, keep, n_prefix, causal, scale);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type(), name, ": expected ",
                q.scalar_type(), " of shape ", q.sizes(), " (same as q), got ", t->scalar_type(), " of shape ",
                t->sizes());
    check_contiguous(*t, name);
  }
  const auto acc = acc_scalar(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 2 && lse.size(0) == pb.n_heads &&
                  lse.size(1) == pb.total_q && lse.is_contiguous(),
              "lse: expected a contiguous ", acc, " tensor of shape [", pb.n_heads, ", ", pb.total_q, "], got ",
              lse.scalar_type(), " of shape ", lse.sizes());
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  at::Tensor delta = at::empty({pb.n_heads, pb.total_q}, q.options().dtype(acc));
  const int64_t max_q = max_len(pb.cu_q, pb.batch), max_k = max_len(pb.cu_k, pb.batch);
  const std::vector<std::vector<int64_t>> plan = plan_bwd(pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto* go = grad_out.const_data_ptr<scalar_t>();
    const auto* qp = q.const_data_ptr<scalar_t>();
    const auto* kp = k.const_data_ptr<scalar_t>();
    const auto* vp = v.const_data_ptr<scalar_t>();
    if (!plan.empty()) {
      bwd_fused_kernel<scalar_t>(pb, go, qp, kp, vp, out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                                 delta.mutable_data_ptr<acc_t>(), dq.mutable_data_ptr<scalar_t>(),
                                 dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), plan);
      return;
    }
    // Pass 1 also writes delta_i = dO_i . O_i for pass 2.
    bwd_dq_kernel<scalar_t>(pb, go, qp, kp, vp, out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                            delta.mutable_data_ptr<acc_t>(), dq.mutable_data_ptr<scalar_t>(), max_q);
    bwd_dkdv_kernel<scalar_t>(pb, go, qp, kp, vp, lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), max_k);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastllm::cpu
