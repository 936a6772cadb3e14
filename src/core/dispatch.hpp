// Chooses the backend from the device of an operation's tensors.
#pragma once

#include <string>

#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

#ifdef SCATTERMOE_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace scattermoe::detail {

// True when `device` is served by the CUDA backend; throws Unsupported when this build has no
// CUDA backend. Callers write
//   if (use_cuda(op, device)) {
//   #ifdef SCATTERMOE_WITH_CUDA
//     return cuda::...;
//   #endif
//   }
//   return cpu::...;
inline bool use_cuda([[maybe_unused]] const char* op, Device device) {
  if (device.type == DeviceType::kCPU) return false;
#ifdef SCATTERMOE_WITH_CUDA
  return true;
#else
  throw Unsupported(std::string(op) + ": tensors are on " + device_name(device) +
                    " but this build has no CUDA backend (configure with -DSCATTERMOE_CUDA=ON)");
#endif
}

}  // namespace scattermoe::detail

