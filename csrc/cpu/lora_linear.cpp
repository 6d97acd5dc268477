// LoRA linear on the CPU, as products that never form the LoRA branch's own (rows, out) output:
//   forward : u = xd A^T                          (rows, r)
//             y = x W^T + b + s u B^T             one pass: the low-rank term is a second term
//   backward: g = s dy B                          (rows, r)
//             dx = dy W + g A (* keep / (1 - p))  one pass without dropout
//             dA = g^T xd (r, in),  dB = s dy^T u (out, r)
// xd = x * keep / (1 - p) when a dropout mask is given, else x. W and b are frozen: no dW.
// The products go through tiled_mm (csrc/cpu/gemm.cpp), on the CPU's products engine. On the
// tile kernel (fastllm/tile_mm.h) it reads W^T, A^T, B^T, g^T and dy^T as the transposed views
// they are and adds the low-rank term in the same pass as the base product; the rank-r products
// (r columns, or K = rows) on it ran 1.05-2.3x faster on an AMD Zen 4 than the BLAS calls they
// replace, themselves already issued in BLAS's faster orientation (bench/README.md). On the BLAS
// engine (MKL on an Intel CPU) each term is one ATen call, except without dropout: the two base
// products y = x (W + s B A)^T and dx = dy (W + s B A), each one product on the merged weight (the
// only place B A is formed, in a buffer the thread reuses), and, for float32 with r a multiple of
// 16 up to 64, the backward's rank-r products g, dA and dB in one pass of our own (lora_aux).
// Everything else (other dtypes, CUDA tensors in builds with CUDA: cuBLAS
// does the GEMMs) is ATen calls, one per term; the Triton kernel is the alternative on CUDA
// (bench/bench_lora.py decides).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/List.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/cpu_mm.h"
#include "fastllm/cpu_simd.h"     // FASTLLM_CLONES_X86_64_V4
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // v16, load, store

namespace fastllm::cpu {
namespace {

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const std::optional<at::Tensor>& keep,
                  double dropout_p) {
  check_dtype(x, "x", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_dim(x, "x", 2);
  check_dim(weight, "weight", 2);
  check_dim(lora_a, "lora_a", 2);
  check_dim(lora_b, "lora_b", 2);
  const at::Tensor* others[] = {&weight, &lora_a, &lora_b};
  const char* names[] = {"weight", "lora_a", "lora_b"};
  for (int i = 0; i < 3; ++i) {
    check_same_device(x, "x", *others[i], names[i]);
    TORCH_CHECK(others[i]->scalar_type() == x.scalar_type(), names[i], ": expected dtype ",
                x.scalar_type(), " (same as x), got ", others[i]->scalar_type());
  }
  const int64_t in = x.size(1), out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == in, "weight: expected shape [", out, ", ", in,
              "] (in_features from x), got ", weight.sizes());
  TORCH_CHECK(lora_a.size(1) == in, "lora_a: expected shape [r, ", in, "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == out && lora_b.size(1) == r, "lora_b: expected shape [", out, ", ",
              r, "] (out_features, r), got ", lora_b.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a value in [0, 1), got ",
              dropout_p);
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool, "keep: expected dtype bool, got ",
                keep->scalar_type());
    TORCH_CHECK(keep->sizes() == x.sizes(), "keep: expected shape ", x.sizes(),
                " (same as x), got ", keep->sizes());
  }
}

// Whether a product on this CPU tensor goes through the merged weight W + s B A: on the BLAS
// engine without dropout (see lora_linear_fwd_cpu and lora_linear_bwd_cpu).
bool merge_on_blas(const at::Tensor& x, const std::optional<at::Tensor>& keep) {
  return !keep.has_value() && x.device().is_cpu() && !tile_products();
}

