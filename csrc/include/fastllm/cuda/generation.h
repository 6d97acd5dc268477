// Launchers of the rollout engine's CUDA kernels (csrc/cuda/{decode_attention,sampling,
// kv_append_rope}.cu). Torch-free. All tensors contiguous; dtype is that of q / the caches
// (kFloat32, kBFloat16 or kFloat16; kFloat64 is not supported on CUDA and returns
// cudaErrorInvalidValue). Semantics: fastllm/ops/{decode_attention,sampling,kv_append_rope}.py.
#pragma once

#include "fastllm/cuda/common.h"

namespace fastllm::cuda {

// Largest head_dim and query heads per kv head the decode kernel handles.
constexpr int kDecodeMaxHeadDim = 256;
constexpr int kDecodeMaxGroup = 8;
// Warps per block of the decode kernel: each warp is its own split of the keys.
constexpr int kDecodeWarps = 4;

// q (B, Hq, D); k_cache, v_cache (B, Smax, Hkv, D); lengths (B,) int32; out (B, Hq, D).
// Scratch: partial_acc (B, Hq, num_splits * kDecodeWarps, D) float32 and
// partial_ml (B, Hq, num_splits * kDecodeWarps, 2) float32.
cudaError_t decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache,
                                 const int32_t* lengths, void* out, float* partial_acc,
                                 float* partial_ml, int64_t B, int64_t Hq, int64_t Hkv,
                                 int64_t Smax, int64_t D, int num_splits, float scale,
                                 DType dtype, cudaStream_t stream);

// logits (B, V) float32; temperature, top_p, uniforms (B,) float32; top_k (B,) int32;
// tokens (B,) int64; logprobs (B,) float32.
cudaError_t sample_tokens(const float* logits, const float* temperature, const int32_t* top_k,
                          const float* top_p, const float* uniforms, int64_t* tokens,
                          float* logprobs, int64_t B, int64_t V, cudaStream_t stream);

// q, q_out (B, Hq, D); k, v (B, Hkv, D); k_cache, v_cache (B, Smax, Hkv, D);
// positions (B,) int32; inv_freq (D/2,) float32.
cudaError_t kv_append_rope_fwd(const void* q, const void* k, const void* v, void* k_cache,
                               void* v_cache, void* q_out, const int32_t* positions,
                               const float* inv_freq, int64_t B, int64_t Hq, int64_t Hkv,
                               int64_t Smax, int64_t D, DType dtype, cudaStream_t stream);

}  // namespace fastllm::cuda
