// What a decode step's weight stream can reach on this CPU, with no model around it.
//
// A decode step at batch B reads every weight once from memory and does B multiply-adds per
// weight: per 64-byte line of float32 weights (16 values), B vector multiply-adds of 16 lanes.
// This probe streams a buffer the size of a small model's weights over all threads and does,
// per line, F independent vector multiply-adds (F = 0, 16, 32: a pure read, batch 16, batch 32)
// with X operand vectors loaded per line from a small per-thread buffer of S KiB (what the
// batch's activations cost: X = 8 is a 4 x 4 dot-product tile, X = 16 one broadcast per
// multiply-add), and a software prefetch P lines ahead into L2 (0: the hardware prefetcher
// alone). The best of 5 passes is printed as time and read bandwidth.
//
// Nothing here is built with the extension; with GCC on an x86-64 CPU with AVX-512:
//
//   g++ -O2 -mavx512f -mfma -fopenmp bench/cpu_stream_probe.cpp -o cpu_stream_probe
//   OMP_NUM_THREADS=2 ./cpu_stream_probe [MiB]          # default 512
//
// bench/README.md ("What the decode step's weight stream can reach") has the table of the
// development CPU and what it bounds.
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

namespace {

template <int F, int X>
double pass(const float* w, size_t lines, size_t x_kib, size_t prefetch, float* sink) {
  const auto t0 = std::chrono::steady_clock::now();
  float total = 0.0f;
#pragma omp parallel reduction(+ : total)
  {
    const size_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const size_t lo = lines * t / T, hi = lines * (t + 1) / T;
    const size_t x_lines = x_kib * 1024 / 64;  // a power of two
    float* x = static_cast<float*>(std::aligned_alloc(64, x_lines * 64));
    for (size_t i = 0; i < x_lines * 16; ++i) x[i] = 0.5f;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    __m512 s = _mm512_setzero_ps();
    size_t xi = 0;
    for (size_t l = lo; l < hi; ++l) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (l + prefetch) * 16), _MM_HINT_T1);
      const __m512 v = _mm512_load_ps(w + l * 16);
      if constexpr (F == 0) {
        s = _mm512_add_ps(s, v);
      } else {
        __m512 xv[X];
#pragma GCC unroll 16
        for (int j = 0; j < X; ++j) xv[j] = _mm512_load_ps(x + ((xi + j) & (x_lines - 1)) * 16);
        xi += X;
#pragma GCC unroll 32
        for (int i = 0; i < F; ++i) acc[i % 16] = _mm512_fmadd_ps(xv[i % X], v, acc[i % 16]);
      }
    }
    for (int i = 0; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, s);
    for (float v : lanes) total += v;
    std::free(x);
  }
  *sink += total;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <int F, int X>
void row(const float* w, size_t lines, size_t x_kib, size_t prefetch) {
  double best = 1e30;
  float sink = 0.0f;
  for (int rep = 0; rep < 5; ++rep) {
    const double dt = pass<F, X>(w, lines, x_kib, prefetch, &sink);
    if (dt < best) best = dt;
  }
  std::printf("| %2d | %2d | %3zu | %4zu | %8.2f | %5.1f |\n", F, F ? X : 0, F ? x_kib : 0, prefetch, best * 1e3,
              lines * 64 / best / 1e9);
  if (sink == 42.0f) std::printf(" ");  // keeps the passes from being optimised away
}

}  // namespace

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 512;
  const size_t lines = mib * 1024 * 1024 / 64;
  float* w = static_cast<float*>(std::aligned_alloc(64, (lines + 1024) * 64));
#pragma omp parallel for
  for (size_t i = 0; i < (lines + 1024) * 16; ++i) w[i] = 1.0f;
  std::printf("%zu MiB on %d threads\n\n", mib, omp_get_max_threads());
  std::printf("| FMA/line | loads/line | x KiB | prefetch | ms | GB/s |\n|---|---|---|---|---|---|\n");
  for (size_t pf : {0, 128}) row<0, 1>(w, lines, 4, pf);
  for (size_t pf : {0, 32, 128, 512}) row<16, 1>(w, lines, 4, pf);
  for (size_t kib : {32, 64}) {
    row<16, 4>(w, lines, kib, 256);
    row<16, 8>(w, lines, kib, 256);
    row<16, 16>(w, lines, kib, 256);
  }
  row<32, 8>(w, lines, 32, 256);
  std::free(w);
}
