// RoPE on the new token's q and k fused with the KV-cache append, on CUDA. Torch-free;
// bound to torch in kv_append_rope_binding.cpp. Semantics: fastllm/ops/kv_append_rope.py.
// Grid (B, Hq + 2*Hkv): block y < Hq rotates a query head into q_out, the next Hkv rotate
// key heads into k_cache[b, positions[b]], the last Hkv copy value heads into v_cache.
// One thread per rotation pair (i, i + D/2). The angle is formed in float32 like the
// model's rope_cos_sin; cos/sin are evaluated in double so that --use_fast_math's
// approximate sinf/cosf (inaccurate for large angles) cannot change the result.
#include "fastllm/cuda/generation.h"
#include "fastllm/cuda/types.cuh"

namespace fastllm::cuda {
namespace {

template <typename T>
__global__ void kv_append_rope_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, T* __restrict__ k_cache,
                                      T* __restrict__ v_cache, T* __restrict__ q_out,
                                      const int32_t* __restrict__ positions,
                                      const float* __restrict__ inv_freq, int Hq, int Hkv,
                                      int64_t Smax, int D) {
  const int64_t b = blockIdx.x;
  const int head = blockIdx.y;
  const int half = D / 2;
  const int64_t pos = positions[b];
  if (pos < 0 || pos >= Smax) return;  // out of range: the binding's caller owns the check
  const int64_t slot = (b * Smax + pos) * Hkv;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const T* src;
    T* dst;
    bool rotate = true;
    if (head < Hq) {
      src = q + (b * Hq + head) * D;
      dst = q_out + (b * Hq + head) * D;
    } else if (head < Hq + Hkv) {
      src = k + (b * Hkv + head - Hq) * D;
      dst = k_cache + (slot + head - Hq) * D;
    } else {
      src = v + (b * Hkv + head - Hq - Hkv) * D;
      dst = v_cache + (slot + head - Hq - Hkv) * D;
      rotate = false;
    }
    if (!rotate) {
      dst[i] = src[i];
      dst[i + half] = src[i + half];
      continue;
    }
    const float angle = static_cast<float>(pos) * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd), s = static_cast<float>(sd);
    const float x1 = load_as<float>(src[i]), x2 = load_as<float>(src[i + half]);
    dst[i] = store_as<T>(x1 * c - x2 * s);
    dst[i + half] = store_as<T>(x2 * c + x1 * s);
  }
}

template <typename T>
cudaError_t run(const void* q, const void* k, const void* v, void* kc, void* vc, void* qo,
                const int32_t* positions, const float* inv_freq, int64_t B, int64_t Hq,
                int64_t Hkv, int64_t Smax, int64_t D, cudaStream_t stream) {
  const int half = static_cast<int>(D / 2);
  const int threads = half <= 32 ? 32 : (half <= 64 ? 64 : 128);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(Hq + 2 * Hkv));
  kv_append_rope_kernel<T><<<grid, threads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<T*>(kc), static_cast<T*>(vc), static_cast<T*>(qo), positions, inv_freq,
      static_cast<int>(Hq), static_cast<int>(Hkv), Smax, static_cast<int>(D));
  return cudaGetLastError();
}

}  // namespace

cudaError_t kv_append_rope_fwd(const void* q, const void* k, const void* v, void* k_cache,
                               void* v_cache, void* q_out, const int32_t* positions,
                               const float* inv_freq, int64_t B, int64_t Hq, int64_t Hkv,
                               int64_t Smax, int64_t D, DType dtype, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (D % 2 != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return run<float>(q, k, v, k_cache, v_cache, q_out, positions, inv_freq, B, Hq, Hkv, Smax, D, stream);
    case DType::kBFloat16:
      return run<__nv_bfloat16>(q, k, v, k_cache, v_cache, q_out, positions, inv_freq, B, Hq, Hkv, Smax, D, stream);
    case DType::kFloat16:
      return run<__half>(q, k, v, k_cache, v_cache, q_out, positions, inv_freq, B, Hq, Hkv, Smax, D, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastllm::cuda
