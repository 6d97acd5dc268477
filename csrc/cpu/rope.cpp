// Rotary position embedding on the CPU: q and k of a token rotated with that token's cos/sin.
//   y1 = x1 * cos - x2 * sin,  y2 = x2 * cos + x1 * sin   (x1, x2: the halves of one head)
// inverse=true negates sin (the backward). q: (N, Hq, D), k: (N, Hkv, D), cos/sin: (N, D/2)
// in acc_t (float, or double for float64 inputs); tokens are split across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_mm.h"  // output_empty
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"

namespace fastllm::cpu {
namespace {

// Rotates `heads` heads of one token; c, s hold the token's D/2 cos/sin values.
template <typename scalar_t, typename acc_t>
inline void rotate_token(const scalar_t* x, scalar_t* y, int64_t heads, int64_t half,
                         const acc_t* c, const acc_t* s, std::vector<acc_t>& xs,
                         std::vector<acc_t>& ys) {
  const int64_t D = 2 * half;
  for (int64_t h = 0; h < heads; ++h) {
    const acc_t* xr = widen<scalar_t, acc_t>(x + h * D, D, xs);
    acc_t* out = ys.data();
    const acc_t* x1 = xr;
    const acc_t* x2 = xr + half;
    int64_t i = 0;
    for (; i + Vec<acc_t>::size() <= half; i += Vec<acc_t>::size()) {
      const auto a = Vec<acc_t>::loadu(x1 + i), b = Vec<acc_t>::loadu(x2 + i);
      const auto cv = Vec<acc_t>::loadu(c + i), sv = Vec<acc_t>::loadu(s + i);
      (a * cv - b * sv).store(out + i);
      (b * cv + a * sv).store(out + half + i);
    }
    for (; i < half; ++i) {
      out[i] = x1[i] * c[i] - x2[i] * s[i];
      out[half + i] = x2[i] * c[i] + x1[i] * s[i];
    }
    narrow<scalar_t, acc_t>(out, y + h * D, D);
  }
}

template <typename scalar_t>
void rope_rows(const scalar_t* q, const scalar_t* k, const acc_type_t<scalar_t>* cos,
               const acc_type_t<scalar_t>* sin, scalar_t* qo, scalar_t* ko, int64_t tokens,
               int64_t hq, int64_t hk, int64_t half, bool inverse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = 2 * half;
  at::parallel_for(0, tokens, grain_for((hq + hk) * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs, ys(D), neg(half);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* c = cos + t * half;
      const acc_t* s = sin + t * half;
      if (inverse) {
        for (int64_t i = 0; i < half; ++i) neg[i] = -s[i];
        s = neg.data();
      }
      rotate_token<scalar_t, acc_t>(q + t * hq * D, qo + t * hq * D, hq, half, c, s, xs, ys);
      rotate_token<scalar_t, acc_t>(k + t * hk * D, ko + t * hk * D, hk, half, c, s, xs, ys);
    }
  });
}

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = output_empty(like.sizes(), like.options());
  maybe_poison(out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                bool inverse) {
  check_dtype(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k: expected dtype ", q.scalar_type(),
              " (same as q), got ", k.scalar_type());
  check_dim(q, "q", 3);
  check_dim(k, "k", 3);
  check_dim(cos, "cos", 2);
  check_dim(sin, "sin", 2);
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", cos, "cos");
  check_same_device(q, "q", sin, "sin");
  const int64_t N = q.size(0), D = q.size(2);
  TORCH_CHECK(D % 2 == 0, "q: expected an even head dimension, got ", D);
  TORCH_CHECK(k.size(0) == N && k.size(2) == D, "k: expected shape [", N, ", Hkv, ", D,
              "], got ", k.sizes());
  TORCH_CHECK(cos.size(0) == N && cos.size(1) == D / 2, "cos: expected shape [", N, ", ",
              D / 2, "], got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin: expected shape ", cos.sizes(),
              " (same as cos), got ", sin.sizes());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos.scalar_type() == acc && sin.scalar_type() == acc, "cos, sin: expected dtype ",
              acc, ", got ", cos.scalar_type(), " and ", sin.scalar_type());
  for (const auto* t : {&q, &k, &cos, &sin}) check_contiguous(*t, "q, k, cos and sin");
  at::Tensor qo = new_output(q), ko = new_output(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_fwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    rope_rows<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                        cos.const_data_ptr<acc_t>(), sin.const_data_ptr<acc_t>(),
                        qo.mutable_data_ptr<scalar_t>(), ko.mutable_data_ptr<scalar_t>(), N,
                        q.size(1), k.size(1), D / 2, inverse);
  });
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("rope_fwd", &rope_fwd_cpu); }

}  // namespace fastllm::cpu
