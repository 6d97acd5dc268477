// Decode attention on the CPU: one new query per sequence against a preallocated KV cache.
//   out[b, hq] = softmax(scale * q[b, hq] . K[b, :len_b, hkv]) @ V[b, :len_b, hkv],
//   hkv = hq / G with G = Hq / Hkv query heads per key/value head (grouped-query attention).
// Work is split over (sequence, kv head) tasks (the wide bodies: whole sequences when there
// are at least two per thread); each task loads every key and value row of its heads once and
// uses it for all G query heads of each group. Within a task the keys are
// walked in blocks with an online softmax (running max m, running sum l, rescaled
// accumulator), so the scratch stays a block of scores whatever the cache length.
// Computed in float (double for float64); a sequence with length 0 gets zeros.
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

#include "fastllm/balanced_for.h"
#include "fastllm/checks.h"
#include "fastllm/decode_attention_checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/cpu_simd.h"
#include "fastllm/cpu_vec.h"
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // v16, load, reduce_all

namespace fastllm::cpu {
namespace {

constexpr int64_t kKeyBlock = 64;  // keys per online-softmax step

#if defined(__GNUC__) || defined(__clang__)
// float32 with D % 8 == 0 (every real head size): the task body on 8-lane vector types
// (fastllm/cpu_simd.h), compiled for AVX2 and the baseline (target_clones). ATen's
// Vectorized<float> is scalar in this extension's build, which left the generic body ~3x
// slower than torch's own matmuls.

// One online-softmax step for a query head over a block of n scores s (in place): the running
// max m and sum l move on, s becomes exp(s - m_new), and the factor exp(m_old - m_new) by which
// the head's output accumulator must be rescaled is returned (0 on the first block:
// exp(-inf)). Inlined into both task bodies, so each gets its own ISA.
FASTLLM_ALWAYS_INLINE float softmax_step(float* s, int64_t n, float& m, float& l) {
  float m_new = m;
  for (int64_t j = 0; j < n; ++j) m_new = std::max(m_new, s[j]);
  const float correction = std::exp(m - m_new);
  f8 sum8 = splat8(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const f8 e = exp8_nonpos(load8(s + j) - m_new);
    store8(s + j, e);
    sum8 += e;
  }
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += sum8[k];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m_new);
    sum += s[j];
  }
  l = l * correction + sum;
  m = m_new;
  return correction;
}

