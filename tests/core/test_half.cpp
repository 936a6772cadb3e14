// fp32 <-> bf16 / f16 software conversions: round-to-nearest-even against a brute-force
// nearest-value search, exhaustive round trips, and NaN / infinity / subnormal / overflow edges.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "core/half.hpp"

namespace scattermoe::detail {
namespace {

bool bf16_is_nan(std::uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu); }
bool f16_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu); }

// The nearest representable value by search over every positive finite pattern (plus infinity
// at the position one ulp past the largest finite value, as IEEE rounding places it), with ties
// going to the even pattern. Independent of the bit tricks under test.
class NearestSearch {
 public:
  NearestSearch(std::uint16_t max_finite, std::uint16_t inf, double inf_position,
                float (*decode)(std::uint16_t))
      : inf_(inf) {
    for (std::uint32_t h = 0; h <= max_finite; ++h) {
      values_.push_back(decode(static_cast<std::uint16_t>(h)));
      patterns_.push_back(static_cast<std::uint16_t>(h));
    }
    values_.push_back(inf_position);
    patterns_.push_back(inf);
  }

  std::uint16_t round(float f) const {
    const double a = std::fabs(static_cast<double>(f));
    const std::uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
    if (std::isinf(f)) return static_cast<std::uint16_t>(sign | inf_);
    const auto hi = std::upper_bound(values_.begin(), values_.end(), a);
    if (hi == values_.end()) return static_cast<std::uint16_t>(sign | inf_);
    const std::size_t u = static_cast<std::size_t>(hi - values_.begin());
    const std::size_t l = u - 1;  // values_[0] == 0 <= a
    const double dl = a - values_[l];
    const double du = values_[u] - a;
    std::size_t pick = dl < du ? l : u;
    if (dl == du) pick = (patterns_[l] & 1u) == 0 ? l : u;
    return static_cast<std::uint16_t>(sign | patterns_[pick]);
  }

 private:
  std::uint16_t inf_;
  std::vector<double> values_;
  std::vector<std::uint16_t> patterns_;
};

// Floats spread over every exponent (random bit patterns) and densely around the 16-bit ranges,
// including exact halfway points between neighbours.
std::vector<float> sample_floats(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> out;
  for (int n = 0; n < 100000; ++n) {
    const float f = bits_float(static_cast<std::uint32_t>(rng()));
    if (!std::isnan(f)) out.push_back(f);
  }
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> expo(-30, 17);
  for (int n = 0; n < 100000; ++n) {
    out.push_back(static_cast<float>(std::ldexp(mant(rng), expo(rng)) * (n % 2 ? -1 : 1)));
  }
  // Halfway points: a 16-bit value's bits with the first dropped bit set and nothing below.
  for (std::uint32_t h = 0; h < 0x7f80u; h += 7) out.push_back(bits_float((h << 16) | 0x8000u));
  for (std::uint32_t m = 0; m < 0x400u; m += 3) {
    out.push_back(static_cast<float>((2.0 * m + 1) * std::ldexp(1.0, -25)));  // f16 subnormal ties
    out.push_back(static_cast<float>((1.0 + (2.0 * m + 1) / 2048.0)));        // ties in [1, 2)
  }
  return out;
}

TEST(Bf16Conversion, RoundsToNearestEvenLikeABruteForceSearch) {
  const NearestSearch search(0x7f7fu, 0x7f80u, std::ldexp(1.0, 128), bf16_to_float);
  for (float f : sample_floats(7)) {
    ASSERT_EQ(float_to_bf16(f), search.round(f))
        << "f = " << f << " bits " << std::hex << float_bits(f);
  }
}

TEST(Bf16Conversion, EveryValueRoundTripsAndNaNStaysQuietNaN) {
  for (std::uint32_t h = 0; h <= 0xffffu; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const std::uint16_t back = float_to_bf16(bf16_to_float(b));
    if (bf16_is_nan(b)) {
      EXPECT_TRUE(bf16_is_nan(back)) << std::hex << h;
      EXPECT_TRUE(back & 0x0040u) << "quiet bit, " << std::hex << h;
    } else {
      ASSERT_EQ(back, b) << std::hex << h;
    }
  }
}

