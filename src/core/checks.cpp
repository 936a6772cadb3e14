#include "core/checks.hpp"

#include <cstdlib>
#include <sstream>

#include "scattermoe/error.hpp"

namespace scattermoe::detail {

void fail(const char* op, const std::string& name, const std::string& value,
          const std::string& expected) {
  throw InvalidArgument(std::string(op) + ": argument '" + name + "' is " + value +
                        "; expected " + expected);
}

std::string shape_string(const TensorView& v) {
  if (!v.defined()) return "undefined";
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < v.rank(); ++i) s << (i ? ", " : "") << v.size(i);
  s << ")";
  return s.str();
}

void expect_defined(const char* op, const char* name, const TensorView& v) {
  if (!v.defined()) fail(op, name, "undefined", "a tensor");
  expect_data(op, name, v);
}

void expect_data(const char* op, const char* name, const TensorView& v) {
  if (v.defined() && v.data() == nullptr && v.numel() > 0) {
    fail(op, name, "a null pointer with " + std::to_string(v.numel()) + " elements",
         "data for every element (null is allowed only for empty tensors)");
  }
}

void expect_shape(const char* op, const char* name, const TensorView& v,
                  std::initializer_list<std::int64_t> shape) {
  bool ok = v.defined() && v.rank() == static_cast<int>(shape.size());
  for (int i = 0; ok && i < v.rank(); ++i) {
    const std::int64_t want = shape.begin()[i];
    if (want >= 0 && v.size(i) != want) ok = false;
  }
  if (ok) return;
  std::ostringstream want;
  want << "shape (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    want << (i ? ", " : "");
    if (shape.begin()[i] < 0) want << "*"; else want << shape.begin()[i];
  }
  if (shape.size() == 1) want << ",";
  want << ")";
  fail(op, name, v.describe(), want.str());
}

void expect_distinct_elements(const char* op, const char* name, const TensorView& v) {
  if (!v.defined() || v.numel() <= 1) return;
  // Dims of size > 1 ordered by |stride|: each stride must step past everything the smaller
  // ones reach.
  int dims[TensorView::kMaxRank];
  int n = 0;
  for (int i = 0; i < v.rank(); ++i) {
    if (v.size(i) <= 1) continue;
    int j = n++;  // insertion by |stride|
    for (; j > 0 && std::llabs(v.stride(dims[j - 1])) > std::llabs(v.stride(i)); --j) dims[j] = dims[j - 1];
    dims[j] = i;
  }
  std::int64_t reach = 0;  // largest offset the smaller dims reach
  for (int j = 0; j < n; ++j) {
    const int d = dims[j];
    const std::int64_t stride = std::llabs(v.stride(d));
    if (stride <= reach) {
      fail(op, name, v.describe() + " (strides map two elements to one address)",
           "an output whose elements are distinct");
    }
    reach += (v.size(d) - 1) * stride;
  }
}

void expect_float(const char* op, const char* name, const TensorView& v) {
  if (!is_floating(v.dtype())) fail(op, name, v.describe(), "dtype f32, f16 or bf16");
}

void expect_integral(const char* op, const char* name, const TensorView& v) {
  if (!is_integral(v.dtype())) fail(op, name, v.describe(), "dtype i32 or i64");
}

void expect_dtype(const char* op, const char* name, const TensorView& v, DType dtype,
                  const char* like) {
  if (v.dtype() != dtype) {
    fail(op, name, v.describe(),
         std::string("dtype ") + dtype_name(dtype) + (like ? std::string(" (as ") + like + ")" : ""));
  }
}

void expect_device(const char* op, const char* name, const TensorView& v, Device device,
                   const char* like) {
  if (v.device() != device) {
    fail(op, name, v.describe(),
         "a tensor on " + device_name(device) + (like ? std::string(" (as ") + like + ")" : ""));
  }
}

void expect_no_overlap(const char* op, const char* out_name, const TensorView& out,
                       const char* in_name, const TensorView& in) {
  if (views_overlap(out, in)) {
    fail(op, out_name, out.describe() + ", which overlaps '" + in_name + "'",
         "an output that shares no memory with any input");
  }
}

void expect_workspace(const char* op, const Context& ctx, std::size_t needed) {
  if (ctx.workspace.bytes < needed || (needed > 0 && ctx.workspace.data == nullptr)) {
    fail(op, "ctx.workspace",
         std::to_string(ctx.workspace.bytes) + " bytes" +
             (ctx.workspace.data ? "" : " at a null pointer"),
         "at least " + std::to_string(needed) + " bytes (the matching *_workspace_size query)");
  }
}

}  // namespace scattermoe::detail