// One (sequence, kv head) task: q (G, D) rows, keys/values of the head every `stride`
// floats, len keys; out (G, D). scratch: 2 * G * D + G * kKeyBlock floats.
FASTLLM_CLONES_AVX2 void decode_task_f32(const float* q, const float* kc, const float* vc, int64_t stride,
                                         int64_t len, int64_t G, int64_t D, float scale, float* out,
                                         float* scratch) {
  float* qs = scratch;
  float* acc = qs + G * D;
  float* scores = acc + G * D;
  for (int64_t i = 0; i < G * D; i += 8) {
    store8(qs + i, load8(q + i) * scale);
    store8(acc + i, splat8(0.0f));
  }
  float m[8], l[8];  // G <= 8 on this path
  for (int64_t g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.0f;
  for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, len - j0);
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = kc + (j0 + j) * stride;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qs + g * D;
        f8 s0 = splat8(0.0f), s1 = splat8(0.0f);
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
          s0 += load8(qg + d) * load8(kr + d);
          s1 += load8(qg + d + 8) * load8(kr + d + 8);
        }
        if (d < D) s0 += load8(qg + d) * load8(kr + d);
        s0 += s1;
        float s = 0.0f;
        for (int k = 0; k < 8; ++k) s += s0[k];
        scores[g * kKeyBlock + j] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * kKeyBlock;
      const float correction = softmax_step(s, n, m[g], l[g]);
      if (correction != 1.0f) {
        float* a = acc + g * D;
        for (int64_t d = 0; d < D; d += 8) store8(a + d, load8(a + d) * correction);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = vc + (j0 + j) * stride;
      for (int64_t g = 0; g < G; ++g) {
        const f8 p = splat8(scores[g * kKeyBlock + j]);
        float* a = acc + g * D;
        for (int64_t d = 0; d < D; d += 8) store8(a + d, load8(a + d) + p * load8(vr + d));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const f8 inv = splat8(l[g] > 0 ? 1.0f / l[g] : 0.0f);
    for (int64_t d = 0; d < D; d += 8) store8(out + g * D + d, load8(acc + g * D + d) * inv);
  }
}
#define FASTLLM_DECODE_F32_FAST 1
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// float32 with D in {64, 128} on AVX-512 or AVX2 CPUs (picked at load time): the same attention
// on the CPU's widest vectors (16 lanes, or 8) with D a compile-time constant. Scores of L keys
// (L lanes) for one query head accumulate in L vectors and are reduced together
// (lane_reduce.h) instead of one horizontal sum per key and head; the output accumulator of a
// query head (D / L vectors) stays in registers while a block's values stream through. ~2.5x
// fewer instructions per (key, head) than the 8-lane body at 16 lanes; the softmax between the
// two is the 8-lane code above, compiled for each target. On an AMD Zen 3 (AVX2) the 8-lane
// instance of this body read the SmolLM2 b16 caches ~3x faster than the 8-lane body above (30
// cold layers at 192 keys: 16-23 against 51-71 ms; bench/README.md).
//
// A task here is H consecutive kv heads of one sequence (H * G query heads): with every kv
// head of the sequence, a task reads whole cache rows (H * D floats) in order, which the
// memory streams better: per-head tasks, reading a D-float slice of every H * D-float row, read
// the SmolLM2 b16 cache at 8.6-11.7 GB/s, whole-sequence tasks at 14.8-17.4 (bench/README.md).
// The thread's next task's rows are prefetched into L2 while this one computes, on an AMD
// Zen 4; on an Intel Xeon the hardware prefetcher alone streamed the caches faster than with
// these software prefetches (30 layers, 192 cached keys, cold, 2 threads: 7.7 against 8.6-8.7 ms
// at B 16, 30.3-30.9 against 35.8-36.5 ms at B 64; per-head tasks at B 1-4 on par), so there
// they are off (kPrefetchRows).
const bool kPrefetchRows = !cpu_is_intel();

// Rows [j0, j1) of a task's heads (`lines` cache lines each, `stride` floats apart) into L2.
FASTLLM_ALWAYS_INLINE void prefetch_rows(const float* base, int64_t stride, int64_t j0, int64_t j1, int64_t lines) {
  if (!kPrefetchRows) return;
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t c = 0; c < lines; ++c) __builtin_prefetch(base + j * stride + 16 * c, 0, 2);
  }
}

template <class V, class I, int D>
FASTLLM_ALWAYS_INLINE void decode_task_wide(const float* q, const float* kc, const float* vc, int64_t stride,
                                            int64_t len, int64_t G, int64_t H, float scale, float* out,
                                            float* scratch, const float* next_k, const float* next_v,
                                            int64_t next_len) {
  constexpr int L = sizeof(V) / sizeof(float);
  constexpr int C = D / L;
  const int64_t NQ = G * H;            // query heads of the task
  const int64_t lines = H * D / 16;    // cache lines (of 16 floats) per row of the task's heads
  float* acc = scratch;                // NQ * D
  float* scores = acc + NQ * D;        // NQ * kKeyBlock
  float* m = scores + NQ * kKeyBlock;  // NQ running maxima
  float* l = m + NQ;                   // NQ running sums
  for (int64_t i = 0; i < NQ * D; ++i) acc[i] = 0.0f;
  for (int64_t g = 0; g < NQ; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.0f;
  for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, len - j0);
    // The cache is cold (a layer's keys and values were last touched a whole step ago): fetch
    // this block's value rows and the next block's key rows while this block's scores compute,
    // and the same rows of the thread's next task into L2.
    prefetch_rows(vc, stride, j0, j0 + n, lines);
    prefetch_rows(kc, stride, j0 + n, std::min(len, j0 + n + kKeyBlock), lines);
    prefetch_rows(next_k, stride, j0, std::min(next_len, j0 + n), lines);
    prefetch_rows(next_v, stride, j0, std::min(next_len, j0 + n), lines);
    for (int64_t g = 0; g < NQ; ++g) {
      const float* kh = kc + (g / G) * D;
      V qg[C];
      for (int c = 0; c < C; ++c) qg[c] = load<V>(q + g * D + L * c) * scale;
      for (int64_t jj = 0; jj < n; jj += L) {
        const int64_t cnt = std::min<int64_t>(L, n - jj);
        V a[L];
        for (int t = 0; t < L; ++t) {
          // rows past the block's end repeat its last key (read, never stored)
          const float* kr = kh + (j0 + jj + std::min<int64_t>(t, cnt - 1)) * stride;
          V s = qg[0] * load<V>(kr);
          for (int c = 1; c < C; ++c) s += qg[c] * load<V>(kr + L * c);
          a[t] = s;
        }
        float sums[L];
        reduce_all<V, I>(a, sums);
        std::memcpy(scores + g * kKeyBlock + jj, sums, cnt * sizeof(float));
      }
      float* s = scores + g * kKeyBlock;
      const float correction = softmax_step(s, n, m[g], l[g]);
      const float* vh = vc + (g / G) * D;
      V o[C];
      for (int c = 0; c < C; ++c) o[c] = load<V>(acc + g * D + L * c) * correction;
      for (int64_t jv = 0; jv < n; ++jv) {
        const float* vr = vh + (j0 + jv) * stride;
        const float p = s[jv];
        for (int c = 0; c < C; ++c) o[c] += p * load<V>(vr + L * c);
      }
      for (int c = 0; c < C; ++c) std::memcpy(acc + g * D + L * c, &o[c], sizeof(V));
    }
  }
  // the next task's rows past this one's length
  prefetch_rows(next_k, stride, len, next_len, lines);
  prefetch_rows(next_v, stride, len, next_len, lines);
  for (int64_t g = 0; g < NQ; ++g) {
    const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}

