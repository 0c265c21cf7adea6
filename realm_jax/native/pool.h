// realm-jax native kernels: splitting a call's work over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace realm {

// Runs chunk(c) for every c in [0, n_chunks) on the calling thread and up to pool.num_threads() - 1 pool
// tasks. Chunks are handed out from an atomic counter: the calling thread takes chunks too and waits only
// for chunks another thread has claimed, so a pool task that starts late cannot stall the call (it finds
// the counter exhausted and returns without touching `chunk`).
inline void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t n_chunks, std::function<void(int64_t)> chunk) {
  struct Shared {
    std::function<void(int64_t)> chunk;
    int64_t n_chunks;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto s = std::make_shared<Shared>();
  s->chunk = std::move(chunk);
  s->n_chunks = n_chunks;
  auto work = [](Shared& sh) {
    for (;;) {
      const int64_t c = sh.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= sh.n_chunks) return;
      sh.chunk(c);
      sh.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s, work] { work(*s); });
  work(*s);
  while (s->done.load(std::memory_order_acquire) < n_chunks) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace realm
