// Element access for the CPU backend: every float view is read and written as fp32 through
// its dtype and strides; index views as int64.
#pragma once

#include <cstdint>

#include "core/half.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::cpu {

inline float load(const void* base, DType dtype, std::int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat16: return detail::f16_to_float(static_cast<const std::uint16_t*>(base)[offset]);
    case DType::kBFloat16: return detail::bf16_to_float(static_cast<const std::uint16_t*>(base)[offset]);
    case DType::kInt32: return static_cast<float>(static_cast<const std::int32_t*>(base)[offset]);
    case DType::kInt64: return static_cast<float>(static_cast<const std::int64_t*>(base)[offset]);
  }
  return 0.0f;
}

inline void store(void* base, DType dtype, std::int64_t offset, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = value; break;
    case DType::kFloat16: static_cast<std::uint16_t*>(base)[offset] = detail::float_to_f16(value); break;
    case DType::kBFloat16: static_cast<std::uint16_t*>(base)[offset] = detail::float_to_bf16(value); break;
    default: break;  // integer outputs are never stored through this path
  }
}

inline std::int64_t load_index(const void* base, DType dtype, std::int64_t offset) {
  return dtype == DType::kInt32 ? static_cast<const std::int32_t*>(base)[offset]
                                : static_cast<const std::int64_t*>(base)[offset];
}

// A rank-1 view of indices.
struct Indices {
  explicit Indices(const TensorView& v) : p(v.data()), dtype(v.dtype()), stride(v.rank() > 0 ? v.stride(0) : 1) {}
  std::int64_t operator[](std::int64_t i) const { return load_index(p, dtype, i * stride); }
  const void* p;
  DType dtype;
  std::int64_t stride;
};

// A rank-2 float view; rank-1 views are read as (n, 1).
struct Matrix {
  explicit Matrix(const TensorView& v)
      : p(v.data()), dtype(v.dtype()), rs(v.stride(0)), cs(v.rank() > 1 ? v.stride(1) : 1) {}
  float get(std::int64_t r, std::int64_t c) const { return load(p, dtype, r * rs + c * cs); }
  void set(std::int64_t r, std::int64_t c, float value) const { store(p, dtype, r * rs + c * cs, value); }
  void* p;
  DType dtype;
  std::int64_t rs, cs;
};

// A rank-3 float view (E, rows, cols): one matrix per expert.
struct Batched {
  explicit Batched(const TensorView& v)
      : p(v.data()), dtype(v.dtype()), es(v.stride(0)), rs(v.stride(1)), cs(v.stride(2)) {}
  float get(std::int64_t e, std::int64_t r, std::int64_t c) const {
    return load(p, dtype, e * es + r * rs + c * cs);
  }
  void set(std::int64_t e, std::int64_t r, std::int64_t c, float value) const {
    store(p, dtype, e * es + r * rs + c * cs, value);
  }
  void* p;
  DType dtype;
  std::int64_t es, rs, cs;
};

// fp32 scratch matrices carved from the workspace are addressed through views like any other.
inline TensorView f32_matrix(float* data, std::int64_t rows, std::int64_t cols) {
  return TensorView::contiguous(data, DType::kFloat32, {rows, cols});
}

}  // namespace scattermoe::cpu
