// A GLU-MLP (SwiGLU) mixture-of-experts layer on the CPU: routing plan, forward, backward.
// Compiled and run as a test (ctest -R example_basic), so this code is known to work.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "scattermoe/scattermoe.hpp"

using scattermoe::DType;
using scattermoe::TensorView;

int main() {
  constexpr std::int64_t T = 4, d = 8, h = 16, E = 4, k = 2;  // tokens, widths, experts, top-k

  // The router's choice for each token (T, k) and its weights (T, k); the caller owns memory.
  std::vector<std::int64_t> expert_idxs = {0, 2, 1, 2, 3, 0, 2, 1};
  std::vector<float> gates = {0.7f, 0.3f, 0.5f, 0.5f, 0.9f, 0.1f, 0.6f, 0.4f};
  std::vector<float> x(T * d), w1(E * d * 2 * h), w2(E * h * d);
  std::mt19937 rng(0);  // any values will do
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& v : x) v = uniform(rng);
  for (float& v : w1) v = 0.5f * uniform(rng);
  for (float& v : w2) v = 0.5f * uniform(rng);

  // 1. The routing plan: rows grouped by expert, built into caller-provided views.
  std::vector<std::int64_t> sorted_expert(T * k), sorted_scattered(T * k), offsets(E);
  scattermoe::RoutingPlan plan;
  plan.sorted_expert_idxs = TensorView::contiguous(sorted_expert.data(), DType::kInt64, {T * k});
  plan.sorted_scattered_idxs =
      TensorView::contiguous(sorted_scattered.data(), DType::kInt64, {T * k});
  plan.expert_offsets = TensorView::contiguous(offsets.data(), DType::kInt64, {E});
  const TensorView idx = TensorView::contiguous(expert_idxs.data(), DType::kInt64, {T, k});

  // Scratch memory comes from the caller: each call has a *_workspace_size query.
  scattermoe::Context ctx;
  std::vector<char> scratch(
      scattermoe::routing_plan_workspace_size(T, k, E, scattermoe::Device::cpu()));
  ctx.workspace = {scratch.data(), scratch.size()};
  scattermoe::build_routing_plan(idx, E, plan, ctx);

  // 2. Forward: out = sum_j gates[t,j] * (silu(gate) * up) @ W2[e]; `hidden` keeps the
  //    pre-activation (grouped order) for backward.
  scattermoe::MlpArgs args;
  args.x = TensorView::contiguous(x.data(), DType::kFloat32, {T, d});
  args.w1 = TensorView::contiguous(w1.data(), DType::kFloat32, {E, d, 2 * h});  // up | gate
  args.w2 = TensorView::contiguous(w2.data(), DType::kFloat32, {E, h, d});
  args.gates = TensorView::contiguous(gates.data(), DType::kFloat32, {T, k});
  args.activation = scattermoe::Activation::kSilu;
  args.glu = true;

  std::vector<float> out(T * d), hidden(T * k * 2 * h);
  const TensorView out_v = TensorView::contiguous(out.data(), DType::kFloat32, {T, d});
  const TensorView hidden_v =
      TensorView::contiguous(hidden.data(), DType::kFloat32, {T * k, 2 * h});
  scratch.resize(scattermoe::mlp_forward_workspace_size(args, plan));
  ctx.workspace = {scratch.data(), scratch.size()};
  scattermoe::mlp_forward(args, plan, out_v, hidden_v, ctx);

  // 3. Backward for d_out = 1: gradients of x, both weights and the gates.
  std::vector<float> d_out(T * d, 1.0f), dx(T * d), dw1(w1.size()), dw2(w2.size()), dg(T * k);
  scattermoe::MlpGrads grads;
  grads.dx = TensorView::contiguous(dx.data(), DType::kFloat32, {T, d});
  grads.dw1 = TensorView::contiguous(dw1.data(), DType::kFloat32, {E, d, 2 * h});
  grads.dw2 = TensorView::contiguous(dw2.data(), DType::kFloat32, {E, h, d});
  grads.d_gates = TensorView::contiguous(dg.data(), DType::kFloat32, {T, k});
  scratch.resize(scattermoe::mlp_backward_workspace_size(args, plan));
  ctx.workspace = {scratch.data(), scratch.size()};
  scattermoe::mlp_backward(args, plan, hidden_v,
                           TensorView::contiguous(d_out.data(), DType::kFloat32, {T, d}), grads,
                           ctx);

  // expert_offsets are inclusive ends: expert e owns grouped rows [offsets[e-1], offsets[e]).
  std::printf("expert_offsets: %lld %lld %lld %lld\n", static_cast<long long>(offsets[0]),
              static_cast<long long>(offsets[1]), static_cast<long long>(offsets[2]),
              static_cast<long long>(offsets[3]));
  std::printf("out[0][0] = %.6f   dx[0][0] = %.6f   d_gates[0] = %.6f %.6f\n", out[0], dx[0],
              dg[0], dg[1]);
  return 0;
}
