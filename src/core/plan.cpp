// build_routing_plan: argument checks, then the backend.
#include "core/checks.hpp"
#include "core/dispatch.hpp"
#include "core/plan_checks.hpp"
#include "cpu/backend.hpp"
#include "scattermoe/plan.hpp"

namespace scattermoe {

std::size_t routing_plan_workspace_size(std::int64_t num_tokens, int k, int num_experts,
                                        Device device) {
  if (detail::use_cuda("routing_plan_workspace_size", device)) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::routing_plan_workspace_size(num_tokens, k, num_experts);
#endif
  }
  return cpu::routing_plan_workspace_size(num_tokens, k, num_experts);
}

void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Context& ctx) {
  constexpr const char* op = "build_routing_plan";
  detail::expect_defined(op, "expert_idxs", expert_idxs);
  detail::expect_integral(op, "expert_idxs", expert_idxs);
  detail::expect_shape(op, "expert_idxs", expert_idxs, {-1, -1});
  if (num_experts < 1) {
    detail::fail(op, "num_experts", std::to_string(num_experts), "at least 1");
  }
  const std::int64_t T = expert_idxs.size(0);
  const std::int64_t k = expert_idxs.size(1);
  if (k < 1 || k > num_experts) {
    detail::fail(op, "expert_idxs", expert_idxs.describe() + " (k = " + std::to_string(k) + ")",
                 "k = size(1) in [1, num_experts = " + std::to_string(num_experts) + "]");
  }
  const Device device = expert_idxs.device();
  const std::int64_t L = T * k;
  detail::expect_plan_views(op, plan, device, L, num_experts, /*outputs=*/true);
  detail::expect_no_overlap(op, "plan.sorted_expert_idxs", plan.sorted_expert_idxs, "expert_idxs", expert_idxs);
  detail::expect_no_overlap(op, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs, "expert_idxs", expert_idxs);
  detail::expect_no_overlap(op, "plan.expert_offsets", plan.expert_offsets, "expert_idxs", expert_idxs);
  detail::expect_no_overlap(op, "plan.sorted_expert_idxs", plan.sorted_expert_idxs, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs);
  detail::expect_no_overlap(op, "plan.expert_offsets", plan.expert_offsets, "plan.sorted_expert_idxs", plan.sorted_expert_idxs);
  detail::expect_no_overlap(op, "plan.expert_offsets", plan.expert_offsets, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs);
  detail::expect_workspace(op, ctx, routing_plan_workspace_size(T, static_cast<int>(k), num_experts, device));

  if (detail::use_cuda(op, device)) {
#ifdef SCATTERMOE_WITH_CUDA
    return cuda::build_routing_plan(expert_idxs, num_experts, plan, ctx);
#endif
  }
  cpu::build_routing_plan(expert_idxs, num_experts, plan, ctx.workspace);
}

}  // namespace scattermoe