template <int D>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void decode_task_f32_avx512(
    const float* q, const float* kc, const float* vc, int64_t stride, int64_t len, int64_t G, int64_t H,
    float scale, float* out, float* scratch, const float* next_k, const float* next_v, int64_t next_len) {
  decode_task_wide<v16, i16v, D>(q, kc, vc, stride, len, G, H, scale, out, scratch, next_k, next_v, next_len);
}

template <int D>
__attribute__((target("avx2,fma"))) void decode_task_f32_avx2(const float* q, const float* kc, const float* vc,
                                                              int64_t stride, int64_t len, int64_t G, int64_t H,
                                                              float scale, float* out, float* scratch,
                                                              const float* next_k, const float* next_v,
                                                              int64_t next_len) {
  decode_task_wide<v8, i8v, D>(q, kc, vc, stride, len, G, H, scale, out, scratch, next_k, next_v, next_len);
}

using DecodeTaskFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float,
                              float*, float*, const float*, const float*, int64_t);

// The wide body (AVX-512 or AVX2) for head size D on this CPU, or nullptr.
DecodeTaskFn wide_task(int64_t D) {
  if (cpu_isa() == CpuIsa::kAvx512) {
    if (D == 64) return decode_task_f32_avx512<64>;
    if (D == 128) return decode_task_f32_avx512<128>;
  } else if (cpu_isa() == CpuIsa::kAvx2) {
    if (D == 64) return decode_task_f32_avx2<64>;
    if (D == 128) return decode_task_f32_avx2<128>;
  }
  return nullptr;
}
#define FASTLLM_DECODE_F32_WIDE 1
#endif

template <typename scalar_t>
void decode_attention_rows(const scalar_t* q, const scalar_t* kc, const scalar_t* vc,
                           const int32_t* lengths, scalar_t* out, int64_t B, int64_t Hq,
                           int64_t Hkv, int64_t Smax, int64_t D, double scale) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t G = Hq / Hkv;
  // A task reads its sequence's cached keys and values (len * D each) for G query heads:
  // ~len * D * (G + 1) units, from the mean length (the cache capacity Smax overstates it).
  int64_t total_len = 0;
  for (int64_t b = 0; b < B; ++b) total_len += std::max<int32_t>(lengths[b], 0);
  const int64_t grain = grain_for(std::max<int64_t>(1, total_len / std::max<int64_t>(B, 1)) * D * (G + 1));
