#include "scattermoe/build_info.hpp"

#include <thread>

namespace scattermoe {

BuildInfo build_info() {
  BuildInfo info;
  info.version = SCATTERMOE_VERSION;
#ifdef SCATTERMOE_WITH_CUDA
  info.cuda_backend = true;
#endif
  return info;
}

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> devices;
  DeviceInfo cpu;
  cpu.device = Device::cpu();
  cpu.name = "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " threads)";
  devices.push_back(cpu);
  return devices;
}

}  // namespace scattermoe
