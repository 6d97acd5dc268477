// Fused sampling on the CPU: temperature, top-k and top-p filtering, and the draw from a
// given uniform, one row per task. Per row b with z = logits / T:
//   greedy (T == 0): token = argmax(logits) (first on ties), logprob under softmax(logits);
//   otherwise      : keep z_i >= t, t = max(top-k value threshold, top-p value threshold),
//                    token = the first kept i (in index order) whose running sum of exp(z - m)
//                    exceeds u * (sum over kept), logprob = z_token - logsumexp(z) (the
//                    temperature-scaled distribution before filtering).
// Thresholds are token values, so ties with the boundary token are all kept. The kernel is
// deterministic: the randomness is the uniform u, drawn by the caller.
//
// No row is sorted. Per sampled row:
//   1. one vectorised pass: z = x / T, its order-preserving 32-bit key, m = max z;
//   2. one vectorised pass: e = exp(z - m) in float, total_all = sum e (in double);
//   3. thresholds by radix selection over the keys (levels of 11, 11 and 10 bits): a
//      histogram of counts and masses per bucket, a walk from the largest bucket to the one
//      where the running count reaches k (top-k) or the running mass reaches top_p * kept
//      (top-p), then the same inside that bucket's elements only. The last level is a single
//      key, i.e. the exact threshold value. Top-p selects among the tokens top-k kept, or
//      (top-p alone) among those above a cut that provably lies below the nucleus threshold;
//   4. the draw: masked chunk sums in index order find the chunk where the running mass
//      crosses u * total, then a walk inside it.
// The float exp is within 2.6e-7 (relative) of exp, so every running mass is within
// 2.6e-7 * total of its exact value. Each mass comparison the result depends on (the top-p
// boundary, the draw) is checked against a margin of 2^-20 * total; a row where one falls
// inside the margin is recomputed with e = exp(z - m) in double (std::exp), so the result is
// the one exact arithmetic gives, as the float64 reference computes it.
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
#include <type_traits>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_simd.h"
#include "fastllm/grain.h"
#include "fastllm/sampling_checks.h"

// Without this GCC keeps the clamps of exp_neg_flush and the selects scalar (they could raise
// FP exceptions, which no code here inspects), and the loops below do not vectorise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastllm::cpu {
namespace {

// ---------------------------------------------------------------------------- vector passes

// z[i] = x[i] / T (IEEE division, as the reference computes it) and its order-preserving
// key (larger float, larger key; -0 taken as +0, since the two compare equal as
// thresholds); returns max z.
FASTLLM_CLONES_X86_64_V3 float scale_and_key(const float* __restrict x, int64_t n, float T, float* __restrict z,
                                             uint32_t* __restrict key) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] / T + 0.0f;
    z[i] = v;
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    key[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    m = v > m ? v : m;
  }
  return m;
}

// e[i] = exp(z[i] - m) (float); returns sum e in double.
FASTLLM_CLONES_X86_64_V3 double exp_shifted(const float* __restrict z, int64_t n, float m, float* __restrict e) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float v = exp_neg_flush(z[i] - m);
    e[i] = v;
    s += v;
  }
  return s;
}

// sum of e[i] over key[i] >= t, in double.
FASTLLM_CLONES_X86_64_V3 double masked_sum(const float* __restrict e, const uint32_t* __restrict key, int64_t n,
                                           uint32_t t) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += key[i] >= t ? double(e[i]) : 0.0;
  return s;
}

FASTLLM_CLONES_X86_64_V4 float row_max(const float* __restrict x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum exp(x[i] - m) with the float exp, in double.
FASTLLM_CLONES_X86_64_V4 double sum_exp_shifted(const float* __restrict x, int64_t n, float m) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_neg_flush(x[i] - m);
  return s;
}

// The double versions of the passes above (the exact recomputation of a row).
double exp_shifted_exact(const float* z, int64_t n, float m, double* e) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    e[i] = std::exp(double(z[i] - m));
    s += e[i];
  }
  return s;
}

double masked_sum_exact(const double* e, const uint32_t* key, int64_t n, uint32_t t) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += key[i] >= t ? e[i] : 0.0;
  return s;
}

// ---------------------------------------------------------------------------- radix select

constexpr int kLevels = 3;
constexpr int kShift[kLevels] = {21, 10, 0};
constexpr uint32_t kMask[kLevels] = {0x7FFu, 0x7FFu, 0x3FFu};
constexpr int kBuckets = 2048;

template <typename E>
struct Scratch {
  std::vector<float> z;
  std::vector<E> e;
  std::vector<uint32_t> key, list_key, cand_key;
  std::vector<E> list_e, cand_e;
  std::vector<int32_t> count = std::vector<int32_t>(kBuckets);
  std::vector<double> mass = std::vector<double>(kBuckets);
};

