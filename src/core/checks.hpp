// Argument checks shared by every entry point. Each throws InvalidArgument with
// "<op>: argument '<name>' is <value>; expected <what>".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "scattermoe/context.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::detail {

[[noreturn]] void fail(const char* op, const std::string& name, const std::string& value,
                       const std::string& expected);

// Defined, data present when non-empty, on `device` (when given).
void expect_defined(const char* op, const char* name, const TensorView& v);
void expect_data(const char* op, const char* name, const TensorView& v);
// Shape with -1 meaning "any size" for that dim.
void expect_shape(const char* op, const char* name, const TensorView& v,
                  std::initializer_list<std::int64_t> shape);
void expect_float(const char* op, const char* name, const TensorView& v);
void expect_integral(const char* op, const char* name, const TensorView& v);
void expect_dtype(const char* op, const char* name, const TensorView& v, DType dtype,
                  const char* like);
void expect_device(const char* op, const char* name, const TensorView& v, Device device,
                   const char* like);
// Rows (dim 0) of a matrix view with contiguous-enough layout are addressed through strides;
// only the element stride of index vectors must be positive.
void expect_no_overlap(const char* op, const char* out_name, const TensorView& out,
                       const char* in_name, const TensorView& in);
void expect_workspace(const char* op, const Context& ctx, std::size_t needed);

std::string shape_string(const TensorView& v);

}  // namespace scattermoe::detail