#ifdef FASTLLM_DECODE_F32_FAST
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D % 8 == 0 && G <= 8) {
#ifdef FASTLLM_DECODE_F32_WIDE
      if (const DecodeTaskFn wide = wide_task(D)) {
        // Tasks of whole sequences (every kv head: whole cache rows in order) when there are
        // enough of them for the threads, else of single kv heads.
        const int64_t H = B >= 2 * at::get_num_threads() ? Hkv : 1;
        const int64_t per_seq = Hkv / H;
        balanced_for(B * per_seq, std::max<int64_t>(1, grain / H), [&](int64_t begin, int64_t end, int64_t ahead) {
          std::vector<float> scratch(H * G * (D + kKeyBlock + 2));
          for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / per_seq, h = (task % per_seq) * H;
            // the thread's likely next task, whose rows this one prefetches (none after its last)
            const int64_t nb = (task + 1) / per_seq, nh = ((task + 1) % per_seq) * H;
            const int64_t next_len = task + 1 < ahead ? lengths[nb] : 0;  // lengths checked >= 0
            wide(q + (b * Hq + h * G) * D, kc + (b * Smax * Hkv + h) * D, vc + (b * Smax * Hkv + h) * D, Hkv * D,
                 lengths[b], G, H, static_cast<float>(scale), out + (b * Hq + h * G) * D,
                 scratch.data(), kc + (nb * Smax * Hkv + nh) * D, vc + (nb * Smax * Hkv + nh) * D, next_len);
          }
        });
        return;
      }
#endif
      balanced_for(B * Hkv, grain, [&](int64_t begin, int64_t end, int64_t) {
        std::vector<float> scratch(2 * G * D + G * kKeyBlock);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / Hkv, h = task % Hkv;
          decode_task_f32(q + (b * Hq + h * G) * D, kc + (b * Smax * Hkv + h) * D, vc + (b * Smax * Hkv + h) * D,
                          Hkv * D, lengths[b], G, D, static_cast<float>(scale), out + (b * Hq + h * G) * D,
                          scratch.data());
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(G * D), acc(G * D), scores(G * kKeyBlock), m(G), l(G), ks, vs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lengths[b];
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qr = q + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = static_cast<acc_t>(qr[d]) * acc_t(scale);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < len; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, len - j0);
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* kr = widen<scalar_t, acc_t>(kc + ((b * Smax + j0 + j) * Hkv + h) * D, D, ks);
          for (int64_t g = 0; g < G; ++g) scores[g * kKeyBlock + j] = dot(qs.data() + g * D, kr, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          acc_t* s = scores.data() + g * kKeyBlock;
          const acc_t m_new = std::max(m[g], *std::max_element(s, s + n));
          const acc_t correction = std::exp(m[g] - m_new);  // exp(-inf) = 0 on the first block
          acc_t sum = 0;
          for (int64_t j = 0; j < n; ++j) {
            s[j] = std::exp(s[j] - m_new);
            sum += s[j];
          }
          l[g] = l[g] * correction + sum;
          m[g] = m_new;
          acc_t* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
        }
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* vr = widen<scalar_t, acc_t>(vc + ((b * Smax + j0 + j) * Hkv + h) * D, D, vs);
          for (int64_t g = 0; g < G; ++g) {
            const Vec<acc_t> p(scores[g * kKeyBlock + j]);
            acc_t* a = acc.data() + g * D;
            int64_t d = 0;
            for (; d + Vec<acc_t>::size() <= D; d += Vec<acc_t>::size()) {
              at::vec::fmadd(p, Vec<acc_t>::loadu(vr + d), Vec<acc_t>::loadu(a + d)).store(a + d);
            }
            for (; d < D; ++d) a[d] += scores[g * kKeyBlock + j] * vr[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t inv = l[g] > 0 ? acc_t(1) / l[g] : acc_t(0);
        scalar_t* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

at::Tensor decode_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& lengths,
                                    double scale) {
  check_dtype(q, "q", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_decode_attention_inputs(q, k_cache, v_cache, lengths);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Smax = k_cache.size(1), Hkv = k_cache.size(2);
  check_contiguous(q, "q");
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_contiguous(lengths, "lengths");
  const int32_t* len = lengths.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= Smax, "lengths: expected values in [0, ", Smax,
                "] (the cache length), got ", len[b], " at index ", b);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  maybe_poison(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_attention_rows<scalar_t>(q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                                    v_cache.const_data_ptr<scalar_t>(), len,
                                    out.mutable_data_ptr<scalar_t>(), B, Hq, Hkv, Smax, D, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cpu); }

}  // namespace fastllm::cpu