// The elements with key >= floor, in index order, into (out_key, out_e); returns their mass.
// Branch-free (the write always happens, the end advances by the test), so an unpredictable
// test costs no mispredictions.
template <typename E>
double gather_at_least(const uint32_t* key, const E* e, int64_t n, uint32_t floor, std::vector<uint32_t>& out_key,
                       std::vector<E>& out_e) {
  out_key.resize(static_cast<size_t>(n) + 1);
  out_e.resize(static_cast<size_t>(n) + 1);
  uint32_t* ok = out_key.data();
  E* oe = out_e.data();
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key[i];
    const E v = e[i];
    ok[c] = k;
    oe[c] = v;
    c += k >= floor ? 1 : 0;
  }
  out_key.resize(static_cast<size_t>(c));
  out_e.resize(static_cast<size_t>(c));
  double sum = 0;
  for (int64_t i = 0; i < c; ++i) sum += double(oe[i]);
  return sum;
}

struct Selection {
  uint32_t key;       // the threshold key: the largest key v with weight(key >= v) >= target
  double mass_above;  // mass of the elements with key > v (ByMass only)
  double mass_at;     // mass of the elements with key == v (ByMass only)
};

// The largest key v such that the count (ByMass false) or the mass (ByMass true) of the
// elements (keys, es)[0, n) with key >= v reaches `target`; when none does (a mass target
// above the total by rounding), the smallest key. Each level histograms the elements left,
// walks the buckets from the largest, and keeps only the boundary bucket's elements.
template <bool ByMass, typename E>
Selection radix_select(Scratch<E>& s, const uint32_t* keys, const E* es, int64_t n, double target) {
  double acc_mass = 0;
  int64_t acc_count = 0;
  uint32_t prefix = 0;
  int32_t* count = s.count.data();
  double* mass = s.mass.data();
  for (int level = 0; level < kLevels; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = kMask[level];
    const int buckets = static_cast<int>(mask) + 1;
    std::fill(count, count + buckets, 0);
    if (ByMass) std::fill(mass, mass + buckets, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t b = (keys[i] >> shift) & mask;
      count[b] += 1;
      if (ByMass) mass[b] += double(es[i]);
    }
    int chosen = -1, lowest = -1;
    for (int b = buckets - 1; b >= 0; --b) {
      if (count[b] == 0) continue;
      lowest = b;
      const bool reached = ByMass ? acc_mass + mass[b] >= target : double(acc_count + count[b]) >= target;
      if (reached) {
        chosen = b;
        break;
      }
      if (ByMass) acc_mass += mass[b];
      acc_count += count[b];
    }
    if (lowest < 0) return Selection{0, 0.0, 0.0};  // no elements
    if (chosen < 0) {  // not reached (rounding): the smallest bucket, its mass not above
      chosen = lowest;
      if (ByMass) acc_mass -= mass[lowest];
      acc_count -= count[lowest];
    }
    prefix |= static_cast<uint32_t>(chosen) << shift;
    if (level == kLevels - 1) return Selection{prefix, acc_mass, ByMass ? mass[chosen] : 0.0};
    // Keep only the elements of the chosen bucket (their higher bits all equal `prefix`): copied
    // out at the first level, compacted in place after (c <= i).
    const uint32_t hi_mask = ~((uint32_t(1) << shift) - 1);
    if (level == 0) {
      s.cand_key.resize(static_cast<size_t>(count[chosen]));
      s.cand_e.resize(static_cast<size_t>(count[chosen]));
    }
    uint32_t* ck = s.cand_key.data();
    E* ce = s.cand_e.data();
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      if ((keys[i] & hi_mask) == prefix) {
        ck[c] = keys[i];
        ce[c] = es[i];
        ++c;
      }
    }
    keys = ck;
    es = ce;
    n = c;
  }
  return Selection{prefix, acc_mass, 0.0};  // not reached
}

// ---------------------------------------------------------------------------- rows

constexpr double kMargin = 1.0 / (1 << 20);  // relative to the row's kept mass
constexpr int64_t kDrawChunk = 1024;

