// The shared argument checks: the message format "<op>: argument '<name>' is <value>; expected
// <what>" and the conditions each check enforces.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/contains.hpp"
#include "core/checks.hpp"
#include "scattermoe/error.hpp"

namespace scattermoe::detail {
namespace {

using ::scattermoe::testing::contains;

template <class F>
std::string message_of(F f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "<no throw>";
}

TEST(Checks, FailFormatsOpArgumentValueAndExpectation) {
  EXPECT_EQ(message_of([] { fail("scatter2scatter", "k", "0", "at least 1"); }),
            "scatter2scatter: argument 'k' is 0; expected at least 1");
  EXPECT_THROW(fail("op", "a", "b", "c"), InvalidArgument);
  // InvalidArgument is a std::invalid_argument, so generic handlers catch it too.
  EXPECT_THROW(fail("op", "a", "b", "c"), std::invalid_argument);
}

TEST(Checks, ExpectDefinedAndData) {
  std::vector<float> buf(6);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kFloat32, {2, 3});
  EXPECT_NO_THROW(expect_defined("op", "x", v));
  EXPECT_EQ(message_of([] { expect_defined("op", "x", TensorView{}); }),
            "op: argument 'x' is undefined; expected a tensor");
  const TensorView null_data = TensorView::contiguous(nullptr, DType::kFloat32, {2, 3});
  EXPECT_TRUE(contains(message_of([&] { expect_defined("op", "x", null_data); }),
                       "op: argument 'x' is a null pointer with 6 elements"));
  // Null data is fine for an empty tensor.
  EXPECT_NO_THROW(
      expect_defined("op", "x", TensorView::contiguous(nullptr, DType::kFloat32, {0, 3})));
}

TEST(Checks, ExpectShapeWithWildcards) {
  std::vector<float> buf(6);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kFloat32, {2, 3});
  EXPECT_NO_THROW(expect_shape("op", "x", v, {2, 3}));
  EXPECT_NO_THROW(expect_shape("op", "x", v, {-1, 3}));
  EXPECT_NO_THROW(expect_shape("op", "x", v, {-1, -1}));
  EXPECT_EQ(message_of([&] {
              expect_shape("op", "x", v, {2, 4});
            }),
            "op: argument 'x' is f32[2, 3] on cpu; expected shape (2, 4)");
  EXPECT_EQ(message_of([&] {
              expect_shape("op", "x", v, {-1, 3, -1});
            }),
            "op: argument 'x' is f32[2, 3] on cpu; expected shape (*, 3, *)");
  EXPECT_EQ(message_of([&] { expect_shape("op", "v", v, {6}); }),
            "op: argument 'v' is f32[2, 3] on cpu; expected shape (6,)");
}

TEST(Checks, ExpectDtypeFloatIntegralAndDevice) {
  std::vector<float> buf(4);
  const TensorView f = TensorView::contiguous(buf.data(), DType::kFloat32, {4});
  const TensorView i = TensorView::contiguous(buf.data(), DType::kInt32, {4});
  EXPECT_NO_THROW(expect_float("op", "x", f));
  EXPECT_NO_THROW(expect_integral("op", "idx", i));
  EXPECT_TRUE(contains(message_of([&] { expect_float("op", "x", i); }),
                       "op: argument 'x' is i32[4] on cpu; expected dtype f32, f16 or bf16"));
  EXPECT_TRUE(
      contains(message_of([&] { expect_integral("op", "idx", f); }), "expected dtype i32 or i64"));
  EXPECT_EQ(message_of([&] { expect_dtype("op", "w", i, DType::kBFloat16, "x"); }),
            "op: argument 'w' is i32[4] on cpu; expected dtype bf16 (as x)");
  EXPECT_EQ(message_of([&] { expect_device("op", "w", f, Device::cuda(0), "x"); }),
            "op: argument 'w' is f32[4] on cpu; expected a tensor on cuda:0 (as x)");
}

TEST(Checks, ExpectNoOverlapNamesBothArguments) {
  std::vector<float> buf(8);
  const TensorView a = TensorView::contiguous(buf.data(), DType::kFloat32, {8});
  EXPECT_NO_THROW(expect_no_overlap("op", "y", a.narrowed(0, 0, 4), "x", a.narrowed(0, 4, 8)));
  EXPECT_EQ(message_of([&] { expect_no_overlap("op", "y", a, "x", a.narrowed(0, 2, 3)); }),
            "op: argument 'y' is f32[8] on cpu, which overlaps 'x'; expected an output that "
            "shares no memory with any input");
}

TEST(Checks, ExpectWorkspace) {
  std::vector<char> mem(64);
  EXPECT_NO_THROW(expect_workspace("op", Context{}, 0));
  EXPECT_NO_THROW(expect_workspace("op", Context{nullptr, Workspace{mem.data(), 64}}, 64));
  EXPECT_EQ(message_of([&] {
              expect_workspace("op", Context{nullptr, Workspace{mem.data(), 63}}, 64);
            }),
            "op: argument 'ctx.workspace' is 63 bytes; expected at least 64 bytes (the matching "
            "*_workspace_size query)");
  EXPECT_TRUE(contains(message_of([] {
                         expect_workspace("op", Context{nullptr, Workspace{nullptr, 128}}, 64);
                       }),
                       "op: argument 'ctx.workspace' is 128 bytes at a null pointer"));
}

TEST(Checks, ShapeString) {
  std::vector<float> buf(6);
  EXPECT_EQ(shape_string(TensorView::contiguous(buf.data(), DType::kFloat32, {2, 3})), "(2, 3)");
  EXPECT_EQ(shape_string(TensorView{}), "undefined");
}

}  // namespace
}  // namespace scattermoe::detail
