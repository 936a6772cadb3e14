// Routing plan on the CPU: a stable counting sort of the flat expert ids.
#include <string>
#include <vector>

#include "core/checks.hpp"
#include "core/workspace.hpp"
#include "cpu/access.hpp"
#include "cpu/backend.hpp"

namespace scattermoe::cpu {

namespace {

void plan_layout(detail::WorkspaceCarver& carver, int num_experts, std::int64_t** cursor) {
  *cursor = carver.take<std::int64_t>(num_experts);  // (E) next free grouped position
}

}  // namespace

std::size_t routing_plan_workspace_size(std::int64_t /*num_tokens*/, int /*k*/, int num_experts) {
  detail::WorkspaceCarver carver;
  std::int64_t* cursor;
  plan_layout(carver, num_experts, &cursor);
  return carver.used();
}

void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Workspace& ws) {
  const std::int64_t T = expert_idxs.size(0);
  const std::int64_t k = expert_idxs.size(1);
  const DType dt = expert_idxs.dtype();
  auto id_at = [&](std::int64_t p) {
    return load_index(expert_idxs.data(), dt, (p / k) * expert_idxs.stride(0) + (p % k) * expert_idxs.stride(1));
  };
  const std::int64_t L = T * k;

  // Every id is checked before anything is written.
  for (std::int64_t p = 0; p < L; ++p) {
    const std::int64_t e = id_at(p);
    if (e < 0 || e >= num_experts) {
      detail::fail("build_routing_plan", "expert_idxs",
                   std::to_string(e) + " at [" + std::to_string(p / k) + ", " + std::to_string(p % k) + "]",
                   "expert ids in [0, " + std::to_string(num_experts) + ")");
    }
  }

  detail::WorkspaceCarver carver(ws);
  std::int64_t* cursor;
  plan_layout(carver, num_experts, &cursor);

  auto* sorted_expert = static_cast<std::int64_t*>(plan.sorted_expert_idxs.data());
  auto* sorted_scattered = static_cast<std::int64_t*>(plan.sorted_scattered_idxs.data());
  auto* offsets = static_cast<std::int64_t*>(plan.expert_offsets.data());
  const std::int64_t se_stride = plan.sorted_expert_idxs.stride(0);
  const std::int64_t ss_stride = plan.sorted_scattered_idxs.stride(0);
  const std::int64_t off_stride = plan.expert_offsets.stride(0);

  // Histogram, then inclusive scan into offsets and exclusive scan into cursors.
  for (int e = 0; e < num_experts; ++e) cursor[e] = 0;
  for (std::int64_t p = 0; p < L; ++p) ++cursor[id_at(p)];
  std::int64_t running = 0;
  for (int e = 0; e < num_experts; ++e) {
    const std::int64_t count = cursor[e];
    cursor[e] = running;
    running += count;
    offsets[e * off_stride] = running;
  }
  // Stable scatter: flat positions are visited in ascending order.
  for (std::int64_t p = 0; p < L; ++p) {
    const std::int64_t e = id_at(p);
    const std::int64_t i = cursor[e]++;
    sorted_expert[i * se_stride] = e;
    sorted_scattered[i * ss_stride] = p;
  }
}

void check_plan_contents(const char* op, const RoutingPlan& plan) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t E = plan.num_experts();
  const Indices sorted_expert(plan.sorted_expert_idxs);
  const Indices sorted_scattered(plan.sorted_scattered_idxs);
  const Indices offsets(plan.expert_offsets);
  std::int64_t begin = 0;
  for (std::int64_t e = 0; e < E; ++e) {
    const std::int64_t end = offsets[e];
    if (end < begin || end > L) {
      detail::fail(op, "plan.expert_offsets",
                   std::to_string(end) + " at [" + std::to_string(e) + "]",
                   "non-decreasing inclusive end offsets in [0, " + std::to_string(L) + "]");
    }
    for (std::int64_t i = begin; i < end; ++i) {
      if (sorted_expert[i] != e) {
        detail::fail(op, "plan.sorted_expert_idxs",
                     std::to_string(sorted_expert[i]) + " at [" + std::to_string(i) + "]",
                     std::to_string(e) + ", as plan.expert_offsets says");
      }
    }
    begin = end;
  }
  if (begin != L) {
    detail::fail(op, "plan.expert_offsets",
                 E > 0 ? std::to_string(begin) + " at [" + std::to_string(E - 1) + "]" : "empty",
                 "a last offset equal to " + std::to_string(L) + " (the number of routed rows)");
  }
  std::vector<bool> seen(static_cast<std::size_t>(L), false);
  for (std::int64_t i = 0; i < L; ++i) {
    const std::int64_t p = sorted_scattered[i];
    if (p < 0 || p >= L || seen[static_cast<std::size_t>(p)]) {
      detail::fail(op, "plan.sorted_scattered_idxs", std::to_string(p) + " at [" + std::to_string(i) + "]",
                   "a permutation of the flat positions [0, " + std::to_string(L) + ")");
    }
    seen[static_cast<std::size_t>(p)] = true;
  }
}

}  // namespace scattermoe::cpu