#ifdef FASTLLM_HAVE_VECTORS
// Rows [n0, n1) of out = W + s B A, float32, in one pass: each row of W plus its r multiples of
// A's rows (A, r x in, stays in L1), summed in order of r. In place of a copy of W and a BLAS
// product added over the copy (two passes over it): the LoRA step's merges, two per adapted
// projection, took ~130 ms of it that way (bench/README.md). At B = 0 every row is W's exactly.
FASTLLM_CLONES_X86_64_V4 void merge_rows_f32(const float* w, const float* a, const float* b, int64_t r, float s,
                                             float* out, int64_t n0, int64_t n1, int64_t in) {
  float c[64];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t j = 0; j < r; ++j) c[j] = s * b[n * r + j];
    const float* wr = w + n * in;
    float* o = out + n * in;
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {  // four independent sums in flight (an FMA's latency)
      v16 acc[4];
      for (int q = 0; q < 4; ++q) acc[q] = load<v16>(wr + i + 16 * q);
      for (int64_t j = 0; j < r; ++j) {
        for (int q = 0; q < 4; ++q) acc[q] += c[j] * load<v16>(a + j * in + i + 16 * q);
      }
      for (int q = 0; q < 4; ++q) store<v16>(o + i + 16 * q, acc[q]);
    }
    for (; i + 16 <= in; i += 16) {
      v16 acc = load<v16>(wr + i);
      for (int64_t j = 0; j < r; ++j) acc += c[j] * load<v16>(a + j * in + i);
      store<v16>(o + i, acc);
    }
    for (; i < in; ++i) {
      float acc = wr[i];
      for (int64_t j = 0; j < r; ++j) acc += c[j] * a[j * in + i];
      o[i] = acc;
    }
  }
}

// The backward's three rank-r products in one pass over the rows of dy and x (float32, r a
// multiple of 16 up to 64, no dropout):
//   g = s dy B (rows, r),   db = s dy^T u (out, r),   da = g^T x (r, in).
// As BLAS calls they are three memory passes with K or N of r, two over all of dy and one over
// all of x (~0.3 s of the SmolLM2 LoRA step, bench/README.md). Here rows go Q at a time: their g
// (dy's Q rows against B, out x r, which stays in L2), then their multiples of u summed into db
// and of x into da, while the Q rows of dy and x are in L1. A row of B, db or u is R vectors of
// 16 lanes (R = r / 16). Rows are split across threads, each summing into its own db and da,
// which are added up in thread order at the end.
template <int Q, int R>
FASTLLM_ALWAYS_INLINE void lora_aux_block(const float* dy, const float* x, const float* u, const float* b, float s,
                                          int64_t out, int64_t in, float* g, float* db, float* da,
                                          const float* next_dy, const float* next_x) {
  constexpr int r = 16 * R;
  // g and db together, each dy[q, n] broadcast once for both: g[q] += dy[q, n] B[n] (Q x R
  // accumulators over n), db[n] += sum_q dy[q, n] (s u[q])
  v16 acc[Q][R], us[Q][R];
  for (int q = 0; q < Q; ++q) {
    for (int c = 0; c < R; ++c) {
      acc[q][c] = v16{};
      us[q][c] = load<v16>(u + q * r + 16 * c) * s;
    }
  }
  for (int64_t n = 0; n < out; ++n) {
    if (next_dy != nullptr && (n & 1) == 0) __builtin_prefetch(next_dy + n * Q, 0, 2);
    v16 bn[R], dn[R];
    for (int c = 0; c < R; ++c) {
      bn[c] = load<v16>(b + n * r + 16 * c);
      dn[c] = load<v16>(db + n * r + 16 * c);
    }
    for (int q = 0; q < Q; ++q) {
      const float d = dy[q * out + n];
      for (int c = 0; c < R; ++c) {
        acc[q][c] += d * bn[c];
        dn[c] += d * us[q][c];
      }
    }
    for (int c = 0; c < R; ++c) store<v16>(db + n * r + 16 * c, dn[c]);
  }
  for (int q = 0; q < Q; ++q) {
    for (int c = 0; c < R; ++c) {
      store<v16>(g + q * r + 16 * c, acc[q][c] * s);
    }
  }
  // da[j, k] += sum_q g[q, j] x[q, k], two vectors of k at a time (each g[q, j] broadcast once
  // for both)
  int64_t k = 0;
  for (; k + 32 <= in; k += 32) {
    if (next_x != nullptr) {
      for (int l = 0; l < 2 * Q; ++l) __builtin_prefetch(next_x + k * Q + 16 * l, 0, 2);
    }
    v16 xv[Q][2];
    for (int q = 0; q < Q; ++q) xv[q][0] = load<v16>(x + q * in + k), xv[q][1] = load<v16>(x + q * in + k + 16);
    for (int j = 0; j < r; ++j) {
      v16 d0 = load<v16>(da + j * in + k), d1 = load<v16>(da + j * in + k + 16);
      for (int q = 0; q < Q; ++q) {
        const float gq = g[q * r + j];
        d0 += gq * xv[q][0];
        d1 += gq * xv[q][1];
      }
      store<v16>(da + j * in + k, d0);
      store<v16>(da + j * in + k + 16, d1);
    }
  }
  for (; k + 16 <= in; k += 16) {
    v16 xv[Q];
    for (int q = 0; q < Q; ++q) xv[q] = load<v16>(x + q * in + k);
    for (int j = 0; j < r; ++j) {
      v16 d = load<v16>(da + j * in + k);
      for (int q = 0; q < Q; ++q) d += g[q * r + j] * xv[q];
      store<v16>(da + j * in + k, d);
    }
  }
  for (; k < in; ++k) {
    for (int j = 0; j < r; ++j) {
      float d = da[j * in + k];
      for (int q = 0; q < Q; ++q) d += g[q * r + j] * x[q * in + k];
      da[j * in + k] = d;
    }
  }
}

