// Cross-entropy and per-token log-prob/entropy rows on the CPU, for one chunk of logits.
// The chunked matmuls around them stay in ATen (fastllm/ops/linear_cross_entropy.py); these
// kernels do the row-wise work in place so the chunk's gradient reuses the logits' memory.
//
// xent_rows_ (per row r, V classes, x = logits row, y = label, s = row_scale[r]):
//   z    = c * tanh(x / c) when softcap c > 0, else x
//   lse  = log(sum_j exp(z_j))
//   loss = (1 - eps) * (lse - z_y) + eps * (lse - mean(z)) + zl * lse^2
//   dx_j = s * (p_j * (1 + 2 zl lse) - (1 - eps) [j == y] - eps / V) * dz_j/dx_j,
//          p = softmax(z), dz/dx = 1 - (z / c)^2 (1 without soft cap)
//   Rows with y == ignore_index get loss 0 and a zero gradient.
// logprob_rows (z = x / T, T the temperature):
//   logprob = z_y - lse (0 for y == ignore_index),  entropy = lse - sum_j p_j z_j
// logprob_rows_bwd_ (g, h = the gradients of logprob and entropy):
//   dx_j = (g ([j == y] - p_j) - h p_j (z_j - E[z])) / T,  E[z] = sum_j p_j z_j
//
// Rows are split across threads; each row is widened into a float (double for float64)
// scratch row. The float loops are compiled twice (AVX2+FMA and the baseline) and picked
// at load time, with an exp that the compiler vectorises, so one wheel runs everywhere.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_simd.h"
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"

// Without this GCC keeps the clamps and floor of exp_bounded scalar (they could raise FP
// exceptions, which no code here inspects), and none of the loops below vectorise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastllm::cpu {
namespace {

// ---------------------------------------------------------------------------- math

// tanh(u) = 1 - 2 / (exp(2u) + 1): saturates to +-1 without overflow.
template <typename T>
inline T tanh_f(T u) {
  return T(1) - T(2) / (exp_bounded(T(2) * u) + T(1));
}

template <typename T>
inline T row_max_t(const T* z, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

template <typename T>
inline T sum_exp_t(const T* z, int64_t n, T shift) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_bounded(z[j] - shift);
  return s;
}

// sum_j exp(z_j - shift) * z_j (for E[z] under the softmax).
template <typename T>
inline T sum_exp_z_t(const T* z, int64_t n, T shift) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_bounded(z[j] - shift) * z[j];
  return s;
}

template <typename T>
inline T sum_t(const T* z, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += z[j];
  return s;
}

// z = c * tanh(z / c) in place.
template <typename T>
inline void softcap_t(T* z, int64_t n, T c) {
  const T inv = T(1) / c;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = c * tanh_f(z[j] * inv);
}

// g_j = (a * exp(z_j - lse) - b) * (1 - (z_j / c)^2 if c > 0).
template <typename T>
inline void xent_grad_t(const T* z, int64_t n, T lse, T a, T b, T c, T* g) {
  if (c > T(0)) {
    const T inv = T(1) / c;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T t = z[j] * inv;
      g[j] = (a * exp_bounded(z[j] - lse) - b) * (T(1) - t * t);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = a * exp_bounded(z[j] - lse) - b;
  }
}

// g_j = -p_j * (a + b * (z_j - mean)),  p_j = exp(z_j - lse).
template <typename T>
inline void logprob_grad_t(const T* z, int64_t n, T lse, T a, T b, T mean, T* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = -exp_bounded(z[j] - lse) * (a + b * (z[j] - mean));
}

// The float versions, compiled for AVX2+FMA and for the baseline ISA.
FASTLLM_CLONES_X86_64_V4 float row_max(const float* z, int64_t n) { return row_max_t(z, n); }
FASTLLM_CLONES_X86_64_V4 float sum_exp(const float* z, int64_t n, float s) { return sum_exp_t(z, n, s); }
FASTLLM_CLONES_X86_64_V4 float sum_exp_z(const float* z, int64_t n, float s) { return sum_exp_z_t(z, n, s); }
FASTLLM_CLONES_X86_64_V4 float row_sum(const float* z, int64_t n) { return sum_t(z, n); }
FASTLLM_CLONES_X86_64_V4 void softcap(float* z, int64_t n, float c) { softcap_t(z, n, c); }
FASTLLM_CLONES_X86_64_V4 void xent_grad(const float* z, int64_t n, float lse, float a, float b, float c,
                                        float* g) {
  xent_grad_t(z, n, lse, a, b, c, g);
}
FASTLLM_CLONES_X86_64_V4 void logprob_grad(const float* z, int64_t n, float lse, float a, float b,
                                           float mean, float* g) {
  logprob_grad_t(z, n, lse, a, b, mean, g);
}
// float64 (gradchecks): plain loops.
double row_max(const double* z, int64_t n) { return row_max_t(z, n); }
double sum_exp(const double* z, int64_t n, double s) { return sum_exp_t(z, n, s); }
double sum_exp_z(const double* z, int64_t n, double s) { return sum_exp_z_t(z, n, s); }
double row_sum(const double* z, int64_t n) { return sum_t(z, n); }
void softcap(double* z, int64_t n, double c) { softcap_t(z, n, c); }
void xent_grad(const double* z, int64_t n, double lse, double a, double b, double c, double* g) {
  xent_grad_t(z, n, lse, a, b, c, g);
}
void logprob_grad(const double* z, int64_t n, double lse, double a, double b, double mean,
                  double* g) {
  logprob_grad_t(z, n, lse, a, b, mean, g);
}

