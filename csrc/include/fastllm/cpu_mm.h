// Matrix products through the tile kernel (fastllm/tile_mm.h) for the C++ ops that issue large
// products themselves (csrc/cpu/gemm.cpp, csrc/cpu/lora_linear.cpp). Defined in gemm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace fastllm::cpu {

// One term alpha a b of a product sum.
struct MMTerm {
  const at::Tensor& a;
  const at::Tensor& b;
  double alpha = 1.0;
};

// c = the sum of the terms (+ c when accumulate), 2-D tensors: in one pass of the tile kernel
// for float32 CPU tensors with a and b each row-major or a transposed view (either stride 1; a
// large transposed b, such as a weight's .t(), is first copied by contiguous_f32), c with unit
// column stride, on a CPU with AVX2; through ATen otherwise (any layout, dtype or device), one
// call per term.
void tiled_mm_into(at::Tensor& c, std::initializer_list<MMTerm> terms, bool accumulate);

// b as a row-major tensor: for a float32 CPU matrix given as a transposed view (stride 1 down
// its columns: a weight's .t()), a blocked transposed copy (ATen's element-wise copy of that
// layout ran at ~1 GB/s here); b.contiguous() otherwise.
at::Tensor contiguous_f32(const at::Tensor& b);

// The sum of the terms as a new (rows of a, columns of b) tensor, as tiled_mm_into decides.
at::Tensor tiled_mm(std::initializer_list<MMTerm> terms);

}  // namespace fastllm::cpu
