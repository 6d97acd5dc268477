// Launchers of the RMSNorm CUDA kernels (csrc/cuda/rms_norm.cu). Torch-free.
//   x, y, dy, dx : (rows, hidden) contiguous, of `dtype`
//   w_acc        : (hidden,) weight already converted to the accumulation type
//                  (float64 for kFloat64, float32 otherwise)
//   dw_partial   : (num_blocks, hidden) accumulation type; the caller sums over dim 0
#pragma once

#include "fastllm/cuda/common.h"

namespace fastllm::cuda {

cudaError_t rms_norm_fwd(const void* x, const void* w_acc, void* y, int64_t rows,
                         int64_t hidden, double eps, DType dtype, cudaStream_t stream);

cudaError_t rms_norm_bwd(const void* dy, const void* x, const void* w_acc, void* dx,
                         void* dw_partial, int64_t rows, int64_t hidden, double eps,
                         int num_blocks, DType dtype, cudaStream_t stream);

}  // namespace fastllm::cuda
