// ParallelLinear and the MLP: argument checks, then the backend.
#include <string>

#include "core/checks.hpp"
#include "core/dispatch.hpp"
#include "core/op_checks.hpp"
#include "core/plan_checks.hpp"
#include "cpu/backend.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/modules.hpp"

namespace scattermoe {

namespace {

// Checks the ParallelLinear inputs; returns the shape of the forward output.
struct LinearCheck {
  detail::LinearShape s;
  std::int64_t out_rows = 0;
};

LinearCheck check_parallel_linear(const char* op, const ParallelLinearArgs& args,
                                  const RoutingPlan& plan) {
  LinearCheck c;
  c.s = detail::expect_linear_inputs(op, args.x, args.w, args.bias, plan, args.k, args.grouped_in);
  c.out_rows = c.s.L;
  if (args.gates.defined()) {
    if (args.grouped_out) {
      detail::fail(op, "gates", args.gates.describe(),
                   "undefined when grouped_out is true (gates combine token-major rows)");
    }
    detail::expect_data(op, "gates", args.gates);
    detail::expect_float(op, "gates", args.gates);
    detail::expect_device(op, "gates", args.gates, args.x.device(), "x");
    detail::expect_shape(op, "gates", args.gates, {-1, -1});
    if (args.gates.numel() != c.s.L || args.gates.size(1) < 1) {
      detail::fail(op, "gates", args.gates.describe(),
                   "shape (T, k) with T*k = " + std::to_string(c.s.L) + " routed rows");
    }
    c.out_rows = args.gates.size(0);
  }
  return c;
}

// Shape checks of the MLP; returns L.
std::int64_t check_mlp(const char* op, const MlpArgs& args, const RoutingPlan& plan) {
  detail::expect_defined(op, "x", args.x);
  detail::expect_float(op, "x", args.x);
  detail::expect_shape(op, "x", args.x, {-1, -1});
  const Device device = args.x.device();
  const DType dtype = args.x.dtype();
  const std::int64_t T = args.x.size(0);
  const std::int64_t d = args.x.size(1);
  detail::expect_defined(op, "w2", args.w2);
  detail::expect_dtype(op, "w2", args.w2, dtype, "x");
  detail::expect_device(op, "w2", args.w2, device, "x");
  detail::expect_shape(op, "w2", args.w2, {-1, -1, d});
  const std::int64_t E = args.w2.size(0);
  const std::int64_t h = args.w2.size(1);
  const std::int64_t h1 = args.glu ? 2 * h : h;
  detail::expect_defined(op, "w1", args.w1);
  detail::expect_dtype(op, "w1", args.w1, dtype, "x");
  detail::expect_device(op, "w1", args.w1, device, "x");
  detail::expect_shape(op, "w1", args.w1, {E, d, h1});
  if (args.b1.defined()) {
    detail::expect_data(op, "b1", args.b1);
    detail::expect_dtype(op, "b1", args.b1, dtype, "x");
    detail::expect_device(op, "b1", args.b1, device, "x");
    detail::expect_shape(op, "b1", args.b1, {E, h1});
  }
  if (args.b2.defined()) {
    detail::expect_data(op, "b2", args.b2);
    detail::expect_dtype(op, "b2", args.b2, dtype, "x");
    detail::expect_device(op, "b2", args.b2, device, "x");
    detail::expect_shape(op, "b2", args.b2, {E, d});
  }
  detail::expect_defined(op, "gates", args.gates);
  detail::expect_float(op, "gates", args.gates);
  detail::expect_device(op, "gates", args.gates, device, "x");
  detail::expect_shape(op, "gates", args.gates, {T, -1});
  detail::expect_plan_views(op, plan, device, -1, E, false);
  const std::int64_t L = plan.num_rows();
  if (args.gates.size(1) < 1 || T * args.gates.size(1) != L) {
    detail::fail(op, "gates", args.gates.describe(),
                 "shape (T = " + std::to_string(T) + ", k) with T*k = " + std::to_string(L) +
                     " (the plan's routed rows)");
  }
  return L;
}

void expect_apart(const char* op, const char* name, const TensorView& out, const MlpArgs& args,
                  const RoutingPlan& plan) {
  detail::expect_output_apart(op, name, out,
                              {{"x", args.x}, {"w1", args.w1}, {"b1", args.b1}, {"w2", args.w2},
                               {"b2", args.b2}, {"gates", args.gates}},
                              plan);
}

}  // namespace

// ---- ParallelLinear --------------------------------------------------------------------------

std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan) {
  if (detail::use_cuda("parallel_linear_forward_workspace_size", args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::parallel_linear_forward_workspace_size(args, plan);
#endif
  }
  return cpu::parallel_linear_forward_workspace_size(args, plan);
}

void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Context& ctx) {
  constexpr const char* op = "parallel_linear_forward";
  const LinearCheck c = check_parallel_linear(op, args, plan);
  detail::expect_output(op, "out", out, {c.out_rows, c.s.d_out}, args.x);
  detail::expect_output_apart(op, "out", out,
                              {{"x", args.x}, {"w", args.w}, {"bias", args.bias}, {"gates", args.gates}},
                              plan);
  detail::expect_workspace(op, ctx, parallel_linear_forward_workspace_size(args, plan));
  if (detail::use_cuda(op, args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::parallel_linear_forward(args, plan, out, ctx);
#endif
  }
  cpu::parallel_linear_forward(args, plan, out, ctx.workspace);
}

std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads) {
  if (detail::use_cuda("parallel_linear_backward_workspace_size", args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::parallel_linear_backward_workspace_size(args, plan, grads);
#endif
  }
  return cpu::parallel_linear_backward_workspace_size(args, plan, grads);
}

void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_out, const ParallelLinearGrads& grads,
                              const Context& ctx) {
  constexpr const char* op = "parallel_linear_backward";
  const LinearCheck c = check_parallel_linear(op, args, plan);
  detail::expect_defined(op, "d_out", d_out);
  detail::expect_dtype(op, "d_out", d_out, args.x.dtype(), "x");
  detail::expect_device(op, "d_out", d_out, args.x.device(), "x");
  detail::expect_shape(op, "d_out", d_out, {c.out_rows, c.s.d_out});
  const std::initializer_list<detail::NamedView> inputs = {
      {"x", args.x}, {"w", args.w}, {"bias", args.bias}, {"gates", args.gates}, {"d_out", d_out}};
  if (grads.dx.defined()) {
    detail::expect_output(op, "grads.dx", grads.dx, {args.x.size(0), c.s.d_in}, args.x);
    detail::expect_output_apart(op, "grads.dx", grads.dx, inputs, plan);
  }
  if (grads.dw.defined()) {
    detail::expect_output(op, "grads.dw", grads.dw, {c.s.E, c.s.d_in, c.s.d_out}, args.x);
    detail::expect_output_apart(op, "grads.dw", grads.dw, inputs, plan);
    detail::expect_no_overlap(op, "grads.dw", grads.dw, "grads.dx", grads.dx);
  }
  if (grads.db.defined()) {
    detail::expect_output(op, "grads.db", grads.db, {c.s.E, c.s.d_out}, args.x);
    detail::expect_output_apart(op, "grads.db", grads.db, inputs, plan);
    detail::expect_no_overlap(op, "grads.db", grads.db, "grads.dx", grads.dx);
    detail::expect_no_overlap(op, "grads.db", grads.db, "grads.dw", grads.dw);
  }
  if (grads.d_gates.defined()) {
    if (!args.gates.defined()) {
      detail::fail(op, "grads.d_gates", grads.d_gates.describe(),
                   "undefined when args.gates is undefined");
    }
    detail::expect_output(op, "grads.d_gates", grads.d_gates,
                          {args.gates.size(0), args.gates.size(1)}, args.gates);
    detail::expect_output_apart(op, "grads.d_gates", grads.d_gates, inputs, plan);
    for (const detail::NamedView& g : {detail::NamedView{"grads.dx", grads.dx},
                                       detail::NamedView{"grads.dw", grads.dw},
                                       detail::NamedView{"grads.db", grads.db}}) {
      detail::expect_no_overlap(op, "grads.d_gates", grads.d_gates, g.first, g.second);
    }
  }
  detail::expect_workspace(op, ctx, parallel_linear_backward_workspace_size(args, plan, grads));
  if (detail::use_cuda(op, args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::parallel_linear_backward(args, plan, d_out, grads, ctx);
#endif
  }
  cpu::parallel_linear_backward(args, plan, d_out, grads, ctx.workspace);
}

// ---- MLP -------------------------------------------------------------------------------------

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
    case Activation::kSilu: return "silu";
    case Activation::kRelu: return "relu";
  }
  return "?";
}

