// Grain sizes for at::parallel_for in the CPU kernels, from one rule.
//
// at::parallel_for(begin, end, grain, f) runs f inline (no fork/join) when end - begin <= grain
// (or one thread is set), and otherwise gives each thread a chunk of at least `grain` items. A
// fork/join costs microseconds on an idle machine and much more on a busy one, so a thread
// chunk must hold enough work to pay for it, or small shapes (a tiny model, a decode step of a
// few rows) run slower with more threads than with one.
//
// The rule: a thread chunk holds at least kMinWorkPerThread units of work. A unit is one
// element of an item's rows processed (read, a few flops, written), or 8 multiply-adds of a
// vectorised tile product. Each kernel states the work of one item (a row of H elements: H; an
// attention tile: rows * keys * D * products / 8) and calls grain_for with it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastllm {

// 64k units: tens of microseconds per thread chunk. A tiny model (hidden 64, a few hundred
// rows) and a decode step of batch 1-16 at hidden ~1k run inline.
constexpr int64_t kMinWorkPerThread = 65536;

// Items per thread chunk for items that cost `work_per_item` units each (at least 1 item).
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
}

}  // namespace fastllm
