// c = a sum of products a b (+ c) for float32 CPU matrices through the tile kernel
// (fastllm/tile_mm.h), for the C++ ops (csrc/cpu/lora_linear.cpp) and the Python loops that run
// large products themselves (the chunked logits-free ops, fastllm/ops/_chunked.py,
// fastllm/ops/linear.py): side by side with torch's own BLAS call on the development CPU, the
// LM head's logits 1.3x faster, the step's products on par at 2048 rows and up to 1.25x faster
// at 64-512 rows; a transposed a (a weight gradient) runs no faster (bench/README.md).
// a and b are each row-major or a transposed view (either stride 1), c has unit column stride.
// Anything else (other strides, no AVX2) goes to ATen's mm, so the result never depends on
// the layout the caller happened to have.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "fastllm/checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // v8, FASTLLM_HAVE_VECTORS
#include "fastllm/cpu_mm.h"
#include "fastllm/tile_mm.h"

namespace fastllm::cpu {

namespace {

// dst (cols x rows, row-major) = src^T for src (rows x cols) with row stride ld. Threads take
// bands of 32 source columns (32 whole destination rows); a band is walked in 32 x 32 blocks,
// each as 8 x 8 tiles: 8 row loads, 24 in-register shuffles, 8 row stores (with AVX2; a plain
// loop otherwise and at the edges). ATen's copy of a transposed view runs element by element.
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
__attribute__((target("avx2"))) void transpose_8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
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
const bool kTranspose8 = cpu_isa() != CpuIsa::kNone;
#else
const bool kTranspose8 = false;
#endif

void transpose_f32(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  constexpr int64_t kB = 32;
  at::parallel_for(0, (cols + kB - 1) / kB, grain_for(kB * rows / 4), [&](int64_t begin, int64_t end) {
    for (int64_t jb = begin * kB; jb < std::min(cols, end * kB); jb += kB) {
      const int64_t je = std::min(cols, jb + kB);
      for (int64_t ib = 0; ib < rows; ib += kB) {
        const int64_t ie = std::min(rows, ib + kB);
        int64_t j8 = jb, i8 = ib;
#if defined(FASTLLM_HAVE_VECTORS) && defined(__x86_64__)
        if (kTranspose8) {
          j8 = jb + (je - jb) / 8 * 8;
          i8 = ib + (ie - ib) / 8 * 8;
          for (int64_t j = jb; j < j8; j += 8) {
            for (int64_t i = ib; i < i8; i += 8) transpose_8x8(src + i * ld + j, ld, dst + j * rows + i, rows);
          }
        }
#endif
        for (int64_t j = jb; j < je; ++j) {  // what the 8 x 8 tiles left: the block's last columns and rows
          float* d = dst + j * rows;
          for (int64_t i = (j < j8 ? i8 : ib); i < ie; ++i) d[i] = src[i * ld + j];
        }
      }
    }
  });
}

// the most values of a transposed B that packing transposes itself (a rank-64 factor of a
// 1024-wide layer); larger ones are copied first
constexpr int64_t kTransposeInPack = 64 * 1024;

bool unit_stride(const at::Tensor& t) { return t.stride(1) == 1 || t.stride(0) == 1; }

bool tile_fits(const at::Tensor& c, std::initializer_list<MMTerm> terms) {
  if (!c.device().is_cpu() || c.scalar_type() != at::kFloat || c.stride(1) != 1 || terms.size() > 4) return false;
  for (const MMTerm& t : terms) {
    if (!t.a.device().is_cpu() || !t.b.device().is_cpu() || t.a.scalar_type() != at::kFloat ||
        t.b.scalar_type() != at::kFloat || !unit_stride(t.a) || !unit_stride(t.b)) {
      return false;
    }
  }
  return true;
}

}  // namespace

at::Tensor contiguous_f32(const at::Tensor& b) {
  if (b.dim() != 2 || !b.device().is_cpu() || b.scalar_type() != at::kFloat || b.is_contiguous() ||
      b.stride(0) != 1) {
    return b.contiguous();
  }
  at::Tensor out = at::empty(b.sizes(), b.options());
  // b is the transposed view of a row-major (cols x rows) matrix with row stride b.stride(1)
  transpose_f32(b.const_data_ptr<float>(), b.size(1), b.size(0), b.stride(1), out.mutable_data_ptr<float>());
  return out;
}

void tiled_mm_into(at::Tensor& c, std::initializer_list<MMTerm> terms, bool accumulate) {
  for (const MMTerm& t : terms) {
    TORCH_CHECK(t.a.dim() == 2 && t.b.dim() == 2 && t.a.size(1) == t.b.size(0) && t.a.size(0) == c.size(0) &&
                    t.b.size(1) == c.size(1),
                "tiled_mm: shapes do not chain: a ", t.a.sizes(), ", b ", t.b.sizes(), ", c ", c.sizes());
  }
  if (tile_fits(c, terms)) {
    GemmTerm gt[4];
    at::Tensor copies[4];
    int n = 0;
    for (const MMTerm& t : terms) {
      // a row-major b is read by rows; a small transposed one (a rank-r factor) is transposed while
      // packed; a large one (a weight's .t()) is copied transposed first: packing would transpose it
      // again for every part of the rows
      const at::Tensor* b = &t.b;
      if (b->stride(1) != 1 && b->numel() > kTransposeInPack) b = &(copies[n] = contiguous_f32(*b));
      const bool b_rows = b->stride(1) == 1;
      gt[n++] = GemmTerm{t.a.const_data_ptr<float>(), t.a.stride(0), t.a.stride(1), b->const_data_ptr<float>(),
                         b_rows ? b->stride(0) : 1, b_rows ? 1 : b->stride(1), t.a.size(1),
                         static_cast<float>(t.alpha)};
    }
    if (gemm_f32(c.size(0), c.size(1), gt, n, c.mutable_data_ptr<float>(), c.stride(0), accumulate)) return;
  }
  bool acc = accumulate;
  for (const MMTerm& t : terms) {
    if (!acc && t.alpha == 1.0) {
      at::mm_out(c, t.a, t.b);
    } else {
      c.addmm_(t.a, t.b, /*beta=*/acc ? 1.0 : 0.0, /*alpha=*/t.alpha);
    }
    acc = true;
  }
  if (!acc) c.zero_();  // no terms
}

at::Tensor tiled_mm(std::initializer_list<MMTerm> terms) {
  TORCH_CHECK(terms.size() > 0, "tiled_mm: expected at least one term");
  const MMTerm& first = *terms.begin();
  at::Tensor c = at::empty({first.a.size(0), first.b.size(1)}, first.a.options());
  tiled_mm_into(c, terms, false);
  return c;
}

namespace {

at::Tensor transpose_f32_cpu(const at::Tensor& w) {
  check_dim(w, "w", 2);
  return contiguous_f32(w.t());
}

void mm_f32_out_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&c, "c"}, {&a, "a"}, {&b, "b"}}) {
    check_dtype(*t, name, {at::kFloat});
    check_dim(*t, name, 2);
  }
  check_same_device(c, "c", a, "a");
  check_same_device(c, "c", b, "b");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, "b: expected ", K, " rows (a's columns), got ", b.size(0));
  TORCH_CHECK(c.size(0) == M && c.size(1) == N, "c: expected shape [", M, ", ", N, "], got ", c.sizes());
  tiled_mm_into(c, {{a, b}}, accumulate);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("mm_f32_out_", &mm_f32_out_cpu);
  m.impl("transpose_f32", &transpose_f32_cpu);
}

}  // namespace fastllm::cpu
