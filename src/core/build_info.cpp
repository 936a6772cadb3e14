#include "scattermoe/build_info.hpp"

#include <sstream>
#include <thread>

#ifdef SCATTERMOE_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace scattermoe {

BuildInfo build_info() {
  BuildInfo info;
  info.version = SCATTERMOE_VERSION;
#ifdef SCATTERMOE_WITH_CUDA
  info.cuda_backend = true;
  std::istringstream archs(SCATTERMOE_CUDA_ARCHS);  // e.g. "80,90a"
  for (std::string arch; std::getline(archs, arch, ',');) {
    if (!arch.empty()) info.cuda_archs.push_back(arch);
  }
#endif
  return info;
}

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> devices;
  DeviceInfo cpu;
  cpu.device = Device::cpu();
  cpu.name = "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " threads)";
  devices.push_back(cpu);
#ifdef SCATTERMOE_WITH_CUDA
  const int count = cuda::device_count();
  for (int i = 0; i < count; ++i) {
    const cuda::CudaDevice props = cuda::device_properties(i);
    DeviceInfo d;
    d.device = Device::cuda(i);
    d.name = props.name;
    d.sm_major = props.major;
    d.sm_minor = props.minor;
    d.multiprocessors = props.multiprocessors;
    d.memory_bytes = props.memory_bytes;
    devices.push_back(d);
  }
#endif
  return devices;
}

}  // namespace scattermoe
