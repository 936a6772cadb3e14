// Each activation's value and derivative at x in fp32, from one evaluation of its transcendental
// (SiLU's sigmoid, GELU's erf, the tanh of the tanh approximation): one definition for the CPU
// oracle and the CUDA kernels. The backward of a GLU needs both at every element; computing the
// sigmoid once instead of three times is most of that kernel's arithmetic.
// Plain C++ on the host (the host tests compare it with float64), __host__ __device__ under nvcc.
#pragma once

#include <math.h>

#include "scattermoe/modules.hpp"

#if defined(__CUDACC__)
#define SCATTERMOE_ACTIVATION_FN __host__ __device__ __forceinline__
#else
#define SCATTERMOE_ACTIVATION_FN inline
#endif

namespace scattermoe {

struct ActivationAt {
  float value;  // act(x)
  float grad;   // d act(x) / dx
};

SCATTERMOE_ACTIVATION_FN ActivationAt activation_at(Activation act, float x) {
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  constexpr float kSqrt2OverPi = 0.79788456080286536f;
  constexpr float kGeluTanhCubic = 0.044715f;
  switch (act) {
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
      return {x * cdf, cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x)};
    }
    case Activation::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * x * x);
      return {0.5f * x * (1.0f + t), 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du};
    }
    case Activation::kSilu: {
      const float s = 1.0f / (1.0f + expf(-x));
      return {x * s, s * (1.0f + x * (1.0f - s))};
    }
    case Activation::kRelu: return {x > 0.0f ? x : 0.0f, x > 0.0f ? 1.0f : 0.0f};
  }
  return {0.0f, 0.0f};
}

}  // namespace scattermoe
