// The CUDA side of the benchmark: cudaMalloc'ed memory, a stream of its own for every call, CUDA
// events on that stream as timestamps, an L2 flush by a memset of a scratch buffer, and the
// inputs' random fill as a kernel (the host generator would take minutes on the largest
// presets' weights).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "bench_device.hpp"
#include "bench_random.hpp"
#include "cuda_util.cuh"
#include "scattermoe/error.hpp"

namespace scattermoe::tools {
namespace {

// Rough sustained rate of the layer's forward+backward on a current data-centre GPU: only for
// the "this run would take hours" guard.
constexpr double kCudaFlopsPerSecond = 2e14;

// The flush buffer is this many times the L2 size (at least twice, by the bench's rule).
constexpr std::size_t kFlushL2Multiple = 4;



// data[i] = scale * normal_at(seed, stream, i), the host generator's values.
template <class T>
__global__ void fill_normal_kernel(T* data, std::int64_t n, float scale, std::uint64_t seed,
                                   std::uint64_t stream) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    data[i] = from_float<T>(scale * normal_at(seed, stream, static_cast<std::uint64_t>(i)));
  }
}

class CudaBenchDevice final : public BenchDevice {
 public:
  explicit CudaBenchDevice(Device device) : device_(device) {
    const std::string where = "bench on " + device_name(device);
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device / no driver" error
      throw Unsupported(where + ": no usable CUDA device (" + cudaGetErrorString(status) + ")");
    }
    if (count == 0) throw Unsupported(where + ": no CUDA device on this machine");
    if (device.index < 0 || device.index >= count) {
      throw Unsupported(where + ": no such device (this machine has " + std::to_string(count) +
                        " CUDA device" + (count == 1 ? "" : "s") + ")");
    }
    // The library runs on the current device; this program benches one device.
    check_cuda(cudaSetDevice(device.index), "cudaSetDevice");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, device.index), "cudaGetDeviceProperties");
    name_ = prop.name;
    multiprocessors_ = prop.multiProcessorCount;
    std::size_t free_bytes = 0, total_bytes = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    available_ = free_bytes;
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    flush_bytes_ = kFlushL2Multiple *
                   std::max<std::size_t>(static_cast<std::size_t>(prop.l2CacheSize), 1 << 20);
    check_cuda(cudaMalloc(&flush_, flush_bytes_), "cudaMalloc of the L2 flush buffer");
  }

  ~CudaBenchDevice() override {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (flush_) cudaFree(flush_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  CudaBenchDevice(const CudaBenchDevice&) = delete;
  CudaBenchDevice& operator=(const CudaBenchDevice&) = delete;

  Device device() const override { return device_; }
  std::string name() const override { return name_; }
  std::string timer_name() const override { return "CUDA events"; }
  bool host_accessible() const override { return false; }
  // Free device memory when the bench started (cudaMemGetInfo).
  std::size_t memory_available() const override { return available_; }
  double estimated_flops_per_second() const override { return kCudaFlopsPerSecond; }

  void* allocate(std::size_t bytes) override {
    void* data = nullptr;
    const cudaError_t status = cudaMalloc(&data, std::max<std::size_t>(bytes, 1));
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky, but leave nothing behind for the next check
      throw std::bad_alloc();
    }
    check_cuda(status, "cudaMalloc of " + std::to_string(bytes) + " bytes");
    return data;
  }
  void deallocate(void* data) noexcept override { cudaFree(data); }

  void copy_to_device(void* dst, const void* src, std::size_t bytes) override {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_),
               "copying to the device");
    check_cuda(cudaStreamSynchronize(stream_), "copying to the device");
  }
  void copy_to_host(void* dst, const void* src, std::size_t bytes) override {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_),
               "copying to the host");
    check_cuda(cudaStreamSynchronize(stream_), "copying to the host");
  }
  void copy_on_device(void* dst, const void* src, std::size_t bytes) override {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_),
               "copying on the device");
  }

  bool fill_normal(void* data, DType dtype, std::int64_t n, float scale, std::uint64_t seed,
                   std::uint64_t stream) override {
    if (n <= 0) return true;
    constexpr int kThreads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(
        (n + kThreads - 1) / kThreads, static_cast<std::int64_t>(multiprocessors_) * 16));
    switch (dtype) {
      case DType::kFloat32:
        fill_normal_kernel<<<blocks, kThreads, 0, stream_>>>(static_cast<float*>(data), n, scale,
                                                             seed, stream);
        break;
      case DType::kFloat16:
        fill_normal_kernel<<<blocks, kThreads, 0, stream_>>>(static_cast<__half*>(data), n, scale,
                                                             seed, stream);
        break;
      case DType::kBFloat16:
        fill_normal_kernel<<<blocks, kThreads, 0, stream_>>>(static_cast<__nv_bfloat16*>(data), n,
                                                             scale, seed, stream);
        break;
      default: return false;
    }
    check_cuda(cudaGetLastError(), "fill_normal_kernel");
    return true;
  }

  Context context(const Workspace& workspace) const override {
    Context ctx;
    ctx.stream = stream_;
    ctx.workspace = workspace;
    return ctx;
  }

  void flush_cache() override {
    check_cuda(cudaMemsetAsync(flush_, 0, flush_bytes_, stream_), "flushing L2");
  }
  std::size_t flush_bytes() const override { return flush_bytes_; }

  int mark() override {
    if (next_mark_ == events_.size()) {
      cudaEvent_t event = nullptr;
      check_cuda(cudaEventCreate(&event), "cudaEventCreate");
      events_.push_back(event);
    }
    check_cuda(cudaEventRecord(events_[next_mark_], stream_), "cudaEventRecord");
    return static_cast<int>(next_mark_++);
  }
  // Errors of the kernels the bench enqueued surface here.
  void synchronize() override {
    check_cuda(cudaStreamSynchronize(stream_), "running the benchmark");
  }
  double elapsed_ms(int from, int to) const override {
    float ms = 0.0f;
    check_cuda(cudaEventElapsedTime(&ms, events_.at(static_cast<std::size_t>(from)),
                                    events_.at(static_cast<std::size_t>(to))),
               "cudaEventElapsedTime");
    return ms;
  }
  // The events are reused by later marks: call after synchronize().
  void clear_marks() override { next_mark_ = 0; }

 private:
  Device device_;
  std::string name_;
  int multiprocessors_ = 1;
  std::size_t available_ = 0;
  cudaStream_t stream_ = nullptr;
  void* flush_ = nullptr;
  std::size_t flush_bytes_ = 0;
  std::vector<cudaEvent_t> events_;
  std::size_t next_mark_ = 0;
};

}  // namespace

std::unique_ptr<BenchDevice> make_cuda_bench_device(Device device) {
  return std::make_unique<CudaBenchDevice>(device);
}

}  // namespace scattermoe::tools
