// Device mirrors of HostTensor for the GPU tests: the same shape, strides and bytes, on cuda:0.
#pragma once

#include <cuda_runtime.h>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "check/device_memory.hpp"
#include "check/host_tensor.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::testing {

#define SCATTERMOE_CUDA_OK(expr)                                                      \
  do {                                                                                \
    const cudaError_t status_ = (expr);                                               \
    ASSERT_EQ(status_, cudaSuccess) << #expr << ": " << cudaGetErrorString(status_); \
  } while (0)

// Skips the calling test with the reason when no GPU can be used.
inline std::string gpu_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device (") + cudaGetErrorString(status) + ")";
  }
  if (count == 0) return "no CUDA device on this machine";
  return "";
}

#define SCATTERMOE_REQUIRE_GPU()                                                         \
  do {                                                                                   \
    const std::string reason_ = ::scattermoe::testing::gpu_unavailable_reason();         \
    if (!reason_.empty()) GTEST_SKIP() << "GPU test skipped: " << reason_;               \
  } while (0)

using check::DeviceBuffer;

// A device copy of a host tensor: view() has the host view's shape and strides.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  explicit DeviceTensor(const check::HostTensor& host)
      : host_view_(host.view()), buffer_(host.byte_size()) {
    upload(host);
  }
  void upload(const check::HostTensor& host) { buffer_.upload(host.bytes()); }
  // Copies the device bytes into `host` (same shape and dtype).
  void download(check::HostTensor& host) const { buffer_.download(host.bytes()); }
  void poison() { buffer_.fill(0xff); }
  TensorView view() const {
    if (!host_view_.defined()) return TensorView{};
    const std::int64_t rank = host_view_.rank();
    std::int64_t shape[TensorView::kMaxRank], strides[TensorView::kMaxRank];
    for (int i = 0; i < rank; ++i) {
      shape[i] = host_view_.size(i);
      strides[i] = host_view_.stride(i);
    }
    return TensorView(buffer_.data(), host_view_.dtype(), static_cast<int>(rank), shape, strides,
                      Device::cuda(0));
  }

 private:
  TensorView host_view_;
  DeviceBuffer buffer_;
};

}  // namespace scattermoe::testing