// Rows [m0, m1) through lora_aux_block, 8 at a time, then one by one.
template <int R>
FASTLLM_ALWAYS_INLINE void lora_aux_rows(const float* dy, const float* x, const float* u, const float* b, float s,
                                         int64_t out, int64_t in, int64_t m0, int64_t m1, float* g, float* db,
                                         float* da) {
  constexpr int r = 16 * R;
  int64_t m = m0;
  for (; m + 8 <= m1; m += 8) {
    const bool more = m + 16 <= m1;  // the next block's rows, into L2 while this one is multiplied
    lora_aux_block<8, R>(dy + m * out, x + m * in, u + m * r, b, s, out, in, g + m * r, db, da,
                         more ? dy + (m + 8) * out : nullptr, more ? x + (m + 8) * in : nullptr);
  }
  for (; m < m1; ++m) {
    lora_aux_block<1, R>(dy + m * out, x + m * in, u + m * r, b, s, out, in, g + m * r, db, da, nullptr, nullptr);
  }
}

FASTLLM_CLONES_X86_64_V4 void lora_aux_f32(const float* dy, const float* x, const float* u, const float* b, float s,
                                           int64_t out, int64_t in, int64_t r, int64_t m0, int64_t m1, float* g,
                                           float* db, float* da) {
  switch (r / 16) {
    case 1: return lora_aux_rows<1>(dy, x, u, b, s, out, in, m0, m1, g, db, da);
    case 2: return lora_aux_rows<2>(dy, x, u, b, s, out, in, m0, m1, g, db, da);
    case 3: return lora_aux_rows<3>(dy, x, u, b, s, out, in, m0, m1, g, db, da);
    default: return lora_aux_rows<4>(dy, x, u, b, s, out, in, m0, m1, g, db, da);
  }
}

