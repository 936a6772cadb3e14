// TensorView: shapes, strides, transposed and narrowed views, byte ranges, overlap.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {
namespace {

TEST(TensorView, UndefinedByDefault) {
  const TensorView v;
  EXPECT_FALSE(v.defined());
  EXPECT_EQ(v.rank(), -1);
  EXPECT_EQ(v.numel(), 0);
  EXPECT_EQ(v.describe(), "undefined");
}

TEST(TensorView, ContiguousRowMajorStrides) {
  std::vector<float> buf(2 * 3 * 4);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kFloat32, {2, 3, 4});
  ASSERT_TRUE(v.defined());
  EXPECT_EQ(v.rank(), 3);
  EXPECT_EQ(v.size(0), 2);
  EXPECT_EQ(v.size(1), 3);
  EXPECT_EQ(v.size(2), 4);
  EXPECT_EQ(v.stride(0), 12);
  EXPECT_EQ(v.stride(1), 4);
  EXPECT_EQ(v.stride(2), 1);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.data(), buf.data());
  EXPECT_EQ(v.device(), Device::cpu());
}

TEST(TensorView, ContiguousWithZeroSizedDimension) {
  const TensorView v = TensorView::contiguous(nullptr, DType::kBFloat16, {0, 7});
  EXPECT_EQ(v.numel(), 0);
  EXPECT_EQ(v.stride(0), 7);
  EXPECT_EQ(v.stride(1), 1);
  EXPECT_EQ(v.first_byte(), v.last_byte());
}

TEST(TensorView, ExplicitStridesAndRankLimits) {
  std::vector<float> buf(64);
  const TensorView v(buf.data(), DType::kFloat32, {4, 3}, {8, 2});
  EXPECT_FALSE(v.is_contiguous());
  EXPECT_EQ(v.stride(0), 8);
  EXPECT_EQ(v.stride(1), 2);
  const std::int64_t shape[5] = {1, 1, 1, 1, 1};
  const std::int64_t strides[5] = {1, 1, 1, 1, 1};
  EXPECT_THROW(TensorView(buf.data(), DType::kFloat32, 5, shape, strides), InvalidArgument);
  EXPECT_THROW(TensorView(buf.data(), DType::kFloat32, {2, -1}, {1, 1}), InvalidArgument);
  EXPECT_THROW(TensorView(buf.data(), DType::kFloat32, {2, 2}, {1}), InvalidArgument);
}

TEST(TensorView, SizeOneDimensionsDoNotBreakContiguity) {
  std::vector<float> buf(8);
  const TensorView v(buf.data(), DType::kFloat32, {1, 8}, {1000, 1});
  EXPECT_TRUE(v.is_contiguous());
}

TEST(TensorView, TransposedSwapsShapeAndStridesWithoutCopy) {
  std::vector<float> buf(5 * 7 * 13);
  // An nn.Linear-style weight (E, d_out, d_in) seen as (E, d_in, d_out).
  const TensorView param = TensorView::contiguous(buf.data(), DType::kFloat32, {5, 7, 13});
  const TensorView w = param.transposed(1, 2);
  EXPECT_EQ(w.data(), buf.data());
  EXPECT_EQ(w.size(0), 5);
  EXPECT_EQ(w.size(1), 13);
  EXPECT_EQ(w.size(2), 7);
  EXPECT_EQ(w.stride(0), 91);
  EXPECT_EQ(w.stride(1), 1);
  EXPECT_EQ(w.stride(2), 13);
  EXPECT_FALSE(w.is_contiguous());
  const TensorView back = w.transposed(2, 1);
  EXPECT_TRUE(back.is_contiguous());
  EXPECT_THROW(param.transposed(0, 3), InvalidArgument);
  EXPECT_THROW(param.transposed(-1, 0), InvalidArgument);
}

TEST(TensorView, NarrowedOffsetsDataAndKeepsStrides) {
  std::vector<std::uint16_t> buf(10 * 6);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kBFloat16, {10, 6});
  const TensorView rows = v.narrowed(0, 3, 7);
  EXPECT_EQ(rows.size(0), 4);
  EXPECT_EQ(rows.size(1), 6);
  EXPECT_EQ(rows.data(), static_cast<void*>(buf.data() + 18));
  EXPECT_TRUE(rows.is_contiguous());
  const TensorView cols = v.narrowed(1, 2, 5);
  EXPECT_EQ(cols.size(1), 3);
  EXPECT_EQ(cols.stride(0), 6);
  EXPECT_EQ(cols.data(), static_cast<void*>(buf.data() + 2));
  EXPECT_FALSE(cols.is_contiguous());
  const TensorView empty = v.narrowed(0, 10, 10);
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_THROW(v.narrowed(0, 4, 3), InvalidArgument);
  EXPECT_THROW(v.narrowed(0, 0, 11), InvalidArgument);
  EXPECT_THROW(v.narrowed(2, 0, 1), InvalidArgument);
  EXPECT_THROW(v.narrowed(1, -1, 2), InvalidArgument);
}

