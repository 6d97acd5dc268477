// Matrix products through the tile kernel (fastllm/tile_mm.h) for the C++ ops that issue large
// products themselves (csrc/cpu/gemm.cpp, csrc/cpu/lora_linear.cpp). Defined in gemm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastllm::cpu {

// c = a b (+ c when accumulate) for 2-D tensors: through the tile kernel for float32 CPU
// tensors with a row-major or transposed (either stride 1), b and c with unit column stride,
// on a CPU with AVX2; through ATen otherwise (any layout, dtype or device).
void tiled_mm_into(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// a b as a new (rows of a, columns of b) tensor, as tiled_mm_into decides.
at::Tensor tiled_mm(const at::Tensor& a, const at::Tensor& b);

}  // namespace fastllm::cpu
