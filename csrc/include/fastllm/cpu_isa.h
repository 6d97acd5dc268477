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

}  // namespace fastllm::cpu