// Whether lora_aux_f32 takes the rank-r products of a backward that merge_on_blas runs: on an
// AVX-512 CPU. Its blocks hold 2 Q R + 2 R 16-lane vectors (18 at Q = 8, R = 1): in AVX2's 16
// 8-lane registers they spill, and on an AMD Zen 3 the pass took longer than the BLAS calls
// it replaces (bench/README.md).
bool fused_aux(const at::Tensor& grad_out, const at::Tensor& lora_a) {
  const int64_t r = lora_a.size(0);
  return cpu_isa() == CpuIsa::kAvx512 && grad_out.scalar_type() == at::kFloat && r % 16 == 0 && r <= 64;
}

// da (r, in) and db (out, r) through lora_aux_f32 (g, rows x r, is its scratch), rows split
// across threads.
std::pair<at::Tensor, at::Tensor> lora_aux(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& u, const at::Tensor& lora_b, double scale) {
  const at::Tensor dy = grad_out.contiguous(), xc = x.contiguous(), uc = u.contiguous(), b = lora_b.contiguous();
  const int64_t rows = dy.size(0), out = dy.size(1), in = xc.size(1), r = uc.size(1);
  at::Tensor g = at::empty({rows, r}, dy.options());
  const int threads = at::get_num_threads();
  at::Tensor db_parts = at::zeros({threads, out, r}, dy.options());
  at::Tensor da_parts = at::zeros({threads, r, in}, dy.options());
  const float* dyp = dy.const_data_ptr<float>();
  const float* xp = xc.const_data_ptr<float>();
  const float* up = uc.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* gp = g.mutable_data_ptr<float>();
  float* dbp = db_parts.mutable_data_ptr<float>();
  float* dap = da_parts.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain_for(r * (2 * out + in)), [&](int64_t m0, int64_t m1) {
    const int64_t t = at::get_thread_num();
    lora_aux_f32(dyp, xp, up, bp, static_cast<float>(scale), out, in, r, m0, m1, gp, dbp + t * out * r,
                 dap + t * r * in);
  });
  return {da_parts.sum(0), db_parts.sum(0)};
}
#endif

// W + s B A in a buffer this thread reuses (the only place B A is formed): valid until the
// thread's next call.
const at::Tensor& merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                double scale) {
  thread_local at::Tensor merged;
  if (!merged.defined() || merged.scalar_type() != weight.scalar_type()) merged = at::empty({0}, weight.options());
  merged.resize_(weight.sizes());
#ifdef FASTLLM_HAVE_VECTORS
  const int64_t r = lora_a.size(0);
  if (weight.scalar_type() == at::kFloat && r <= 64) {
    const at::Tensor w = weight.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
    const int64_t out = w.size(0), in = w.size(1);
    const float* wp = w.const_data_ptr<float>();
    const float* ap = a.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    float* mp = merged.mutable_data_ptr<float>();
    at::parallel_for(0, out, grain_for(in * (r + 2)), [&](int64_t n0, int64_t n1) {
      merge_rows_f32(wp, ap, bp, r, static_cast<float>(scale), mp, n0, n1, in);
    });
    return merged;
  }
#endif
  at::addmm_out(merged, weight, lora_b, lora_a, 1.0, scale);
  return merged;
}

// x * keep / (1 - p), or x itself without a mask.
at::Tensor dropped(const at::Tensor& x, const std::optional<at::Tensor>& keep, double p) {
  if (!keep.has_value()) return x;
  return at::mul(x, *keep).mul_(1.0 / (1.0 - p));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
    const std::optional<at::Tensor>& keep, double dropout_p) {
  check_common(x, weight, lora_a, lora_b, keep, dropout_p);
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == weight.size(0), "bias: expected shape [", weight.size(0),
                "] (out_features), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ", x.scalar_type(),
                " (same as x), got ", bias->scalar_type());
  }
  at::Tensor u = tiled_mm({{dropped(x, keep, dropout_p), lora_a.t()}});  // (rows, r)
  at::Tensor y;
  if (merge_on_blas(x, keep)) {
    // BLAS engine, no dropout: y = x (W + s B A)^T, one product on the merged weight. A second
    // product s u B^T added into y re-reads and re-writes all of y: at 576 -> 1536 over 2048 rows,
    // 12.7 against 9.9 ms (bench/README.md). At B = 0 the merged weight is W exactly, so y is
    // still its base layer's output bit for bit.
    y = output_empty({x.size(0), weight.size(0)}, x.options());
    at::mm_out(y, x, merged_weight(weight, lora_a, lora_b, scale).t());
  } else {
    // y = x W^T + s u B^T in one pass when the tile kernel runs; b added after, as fastllm.ops.linear
    // does, so that at initialisation (B = 0) y is its base layer's output bit for bit
    y = tiled_mm({{x, weight.t()}, {u, lora_b.t(), scale}});
  }
  if (bias.has_value()) y.add_(*bias);
  return {y, u};
}

