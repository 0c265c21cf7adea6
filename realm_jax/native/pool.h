// realm-jax native kernels: splitting a call's work over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace realm {

// Runs work(*s) on `helpers` pool tasks and on the calling thread, then waits until s->done reaches `total`.
// The work claims its items from a cursor in *s (shared, so that a pool task that starts late finds it
// exhausted and returns without touching the call's state) and adds what it finished to s->done.
template <class Shared, class Work>
void run_on_pool(xla::ffi::ThreadPool& pool, int64_t helpers, const std::shared_ptr<Shared>& s, Work work,
                 int64_t total) {
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s, work] { work(*s); });
  work(*s);
  while (s->done.load(std::memory_order_acquire) < total) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

// Runs chunk(c) for every c in [0, n_chunks) on the calling thread and up to pool.num_threads() - 1 pool
// tasks. Chunks are handed out from an atomic counter: the calling thread takes chunks too and waits only
// for chunks another thread has claimed.
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
  run_on_pool(pool, helpers, s, work, n_chunks);
}

// Runs body(begin, end) over the items [0, n) on the calling thread and up to pool.num_threads() - 1 pool tasks,
// in ranges claimed from an atomic cursor, guided: each claim takes 1 / (2 threads) of what is left (at least
// `grain` items, a multiple of `grain` but for the last), so that the first claims are large and the last small,
// and the thread done first waits for the other's last range, a grain or so, not for 1 / 16 of the call.
inline void parallel_ranges(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain,
                            std::function<void(int64_t, int64_t)> body) {
  struct Shared {
    std::function<void(int64_t, int64_t)> body;
    int64_t n, grain, share;
    std::atomic<int64_t> next{0}, done{0};
  };
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), (n + grain - 1) / grain);
  auto s = std::make_shared<Shared>();
  s->body = std::move(body);
  s->n = n;
  s->grain = grain;
  s->share = 2 * threads;
  auto work = [](Shared& sh) {
    int64_t begin = sh.next.load(std::memory_order_relaxed);
    while (begin < sh.n) {
      const int64_t size = std::max<int64_t>(1, (sh.n - begin) / sh.share / sh.grain) * sh.grain;
      const int64_t end = std::min(sh.n, begin + size);
      if (!sh.next.compare_exchange_weak(begin, end, std::memory_order_relaxed)) continue;  // begin reloaded
      sh.body(begin, end);
      sh.done.fetch_add(end - begin, std::memory_order_release);
      begin = sh.next.load(std::memory_order_relaxed);
    }
  };
  run_on_pool(pool, threads - 1, s, work, n);
}

}  // namespace realm
