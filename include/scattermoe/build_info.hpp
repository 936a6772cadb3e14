// What this build of the library contains.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "scattermoe/tensor.hpp"

namespace scattermoe {

struct BuildInfo {
  std::string version;                // "0.1.0"
  bool cuda_backend = false;          // compiled with the CUDA backend
  std::vector<std::string> cuda_archs;  // e.g. {"80", "90a"}; empty without CUDA
};

BuildInfo build_info();

struct DeviceInfo {
  Device device;
  std::string name;    // "NVIDIA H200", "cpu (N threads)"
  int sm_major = 0;    // compute capability, 0 for the CPU
  int sm_minor = 0;
  int multiprocessors = 0;
  std::size_t memory_bytes = 0;
};

// The CPU and every CUDA device the runtime reports (none when CUDA is not compiled in or
// no driver is present; never throws for a machine without a GPU).
std::vector<DeviceInfo> list_devices();

}  // namespace scattermoe
