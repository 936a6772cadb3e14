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

// Defined, and with data when non-empty.
void expect_defined(const char* op, const char* name, const TensorView& v);
void expect_data(const char* op, const char* name, const TensorView& v);
// An output whose elements are all distinct memory (no zero or interleaving strides), so that
// every element is written once.
void expect_distinct_elements(const char* op, const char* name, const TensorView& v);
// Shape with -1 meaning "any size" for that dim.
void expect_shape(const char* op, const char* name, const TensorView& v,
                  std::initializer_list<std::int64_t> shape);
void expect_float(const char* op, const char* name, const TensorView& v);
void expect_integral(const char* op, const char* name, const TensorView& v);
void expect_dtype(const char* op, const char* name, const TensorView& v, DType dtype,
                  const char* like);
void expect_device(const char* op, const char* name, const TensorView& v, Device device,
                   const char* like);
// Conservative: compares the byte ranges the two views span, so interleaved views of one buffer
// count as overlapping.
void expect_no_overlap(const char* op, const char* out_name, const TensorView& out,
                       const char* in_name, const TensorView& in);
void expect_workspace(const char* op, const Context& ctx, std::size_t needed);

std::string shape_string(const TensorView& v);

}  // namespace scattermoe::detail
