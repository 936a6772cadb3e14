// Shared pieces of the CUDA backend: error checks, element types, row sources.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cute/numeric/numeric_types.hpp>

#include "cuda/fast_divisor.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::cuda {

// Turns a CUDA runtime error into an exception naming the operation.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Unsupported(std::string(what) + ": CUDA error " + cudaGetErrorName(status) + " (" +
                      cudaGetErrorString(status) + ")");
  }
}

// After a launch: reports configuration errors at once (no synchronisation).
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// A matrix whose rows are addressed through an optional index list:
// row(i) = (index ? index[i] : i) / divisor. Offsets are 64-bit everywhere.
struct RowSource {
  const void* ptr = nullptr;
  std::int64_t ld = 0;                // elements between consecutive rows
  const std::int64_t* index = nullptr;
  std::int64_t divisor = 1;

  __device__ __forceinline__ std::int64_t row(std::int64_t i) const { return divide(entry(i)); }
  // Row i is row i itself: no index to read, nothing to divide.
  __host__ __device__ bool contiguous() const { return index == nullptr && divisor == 1; }

  // row(i) in two steps, so a kernel can fetch the entries ahead and divide when it uses them.
  __device__ __forceinline__ std::int64_t entry(std::int64_t i) const { return index ? index[i] : i; }
  // Routed-row counts stay below 2^31 on CUDA (checked on entry), so the division is 32-bit.
  __device__ __forceinline__ std::int64_t divide(std::int64_t r) const {
    return divisor == 1 ? r
                        : static_cast<std::int64_t>(static_cast<std::uint32_t>(r) /
                                                    static_cast<std::uint32_t>(divisor));
  }
};

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kFloat32> {
  using type = float;
};
template <>
struct ElementOf<DType::kFloat16> {
  using type = cute::half_t;
};
template <>
struct ElementOf<DType::kBFloat16> {
  using type = cute::bfloat16_t;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(cute::half_t v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(cute::bfloat16_t v) { return static_cast<float>(v); }

// A (rows, cols) float view of any float dtype read or written at flat position p as
// (p / cols, p % cols) through strides: gates, coefficients, d_gates.
struct FlatFloats {
  void* ptr = nullptr;
  DType dtype = DType::kFloat32;
  std::int64_t cols = 1;
  std::int64_t stride0 = 1;
  std::int64_t stride1 = 1;
};

__device__ __forceinline__ std::int64_t flat_offset(const FlatFloats& f, std::int64_t p) {
  return (p / f.cols) * f.stride0 + (p % f.cols) * f.stride1;
}

__device__ __forceinline__ float load_float(const void* ptr, DType dtype, std::int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return static_cast<float>(static_cast<const cute::half_t*>(ptr)[offset]);
    case DType::kBFloat16: return static_cast<float>(static_cast<const cute::bfloat16_t*>(ptr)[offset]);
    default: return static_cast<const float*>(ptr)[offset];
  }
}

__device__ __forceinline__ void store_float(void* ptr, DType dtype, std::int64_t offset, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<cute::half_t*>(ptr)[offset] = cute::half_t(v); break;
    case DType::kBFloat16: static_cast<cute::bfloat16_t*>(ptr)[offset] = cute::bfloat16_t(v); break;
    default: static_cast<float*>(ptr)[offset] = v; break;
  }
}

inline unsigned int ceil_div(std::int64_t a, std::int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

// Calls fn.template operator()<T>() with the element type of a float dtype.
template <class Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(cute::half_t{}); return;
    case DType::kBFloat16: fn(cute::bfloat16_t{}); return;
    default: throw Unsupported(std::string("CUDA backend: no kernels for dtype ") + dtype_name(dtype));
  }
}

}  // namespace scattermoe::cuda
