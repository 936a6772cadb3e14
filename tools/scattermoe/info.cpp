#include "info.hpp"

#include <cstdio>
#include <string>

#include "common.hpp"
#include "scattermoe/build_info.hpp"

namespace scattermoe::tools {

int run_info() {
  const BuildInfo build = build_info();
  std::printf("scattermoe %s\n", build.version.c_str());
  std::printf("backends: cpu%s\n", build.cuda_backend ? ", cuda" : "");
  if (build.cuda_backend) {
    std::string archs;
    for (const std::string& arch : build.cuda_archs) archs += (archs.empty() ? "" : ", ") + arch;
    std::printf("CUDA architectures: %s\n", archs.empty() ? "(none listed)" : archs.c_str());
  }
  std::printf("devices:\n");
  for (const DeviceInfo& info : list_devices()) {
    std::printf("  %-8s %s", device_name(info.device).c_str(), info.name.c_str());
    if (info.device.type == DeviceType::kCUDA) {
      std::printf(", sm_%d%d, %d SMs, %s", info.sm_major, info.sm_minor, info.multiprocessors,
                  format_bytes(info.memory_bytes).c_str());
    } else if (info.memory_bytes > 0) {
      std::printf(", %s", format_bytes(info.memory_bytes).c_str());
    }
    std::printf("\n");
  }
  return 0;
}

}  // namespace scattermoe::tools
