// RMSNorm CUDA kernels (torch-free; bound to torch in rms_norm_binding.cpp).
//   forward : one block per row; y = x * r * w, r = rsqrt(mean(x^2) + eps)
//   backward: a persistent grid; each block walks a contiguous range of rows, recomputes r,
//             writes dx = r * (dy*w - xhat * mean(dy*w*xhat)) and accumulates its share of
//             dw = sum(dy * xhat) in its own row of dw_partial (no atomics: deterministic).
#include "fastllm/cuda/reduce.cuh"
#include "fastllm/cuda/rms_norm.h"
#include "fastllm/cuda/types.cuh"

namespace fastllm::cuda {
namespace {

inline int threads_for(int64_t hidden) {
  if (hidden <= 256) return 64;
  if (hidden <= 1024) return 128;
  if (hidden <= 4096) return 256;
  return 512;
}

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ w,
                                    T* __restrict__ y, int64_t hidden, acc_t<T> eps) {
  using A = acc_t<T>;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * hidden;
  A ss = 0;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const A v = load_as<A>(x[offset + i]);
    ss += v * v;
  }
  const A r = A(1) / sqrt(block_sum(ss) / A(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    y[offset + i] = store_as<T>(load_as<A>(x[offset + i]) * r * w[i]);
  }
}

template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const acc_t<T>* __restrict__ w, T* __restrict__ dx,
                                    acc_t<T>* __restrict__ dw_partial, int64_t rows,
                                    int64_t hidden, int64_t rows_per_block, acc_t<T> eps) {
  using A = acc_t<T>;
  A* dw = dw_partial + static_cast<int64_t>(blockIdx.x) * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dw[i] = A(0);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = min(rows, first + rows_per_block);
  for (int64_t row = first; row < last; ++row) {
    const int64_t offset = row * hidden;
    A ss = 0, gx = 0;  // sum(x^2), sum(dy*w*x)
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const A xv = load_as<A>(x[offset + i]);
      ss += xv * xv;
      gx += load_as<A>(dy[offset + i]) * w[i] * xv;
    }
    ss = block_sum(ss);
    gx = block_sum(gx);
    const A r = A(1) / sqrt(ss / A(hidden) + eps);
    const A c = r * r * gx / A(hidden);  // r * mean(dy*w*xhat)
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const A xv = load_as<A>(x[offset + i]);
      const A dyv = load_as<A>(dy[offset + i]);
      dx[offset + i] = store_as<T>(r * (dyv * w[i] - xv * c));
      dw[i] += dyv * xv * r;  // each thread owns columns i: no race
    }
  }
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* w, void* y, int64_t rows, int64_t hidden,
                       double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_fwd_kernel<T><<<static_cast<unsigned>(rows), threads_for(hidden), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const acc_t<T>*>(w), static_cast<T*>(y), hidden,
      static_cast<acc_t<T>>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* x, const void* w, void* dx, void* dw_partial,
                       int64_t rows, int64_t hidden, double eps, int num_blocks,
                       cudaStream_t stream) {
  const int64_t rows_per_block = (rows + num_blocks - 1) / num_blocks;
  rms_norm_bwd_kernel<T><<<num_blocks, threads_for(hidden), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const acc_t<T>*>(w),
      static_cast<T*>(dx), static_cast<acc_t<T>*>(dw_partial), rows, hidden, rows_per_block,
      static_cast<acc_t<T>>(eps));
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_fwd(const void* x, const void* w_acc, void* y, int64_t rows,
                         int64_t hidden, double eps, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(x, w_acc, y, rows, hidden, eps, stream);
    case DType::kFloat64: return launch_fwd<double>(x, w_acc, y, rows, hidden, eps, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(x, w_acc, y, rows, hidden, eps, stream);
    case DType::kFloat16: return launch_fwd<__half>(x, w_acc, y, rows, hidden, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_bwd(const void* dy, const void* x, const void* w_acc, void* dx,
                         void* dw_partial, int64_t rows, int64_t hidden, double eps,
                         int num_blocks, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(dy, x, w_acc, dx, dw_partial, rows, hidden, eps, num_blocks, stream);
    case DType::kFloat64:
      return launch_bwd<double>(dy, x, w_acc, dx, dw_partial, rows, hidden, eps, num_blocks, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(dy, x, w_acc, dx, dw_partial, rows, hidden, eps, num_blocks, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(dy, x, w_acc, dx, dw_partial, rows, hidden, eps, num_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastllm::cuda