TEST(TensorView, ByteRangeCoversExactlyTheReachableElements) {
  std::vector<float> buf(40);
  const TensorView v(buf.data() + 1, DType::kFloat32, {3, 4}, {10, 2});
  const char* base = reinterpret_cast<const char*>(buf.data() + 1);
  EXPECT_EQ(v.first_byte(), base);
  // last element at offset 2*10 + 3*2 = 26 floats; one past it is 27 floats.
  EXPECT_EQ(v.last_byte(), base + 27 * 4);
  const TensorView t = v.transposed(0, 1);
  EXPECT_EQ(t.first_byte(), v.first_byte());
  EXPECT_EQ(t.last_byte(), v.last_byte());
}

TEST(TensorView, ByteRangeWithNegativeStride) {
  std::vector<float> buf(8);
  const TensorView reversed(buf.data() + 7, DType::kFloat32, {8}, {-1});
  EXPECT_EQ(reversed.first_byte(), reinterpret_cast<const char*>(buf.data()));
  EXPECT_EQ(reversed.last_byte(), reinterpret_cast<const char*>(buf.data() + 8));
}

TEST(TensorView, DescribeNamesDtypeShapeStridesAndDevice) {
  std::vector<std::uint16_t> buf(8 * 64 * 32);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kBFloat16, {8, 32, 64});
  EXPECT_EQ(v.describe(), "bf16[8, 32, 64] on cpu");
  EXPECT_EQ(v.transposed(1, 2).describe(), "bf16[8, 64, 32] strides [2048, 1, 64] on cpu");
  const TensorView g = TensorView::contiguous(nullptr, DType::kFloat32, {4}, Device::cuda(1));
  EXPECT_EQ(g.describe(), "f32[4] on cuda:1");
}

TEST(ViewsOverlap, DisjointAndTouchingHalvesDoNotOverlap) {
  std::vector<float> buf(20);
  const TensorView all = TensorView::contiguous(buf.data(), DType::kFloat32, {4, 5});
  const TensorView top = all.narrowed(0, 0, 2);
  const TensorView bottom = all.narrowed(0, 2, 4);
  EXPECT_FALSE(views_overlap(top, bottom));
  EXPECT_FALSE(views_overlap(bottom, top));
  EXPECT_TRUE(views_overlap(all, top));
  EXPECT_TRUE(views_overlap(top, top));
  EXPECT_TRUE(views_overlap(all.narrowed(0, 1, 3), bottom));
}

TEST(ViewsOverlap, ByteRangesAreConservativeForInterleavedViews) {
  // Even and odd columns share no element, but their byte ranges interleave: the check is on
  // ranges, so they count as overlapping (outputs must not interleave with inputs).
  std::vector<float> buf(16);
  const TensorView even(buf.data(), DType::kFloat32, {8}, {2});
  const TensorView odd(buf.data() + 1, DType::kFloat32, {8}, {2});
  EXPECT_TRUE(views_overlap(even, odd));
}

TEST(ViewsOverlap, EmptyUndefinedAndOtherDeviceNeverOverlap) {
  std::vector<float> buf(8);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kFloat32, {8});
  EXPECT_FALSE(views_overlap(v, TensorView{}));
  EXPECT_FALSE(views_overlap(v, v.narrowed(0, 3, 3)));
  const TensorView on_gpu =
      TensorView::contiguous(buf.data(), DType::kFloat32, {8}, Device::cuda(0));
  EXPECT_FALSE(views_overlap(v, on_gpu));
  const TensorView other_gpu =
      TensorView::contiguous(buf.data(), DType::kFloat32, {8}, Device::cuda(1));
  EXPECT_FALSE(views_overlap(on_gpu, other_gpu));
  EXPECT_TRUE(views_overlap(on_gpu, on_gpu));
}

TEST(ViewsOverlap, DifferentDtypesOverSameBytes) {
  std::vector<std::uint32_t> buf(8);
  const TensorView as_f32 = TensorView::contiguous(buf.data(), DType::kFloat32, {8});
  const TensorView as_bf16 = TensorView::contiguous(buf.data(), DType::kBFloat16, {16});
  EXPECT_TRUE(views_overlap(as_f32, as_bf16));
  const TensorView upper = TensorView::contiguous(buf.data() + 4, DType::kInt64, {2});
  EXPECT_TRUE(views_overlap(as_bf16, upper));
  EXPECT_FALSE(views_overlap(as_f32.narrowed(0, 0, 4), upper));
}

}  // namespace
}  // namespace scattermoe
