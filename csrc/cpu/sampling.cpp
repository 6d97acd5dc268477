// Fused sampling on the CPU: temperature, top-k and top-p filtering, and the draw from a
// given uniform, one row per task. Per row b with z = logits / T:
//   greedy (T == 0): token = argmax(logits) (first on ties), logprob under softmax(logits);
//   otherwise      : keep z_i >= t, t = max(top-k value threshold, top-p value threshold),
//                    token = the first kept i (in index order) whose running sum of exp(z - m)
//                    exceeds u * (sum over kept), logprob = z_token - logsumexp(z) (the
//                    temperature-scaled distribution before filtering).
// Thresholds are token values, so ties with the boundary token are all kept. The kernel is
// deterministic: the randomness is the uniform u, drawn by the caller.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "fastllm/sampling_checks.h"
#include "fastllm/checks.h"

namespace fastllm::cpu {
namespace {

void sample_row(const float* row, int64_t V, float temperature, int64_t top_k, float top_p,
                float u, std::vector<float>& z, std::vector<float>& sorted, int64_t* token,
                float* logprob) {
  if (!(temperature > 0.f)) {  // greedy
    const int64_t best = std::max_element(row, row + V) - row;  // first maximum
    double s = 0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(double(row[i]) - double(row[best]));
    *token = best;
    *logprob = static_cast<float>(-std::log(s));
    return;
  }
  z.resize(V);
  for (int64_t i = 0; i < V; ++i) z[i] = row[i] / temperature;
  const float m = *std::max_element(z.begin(), z.end());
  double total_all = 0;
  for (int64_t i = 0; i < V; ++i) total_all += std::exp(double(z[i] - m));
  float threshold = -std::numeric_limits<float>::infinity();
  const bool use_k = top_k > 0 && top_k < V, use_p = top_p < 1.f;
  if (use_k || use_p) {
    sorted.assign(z.begin(), z.end());
    const int64_t keep = use_k ? top_k : V;
    // Only the `keep` largest values matter for either filter: order those, descending.
    std::partial_sort(sorted.begin(), sorted.begin() + keep, sorted.end(), std::greater<float>());
    if (use_k) threshold = sorted[keep - 1];
    if (use_p) {
      double kept_mass = 0;  // mass left by top-k (every value >= its threshold, ties included)
      for (int64_t i = 0; i < V; ++i) {
        if (z[i] >= threshold) kept_mass += std::exp(double(z[i] - m));
      }
      // Walk the kept values from the largest; the first one at which the running mass
      // reaches top_p becomes the threshold. Ties beyond `keep` (unsorted) all equal the
      // smallest kept value, so they cannot move the threshold.
      double cum = 0;
      for (int64_t r = 0; r < keep; ++r) {
        cum += std::exp(double(sorted[r] - m));
        if (cum >= double(top_p) * kept_mass) {
          threshold = std::max(threshold, sorted[r]);
          break;
        }
      }
    }
  }
  double total = 0;
  int64_t last = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (z[i] >= threshold) {
      total += std::exp(double(z[i] - m));
      last = i;
    }
  }
  const double target = double(u) * total;
  double cum = 0;
  int64_t chosen = last;  // rounding fallback: the last kept token
  for (int64_t i = 0; i < V; ++i) {
    if (z[i] >= threshold) {
      cum += std::exp(double(z[i] - m));
      if (cum > target) {
        chosen = i;
        break;
      }
    }
  }
  *token = chosen;
  *logprob = static_cast<float>(double(z[chosen] - m) - std::log(total_all));
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits,
                                                     const at::Tensor& temperature,
                                                     const at::Tensor& top_k,
                                                     const at::Tensor& top_p,
                                                     const at::Tensor& uniforms) {
  check_sampling_inputs(logits, temperature, top_k, top_p, uniforms);
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options());
  const float* x = logits.const_data_ptr<float>();
  const float* t = temperature.const_data_ptr<float>();
  const int32_t* k = top_k.const_data_ptr<int32_t>();
  const float* p = top_p.const_data_ptr<float>();
  const float* u = uniforms.const_data_ptr<float>();
  int64_t* tok = tokens.mutable_data_ptr<int64_t>();
  float* lp = logprobs.mutable_data_ptr<float>();
  // Rows per thread chunk: a small vocabulary runs inline (a fork/join costs more).
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / V), [&](int64_t begin, int64_t end) {
    std::vector<float> z, sorted;
    for (int64_t b = begin; b < end; ++b) {
      sample_row(x + b * V, V, t[b], k[b], p[b], u[b], z, sorted, tok + b, lp + b);
    }
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace fastllm::cpu
