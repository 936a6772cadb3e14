// Builds a routing plan with an installed scattermoe.
#include <cstdint>
#include <cstdio>
#include <vector>

#include <scattermoe/scattermoe.hpp>

int main() {
  using scattermoe::DType;
  using scattermoe::TensorView;
  std::vector<std::int64_t> expert_idxs = {1, 0, 1, 2};  // (T = 2, k = 2), E = 3
  std::vector<std::int64_t> sorted_expert(4), sorted_scattered(4), offsets(3);
  scattermoe::RoutingPlan plan;
  plan.sorted_expert_idxs = TensorView::contiguous(sorted_expert.data(), DType::kInt64, {4});
  plan.sorted_scattered_idxs =
      TensorView::contiguous(sorted_scattered.data(), DType::kInt64, {4});
  plan.expert_offsets = TensorView::contiguous(offsets.data(), DType::kInt64, {3});

  std::vector<char> scratch(
      scattermoe::routing_plan_workspace_size(2, 2, 3, scattermoe::Device::cpu()));
  scattermoe::Context ctx;
  ctx.workspace = {scratch.data(), scratch.size()};
  scattermoe::build_routing_plan(
      TensorView::contiguous(expert_idxs.data(), DType::kInt64, {2, 2}), 3, plan, ctx);

  std::printf("scattermoe %s: expert_offsets %lld %lld %lld\n",
              scattermoe::build_info().version.c_str(), static_cast<long long>(offsets[0]),
              static_cast<long long>(offsets[1]), static_cast<long long>(offsets[2]));
  return offsets[0] == 1 && offsets[1] == 3 && offsets[2] == 4 ? 0 : 1;
}
