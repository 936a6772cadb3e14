// What the benchmark needs from a device: memory, copies, stream-ordered timestamps, a cache
// flush. The bench itself (bench.cpp) is device-independent; each backend implements this
// interface in its own file (bench_device_cpu.cpp; bench_device_cuda.cu: cudaMalloc, a created
// stream, CUDA events).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "scattermoe/context.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::tools {

class BenchDevice {
 public:
  virtual ~BenchDevice() = default;

  virtual Device device() const = 0;
  // "cpu (2 threads)", "NVIDIA H200".
  virtual std::string name() const = 0;
  // The note for the table's time column: "std::chrono::steady_clock", "CUDA events".
  virtual std::string timer_name() const = 0;

  // True when the host can read and write device memory directly (no copies needed).
  virtual bool host_accessible() const = 0;
  // Memory the bench may allocate on this device, in bytes (refuses layers that do not fit).
  virtual std::size_t memory_available() const = 0;
  // Sustained FLOP/s of a GLU-MLP forward+backward here: only for the "this run would take
  // hours" estimate, so a rough figure is fine.
  virtual double estimated_flops_per_second() const = 0;

  // Aligned to kWorkspaceAlignment; throws std::bad_alloc (or Unsupported) on failure.
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* data) noexcept = 0;
  virtual void copy_to_device(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, std::size_t bytes) = 0;
  // Enqueues a copy between two of this device's buffers, in stream order with the library's
  // calls (not waited for): the plain copy the memory-bound kernels are compared with.
  virtual void copy_on_device(void* dst, const void* src, std::size_t bytes) = 0;

  // Fills n elements with scale * normal_at(seed, stream, i) (bench_random.hpp) stored as
  // `dtype`, on the device itself, and returns true; false when this device has no such fill,
  // and the bench generates the values on the host and copies them.
  virtual bool fill_normal(void* data, DType dtype, std::int64_t n, float scale,
                           std::uint64_t seed, std::uint64_t stream) = 0;

  // The context every library call of the bench gets (the stream, the workspace).
  virtual Context context(const Workspace& workspace) const = 0;

  // Enqueues a write of a scratch buffer larger than the device's last-level cache, so that the
  // next timed region starts cold (nothing on the CPU). flush_bytes(): its size, 0 for none.
  virtual void flush_cache() = 0;
  virtual std::size_t flush_bytes() const = 0;

  // Stream-ordered timestamps: mark() records one after all work enqueued so far and returns
  // its index; after synchronize(), elapsed_ms(a, b) is the time between marks a and b.
  // clear_marks() forgets them all.
  virtual int mark() = 0;
  virtual void synchronize() = 0;
  virtual double elapsed_ms(int from, int to) const = 0;
  virtual void clear_marks() = 0;
};

// The device types this build can bench (the CPU; CUDA when the CUDA backend is compiled in).
bool bench_supports(DeviceType type);
// Throws Unsupported for a device this build or machine cannot bench.
std::unique_ptr<BenchDevice> make_bench_device(Device device);

// One per backend, each in its own file. make_cuda_bench_device (only in builds with the CUDA
// backend) throws Unsupported, in one line, when the machine has no usable GPU of that index.
std::unique_ptr<BenchDevice> make_cpu_bench_device();
std::unique_ptr<BenchDevice> make_cuda_bench_device(Device device);

// Owns one allocation on a BenchDevice (nullptr for 0 bytes).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(BenchDevice& device, std::size_t bytes)
      : device_(&device), data_(bytes ? device.allocate(bytes) : nullptr), bytes_(bytes) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    DeviceBuffer(std::move(other)).swap(*this);
    return *this;
  }
  ~DeviceBuffer() {
    if (data_) device_->deallocate(data_);
  }

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void swap(DeviceBuffer& other) noexcept {
    std::swap(device_, other.device_);
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
  }

  BenchDevice* device_ = nullptr;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace scattermoe::tools
