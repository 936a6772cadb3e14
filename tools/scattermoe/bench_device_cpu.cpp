// The CPU side of the benchmark: host memory, wall-clock timestamps (every CPU op is
// synchronous, so a timestamp taken after a call is taken after its work).
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "bench_device.hpp"
#include "scattermoe/error.hpp"

namespace scattermoe::tools {
namespace {

// Rough sustained rate of the CPU reference backend on a GLU-MLP forward+backward, per
// hardware thread, measured on the tiny and small explicit configs (see docs/perf.md).
constexpr double kCpuFlopsPerSecondPerThread = 1e9;

class CpuBenchDevice final : public BenchDevice {
 public:
  Device device() const override { return Device::cpu(); }
  std::string name() const override {
    return "cpu (" + std::to_string(threads()) + " threads)";
  }
  std::string timer_name() const override { return "std::chrono::steady_clock"; }
  bool host_accessible() const override { return true; }

  std::size_t memory_available() const override {
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page_size = sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page_size <= 0) return static_cast<std::size_t>(-1);
    return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page_size);
  }

  double estimated_flops_per_second() const override {
    return kCpuFlopsPerSecondPerThread * threads();
  }

  void* allocate(std::size_t bytes) override {
    const std::size_t rounded =
        (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
    void* data = std::aligned_alloc(kWorkspaceAlignment, rounded);
    if (!data) throw std::bad_alloc();
    return data;
  }
  void deallocate(void* data) noexcept override { std::free(data); }
  void copy_to_device(void* dst, const void* src, std::size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, std::size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void copy_on_device(void* dst, const void* src, std::size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }

  // The host generator in bench.cpp fills CPU memory directly.
  bool fill_normal(void*, DType, std::int64_t, float, std::uint64_t, std::uint64_t) override {
    return false;
  }

  Context context(const Workspace& workspace) const override {
    Context ctx;
    ctx.workspace = workspace;
    return ctx;
  }

  // The CPU reference backend is compute-bound at these sizes: no flush.
  void flush_cache() override {}
  std::size_t flush_bytes() const override { return 0; }

  int mark() override {
    marks_.push_back(std::chrono::steady_clock::now());
    return static_cast<int>(marks_.size()) - 1;
  }
  void synchronize() override {}
  double elapsed_ms(int from, int to) const override {
    return std::chrono::duration<double, std::milli>(marks_.at(to) - marks_.at(from)).count();
  }
  void clear_marks() override { marks_.clear(); }

 private:
  static unsigned threads() { return std::max(1u, std::thread::hardware_concurrency()); }

  std::vector<std::chrono::steady_clock::time_point> marks_;
};

}  // namespace

std::unique_ptr<BenchDevice> make_cpu_bench_device() { return std::make_unique<CpuBenchDevice>(); }

}  // namespace scattermoe::tools
