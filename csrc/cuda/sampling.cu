// Fused sampling (temperature, top-k, top-p, the draw) on CUDA: one block per row.
// Torch-free; bound to torch in sampling_binding.cpp. Semantics: fastllm/ops/sampling.py.
//   1. m = max z, z = logits / T (z is recomputed from the row on every pass, never stored);
//      total_all = sum exp(z - m) for the returned log-probability.
//   2. Thresholds as exact token values, found by a bitwise descent over the order-preserving
//      32-bit keys of z (32 block-wide counting passes, no sort, no scratch):
//        top-k: the largest key t with count(key >= t) >= k (the k-th largest value);
//        top-p: the largest key t with mass(key >= t) >= top_p * (mass kept by top-k).
//   3. Draw: each thread owns a contiguous chunk of the vocabulary; an exclusive block scan
//      of the chunks' kept masses finds the chunk where the running mass crosses u * total,
//      and its thread walks the chunk (same summation order as its chunk sum, so it finds it).
// Greedy rows (T <= 0) take the first argmax. Nothing is written to the host: the step can be
// captured in a CUDA graph.
#include <cfloat>
#include <cstdint>

#include "fastllm/cuda/generation.h"
#include "fastllm/cuda/reduce.cuh"

namespace fastllm::cuda {
namespace {

constexpr int kThreads = 512;

// z = x / T with IEEE division even under --use_fast_math, so z (and so the thresholds and
// the draw) match the CPU kernel and the reference bit for bit.
__device__ __forceinline__ float scaled(float x, float T) { return __fdiv_rn(x, T); }

// Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = (threadIdx.x & 31) < warps ? partial[threadIdx.x & 31] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Largest value with the smallest index among equal maxima (first argmax).
__device__ __forceinline__ void block_argmax(float& v, int64_t& i) {
  __shared__ float pv[32];
  __shared__ int64_t pi[32];
  auto better = [](float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) { pv[threadIdx.x >> 5] = v; pi[threadIdx.x >> 5] = i; }
  __syncthreads();
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  v = lane < warps ? pv[lane] : -INFINITY;
  i = lane < warps ? pi[lane] : INT64_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

// Exclusive prefix sum over the block (every thread gets its own prefix and the total).
__device__ __forceinline__ float block_exclusive_scan(float v, float& total) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) warp_totals[warp] = inc;
  __syncthreads();
  float before = 0.f;
  total = 0.f;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += warp_totals[w];
    total += warp_totals[w];
  }
  return before + inc - v;
}

__global__ void __launch_bounds__(kThreads)
sample_kernel(const float* __restrict__ logits, const float* __restrict__ temperature,
              const int32_t* __restrict__ top_k, const float* __restrict__ top_p,
              const float* __restrict__ uniforms, int64_t* __restrict__ tokens,
              float* __restrict__ logprobs, int64_t V) {
  const int64_t b = blockIdx.x;
  const float* row = logits + b * V;
  const float T = temperature[b];
  const int tid = threadIdx.x;
  __shared__ unsigned long long chosen;  // smallest index found (atomicMin: deterministic)

  if (!(T > 0.f)) {  // greedy
    float v = -INFINITY;
    int64_t idx = INT64_MAX;
    for (int64_t i = tid; i < V; i += blockDim.x) {
      if (row[i] > v) { v = row[i]; idx = i; }  // strided: the first maximum of this thread
    }
    block_argmax(v, idx);
    float s = 0.f;
    for (int64_t i = tid; i < V; i += blockDim.x) s += __expf(row[i] - v);
    s = block_sum(s);
    if (tid == 0) {
      tokens[b] = idx;
      logprobs[b] = -logf(s);
    }
    return;
  }

  float m = -INFINITY;
  for (int64_t i = tid; i < V; i += blockDim.x) m = fmaxf(m, scaled(row[i], T));
  m = block_max(m);
  float total_all = 0.f;
  for (int64_t i = tid; i < V; i += blockDim.x) total_all += __expf(scaled(row[i], T) - m);
  total_all = block_sum(total_all);

  uint32_t thr = 0;  // keep z with float_key(z) >= thr; 0 keeps everything
  const int64_t k = top_k[b];
  if (k > 0 && k < V) {
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = prefix | (1u << bit);
      float count = 0.f;  // exact in float up to 2^24 tokens
      for (int64_t i = tid; i < V; i += blockDim.x) count += float_key(scaled(row[i], T)) >= cand ? 1.f : 0.f;
      if (block_sum(count) >= static_cast<float>(k)) prefix = cand;
    }
    thr = prefix;
  }
  const float p = top_p[b];
  if (p < 1.f) {
    float kept = 0.f;
    for (int64_t i = tid; i < V; i += blockDim.x) {
      const float z = scaled(row[i], T);
      if (float_key(z) >= thr) kept += __expf(z - m);
    }
    const float target = p * block_sum(kept);
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = prefix | (1u << bit);
      const uint32_t floor = cand > thr ? cand : thr;
      float mass = 0.f;
      for (int64_t i = tid; i < V; i += blockDim.x) {
        const float z = scaled(row[i], T);
        if (float_key(z) >= floor) mass += __expf(z - m);
      }
      if (block_sum(mass) >= target) prefix = cand;
    }
    thr = prefix > thr ? prefix : thr;
  }

  // Draw: contiguous chunks per thread, exclusive scan of their kept masses.
  const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
  const int64_t lo = min(V, tid * chunk), hi = min(V, lo + chunk);
  float mine = 0.f;
  int64_t last_kept = -1;
  for (int64_t i = lo; i < hi; ++i) {
    const float z = scaled(row[i], T);
    if (float_key(z) >= thr) { mine += __expf(z - m); last_kept = i; }
  }
  float total;
  const float before = block_exclusive_scan(mine, total);
  const float target = uniforms[b] * total;
  if (tid == 0) chosen = ~0ull;
  __syncthreads();
  if (mine > 0.f && before <= target && target < before + mine) {
    const float need = target - before;
    float cum = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const float z = scaled(row[i], T);
      if (float_key(z) >= thr) {
        cum += __expf(z - m);
        if (cum > need) { atomicMin(&chosen, static_cast<unsigned long long>(i)); break; }
      }
    }
  }
  __syncthreads();
  // Rounding fallback (target at the very top): the last kept token.
  float lk = static_cast<float>(last_kept);
  lk = block_max(lk);
  if (tid == 0) {
    const int64_t tok = chosen != ~0ull ? static_cast<int64_t>(chosen) : static_cast<int64_t>(lk);
    tokens[b] = tok;
    logprobs[b] = (scaled(row[tok], T) - m) - logf(total_all);
  }
}

}  // namespace

cudaError_t sample_tokens(const float* logits, const float* temperature, const int32_t* top_k,
                          const float* top_p, const float* uniforms, int64_t* tokens,
                          float* logprobs, int64_t B, int64_t V, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (V <= 0) return cudaErrorInvalidValue;
  sample_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, temperature, top_k, top_p,
                                                                  uniforms, tokens, logprobs, V);
  return cudaGetLastError();
}

}  // namespace fastllm::cuda