// Row `x` widened to acc_t into `z` (scaled by `mul` when it is not 1).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* x, int64_t n, acc_t mul, acc_t* z) {
  for (int64_t j = 0; j < n; ++j) z[j] = static_cast<acc_t>(x[j]);
  if (mul != acc_t(1)) {
    for (int64_t j = 0; j < n; ++j) z[j] *= mul;
  }
}

// log(sum exp(z)), stable for any finite z: the max is taken out first.
template <typename acc_t>
inline acc_t log_sum_exp(const acc_t* z, int64_t n, acc_t* max_out) {
  const acc_t m = row_max(z, n);
  *max_out = m;
  return m + std::log(sum_exp(z, n, m));
}

// ---------------------------------------------------------------------------- kernels

template <typename scalar_t>
void xent_rows_kernel(scalar_t* logits, int64_t stride, const int64_t* labels,
                      const acc_type_t<scalar_t>* row_scale, acc_type_t<scalar_t>* loss,
                      acc_type_t<scalar_t>* lse_out, int64_t rows, int64_t V, int64_t ignore_index,
                      double eps_d, double z_loss_d, double softcap_d, bool compute_grad) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t eps = acc_t(eps_d), zl = acc_t(z_loss_d), c = acc_t(softcap_d);
  at::parallel_for(0, rows, grain_for(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(V), g(compute_grad ? V : 0);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* x = logits + r * stride;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        loss[r] = acc_t(0);
        lse_out[r] = acc_t(0);
        if (compute_grad) std::fill(x, x + V, scalar_t(0));
        continue;
      }
      TORCH_CHECK(y >= 0 && y < V, "labels: expected values in [0, ", V, ") or ignore_index ",
                  ignore_index, ", got ", y);
      load_row(x, V, acc_t(1), z.data());
      if (c > acc_t(0)) softcap(z.data(), V, c);
      acc_t m;
      const acc_t lse = log_sum_exp(z.data(), V, &m);
      acc_t l = lse * (acc_t(1) + zl * lse) - (acc_t(1) - eps) * z[y];
      if (eps > acc_t(0)) l -= eps * row_sum(z.data(), V) / acc_t(V);
      loss[r] = l;
      lse_out[r] = lse;
      if (!compute_grad) continue;
      const acc_t s = row_scale[r];
      xent_grad(z.data(), V, lse, s * (acc_t(1) + acc_t(2) * zl * lse), s * eps / acc_t(V), c,
                g.data());
      const acc_t t = c > acc_t(0) ? z[y] / c : acc_t(0);
      g[y] -= s * (acc_t(1) - eps) * (acc_t(1) - t * t);
      narrow<scalar_t, acc_t>(g.data(), x, V);
    }
  });
}

template <typename scalar_t>
void logprob_rows_kernel(const scalar_t* logits, int64_t stride, const int64_t* targets,
                         acc_type_t<scalar_t>* logprob, acc_type_t<scalar_t>* entropy,
                         int64_t rows, int64_t V, int64_t ignore_index, double inv_temperature) {
  using acc_t = acc_type_t<scalar_t>;
  at::parallel_for(0, rows, grain_for(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = targets[r];
      TORCH_CHECK(y == ignore_index || (y >= 0 && y < V), "targets: expected values in [0, ", V,
                  ") or ignore_index ", ignore_index, ", got ", y);
      load_row(logits + r * stride, V, acc_t(inv_temperature), z.data());
      acc_t m;
      const acc_t lse = log_sum_exp(z.data(), V, &m);
      const acc_t mean = sum_exp_z(z.data(), V, lse);  // E[z] = sum p z
      logprob[r] = y == ignore_index ? acc_t(0) : z[y] - lse;
      entropy[r] = lse - mean;
    }
  });
}

template <typename scalar_t>
void logprob_rows_bwd_kernel(scalar_t* logits, int64_t stride, const int64_t* targets,
                             const acc_type_t<scalar_t>* grad_logprob,
                             const acc_type_t<scalar_t>* grad_entropy, int64_t rows, int64_t V,
                             int64_t ignore_index, double inv_temperature) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t inv_t = acc_t(inv_temperature);
  at::parallel_for(0, rows, grain_for(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(V), g(V);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* x = logits + r * stride;
      const int64_t y = targets[r];
      TORCH_CHECK(y == ignore_index || (y >= 0 && y < V), "targets: expected values in [0, ", V,
                  ") or ignore_index ", ignore_index, ", got ", y);
      load_row(x, V, inv_t, z.data());
      acc_t m;
      const acc_t lse = log_sum_exp(z.data(), V, &m);
      const acc_t mean = sum_exp_z(z.data(), V, lse);
      const acc_t glp = y == ignore_index ? acc_t(0) : grad_logprob[r];
      logprob_grad(z.data(), V, lse, glp * inv_t, grad_entropy[r] * inv_t, mean, g.data());
      if (y != ignore_index) g[y] += glp * inv_t;
      narrow<scalar_t, acc_t>(g.data(), x, V);
    }
  });
}

