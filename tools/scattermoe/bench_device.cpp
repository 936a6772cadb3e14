// Picks the BenchDevice and the comparisons of a backend. The CUDA ones exist only in builds with
// the CUDA backend (CMake defines SCATTERMOE_BENCH_CUDA for them).
#include "bench_device.hpp"

#include "bench_comparison.hpp"
#include "scattermoe/build_info.hpp"
#include "scattermoe/error.hpp"

#ifdef SCATTERMOE_BENCH_CUDA
#include "bench_cublas.hpp"
#endif

namespace scattermoe::tools {

bool bench_supports(DeviceType type) {
#ifdef SCATTERMOE_BENCH_CUDA
  if (type == DeviceType::kCUDA) return true;
#endif
  return type == DeviceType::kCPU;
}

std::unique_ptr<BenchDevice> make_bench_device(Device device) {
  if (device.type == DeviceType::kCPU) return make_cpu_bench_device();
#ifdef SCATTERMOE_BENCH_CUDA
  return make_cuda_bench_device(device);
#else
  if (!build_info().cuda_backend) {
    throw Unsupported("bench: " + device_name(device) +
                      " needs the CUDA backend, which this build does not have (configure with "
                      "-DSCATTERMOE_CUDA=ON)");
  }
  throw Unsupported("bench: timing on " + device_name(device) +
                    " is not compiled into this program (it was built without SCATTERMOE_CUDA)");
#endif
}

std::vector<std::unique_ptr<BenchComparison>> make_bench_comparisons(BenchDevice& device,
                                                                     const BenchLayer& layer,
                                                                     const Context& ctx) {
#ifdef SCATTERMOE_BENCH_CUDA
  if (device.device().type == DeviceType::kCUDA) return make_cublas_comparisons(device, layer, ctx);
#else
  (void)layer;
  (void)ctx;
#endif
  (void)device;
  return {};
}

}  // namespace scattermoe::tools
