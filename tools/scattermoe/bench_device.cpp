// Picks the BenchDevice of a backend. A CUDA one (cudaMalloc, CUDA events on the context's
// stream) plugs in here next to the CPU one.
#include "bench_device.hpp"

#include "scattermoe/build_info.hpp"
#include "scattermoe/error.hpp"

namespace scattermoe::tools {

bool bench_supports(DeviceType type) { return type == DeviceType::kCPU; }

std::unique_ptr<BenchDevice> make_bench_device(Device device) {
  if (device.type == DeviceType::kCPU) return make_cpu_bench_device();
  if (!build_info().cuda_backend) {
    throw Unsupported("bench: " + device_name(device) +
                      " needs the CUDA backend, which this build does not have (configure with "
                      "-DSCATTERMOE_CUDA=ON)");
  }
  throw Unsupported("bench: timing on " + device_name(device) +
                    " is not implemented yet (only the CPU bench is)");
}

}  // namespace scattermoe::tools
