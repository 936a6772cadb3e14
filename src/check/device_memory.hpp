// CUDA device memory for the correctness suite: owning device buffers that mirror HostTensor
// bytes, the current-device guard, and CUDA runtime errors as scattermoe::Unsupported. Only
// built when the library has the CUDA backend (SCATTERMOE_CHECK_CUDA, set by CMake for
// scattermoe_check); test-side only, nothing here is part of the library.
#pragma once

#ifdef SCATTERMOE_CHECK_CUDA

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::check {

// Throws Unsupported naming `what` when a CUDA runtime call failed.
inline void cuda_check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) {
    throw Unsupported("check: " + what + " failed: " + cudaGetErrorString(status));
  }
}

// Throws Unsupported with the reason when `device` cannot be used (no driver, no GPU, no such
// ordinal).
inline void require_cuda_device(Device device) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it: nothing else runs on this device
    throw Unsupported("check on " + device_name(device) + ": no usable CUDA device (" +
                      cudaGetErrorString(status) + ")");
  }
  if (count == 0) {
    throw Unsupported("check on " + device_name(device) + ": no CUDA device on this machine");
  }
  if (device.index < 0 || device.index >= count) {
    throw Unsupported("check on " + device_name(device) + ": no such device (this machine has " +
                      std::to_string(count) + " CUDA device" + (count == 1 ? "" : "s") + ")");
  }
}

// Makes `index` the current device for its lifetime (the backend runs on the current device),
// then restores the previous one.
class CurrentDevice {
 public:
  explicit CurrentDevice(int index) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    cuda_check(cudaSetDevice(index), "cudaSetDevice(" + std::to_string(index) + ")");
  }
  ~CurrentDevice() { cudaSetDevice(previous_); }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = 0;
};

// Waits for all work on the current device and reports any error it raised.
inline void synchronize_device(const std::string& what) {
  cuda_check(cudaGetLastError(), what);
  cuda_check(cudaDeviceSynchronize(), what);
}

// An owning buffer of device memory on the current device (cudaMalloc aligns it to at least
// 256 bytes = kWorkspaceAlignment). Never null: an empty request still gets a few bytes, as a
// HostTensor does.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    cuda_check(cudaMalloc(&ptr_, bytes_ > 0 ? bytes_ : 8),
               "cudaMalloc of " + std::to_string(bytes_) + " bytes");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }

  // Every byte set to `byte`: 0xff makes every f32 / f16 / bf16 element a NaN.
  void fill(unsigned char byte) {
    if (bytes_ > 0) cuda_check(cudaMemset(ptr_, byte, bytes_), "cudaMemset");
  }
  // Synchronous copies of the whole buffer from / to host memory of bytes() bytes.
  void upload(const void* host) {
    if (bytes_ > 0) {
      cuda_check(cudaMemcpy(ptr_, host, bytes_, cudaMemcpyHostToDevice),
                 "cudaMemcpy to the device");
    }
  }
  void download(void* host) const {
    if (bytes_ > 0) {
      cuda_check(cudaMemcpy(host, ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
    }
  }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace scattermoe::check

#endif  // SCATTERMOE_CHECK_CUDA
