#include "common.hpp"

#include <cstdio>
#include <cstdlib>

#include "scattermoe/build_info.hpp"

namespace scattermoe::tools {

Device parse_device_option(const std::string& text) {
  if (text == "cpu") return Device::cpu();
  if (text == "cuda") return Device::cuda(0);
  const std::string prefix = "cuda:";
  if (text.compare(0, prefix.size(), prefix) == 0 && text.size() > prefix.size()) {
    const std::string digits = text.substr(prefix.size());
    if (digits.find_first_not_of("0123456789") == std::string::npos && digits.size() < 6) {
      return Device::cuda(std::atoi(digits.c_str()));
    }
  }
  throw UsageError("--device: expected cpu, cuda or cuda:N, got '" + text + "'");
}

Device default_device() {
  if (!build_info().cuda_backend) return Device::cpu();
  for (const DeviceInfo& info : list_devices()) {
    if (info.device.type == DeviceType::kCUDA) return info.device;
  }
  return Device::cpu();
}

std::string format_bytes(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  if (unit == 0) {
    std::snprintf(text, sizeof(text), "%zu B", bytes);
  } else {
    std::snprintf(text, sizeof(text), value < 10 ? "%.2f %s" : value < 100 ? "%.1f %s" : "%.0f %s",
                  value, units[unit]);
  }
  return text;
}

std::string format_seconds(double seconds) {
  char text[32];
  if (seconds < 1.0) {
    std::snprintf(text, sizeof(text), "%.0f ms", seconds * 1e3);
  } else if (seconds < 120.0) {
    std::snprintf(text, sizeof(text), "%.1f s", seconds);
  } else if (seconds < 7200.0) {
    std::snprintf(text, sizeof(text), "%.1f min", seconds / 60.0);
  } else {
    std::snprintf(text, sizeof(text), "%.1f h", seconds / 3600.0);
  }
  return text;
}

}  // namespace scattermoe::tools
