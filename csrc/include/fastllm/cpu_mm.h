// Matrix products through the tile kernel (fastllm/tile_mm.h) for the C++ ops that issue large
// products themselves (csrc/cpu/gemm.cpp, csrc/cpu/lora_linear.cpp). Defined in gemm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace fastllm::cpu {

// Whether tiled_mm_into runs the tile kernel (else ATen's BLAS): the CPU's default
// (detect_cpu_products, fastllm/cpu_isa.h, decided at the first product) until
// set_cpu_products("tile" | "blas" | "default") changes it. cpu_products_name() is "tile" or "blas".
bool tile_products();
std::string cpu_products_name();
void set_cpu_products(const std::string& name);

// Whether small_linear_fwd (csrc/cpu/small_linear.cpp) gives a product of `rows` rows of x to
// BLAS: one row where the products engine is BLAS on an Intel CPU (MKL's matrix-vector product
// streams the weights ~4% faster than the small-rows kernel there; on an AMD Zen 3 it took 1.8x
// the kernel's time). Defined in gemm.cpp.
bool small_linear_on_blas(int64_t rows);

// One term alpha a b of a product sum.
struct MMTerm {
  const at::Tensor& a;
  const at::Tensor& b;
  double alpha = 1.0;
};

// c = the sum of the terms (+ c when accumulate), 2-D tensors: in one pass of the tile kernel
// for float32 CPU tensors with a and b each row-major or a transposed view (either stride 1; a
// transposed b, such as a weight's .t(), is transposed as it is packed), c with unit column
// stride, on a CPU with AVX2, when tile_products(); through ATen otherwise (any layout, dtype or
// device, or BLAS chosen), one call per term.
void tiled_mm_into(at::Tensor& c, std::initializer_list<MMTerm> terms, bool accumulate);

// An uninitialised CPU tensor for an op's output. One of at least 1 MiB comes from a pool of the
// ops' freed outputs, by exact size (FASTLLM_CPU_POOL_MB of them kept, default 256; 0: no pool):
// a fresh large tensor is a fresh mapping whose every page faults on first touch (~1-2 us a page
// on the Intel development CPU), and a training step makes the same outputs again and again.
// Measured on the SmolLM2 LoRA step (bench/README.md): ~4% of the step. Anything else, and every
// non-CPU tensor, is at::empty.
at::Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// output_empty for a CPU tensor of `dtype`, checked: the op `fastllm::pooled_empty`, through which
// the Python ops' outputs on the CPU come from the same pool (fastllm.ops._backend.new_output).
at::Tensor pooled_empty(at::IntArrayRef size, at::ScalarType dtype);

// The sum of the terms as a new (rows of a, columns of b) tensor, as tiled_mm_into decides.
at::Tensor tiled_mm(std::initializer_list<MMTerm> terms);

}  // namespace fastllm::cpu
