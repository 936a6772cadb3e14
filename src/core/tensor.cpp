#include "scattermoe/tensor.hpp"

#include <algorithm>
#include <sstream>

#include "scattermoe/error.hpp"

namespace scattermoe {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "f32";
    case DType::kFloat16: return "f16";
    case DType::kBFloat16: return "bf16";
    case DType::kInt32: return "i32";
    case DType::kInt64: return "i64";
  }
  return "?";
}

bool is_floating(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

bool is_integral(DType dtype) { return dtype == DType::kInt32 || dtype == DType::kInt64; }

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32" || name == "fp32") return DType::kFloat32;
  if (name == "f16" || name == "float16" || name == "fp16") return DType::kFloat16;
  if (name == "bf16" || name == "bfloat16") return DType::kBFloat16;
  if (name == "i32" || name == "int32") return DType::kInt32;
  if (name == "i64" || name == "int64") return DType::kInt64;
  throw InvalidArgument("parse_dtype: argument 'name' is \"" + name +
                        "\"; expected one of f32, f16, bf16, i32, i64");
}

std::string device_name(Device device) {
  if (device.type == DeviceType::kCPU) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

TensorView::TensorView(void* data, DType dtype, int rank, const std::int64_t* shape,
                       const std::int64_t* strides, Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(rank) {
  if (rank < 0 || rank > kMaxRank) {
    throw InvalidArgument("TensorView: argument 'rank' is " + std::to_string(rank) +
                          "; expected 0.." + std::to_string(kMaxRank));
  }
  for (int i = 0; i < rank; ++i) {
    if (shape[i] < 0) {
      throw InvalidArgument("TensorView: argument 'shape' has " + std::to_string(shape[i]) +
                            " at dim " + std::to_string(i) + "; expected sizes >= 0");
    }
    shape_[i] = shape[i];
    strides_[i] = strides[i];
  }
}

TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                       std::initializer_list<std::int64_t> strides, Device device) {
  if (shape.size() != strides.size()) {
    throw InvalidArgument("TensorView: shape has " + std::to_string(shape.size()) +
                          " dims but strides has " + std::to_string(strides.size()) +
                          "; expected the same number");
  }
  *this = TensorView(data, dtype, static_cast<int>(shape.size()), shape.begin(), strides.begin(),
                     device);
}

TensorView TensorView::contiguous(void* data, DType dtype,
                                  std::initializer_list<std::int64_t> shape, Device device) {
  std::int64_t strides[kMaxRank] = {0, 0, 0, 0};
  const int rank = static_cast<int>(shape.size());
  if (rank > kMaxRank) {
    throw InvalidArgument("TensorView::contiguous: argument 'shape' has " + std::to_string(rank) +
                          " dims; expected at most " + std::to_string(kMaxRank));
  }
  std::int64_t running = 1;
  for (int i = rank - 1; i >= 0; --i) {
    strides[i] = running;
    running *= std::max<std::int64_t>(shape.begin()[i], 1);
  }
  return TensorView(data, dtype, rank, shape.begin(), strides, device);
}

std::int64_t TensorView::numel() const {
  if (rank_ < 0) return 0;
  std::int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= shape_[i];
  return n;
}

bool TensorView::is_contiguous() const {
  std::int64_t running = 1;
  for (int i = rank_ - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != running) return false;
    running *= shape_[i];
  }
  return true;
}

TensorView TensorView::transposed(int dim0, int dim1) const {
  if (dim0 < 0 || dim0 >= rank_ || dim1 < 0 || dim1 >= rank_) {
    throw InvalidArgument("TensorView::transposed: dims (" + std::to_string(dim0) + ", " +
                          std::to_string(dim1) + ") on a rank-" + std::to_string(rank_) +
                          " view; expected dims in [0, rank)");
  }
  TensorView t = *this;
  std::swap(t.shape_[dim0], t.shape_[dim1]);
  std::swap(t.strides_[dim0], t.strides_[dim1]);
  return t;
}

TensorView TensorView::narrowed(int dim, std::int64_t begin, std::int64_t end) const {
  if (dim < 0 || dim >= rank_ || begin < 0 || end < begin || end > shape_[dim]) {
    throw InvalidArgument("TensorView::narrowed: range [" + std::to_string(begin) + ", " +
                          std::to_string(end) + ") of dim " + std::to_string(dim) + " on " +
                          describe() + "; expected 0 <= begin <= end <= size");
  }
  TensorView t = *this;
  t.shape_[dim] = end - begin;
  if (begin != 0) {
    t.data_ = static_cast<char*>(data_) +
              begin * strides_[dim] * static_cast<std::int64_t>(dtype_size(dtype_));
  }
  return t;
}

const char* TensorView::first_byte() const {
  if (numel() == 0) return static_cast<const char*>(data_);
  std::int64_t lo = 0;
  for (int i = 0; i < rank_; ++i) {
    if (strides_[i] < 0) lo += (shape_[i] - 1) * strides_[i];
  }
  return static_cast<const char*>(data_) + lo * static_cast<std::int64_t>(dtype_size(dtype_));
}

const char* TensorView::last_byte() const {
  if (numel() == 0) return static_cast<const char*>(data_);
  std::int64_t hi = 0;
  for (int i = 0; i < rank_; ++i) {
    if (strides_[i] > 0) hi += (shape_[i] - 1) * strides_[i];
  }
  return static_cast<const char*>(data_) + (hi + 1) * static_cast<std::int64_t>(dtype_size(dtype_));
}

std::string TensorView::describe() const {
  if (!defined()) return "undefined";
  std::ostringstream s;
  s << dtype_name(dtype_) << "[";
  for (int i = 0; i < rank_; ++i) s << (i ? ", " : "") << shape_[i];
  s << "]";
  if (!is_contiguous()) {
    s << " strides [";
    for (int i = 0; i < rank_; ++i) s << (i ? ", " : "") << strides_[i];
    s << "]";
  }
  s << " on " << device_name(device_);
  return s.str();
}

bool views_overlap(const TensorView& a, const TensorView& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (a.device() != b.device()) return false;
  return a.first_byte() < b.last_byte() && b.first_byte() < a.last_byte();
}

}  // namespace scattermoe
