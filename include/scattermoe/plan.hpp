// The routing plan: where each routed row (token, choice) goes in expert-grouped order.
//
// From expert_idxs (T, k), flattened token-major (flat position p = t*k + j), L = T*k:
//   sorted_expert_idxs    (L) int64  the flat expert ids in ascending order
//   sorted_scattered_idxs (L) int64  for grouped position i, the flat position p it came from;
//                                    stable (ties in ascending p)
//   expert_offsets        (E) int64  inclusive end offsets: rows of expert e occupy grouped
//                                    positions [expert_offsets[e-1], expert_offsets[e])
#pragma once

#include <cstddef>
#include <cstdint>

#include "scattermoe/context.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {

struct RoutingPlan {
  TensorView sorted_expert_idxs;     // (L) int64
  TensorView sorted_scattered_idxs;  // (L) int64
  TensorView expert_offsets;         // (E) int64

  std::int64_t num_rows() const { return sorted_expert_idxs.defined() ? sorted_expert_idxs.size(0) : 0; }
  std::int64_t num_experts() const { return expert_offsets.defined() ? expert_offsets.size(0) : 0; }
};

// Scratch bytes build_routing_plan needs for T tokens, k choices and E experts on `device`.
std::size_t routing_plan_workspace_size(std::int64_t num_tokens, int k, int num_experts,
                                        Device device);

// Fills `plan` (its three views preallocated with the shapes above) from expert_idxs (T, k)
// int32 or int64. Throws InvalidArgument for k < 1 or k > num_experts or mis-shaped outputs,
// and on the CPU for an expert id outside [0, num_experts) (every id is checked before anything
// is written). On CUDA the plan is built without any device-to-host copy, so ids cannot be
// checked there: an out-of-range id is clamped into [0, num_experts) (a wrong plan, but never an
// access outside the tensors); check ids on the host or in the framework when they are untrusted.
void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Context& ctx = {});

}  // namespace scattermoe
