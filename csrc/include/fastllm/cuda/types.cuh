// Conversions between storage types and accumulation types in CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastllm::cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A> __device__ __forceinline__ A load_as(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A load_as(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A load_as(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A load_as(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

template <typename T> __device__ __forceinline__ T store_as(float v) { return static_cast<T>(v); }
template <typename T> __device__ __forceinline__ T store_as(double v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace fastllm::cuda