// ---------------------------------------------------------------------------- host code

void check_rows(const at::Tensor& logits, const at::Tensor& labels, const char* labels_name) {
  check_dtype(logits, "logits", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_dim(logits, "logits", 2);
  TORCH_CHECK(logits.stride(1) == 1, "logits: expected unit stride along the vocabulary, got strides ",
              logits.strides());
  check_dtype(labels, labels_name, {at::kLong});
  check_dim(labels, labels_name, 1);
  check_contiguous(labels, labels_name);
  check_same_device(logits, "logits", labels, labels_name);
  TORCH_CHECK(labels.size(0) == logits.size(0), labels_name, ": expected shape [", logits.size(0),
              "] (the rows of logits), got ", labels.sizes());
}

void check_acc_vector(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc, " (the accumulation type of ",
              logits.scalar_type(), " logits), got ", t.scalar_type());
  check_dim(t, name, 1);
  check_contiguous(t, name);
  check_same_device(logits, "logits", t, name);
  TORCH_CHECK(t.size(0) == logits.size(0), name, ": expected shape [", logits.size(0),
              "] (the rows of logits), got ", t.sizes());
}

at::Tensor new_acc_vector(const at::Tensor& logits) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(acc));
  maybe_poison(out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> xent_rows_cpu(at::Tensor& logits, const at::Tensor& labels,
                                                 const at::Tensor& row_scale, int64_t ignore_index,
                                                 double label_smoothing, double z_loss,
                                                 double softcap_value, bool compute_grad) {
  check_rows(logits, labels, "labels");
  check_acc_vector(row_scale, "row_scale", logits);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0, "z_loss: expected a non-negative value, got ", z_loss);
  TORCH_CHECK(softcap_value >= 0, "softcap: expected a positive value (0 for none), got ", softcap_value);
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor loss = new_acc_vector(logits), lse = new_acc_vector(logits);
  if (rows == 0) return {loss, lse};
  TORCH_CHECK(V > 0, "logits: expected at least one class, got shape ", logits.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "xent_rows", [&] {
    using acc_t = acc_type_t<scalar_t>;
    xent_rows_kernel<scalar_t>(logits.mutable_data_ptr<scalar_t>(), logits.stride(0),
                               labels.const_data_ptr<int64_t>(), row_scale.const_data_ptr<acc_t>(),
                               loss.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), rows,
                               V, ignore_index, label_smoothing, z_loss, softcap_value, compute_grad);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> logprob_rows_cpu(const at::Tensor& logits,
                                                    const at::Tensor& targets, int64_t ignore_index,
                                                    double inv_temperature) {
  check_rows(logits, targets, "targets");
  TORCH_CHECK(inv_temperature > 0, "temperature: expected a positive value, got 1/", inv_temperature);
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor logprob = new_acc_vector(logits), entropy = new_acc_vector(logits);
  if (rows == 0) return {logprob, entropy};
  TORCH_CHECK(V > 0, "logits: expected at least one class, got shape ", logits.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_rows", [&] {
    using acc_t = acc_type_t<scalar_t>;
    logprob_rows_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0),
                                  targets.const_data_ptr<int64_t>(), logprob.mutable_data_ptr<acc_t>(),
                                  entropy.mutable_data_ptr<acc_t>(), rows, V, ignore_index,
                                  inv_temperature);
  });
  return {logprob, entropy};
}

void logprob_rows_bwd_cpu(at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                          int64_t ignore_index, double inv_temperature) {
  check_rows(logits, targets, "targets");
  check_acc_vector(grad_logprob, "grad_logprob", logits);
  check_acc_vector(grad_entropy, "grad_entropy", logits);
  TORCH_CHECK(inv_temperature > 0, "temperature: expected a positive value, got 1/", inv_temperature);
  const int64_t rows = logits.size(0), V = logits.size(1);
  if (rows == 0) return;
  TORCH_CHECK(V > 0, "logits: expected at least one class, got shape ", logits.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_rows_bwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    logprob_rows_bwd_kernel<scalar_t>(logits.mutable_data_ptr<scalar_t>(), logits.stride(0),
                                      targets.const_data_ptr<int64_t>(),
                                      grad_logprob.const_data_ptr<acc_t>(),
                                      grad_entropy.const_data_ptr<acc_t>(), rows, V, ignore_index,
                                      inv_temperature);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("xent_rows_", &xent_rows_cpu);
  m.impl("logprob_rows", &logprob_rows_cpu);
  m.impl("logprob_rows_bwd_", &logprob_rows_bwd_cpu);
}

}  // namespace fastllm::cpu
