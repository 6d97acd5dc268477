// c = a sum of products a b (+ c) for float32 CPU matrices, for the C++ ops (csrc/cpu/lora_linear.cpp)
// and the Python loops that run large products themselves (the chunked logits-free ops,
// fastllm/ops/_chunked.py, fastllm/ops/linear.py). Two engines, one chosen per process
// (tile_products(); fastllm/cpu_isa.h has the rule and the numbers behind it):
// - the tile kernel (fastllm/tile_mm.h), all the terms in one pass: on an AMD Zen 4, side by
//   side with torch's own BLAS call, the LM head's logits 1.3x faster, the step's products on
//   par at 2048 rows and up to 1.25x faster at 64-512 rows; on an AMD Zen 3 (AVX2) the step's
//   products 1.0-1.3x and the LM head's 1.75x faster (bench/README.md);
// - torch's BLAS (ATen's mm/addmm, one call per term): on an Intel Xeon, MKL ran these products
//   1.6-2.3x faster than the tile kernel.
// For the tile kernel a and b are each row-major or a transposed view (either stride 1), c has
// unit column stride. Anything else (other strides, no AVX2) goes to ATen's mm, so the result
// never depends on the layout the caller happened to have.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/core/Allocator.h>  // reportMemoryUsageToProfiler
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fastllm/checks.h"
#include "fastllm/cpu_isa.h"
#include "fastllm/grain.h"
#include "fastllm/lane_reduce.h"  // v8, FASTLLM_HAVE_VECTORS
#include "fastllm/cpu_mm.h"
#include "fastllm/tile_mm.h"

namespace fastllm::cpu {

namespace {

bool unit_stride(const at::Tensor& t) { return t.stride(1) == 1 || t.stride(0) == 1; }

bool tile_fits(const at::Tensor& c, std::initializer_list<MMTerm> terms) {
  if (!tile_products() || !c.device().is_cpu() || c.scalar_type() != at::kFloat || c.stride(1) != 1 || terms.size() > 4) return false;
  for (const MMTerm& t : terms) {
    if (!t.a.device().is_cpu() || !t.b.device().is_cpu() || t.a.scalar_type() != at::kFloat ||
        t.b.scalar_type() != at::kFloat || !unit_stride(t.a) || !unit_stride(t.b)) {
      return false;
    }
  }
  return true;
}

// -1: not decided yet; else a CpuProducts
std::atomic<int> g_products{-1};

CpuProducts default_products() {
  static const CpuProducts best = detect_cpu_products(at::hasMKL());
  return best;
}
}  // namespace

bool tile_products() {
  int v = g_products.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(default_products());
    g_products.store(v, std::memory_order_relaxed);
  }
  return v == static_cast<int>(CpuProducts::kTile);
}

std::string cpu_products_name() { return tile_products() ? "tile" : "blas"; }

bool small_linear_on_blas(int64_t rows) { return rows == 1 && !tile_products() && cpu_is_intel(); }

void set_cpu_products(const std::string& name) {
  CpuProducts p;
  if (name == "tile") {
    TORCH_CHECK(cpu_isa() != CpuIsa::kNone, "set_cpu_products: name 'tile' needs a CPU with AVX2 and FMA "
                "(fastllm's CPU ISA is 'none')");
    p = CpuProducts::kTile;
  } else if (name == "blas") {
    p = CpuProducts::kBlas;
  } else if (name == "default") {
    p = default_products();
  } else {
    TORCH_CHECK(false, "set_cpu_products: name: expected 'tile', 'blas' or 'default', got '", name, "'");
  }
  g_products.store(static_cast<int>(p), std::memory_order_relaxed);
}

