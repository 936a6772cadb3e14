// SMoE MLP / GLU-MLP on the CPU: two ParallelLinears and the activation between them, the
// hidden kept in grouped order. Forward keeps only the pre-activation H for backward.
#include <algorithm>

#include "core/workspace.hpp"
#include "cpu/access.hpp"
#include "cpu/activation.hpp"
#include "cpu/backend.hpp"

namespace scattermoe::cpu {

namespace {

std::int64_t hidden_width(const MlpArgs& args) { return args.w2.size(1); }

// Layer 1: x (T, d) scattered in, grouped out, no gates.
ParallelLinearArgs first_layer(const MlpArgs& args) {
  return ParallelLinearArgs{args.x, args.w1, args.b1, TensorView{},
                            static_cast<int>(args.gates.size(1)), false, true};
}

// Layer 2: A (L, h) grouped in, scattered out, combined by the gates.
ParallelLinearArgs second_layer(const MlpArgs& args, const TensorView& a) {
  return ParallelLinearArgs{a, args.w2, args.b2, args.gates, 1, true, false};
}

struct ForwardScratch {
  float* a = nullptr;  // (L, h) activation output
  Workspace inner;     // layer 2's workspace
};

ForwardScratch forward_layout(detail::WorkspaceCarver& carver, const MlpArgs& args,
                              const RoutingPlan& plan) {
  const std::int64_t L = plan.num_rows();
  ForwardScratch s;
  s.a = carver.take<float>(L * hidden_width(args));
  const TensorView a_shape = f32_matrix(nullptr, L, hidden_width(args));
  s.inner.bytes = cpu::parallel_linear_forward_workspace_size(second_layer(args, a_shape), plan);
  s.inner.data = carver.take<std::byte>(static_cast<std::int64_t>(s.inner.bytes));
  return s;
}

struct BackwardScratch {
  float* a = nullptr;         // (L, h)
  float* d_a = nullptr;       // (L, h)
  float* d_hidden = nullptr;  // (L, h | 2h)
  Workspace inner;            // shared by the two layers' backward, one after the other
};

// Sized for every gradient: the size query cannot know which ones a caller will skip.
BackwardScratch backward_layout(detail::WorkspaceCarver& carver, const MlpArgs& args,
                                const RoutingPlan& plan) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t h = hidden_width(args);
  const std::int64_t h1 = args.w1.size(2);
  BackwardScratch s;
  s.a = carver.take<float>(L * h);
  s.d_a = carver.take<float>(L * h);
  s.d_hidden = carver.take<float>(L * h1);
  const TensorView a_shape = f32_matrix(nullptr, L, h);
  const TensorView any = f32_matrix(nullptr, 0, 0);  // stands for "this gradient is wanted"
  const std::size_t second = cpu::parallel_linear_backward_workspace_size(
      second_layer(args, a_shape), plan, {a_shape, any, any, any});
  const std::size_t first = cpu::parallel_linear_backward_workspace_size(
      first_layer(args), plan, {any, any, any, TensorView{}});
  s.inner.bytes = std::max(first, second);
  s.inner.data = carver.take<std::byte>(static_cast<std::int64_t>(s.inner.bytes));
  return s;
}

}  // namespace

std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  forward_layout(carver, args, plan);
  return carver.used();
}

void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Workspace& ws) {
  detail::WorkspaceCarver carver(ws);
  const ForwardScratch scratch = forward_layout(carver, args, plan);
  const TensorView a = f32_matrix(scratch.a, plan.num_rows(), hidden_width(args));

  cpu::parallel_linear_forward(first_layer(args), plan, hidden, Workspace{});
  activation_forward(args.activation, args.glu, hidden, a);
  cpu::parallel_linear_forward(second_layer(args, a), plan, out, scratch.inner);
}

std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  backward_layout(carver, args, plan);
  return carver.used();
}

void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Workspace& ws) {
  detail::WorkspaceCarver carver(ws);
  const BackwardScratch scratch = backward_layout(carver, args, plan);
  const std::int64_t L = plan.num_rows();
  const std::int64_t h = hidden_width(args);
  const TensorView a = f32_matrix(scratch.a, L, h);
  const TensorView d_a = f32_matrix(scratch.d_a, L, h);
  const TensorView d_hidden = f32_matrix(scratch.d_hidden, L, args.w1.size(2));

  // Recompute A from the saved H instead of keeping it from forward.
  activation_forward(args.activation, args.glu, hidden, a);
  cpu::parallel_linear_backward(second_layer(args, a), plan, d_out,
                           {d_a, grads.dw2, grads.db2, grads.d_gates}, scratch.inner);
  const bool need_first = grads.dx.defined() || grads.dw1.defined() || grads.db1.defined();
  if (!need_first) return;
  activation_backward(args.activation, args.glu, hidden, d_a, d_hidden);
  cpu::parallel_linear_backward(first_layer(args), plan, d_hidden,
                           {grads.dx, grads.dw1, grads.db1, TensorView{}}, scratch.inner);
}

}  // namespace scattermoe::cpu
