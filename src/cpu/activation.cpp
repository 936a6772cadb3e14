#include "cpu/activation.hpp"

#include <cmath>

#include "cpu/access.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

namespace {
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCubic = 0.044715f;

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

float activate(Activation act, float x) {
  switch (act) {
    case Activation::kGelu: return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x)));
    case Activation::kSilu: return x * sigmoid(x);
    case Activation::kRelu: return x > 0.0f ? x : 0.0f;
  }
  return 0.0f;
}

float activate_grad(Activation act, float x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * (1.0f + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
    case Activation::kGeluTanh: {
      const float u = kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x);
      const float t = std::tanh(u);
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * x * x);
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case Activation::kSilu: {
      const float s = sigmoid(x);
      return s * (1.0f + x * (1.0f - s));
    }
    case Activation::kRelu: return x > 0.0f ? 1.0f : 0.0f;
  }
  return 0.0f;
}

void activation_forward(Activation act, bool glu, const TensorView& hidden, const TensorView& a) {
  const std::int64_t L = a.size(0);
  const std::int64_t h = a.size(1);
  const Matrix hid(hidden);
  const Matrix out(a);
  parallel_for(L, h * 8, [&](std::int64_t i) {
    for (std::int64_t c = 0; c < h; ++c) {
      const float value = glu ? activate(act, hid.get(i, h + c)) * hid.get(i, c)
                              : activate(act, hid.get(i, c));
      out.set(i, c, value);
    }
  });
}

void activation_backward(Activation act, bool glu, const TensorView& hidden, const TensorView& d_a,
                         const TensorView& d_hidden) {
  const std::int64_t L = d_a.size(0);
  const std::int64_t h = d_a.size(1);
  const Matrix hid(hidden);
  const Matrix da(d_a);
  const Matrix dh(d_hidden);
  parallel_for(L, h * 8, [&](std::int64_t i) {
    for (std::int64_t c = 0; c < h; ++c) {
      const float g = da.get(i, c);
      if (glu) {
        const float up = hid.get(i, c);
        const float gate = hid.get(i, h + c);
        dh.set(i, c, g * activate(act, gate));
        dh.set(i, h + c, g * up * activate_grad(act, gate));
      } else {
        dh.set(i, c, g * activate_grad(act, hid.get(i, c)));
      }
    }
  });
}

}  // namespace scattermoe::cpu