void tiled_mm_into(at::Tensor& c, std::initializer_list<MMTerm> terms, bool accumulate) {
  for (const MMTerm& t : terms) {
    TORCH_CHECK(t.a.dim() == 2 && t.b.dim() == 2 && t.a.size(1) == t.b.size(0) && t.a.size(0) == c.size(0) &&
                    t.b.size(1) == c.size(1),
                "tiled_mm: shapes do not chain: a ", t.a.sizes(), ", b ", t.b.sizes(), ", c ", c.sizes());
  }
  if (tile_fits(c, terms)) {
    GemmTerm gt[4];
    int n = 0;
    for (const MMTerm& t : terms) {
      // b row-major is packed by rows; a transposed view (a weight's or a LoRA factor's .t()) is
      // transposed as it is packed, in 8 x 8 register blocks (tile_mm_detail::pack_panel)
      const bool b_rows = t.b.stride(1) == 1;
      gt[n++] = GemmTerm{t.a.const_data_ptr<float>(), t.a.stride(0), t.a.stride(1), t.b.const_data_ptr<float>(),
                         b_rows ? t.b.stride(0) : 1, b_rows ? 1 : t.b.stride(1), t.a.size(1),
                         static_cast<float>(t.alpha)};
    }
    if (gemm_f32(c.size(0), c.size(1), gt, n, c.mutable_data_ptr<float>(), c.stride(0), accumulate)) return;
  }
  bool acc = accumulate;
  for (const MMTerm& t : terms) {
    if (!acc && t.alpha == 1.0) {
      at::mm_out(c, t.a, t.b);
    } else {
      c.addmm_(t.a, t.b, /*beta=*/acc ? 1.0 : 0.0, /*alpha=*/t.alpha);
    }
    acc = true;
  }
  if (!acc) c.zero_();  // no terms
}

namespace {
// Freed large outputs kept for the next output of the same size (see output_empty). The
// profiler is told of every block handed out and given back, as the CPU allocator tells it, so
// that memory profiles (bench/harness.py's peak) count the pooled outputs like any other.
struct OutputPool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;
  size_t cached = 0, live = 0;
  const size_t cap = [] {
    const char* v = std::getenv("FASTLLM_CPU_POOL_MB");
    const long long mb = v != nullptr && *v != '\0' ? std::atoll(v) : 256;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
};
OutputPool& pool() {
  static OutputPool* p = new OutputPool();  // never destroyed: tensors may outlive static teardown
  return *p;
}
constexpr size_t kPoolMin = size_t(1) << 20;

void give_back(void* ptr, size_t bytes) {
  OutputPool& p = pool();
  bool kept = false;
  size_t live = 0, reserved = 0;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.live -= bytes;
    if (p.cached + bytes <= p.cap) {
      p.free[bytes].push_back(ptr);
      p.cached += bytes;
      kept = true;
    }
    live = p.live;
    reserved = p.live + p.cached;
  }
  c10::reportMemoryUsageToProfiler(ptr, -static_cast<int64_t>(bytes), live, reserved, c10::Device(c10::kCPU));
  if (!kept) std::free(ptr);
}
}  // namespace

at::Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t bytes = size_t(n) * options.dtype().itemsize();
  OutputPool& p = pool();
  if (!options.device().is_cpu() || bytes < kPoolMin || p.cap == 0) return at::empty(sizes, options);
  void* ptr = nullptr;
  size_t live = 0, reserved = 0;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(bytes);
    if (it != p.free.end() && !it->second.empty()) {
      ptr = it->second.back();
      it->second.pop_back();
      p.cached -= bytes;
    }
  }
  if (ptr == nullptr && posix_memalign(&ptr, 64, bytes) != 0) return at::empty(sizes, options);
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.live += bytes;
    live = p.live;
    reserved = p.live + p.cached;
  }
  c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(bytes), live, reserved, c10::Device(c10::kCPU));
  return at::from_blob(ptr, sizes, [bytes](void* q) { give_back(q, bytes); }, options);
}

at::Tensor tiled_mm(std::initializer_list<MMTerm> terms) {
  TORCH_CHECK(terms.size() > 0, "tiled_mm: expected at least one term");
  const MMTerm& first = *terms.begin();
  at::Tensor c = output_empty({first.a.size(0), first.b.size(1)}, first.a.options());
  tiled_mm_into(c, terms, false);
  return c;
}

namespace {

void mm_f32_out_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&c, "c"}, {&a, "a"}, {&b, "b"}}) {
    check_dtype(*t, name, {at::kFloat});
    check_dim(*t, name, 2);
  }
  check_same_device(c, "c", a, "a");
  check_same_device(c, "c", b, "b");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, "b: expected ", K, " rows (a's columns), got ", b.size(0));
  TORCH_CHECK(c.size(0) == M && c.size(1) == N, "c: expected shape [", M, ", ", N, "], got ", c.sizes());
  tiled_mm_into(c, {{a, b}}, accumulate);
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef size, at::ScalarType dtype) {
  for (int64_t s : size) TORCH_CHECK(s >= 0, "size: expected sizes >= 0, got ", size);
  return output_empty(size, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("mm_f32_out_", &mm_f32_out_cpu);
}

}  // namespace fastllm::cpu
