// The primitive ops: argument checks, then the backend.
#include "core/checks.hpp"
#include "core/dispatch.hpp"
#include "core/op_checks.hpp"
#include "core/plan_checks.hpp"
#include "cpu/backend.hpp"
#include "scattermoe/ops.hpp"

namespace scattermoe {

std::size_t scatter2scatter_workspace_size(const Scatter2ScatterArgs& args,
                                           [[maybe_unused]] const RoutingPlan& plan) {
  if (detail::use_cuda("scatter2scatter_workspace_size", args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::scatter2scatter_workspace_size(args, plan);
#endif
  }
  return 0;
}

void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y,
                     const Context& ctx) {
  constexpr const char* op = "scatter2scatter";
  const detail::LinearShape s = detail::expect_linear_inputs(
      op, args.x, args.w, args.bias, plan, args.k, args.x_grouped);
  detail::expect_output(op, "y", y, {s.L, s.d_out}, args.x);
  detail::expect_output_apart(op, "y", y, {{"x", args.x}, {"w", args.w}, {"bias", args.bias}}, plan);
  detail::expect_workspace(op, ctx, scatter2scatter_workspace_size(args, plan));
  if (detail::use_cuda(op, args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::scatter2scatter(args, plan, y, ctx);
#endif
  }
  cpu::scatter2scatter(args, plan, y);
}

void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g, [[maybe_unused]] const Context& ctx) {
  constexpr const char* op = "group";
  detail::expect_defined(op, "a", a);
  detail::expect_float(op, "a", a);
  detail::expect_shape(op, "a", a, {-1, -1});
  const Device device = a.device();
  detail::expect_plan_views(op, plan, device, -1, -1, false);
  const std::int64_t L = plan.num_rows();
  if (fan_out < 1) detail::fail(op, "fan_out", std::to_string(fan_out), "at least 1");
  if (a.size(0) * fan_out != L) {
    detail::fail(op, "a", a.describe(),
                 std::to_string(L / fan_out) + " rows (plan rows " + std::to_string(L) +
                     " / fan_out " + std::to_string(fan_out) + ")");
  }
  if (coeff.defined()) {
    detail::expect_data(op, "coeff", coeff);
    detail::expect_float(op, "coeff", coeff);
    detail::expect_device(op, "coeff", coeff, device, "a");
    if (!((coeff.rank() == 1 || coeff.rank() == 2) && coeff.numel() == L)) {
      detail::fail(op, "coeff", coeff.describe(),
                   "shape (" + std::to_string(L) + ",) or (T, k) with T*k = " + std::to_string(L));
    }
  }
  detail::expect_output(op, "g", g, {L, a.size(1)}, a);
  detail::expect_output_apart(op, "g", g, {{"a", a}, {"coeff", coeff}}, plan);
  if (detail::use_cuda(op, device)) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::group(a, plan, fan_out, coeff, g, ctx);
#endif
  }
  cpu::group(a, plan, fan_out, coeff, g);
}

void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db, [[maybe_unused]] const Context& ctx) {
  constexpr const char* op = "group_xty";
  detail::expect_defined(op, "dy", dy);
  detail::expect_float(op, "dy", dy);
  detail::expect_shape(op, "dy", dy, {-1, -1});
  const Device device = dy.device();
  detail::expect_plan_views(op, plan, device, -1, -1, false);
  const std::int64_t L = plan.num_rows();
  const std::int64_t E = plan.num_experts();
  detail::expect_shape(op, "dy", dy, {L, -1});
  detail::expect_defined(op, "x", x);
  detail::expect_dtype(op, "x", x, dy.dtype(), "dy");
  detail::expect_device(op, "x", x, device, "dy");
  detail::expect_shape(op, "x", x, {L, -1});
  detail::expect_output(op, "dw", dw, {E, x.size(1), dy.size(1)}, dy);
  if (db.defined()) detail::expect_output(op, "db", db, {E, dy.size(1)}, dy);
  detail::expect_output_apart(op, "dw", dw, {{"dy", dy}, {"x", x}}, plan);
  detail::expect_output_apart(op, "db", db, {{"dy", dy}, {"x", x}, {"dw", dw}}, plan);
  if (detail::use_cuda(op, device)) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::group_xty(dy, x, plan, dw, db, ctx);
#endif
  }
  cpu::group_xty(dy, x, plan, dw, db);
}

}  // namespace scattermoe