// One LoRA linear's backward with its input gradient dy W + g A (* keep / (1 - p)) written into a
// new dx (dx undefined) or added into the given dx (a group's running sum: on the BLAS engine by
// BLAS itself, beta = 1, not a second pass). Returns (dA, dB).
std::pair<at::Tensor, at::Tensor> lora_linear_bwd_into(
    at::Tensor& dx, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, double scale,
    const std::optional<at::Tensor>& keep, double dropout_p) {
  check_common(x, weight, lora_a, lora_b, keep, dropout_p);
  check_dim(grad_out, "grad_out", 2);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0),
              "grad_out: expected shape [", x.size(0), ", ", weight.size(0), "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ",
              x.scalar_type(), " (same as x), got ", grad_out.scalar_type());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == x.size(0) && u.size(1) == lora_a.size(0),
              "u: expected shape [", x.size(0), ", ", lora_a.size(0), "], got ", u.sizes());
  const bool accumulate = dx.defined();
  bool dx_done = false;
  if (merge_on_blas(x, keep)) {
    // dy W + s dy B A = dy (W + s B A): one product on the merged weight, as the forward, instead
    // of g A added into dx, which re-reads and re-writes all of dx (bench/README.md)
    const at::Tensor& merged = merged_weight(weight, lora_a, lora_b, scale);
    if (accumulate) {
      dx.addmm_(grad_out, merged);
    } else {
      dx = output_empty({grad_out.size(0), weight.size(1)}, grad_out.options());
      at::mm_out(dx, grad_out, merged);
    }
    dx_done = true;
#ifdef FASTLLM_HAVE_VECTORS
    if (fused_aux(grad_out, lora_a)) return lora_aux(grad_out, x, u, lora_b, scale);  // rank-r products, one pass
#endif
  }
  at::Tensor g = tiled_mm({{grad_out, lora_b, scale}});  // (rows, r), already scaled
  if (!dx_done) {  // no merged product above (the tile engine, dropout, other devices)
    if (!accumulate) dx = output_empty({grad_out.size(0), weight.size(1)}, grad_out.options());
    if (keep.has_value()) {
      tiled_mm_into(dx, {{grad_out, weight}}, accumulate);
      dx.add_(at::mm(g, lora_a).mul_(*keep), 1.0 / (1.0 - dropout_p));
    } else {
      tiled_mm_into(dx, {{grad_out, weight}, {g, lora_a}}, accumulate);
    }
  }
  at::Tensor da = tiled_mm({{g.t(), dropped(x, keep, dropout_p)}});  // (r, in)
  // db (out, r) = s dy^T u. The tile kernel reads dy^T as the transposed view it is. Through BLAS
  // it is issued as (s u^T dy)^T instead: MKL streams dy row by row in that orientation, 2.8-4.3x
  // faster than dy^T u at the SmolLM2 LoRA step's shapes (2048 rows, r = 8) on the Intel CPU
  // (bench/README.md); the (r, out) result is transposed into place, a copy of r x out values.
  const bool on_tile = tile_products() && grad_out.is_cpu() && grad_out.scalar_type() == at::kFloat;
  at::Tensor db = on_tile ? tiled_mm({{grad_out.t(), u, scale}})                  // (out, r)
                          : tiled_mm({{u.t(), grad_out, scale}}).t().contiguous();
  return {da, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, double scale,
    const std::optional<at::Tensor>& keep, double dropout_p) {
  at::Tensor dx;
  auto [da, db] = lora_linear_bwd_into(dx, grad_out, x, weight, lora_a, lora_b, u, scale, keep, dropout_p);
  return {dx, da, db};
}

