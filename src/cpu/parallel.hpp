// A minimal parallel-for over disjoint index ranges: each index's work is done by exactly one
// thread in a fixed order, so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace scattermoe::cpu {

// Calls fn(i) for every i in [0, n). `cost` is a rough per-index operation count used to
// avoid starting threads for small work.
template <class Fn>
void parallel_for(std::int64_t n, std::int64_t cost, Fn&& fn) {
  constexpr std::int64_t kMinWorkPerThread = 1 << 16;
  const std::int64_t hw = std::max<std::int64_t>(1, std::thread::hardware_concurrency());
  const std::int64_t by_work = std::max<std::int64_t>(1, n * std::max<std::int64_t>(cost, 1) / kMinWorkPerThread);
  const std::int64_t threads = std::min({hw, by_work, n, std::int64_t{64}});
  if (threads <= 1) {
    for (std::int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads - 1));
  auto run = [&](std::int64_t t) {
    const std::int64_t begin = n * t / threads, end = n * (t + 1) / threads;
    for (std::int64_t i = begin; i < end; ++i) fn(i);
  };
  for (std::int64_t t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}

}  // namespace scattermoe::cpu