// Samples one row with e = exp(z - m) held in E (float: fast; double: exact). With `certify`,
// returns false (and writes nothing) when a mass comparison falls within the margin.
template <typename E>
bool sample_row(const float* row, int64_t V, float temperature, int64_t top_k, float top_p, float u,
                Scratch<E>& s, bool certify, int64_t* token, float* logprob) {
  s.z.resize(V);
  s.e.resize(V);
  s.key.resize(V);
  const float m = scale_and_key(row, V, temperature, s.z.data(), s.key.data());
  if (certify && !std::isfinite(m)) return false;
  double total_all;
  if constexpr (std::is_same_v<E, float>) {
    total_all = exp_shifted(s.z.data(), V, m, s.e.data());
  } else {
    total_all = exp_shifted_exact(s.z.data(), V, m, s.e.data());
  }

  uint32_t threshold = 0;  // keep key >= threshold; 0 keeps everything
  double kept = total_all;
  const bool use_k = top_k > 0 && top_k < V, use_p = top_p < 1.f;
  // The elements top-p selects among, as a list: those top-k kept, or for top-p alone those
  // above a cut that provably lies below the nucleus threshold.
  const uint32_t* list_key = s.key.data();
  const E* list_e = s.e.data();
  int64_t list_n = V;
  if (use_k) {
    threshold = radix_select<false>(s, s.key.data(), s.e.data(), V, double(top_k)).key;
    kept = gather_at_least(s.key.data(), s.e.data(), V, threshold, s.list_key, s.list_e);
    list_key = s.list_key.data();
    list_e = s.list_e.data();
    list_n = static_cast<int64_t>(s.list_key.size());
  } else if (use_p) {
    // Elements with z < cut have e < tau * (1 + 1e-6), tau = (1 - p) * kept / (4 V): all of
    // them together hold less than (1 - p) * kept / 2, so the elements with z >= cut hold more
    // than top_p * kept and the nucleus threshold is one of theirs. Checked below.
    const double tau = (1.0 - double(top_p)) * kept / (4.0 * double(V));
    const float cut = static_cast<float>(double(m) + std::log(tau));
    if (cut > -std::numeric_limits<float>::infinity() && cut < m) {
      uint32_t cut_bits;
      const float c0 = cut + 0.0f;
      std::memcpy(&cut_bits, &c0, sizeof(cut_bits));
      const uint32_t cut_key = (cut_bits & 0x80000000u) ? ~cut_bits : (cut_bits | 0x80000000u);
      const double listed = gather_at_least(s.key.data(), s.e.data(), V, cut_key, s.list_key, s.list_e);
      if (listed > double(top_p) * kept + (1.0 - double(top_p)) * kept / 4) {
        list_key = s.list_key.data();
        list_e = s.list_e.data();
        list_n = static_cast<int64_t>(s.list_key.size());
      }
    }
  }
  if (use_p) {
    const double target = double(top_p) * kept;
    const Selection p = radix_select<true>(s, list_key, list_e, list_n, target);
    if (certify) {
      const double margin = kMargin * kept;
      if (!(target - p.mass_above > margin && p.mass_above + p.mass_at - target > margin)) return false;
    }
    threshold = std::max(threshold, p.key);
    kept = p.mass_above + p.mass_at;
  }

  // The draw: chunk sums in index order up to the chunk where the running mass crosses.
  const double target = double(u) * kept;
  const double margin = kMargin * kept;
  const E* e = s.e.data();
  const uint32_t* key = s.key.data();
  double cum = 0;
  int64_t chosen = -1;
  for (int64_t off = 0; off < V && chosen < 0; off += kDrawChunk) {
    const int64_t len = std::min(kDrawChunk, V - off);
    double chunk;
    if constexpr (std::is_same_v<E, float>) {
      chunk = masked_sum(e + off, key + off, len, threshold);
    } else {
      chunk = masked_sum_exact(e + off, key + off, len, threshold);
    }
    if (cum + chunk <= target) {
      cum += chunk;
      continue;
    }
    // Walk the chunk, then (rounding: the chunk sum crossed, the walk did not) the rest.
    for (int64_t i = off; i < V; ++i) {
      if (key[i] < threshold) continue;
      const double next = cum + double(e[i]);
      if (next > target) {
        if (certify && !(target - cum > margin && next - target > margin)) return false;
        chosen = i;
        break;
      }
      cum = next;
    }
  }
  if (chosen < 0) {  // rounding fallback: the last kept token
    if (certify) return false;
    chosen = V - 1;
    while (chosen > 0 && key[chosen] < threshold) --chosen;
  }
  *token = chosen;
  *logprob = static_cast<float>(double(s.z[chosen] - m) - std::log(total_all));
  return true;
}

// The index of the first x[i] == m, or n - 1 if there is none; 16 at a time (one compare and
// one test per block), then one by one within the block that holds it.
FASTLLM_CLONES_X86_64_V4 int64_t first_equal(const float* __restrict x, int64_t n, float m) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    int hit = 0;
    for (int l = 0; l < 16; ++l) hit |= x[i + l] == m;
    if (hit) break;
  }
  while (i < n - 1 && !(x[i] == m)) ++i;
  return i;
}

void greedy_row(const float* row, int64_t V, int64_t* token, float* logprob) {
  const float m = row_max(row, V);
  const int64_t best = first_equal(row, V, m);  // the first maximum
  if (!std::isfinite(m)) {  // as exact arithmetic gives it (inf - inf: NaN)
    double s = 0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(double(row[i]) - double(m));
    *token = best;
    *logprob = static_cast<float>(-std::log(s));
    return;
  }
  *token = best;
  *logprob = static_cast<float>(-std::log(sum_exp_shifted(row, V, m)));
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
  // A row of V elements per item: a small vocabulary runs inline.
  at::parallel_for(0, B, grain_for(V), [&](int64_t begin, int64_t end) {
    Scratch<float> fast;
    Scratch<double> exact;
    for (int64_t b = begin; b < end; ++b) {
      const float* row = x + b * V;
      if (!(t[b] > 0.f)) {
        greedy_row(row, V, tok + b, lp + b);
      } else if (!sample_row(row, V, t[b], k[b], p[b], u[b], fast, true, tok + b, lp + b)) {
        sample_row(row, V, t[b], k[b], p[b], u[b], exact, false, tok + b, lp + b);
      }
    }
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace fastllm::cpu
