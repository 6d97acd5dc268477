// The vector ISA the CPU kernels' hand-dispatched bodies run (small_linear, decode attention,
// the attention tile kernel): the widest the CPU has, capped by the environment variable
// FASTLLM_CPU_ISA = avx512 | avx2 | none when it is set (as ATEN_CPU_CAPABILITY caps ATen's
// kernels). Decided once, at load time; `torch.ops.fastllm.cpu_isa()` reports it. The cap is
// how the narrower bodies are tested on a wider CPU (tests/ops/test_cpu_isa.py). Loops compiled
// with target_clones pick their clone by the CPU alone.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace fastllm::cpu {

enum class CpuIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kNone;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl")) {
    best = CpuIsa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = CpuIsa::kAvx2;
  }
#endif
  const char* cap = std::getenv("FASTLLM_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  CpuIsa limit;
  if (std::strcmp(cap, "avx512") == 0) {
    limit = CpuIsa::kAvx512;
  } else if (std::strcmp(cap, "avx2") == 0) {
    limit = CpuIsa::kAvx2;
  } else if (std::strcmp(cap, "none") == 0) {
    limit = CpuIsa::kNone;
  } else {
    std::fprintf(stderr, "fastllm: FASTLLM_CPU_ISA=%s ignored (expected avx512, avx2 or none)\n", cap);
    return best;
  }
  return limit < best ? limit : best;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "none";
  }
}

// Whether the CPU is Intel's (decided once).
inline bool cpu_is_intel() {
  static const bool intel = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return bool(__builtin_cpu_is("intel"));
#else
    return false;
#endif
  }();
  return intel;
}

// Who runs the CPU ops' large float32 products (csrc/cpu/gemm.cpp: the LoRA op's, fastllm.ops.linear's,
// the chunked LM head's; and the attention's tiles, csrc/cpu/attention.cpp): the tile kernel
// (fastllm/tile_mm.h) or torch's BLAS. Side by side on the development CPUs (bench/README.md): on
// an AMD Zen 4 (AVX-512) the tile kernel ran on par with or up to 1.3x faster than torch's BLAS
// (MKL); on an AMD Zen 3 (AVX2 only) its 16-column strips ran the training step's products
// 1.0-1.3x and the LM head's 1.75x faster than MKL; on an AMD Zen 5 (AVX-512 on full-width
// pipes) the step's products 1.9-2.3x faster (MKL does not run its best code on AMD CPUs);
// on an Intel Xeon with AVX-512 MKL ran 1.6-2.3x faster than the tile kernel. So the default is
// BLAS on an Intel CPU when torch's BLAS is MKL, and the tile kernel otherwise (where it runs:
// AVX2 or wider); FASTLLM_CPU_PRODUCTS = tile | blas overrides it. Decided once per process;
// `torch.ops.fastllm.cpu_products()` reports the choice and
// `torch.ops.fastllm.set_cpu_products("tile" | "blas" | "default")` changes it (csrc/cpu/gemm.cpp).
enum class CpuProducts { kTile = 0, kBlas = 1 };
inline CpuProducts detect_cpu_products(bool mkl) {
  CpuProducts best = (mkl && cpu_is_intel()) || cpu_isa() == CpuIsa::kNone ? CpuProducts::kBlas : CpuProducts::kTile;
  const char* choice = std::getenv("FASTLLM_CPU_PRODUCTS");
  if (choice == nullptr || *choice == '\0') return best;
  if (std::strcmp(choice, "blas") == 0) return CpuProducts::kBlas;
  if (std::strcmp(choice, "tile") == 0) return cpu_isa() == CpuIsa::kNone ? CpuProducts::kBlas : CpuProducts::kTile;
  std::fprintf(stderr, "fastllm: FASTLLM_CPU_PRODUCTS=%s ignored (expected tile or blas)\n", choice);
  return best;
}

}  // namespace fastllm::cpu