TEST(Bf16Conversion, Edges) {
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000u);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000u);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80u);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.0.
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80u);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(float_to_bf16(1.0f + 0x3p-8f), 0x3f82u);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81u);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80u);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80u);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);  // rounds past the max
  EXPECT_TRUE(bf16_is_nan(float_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(bf16_is_nan(float_to_bf16(bits_float(0x7f800001u))));  // signalling, low payload
  EXPECT_TRUE(bf16_is_nan(float_to_bf16(bits_float(0xff800001u))));
  // Subnormal floats keep their value down to bf16's own subnormal quantum 2^-133.
  EXPECT_EQ(float_to_bf16(bits_float(0x00000001u)), 0x0000u);
  EXPECT_EQ(float_to_bf16(0x1p-133f), 0x0001u);
  EXPECT_EQ(bf16_to_float(0x0001u), 0x1p-133f);
  EXPECT_EQ(float_to_bf16(0x1p-126f), 0x0080u);
}

TEST(F16Conversion, RoundsToNearestEvenLikeABruteForceSearch) {
  const NearestSearch search(0x7bffu, 0x7c00u, 65536.0, f16_to_float);
  for (float f : sample_floats(11)) {
    ASSERT_EQ(float_to_f16(f), search.round(f))
        << "f = " << f << " bits " << std::hex << float_bits(f);
  }
}

TEST(F16Conversion, EveryValueRoundTripsAndNaNStaysNaN) {
  for (std::uint32_t h = 0; h <= 0xffffu; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const std::uint16_t back = float_to_f16(f16_to_float(b));
    if (f16_is_nan(b)) {
      EXPECT_TRUE(f16_is_nan(back)) << std::hex << h;
      EXPECT_TRUE(std::isnan(f16_to_float(b))) << std::hex << h;
    } else {
      ASSERT_EQ(back, b) << std::hex << h;
    }
  }
}

TEST(F16Conversion, Edges) {
  EXPECT_EQ(float_to_f16(0.0f), 0x0000u);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000u);
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00u);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bffu);
  EXPECT_EQ(float_to_f16(65519.0f), 0x7bffu);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00u);  // halfway to 65536: ties to even (infinity)
  EXPECT_EQ(float_to_f16(-1e6f), 0xfc00u);
  EXPECT_EQ(float_to_f16(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_TRUE(f16_is_nan(float_to_f16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(f16_is_nan(float_to_f16(bits_float(0x7f800001u))));
  // Subnormals: quantum 2^-24.
  EXPECT_EQ(f16_to_float(0x0001u), 0x1p-24f);
  EXPECT_EQ(f16_to_float(0x8001u), -0x1p-24f);
  EXPECT_EQ(float_to_f16(0x1p-24f), 0x0001u);
  EXPECT_EQ(float_to_f16(0x1p-25f), 0x0000u);    // tie with 0: even
  EXPECT_EQ(float_to_f16(0x1.8p-24f), 0x0002u);  // tie between 1 and 2: even
  EXPECT_EQ(float_to_f16(0x1p-25f + 0x1p-40f), 0x0001u);
  EXPECT_EQ(float_to_f16(0x1p-14f), 0x0400u);             // smallest normal
  EXPECT_EQ(float_to_f16(0x1p-14f - 0x1p-25f), 0x0400u);  // the largest subnormal's tie goes up
  EXPECT_EQ(float_to_f16(0x1p-14f - 0x1p-24f), 0x03ffu);
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: even.
  EXPECT_EQ(float_to_f16(1.0f + 0x1p-11f), 0x3c00u);
  EXPECT_EQ(float_to_f16(1.0f + 0x3p-11f), 0x3c02u);
  EXPECT_EQ(float_to_f16(bits_float(0x00000001u)), 0x0000u);  // f32 subnormal
}

}  // namespace
}  // namespace scattermoe::detail
