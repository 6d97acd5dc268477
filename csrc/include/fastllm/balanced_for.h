// at::parallel_for's static split, with the items a thread has not started yet open to the
// threads that finish first (work stealing).
//
// A decode step's products and attention are memory streams split evenly between the threads,
// and the two halves of a split still end tens of microseconds apart: on the development CPU
// (2 threads) a b16 decode product of ~225 us had its threads finish 20 us apart on average,
// the 6.9 ms head 290 us apart (bench/README.md). With a static split the thread that is done
// waits at the join. Here each thread starts on its static share as at::parallel_for would give
// it, claims its items from the front a few at a time, and a thread whose share is empty takes
// the upper half of what remains of another's (which it may lose in turn). Items keep their
// place in memory order within each claim, so a kernel's prefetch ahead stays useful, and
// every item is run exactly once, by one thread, with the same code as under a static split:
// results do not depend on which thread ran an item.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace fastllm {

namespace detail {

// A thread's unclaimed items [lo, hi) in one word, so that owner and thief claim from it with
// one compare-exchange each. Own cache line: the owner claims from it all the time.
struct alignas(64) StealRange {
  std::atomic<uint64_t> bits{0};
  static uint64_t pack(uint64_t lo, uint64_t hi) { return lo | (hi << 32); }
  static uint64_t lo(uint64_t b) { return b & 0xffffffffu; }
  static uint64_t hi(uint64_t b) { return b >> 32; }
};

}  // namespace detail

// f(begin, end, ahead) over [0, n) in runs [begin, end) of consecutive items, each item exactly
// once, on up to at::get_num_threads() threads, a thread's share `grain` items or more (as
// at::parallel_for; n <= grain runs f(0, n, n) inline). ahead: the end of the range the run was
// claimed from: items [end, ahead) are the thread's next unless another thread takes them (what
// a kernel may prefetch during the run). n < 2^32.
template <class F>
void balanced_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads =
      at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || n <= grain) {
    f(int64_t{0}, n, n);
    return;
  }
  std::unique_ptr<detail::StealRange[]> ranges(new detail::StealRange[threads]);
  for (int64_t t = 0; t < threads; ++t) {
    ranges[t].bits.store(detail::StealRange::pack(n * t / threads, n * (t + 1) / threads), std::memory_order_relaxed);
  }
  // A claim takes a sixteenth of what is left of a range (at least one item): few claims on a
  // long range, single items near its end, where a thief may still take half of the rest.
  auto run_own = [&](detail::StealRange& r) {
    uint64_t b = r.bits.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = detail::StealRange::lo(b), hi = detail::StealRange::hi(b);
      if (lo >= hi) return;
      const uint64_t take = std::max<uint64_t>(1, (hi - lo) / 16);
      if (r.bits.compare_exchange_weak(b, detail::StealRange::pack(lo + take, hi), std::memory_order_relaxed)) {
        f(static_cast<int64_t>(lo), static_cast<int64_t>(lo + take), static_cast<int64_t>(hi));
        b = r.bits.load(std::memory_order_relaxed);
      }
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) run_own(ranges[t]);
    detail::StealRange& home = ranges[begin];
    for (bool found = true; found;) {
      found = false;
      for (int64_t v = 0; v < threads; ++v) {
        if (v >= begin && v < end) continue;
        detail::StealRange& r = ranges[v];
        uint64_t b = r.bits.load(std::memory_order_relaxed);
        for (;;) {
          const uint64_t lo = detail::StealRange::lo(b), hi = detail::StealRange::hi(b);
          if (lo >= hi) break;
          const uint64_t mid = hi - (hi - lo + 1) / 2;  // the thief takes [mid, hi): at least one item
          if (r.bits.compare_exchange_weak(b, detail::StealRange::pack(lo, mid), std::memory_order_relaxed)) {
            home.bits.store(detail::StealRange::pack(mid, hi), std::memory_order_relaxed);
            run_own(home);
            found = true;
            break;
          }
        }
      }
    }
  });
}

}  // namespace fastllm
