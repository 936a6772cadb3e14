#include "core/plan_checks.hpp"

#include "core/checks.hpp"
#include "cpu/backend.hpp"

namespace scattermoe::detail {

namespace {

void expect_index_vector(const char* op, const char* name, const TensorView& v, Device device,
                         std::int64_t n) {
  expect_defined(op, name, v);
  expect_dtype(op, name, v, DType::kInt64, nullptr);
  expect_shape(op, name, v, {n});
  expect_device(op, name, v, device, nullptr);
}

}  // namespace

void expect_plan_views(const char* op, const RoutingPlan& plan, Device device, std::int64_t L,
                       std::int64_t E, bool outputs) {
  if (L < 0) L = plan.num_rows();
  if (E < 0) E = plan.num_experts();
  expect_index_vector(op, "plan.sorted_expert_idxs", plan.sorted_expert_idxs, device, L);
  expect_index_vector(op, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs, device, L);
  expect_index_vector(op, "plan.expert_offsets", plan.expert_offsets, device, E);
  if (outputs) {
    expect_distinct_elements(op, "plan.sorted_expert_idxs", plan.sorted_expert_idxs);
    expect_distinct_elements(op, "plan.sorted_scattered_idxs", plan.sorted_scattered_idxs);
    expect_distinct_elements(op, "plan.expert_offsets", plan.expert_offsets);
  }
  if (!outputs && device.type == DeviceType::kCPU) cpu::check_plan_contents(op, plan);
}

}  // namespace scattermoe::detail
