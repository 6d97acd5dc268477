// Torch-free declarations shared by the CUDA kernel files (csrc/cuda/*.cu) and their thin
// torch bindings (csrc/cuda/*_binding.cpp). Kernel files include only CUDA headers and
// these, so they compile with plain nvcc in about a second.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastllm::cuda {

// Element type of a kernel's main tensors; the binding maps torch dtypes onto it.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace fastllm::cuda
