#include "core/op_checks.hpp"

#include "core/checks.hpp"
#include "core/plan_checks.hpp"

namespace scattermoe::detail {

LinearShape expect_linear_inputs(const char* op, const TensorView& x, const TensorView& w,
                                 const TensorView& bias, const RoutingPlan& plan, int k,
                                 bool x_grouped) {
  expect_defined(op, "x", x);
  expect_float(op, "x", x);
  expect_shape(op, "x", x, {-1, -1});
  const Device device = x.device();
  expect_defined(op, "w", w);
  expect_dtype(op, "w", w, x.dtype(), "x");
  expect_device(op, "w", w, device, "x");
  expect_shape(op, "w", w, {-1, x.size(1), -1});
  expect_plan_views(op, plan, device, -1, w.size(0), false);
  LinearShape s;
  s.L = plan.num_rows();
  s.E = w.size(0);
  s.d_in = w.size(1);
  s.d_out = w.size(2);
  if (bias.defined()) {
    expect_data(op, "bias", bias);
    expect_dtype(op, "bias", bias, x.dtype(), "x");
    expect_device(op, "bias", bias, device, "x");
    expect_shape(op, "bias", bias, {s.E, s.d_out});
  }
  if (x_grouped) {
    expect_shape(op, "x", x, {s.L, s.d_in});
  } else {
    if (k < 1) fail(op, "k", std::to_string(k), "at least 1");
    if (x.size(0) * k != s.L) {
      fail(op, "x", x.describe(),
           std::to_string(s.L / k) + " rows (plan rows " + std::to_string(s.L) + " / k " +
               std::to_string(k) + ")");
    }
  }
  return s;
}

void expect_output(const char* op, const char* name, const TensorView& out,
                   std::initializer_list<std::int64_t> shape, const TensorView& like) {
  expect_defined(op, name, out);
  expect_dtype(op, name, out, like.dtype(), nullptr);
  expect_device(op, name, out, like.device(), nullptr);
  expect_shape(op, name, out, shape);
  expect_distinct_elements(op, name, out);
}

void expect_output_apart(const char* op, const char* name, const TensorView& out,
                         std::initializer_list<NamedView> inputs, const RoutingPlan& plan) {
  if (!out.defined()) return;
  for (const NamedView& in : inputs) expect_no_overlap(op, name, out, in.first, in.second);
  expect_no_overlap(op, name, out, "plan.sorted_expert_idxs", plan.sorted_expert_idxs);
  expect_no_overlap(op, name, out, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs);
  expect_no_overlap(op, name, out, "plan.expert_offsets", plan.expert_offsets);
}

}  // namespace scattermoe::detail
