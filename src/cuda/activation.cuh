// Device helpers shared by the memory-bound kernels and the GEMM epilogues that fuse their work:
// float views of any float dtype, and the activations with their derivatives, so a fused
// epilogue computes bit for bit what the separate kernel does.
#pragma once

#include <cstdint>

#include "cuda/kernels.hpp"

namespace scattermoe::cuda {

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

__device__ __forceinline__ std::int64_t flat_offset(const FlatFloats& f, std::int64_t p) {
  return (p / f.cols) * f.stride0 + (p % f.cols) * f.stride1;
}

__device__ __forceinline__ float activate(Activation act, float x) {
  switch (act) {
    case Activation::kGelu: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::kSilu: return x / (1.0f + expf(-x));
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
  }
  return 0.0f;
}

__device__ __forceinline__ float activate_grad(Activation act, float x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
             x * 0.39894228040143268f * expf(-0.5f * x * x);
    case Activation::kGeluTanh: {
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      const float t = tanhf(u);
      const float du = 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * x * x);
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case Activation::kSilu: {
      const float s = 1.0f / (1.0f + expf(-x));
      return s * (1.0f + x * (1.0f - s));
    }
    case Activation::kRelu: return x > 0.0f ? 1.0f : 0.0f;
  }
  return 0.0f;
}

}  // namespace scattermoe::cuda