// The lists of a group's parts: one weight, A, B and scale per projection.
void check_group(const at::TensorList& weights, const at::TensorList& lora_a, const at::TensorList& lora_b,
                 const at::ArrayRef<double>& scales) {
  const size_t n = weights.size();
  TORCH_CHECK(n > 0, "weights: expected at least one projection, got none");
  TORCH_CHECK(lora_a.size() == n && lora_b.size() == n && scales.size() == n,
              "lora_a, lora_b, scales: expected one per weight (", n, "), got ", lora_a.size(), ", ",
              lora_b.size(), ", ", scales.size());
}

// A group of LoRA linears that read the same x (a layer's q/k/v, gate/up), without dropout. The
// forward is each part's forward in one call. The backward sums the parts' input gradients as it
// makes them (lora_linear_bwd_into: on the BLAS engine dx = dy_0 M_0 + dy_1 M_1 + ..., M_i the
// merged weights, each product after the first accumulated into dx by BLAS), where separate calls
// leave autograd one addition of a (rows, in) tensor per extra part (bench/README.md). Returns
// [y_0 .. y_n-1, u_0 .. u_n-1] and [dx, dA_0 .., dB_0 ..].
std::vector<at::Tensor> lora_linear_group_fwd_cpu(const at::Tensor& x, at::TensorList weights,
                                                  const c10::List<std::optional<at::Tensor>>& biases,
                                                  at::TensorList lora_a, at::TensorList lora_b,
                                                  at::ArrayRef<double> scales) {
  check_group(weights, lora_a, lora_b, scales);
  const size_t n = weights.size();
  TORCH_CHECK(biases.size() == n, "biases: expected one per weight (", n, "), got ", biases.size());
  std::vector<at::Tensor> out(2 * n);
  for (size_t i = 0; i < n; ++i) {
    std::tie(out[i], out[n + i]) =
        lora_linear_fwd_cpu(x, weights[i], biases.get(i), lora_a[i], lora_b[i], scales[i], std::nullopt, 0.0);
  }
  return out;
}

std::vector<at::Tensor> lora_linear_group_bwd_cpu(at::TensorList grad_outs, const at::Tensor& x,
                                                  at::TensorList weights, at::TensorList lora_a,
                                                  at::TensorList lora_b, at::TensorList us,
                                                  at::ArrayRef<double> scales) {
  check_group(weights, lora_a, lora_b, scales);
  const size_t n = weights.size();
  TORCH_CHECK(grad_outs.size() == n && us.size() == n, "grad_outs, us: expected one per weight (", n,
              "), got ", grad_outs.size(), ", ", us.size());
  std::vector<at::Tensor> out(2 * n + 1);
  for (size_t i = 0; i < n; ++i) {
    std::tie(out[1 + i], out[1 + n + i]) = lora_linear_bwd_into(out[0], grad_outs[i], x, weights[i], lora_a[i],
                                                                lora_b[i], us[i], scales[i], std::nullopt, 0.0);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
  m.impl("lora_linear_group_fwd", &lora_linear_group_fwd_cpu);
  m.impl("lora_linear_group_bwd", &lora_linear_group_bwd_cpu);
}

#ifdef FASTLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
  m.impl("lora_linear_group_fwd", &lora_linear_group_fwd_cpu);
  m.impl("lora_linear_group_bwd", &lora_linear_group_bwd_cpu);
}
#endif

}  // namespace fastllm::cpu
