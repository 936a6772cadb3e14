// core/activation_math.hpp, the one definition of every activation and its derivative that the
// CPU oracle and the CUDA kernels share, against the float64 reference.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>

#include "check/reference_f64.hpp"
#include "core/activation_math.hpp"

namespace scattermoe {
namespace {

// Every x = i / 256 in [-30, 30]. Each value is a few fp32 roundings of a transcendental that is
// itself correct to an ulp or two; the derivatives subtract (1 - sigmoid, 1 - tanh^2) and then
// multiply by x, so their rounding error grows with |x|. Hence 8 ulps of fp32 times (1 + |x|),
// relative to 1 + |reference| (absolute where the reference is near 0). Measured worst case:
// 5.4e-7 (the tanh form's derivative at x = -5.2), against 5.9e-6 allowed there.
TEST(Activation, ValueAndGradientMatchFloat64) {
  for (Activation act : {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
    for (int i = -30 * 256; i <= 30 * 256; ++i) {
      const float x = static_cast<float>(i) / 256.0f;
      const ActivationAt f = activation_at(act, x);
      const double value = check::reference_activation(act, x);
      const double grad = check::reference_activation_grad(act, x);
      const double tolerance = 8.0 * FLT_EPSILON * (1.0 + std::fabs(x));
      ASSERT_LE(std::fabs(f.value - value) / (1.0 + std::fabs(value)), tolerance) << activation_name(act) << " at " << x;
      ASSERT_LE(std::fabs(f.grad - grad) / (1.0 + std::fabs(grad)), tolerance) << activation_name(act) << " grad at " << x;
    }
  }
}

// Far tails stay finite: no inf / inf or 0 * inf where the exponential over- or underflows. (For
// |x| beyond about 1e19 the tanh form's x^2 term overflows and its derivative is 0 * inf; no
// pre-activation of a working model comes near.)
TEST(Activation, TailsStayFinite) {
  for (Activation act : {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
    for (float x : {-1e6f, -1e4f, -100.0f, -89.0f, -20.0f, 20.0f, 89.0f, 100.0f, 1e4f, 1e6f}) {
      const ActivationAt f = activation_at(act, x);
      EXPECT_TRUE(std::isfinite(f.value)) << activation_name(act) << " at " << x;
      EXPECT_TRUE(std::isfinite(f.grad)) << activation_name(act) << " grad at " << x;
    }
  }
}

}  // namespace
}  // namespace scattermoe