Activation parse_activation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "relu") return Activation::kRelu;
  throw InvalidArgument("parse_activation: argument 'name' is \"" + name +
                        "\"; expected one of gelu, gelu_tanh, silu, relu");
}

std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  if (detail::use_cuda("mlp_forward_workspace_size", args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::mlp_forward_workspace_size(args, plan);
#endif
  }
  return cpu::mlp_forward_workspace_size(args, plan);
}

void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Context& ctx) {
  constexpr const char* op = "mlp_forward";
  const std::int64_t L = check_mlp(op, args, plan);
  detail::expect_output(op, "out", out, {args.x.size(0), args.x.size(1)}, args.x);
  detail::expect_output(op, "hidden", hidden, {L, args.w1.size(2)}, args.x);
  expect_apart(op, "out", out, args, plan);
  expect_apart(op, "hidden", hidden, args, plan);
  detail::expect_no_overlap(op, "hidden", hidden, "out", out);
  detail::expect_workspace(op, ctx, mlp_forward_workspace_size(args, plan));
  if (detail::use_cuda(op, args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::mlp_forward(args, plan, out, hidden, ctx);
#endif
  }
  cpu::mlp_forward(args, plan, out, hidden, ctx.workspace);
}

std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  if (detail::use_cuda("mlp_backward_workspace_size", args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::mlp_backward_workspace_size(args, plan);
#endif
  }
  return cpu::mlp_backward_workspace_size(args, plan);
}

void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Context& ctx) {
  constexpr const char* op = "mlp_backward";
  const std::int64_t L = check_mlp(op, args, plan);
  detail::expect_defined(op, "hidden", hidden);
  detail::expect_dtype(op, "hidden", hidden, args.x.dtype(), "x");
  detail::expect_device(op, "hidden", hidden, args.x.device(), "x");
  detail::expect_shape(op, "hidden", hidden, {L, args.w1.size(2)});
  detail::expect_defined(op, "d_out", d_out);
  detail::expect_dtype(op, "d_out", d_out, args.x.dtype(), "x");
  detail::expect_device(op, "d_out", d_out, args.x.device(), "x");
  detail::expect_shape(op, "d_out", d_out, {args.x.size(0), args.x.size(1)});

  struct Grad {
    const char* name;
    TensorView view;
    TensorView like;
    bool needs_like;
  };
  const Grad all[] = {{"grads.dx", grads.dx, args.x, false},   {"grads.dw1", grads.dw1, args.w1, false},
                      {"grads.db1", grads.db1, args.b1, true}, {"grads.dw2", grads.dw2, args.w2, false},
                      {"grads.db2", grads.db2, args.b2, true}, {"grads.d_gates", grads.d_gates, args.gates, false}};
  for (const Grad& g : all) {
    if (!g.view.defined()) continue;
    if (g.needs_like && !g.like.defined()) {
      detail::fail(op, g.name, g.view.describe(), "undefined when the matching bias is undefined");
    }
    detail::expect_defined(op, g.name, g.view);
    detail::expect_dtype(op, g.name, g.view, g.like.dtype(), nullptr);
    detail::expect_device(op, g.name, g.view, g.like.device(), nullptr);
    bool same_shape = g.view.rank() == g.like.rank();
    for (int i = 0; same_shape && i < g.like.rank(); ++i) same_shape = g.view.size(i) == g.like.size(i);
    if (!same_shape) detail::fail(op, g.name, g.view.describe(), "shape " + detail::shape_string(g.like));
    detail::expect_distinct_elements(op, g.name, g.view);
    expect_apart(op, g.name, g.view, args, plan);
    detail::expect_no_overlap(op, g.name, g.view, "hidden", hidden);
    detail::expect_no_overlap(op, g.name, g.view, "d_out", d_out);
    for (const Grad& other : all) {
      if (&other != &g) detail::expect_no_overlap(op, g.name, g.view, other.name, other.view);
    }
  }
  detail::expect_workspace(op, ctx, mlp_backward_workspace_size(args, plan));
  if (detail::use_cuda(op, args.x.device())) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::mlp_backward(args, plan, hidden, d_out, grads, ctx);
#endif
  }
  cpu::mlp_backward(args, plan, hidden, d_out, grads, ctx.workspace);
}

}  // namespace scattermoe
