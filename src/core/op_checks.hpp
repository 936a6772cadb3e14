// Checks shared by scatter2scatter, ParallelLinear and the MLP.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "scattermoe/plan.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::detail {

struct LinearShape {
  std::int64_t L = 0;      // routed rows
  std::int64_t E = 0;      // experts
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
};

// x (T, d_in) scattered with fan-out k or (L, d_in) grouped; w (E, d_in, d_out) of x's dtype;
// bias undefined or (E, d_out); the plan checked as an input. All on x's device.
LinearShape expect_linear_inputs(const char* op, const TensorView& x, const TensorView& w,
                                 const TensorView& bias, const RoutingPlan& plan, int k,
                                 bool x_grouped);

// An output: defined, with data, of `shape`, of like's dtype, on like's device.
void expect_output(const char* op, const char* name, const TensorView& out,
                   std::initializer_list<std::int64_t> shape, const TensorView& like);

using NamedView = std::pair<const char*, TensorView>;
// The output shares no memory with any of the named inputs or with the plan.
void expect_output_apart(const char* op, const char* name, const TensorView& out,
                         std::initializer_list<NamedView> inputs, const RoutingPlan& plan);

}  // namespace scattermoe::detail
