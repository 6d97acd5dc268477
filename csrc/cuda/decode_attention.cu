// Split-K decode attention ("flash-decoding") over a preallocated KV cache. Torch-free;
// bound to torch in decode_attention_binding.cpp.
//   pass 1: grid (num_splits, Hkv, B), kDecodeWarps warps per block. The keys of sequence b
//           are cut into num_splits chunks, and each chunk among the block's warps
//           (key j goes to warp j % warps): every warp is its own split. A warp loads each
//           of its keys once (lane l holds elements [l*E, l*E+E)) and scores it against all
//           G query heads of the kv head (grouped-query attention shares the loads), keeping
//           an online softmax per head: running max m, running sum l, rescaled acc.
//           It writes (m, l, acc) per query head to the partial buffers.
//   pass 2: grid (B * Hq), one thread per element of D: out = sum_p e^(m_p - M) acc_p /
//           sum_p e^(m_p - M) l_p with M = max_p m_p. Empty splits have m = -inf, l = 0.
// The split count depends only on Smax (not on the lengths), so a captured CUDA graph
// replays correctly as the lengths grow.
#include <cfloat>

#include "fastllm/cuda/generation.h"
#include "fastllm/cuda/reduce.cuh"
#include "fastllm/cuda/types.cuh"

namespace fastllm::cuda {
namespace {

template <typename T, int E, int MAXG>
__global__ void __launch_bounds__(kDecodeWarps * 32)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                    const int32_t* __restrict__ lengths, float* __restrict__ part_acc,
                    float* __restrict__ part_ml, int Hq, int Hkv, int64_t Smax, int D,
                    int chunk, float scale) {
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = Hq / Hkv;
  const int P = gridDim.x * kDecodeWarps;  // partials per query head
  const int p = split * kDecodeWarps + warp;
  const int64_t len = min(static_cast<int64_t>(max(lengths[b], 0)), Smax);
  const int64_t first = static_cast<int64_t>(split) * chunk;
  const int64_t last = min(first + chunk, len);
  const int d0 = lane * E;

  float qv[MAXG][E], acc[MAXG][E], m[MAXG], l[MAXG];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[g][e] = 0.f;
      const int64_t qi = (static_cast<int64_t>(b) * Hq + h * G + g) * D + d0 + e;
      qv[g][e] = (g < G && d0 + e < D) ? load_as<float>(q[qi]) * scale : 0.f;
    }
  }
  for (int64_t j = first + warp; j < last; j += kDecodeWarps) {
    const int64_t row = ((static_cast<int64_t>(b) * Smax + j) * Hkv + h) * D;
    float kv[E], vv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool in = d0 + e < D;
      kv[e] = in ? load_as<float>(kc[row + d0 + e]) : 0.f;
      vv[e] = in ? load_as<float>(vc[row + d0 + e]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g < G) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s += qv[g][e] * kv[e];
        s = warp_sum(s);
        const float m_new = fmaxf(m[g], s);
        const float c = __expf(m[g] - m_new);  // 0 on the first key (m = -inf)
        const float w = __expf(s - m_new);
        l[g] = l[g] * c + w;
        m[g] = m_new;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * c + w * vv[e];
      }
    }
  }
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < G) {
      const int64_t base = (static_cast<int64_t>(b) * Hq + h * G + g) * P + p;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (d0 + e < D) part_acc[base * D + d0 + e] = acc[g][e];
      }
      if (lane == 0) {
        part_ml[base * 2] = m[g];
        part_ml[base * 2 + 1] = l[g];
      }
    }
  }
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ part_acc,
                                      const float* __restrict__ part_ml, T* __restrict__ out,
                                      int P, int D) {
  const int64_t bh = blockIdx.x;  // b * Hq + h
  const float* ml = part_ml + bh * P * 2;
  float M = -INFINITY;
  for (int p = 0; p < P; ++p) M = fmaxf(M, ml[2 * p]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (M != -INFINITY) {
      for (int p = 0; p < P; ++p) {
        const float w = __expf(ml[2 * p] - M);  // 0 for empty splits
        num += w * part_acc[(bh * P + p) * D + d];
        den += w * ml[2 * p + 1];
      }
    }
    out[bh * D + d] = store_as<T>(den > 0.f ? num / den : 0.f);
  }
}

template <typename T, int E, int MAXG>
cudaError_t launch(const void* q, const void* k, const void* v, const int32_t* lengths, void* out,
                   float* pacc, float* pml, int64_t B, int64_t Hq, int64_t Hkv, int64_t Smax,
                   int64_t D, int splits, float scale, cudaStream_t stream) {
  const int chunk = static_cast<int>((Smax + splits - 1) / splits);
  const dim3 grid(splits, static_cast<unsigned>(Hkv), static_cast<unsigned>(B));
  decode_split_kernel<T, E, MAXG><<<grid, kDecodeWarps * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), lengths, pacc,
      pml, static_cast<int>(Hq), static_cast<int>(Hkv), Smax, static_cast<int>(D), chunk, scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int threads = D <= 64 ? 64 : (D <= 128 ? 128 : 256);
  decode_combine_kernel<T><<<static_cast<unsigned>(B * Hq), threads, 0, stream>>>(
      pacc, pml, static_cast<T*>(out), splits * kDecodeWarps, static_cast<int>(D));
  return cudaGetLastError();
}

// Runtime (head_dim, group) -> the smallest compiled (E, MAXG) that covers them.
template <typename T, int E>
cudaError_t by_group(const void* q, const void* k, const void* v, const int32_t* lengths,
                     void* out, float* pacc, float* pml, int64_t B, int64_t Hq, int64_t Hkv,
                     int64_t Smax, int64_t D, int splits, float scale, cudaStream_t stream) {
  const int64_t G = Hq / Hkv;
  if (G == 1) return launch<T, E, 1>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  if (G == 2) return launch<T, E, 2>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  if (G <= 4) return launch<T, E, 4>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  if (G <= 8) return launch<T, E, 8>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t by_head_dim(const void* q, const void* k, const void* v, const int32_t* lengths,
                        void* out, float* pacc, float* pml, int64_t B, int64_t Hq, int64_t Hkv,
                        int64_t Smax, int64_t D, int splits, float scale, cudaStream_t stream) {
  if (D <= 64) return by_group<T, 2>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  if (D <= 128) return by_group<T, 4>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  if (D <= 256) return by_group<T, 8>(q, k, v, lengths, out, pacc, pml, B, Hq, Hkv, Smax, D, splits, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache,
                                 const int32_t* lengths, void* out, float* partial_acc,
                                 float* partial_ml, int64_t B, int64_t Hq, int64_t Hkv,
                                 int64_t Smax, int64_t D, int num_splits, float scale,
                                 DType dtype, cudaStream_t stream) {
  if (B == 0 || Hq == 0) return cudaSuccess;
  if (Hkv <= 0 || Hq % Hkv != 0 || num_splits <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return by_head_dim<float>(q, k_cache, v_cache, lengths, out, partial_acc, partial_ml, B, Hq, Hkv, Smax, D, num_splits, scale, stream);
    case DType::kBFloat16:
      return by_head_dim<__nv_bfloat16>(q, k_cache, v_cache, lengths, out, partial_acc, partial_ml, B, Hq, Hkv, Smax, D, num_splits, scale, stream);
    case DType::kFloat16:
      return by_head_dim<__half>(q, k_cache, v_cache, lengths, out, partial_acc, partial_ml, B, Hq, Hkv, Smax, D, num_splits, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastllm::cuda
