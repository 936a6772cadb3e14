// Element types and devices: sizes, names, parsing.
#include <gtest/gtest.h>

#include <string>

#include "common/contains.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {
namespace {

using ::scattermoe::testing::contains;

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::kFloat32), 4u);
  EXPECT_EQ(dtype_size(DType::kFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kBFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kInt32), 4u);
  EXPECT_EQ(dtype_size(DType::kInt64), 8u);
  EXPECT_STREQ(dtype_name(DType::kFloat32), "f32");
  EXPECT_STREQ(dtype_name(DType::kFloat16), "f16");
  EXPECT_STREQ(dtype_name(DType::kBFloat16), "bf16");
  EXPECT_STREQ(dtype_name(DType::kInt32), "i32");
  EXPECT_STREQ(dtype_name(DType::kInt64), "i64");
}

TEST(DType, FloatingAndIntegralPartitionTheTypes) {
  for (DType d : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    EXPECT_TRUE(is_floating(d)) << dtype_name(d);
    EXPECT_FALSE(is_integral(d)) << dtype_name(d);
  }
  for (DType d : {DType::kInt32, DType::kInt64}) {
    EXPECT_FALSE(is_floating(d)) << dtype_name(d);
    EXPECT_TRUE(is_integral(d)) << dtype_name(d);
  }
}

TEST(DType, ParseRoundTripsEveryNameAndAcceptsLongNames) {
  for (DType d :
       {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt32, DType::kInt64}) {
    EXPECT_EQ(parse_dtype(dtype_name(d)), d);
  }
  EXPECT_EQ(parse_dtype("float32"), DType::kFloat32);
  EXPECT_EQ(parse_dtype("float16"), DType::kFloat16);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBFloat16);
}

TEST(DType, ParseRejectsUnknownNamesWithAMessageNamingTheArgument) {
  EXPECT_THROW(parse_dtype("fp8"), InvalidArgument);
  EXPECT_THROW(parse_dtype(""), InvalidArgument);
  EXPECT_THROW(parse_dtype("F32"), InvalidArgument);
  try {
    parse_dtype("fp8");
  } catch (const InvalidArgument& e) {
    EXPECT_TRUE(contains(e.what(), "parse_dtype: argument 'name' is \"fp8\""));
  }
}

TEST(Device, NamesAndEquality) {
  EXPECT_EQ(device_name(Device::cpu()), "cpu");
  EXPECT_EQ(device_name(Device::cuda()), "cuda:0");
  EXPECT_EQ(device_name(Device::cuda(3)), "cuda:3");
  EXPECT_EQ(Device::cuda(1), Device::cuda(1));
  EXPECT_NE(Device::cuda(0), Device::cuda(1));
  EXPECT_NE(Device::cpu(), Device::cuda(0));
}

}  // namespace
}  // namespace scattermoe
