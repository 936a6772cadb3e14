// The CPU reference backend: plain loops, fp32 accumulation, 16-bit storage by software
// conversion. It is the oracle every other backend is tested against, so it favours clarity.
// Entry points here receive arguments that src/core has already checked; they read and write
// every float view through its own dtype and strides, so internal temporaries may be fp32.
#pragma once

#include <cstddef>

#include "scattermoe/context.hpp"
#include "scattermoe/modules.hpp"
#include "scattermoe/moa.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"

namespace scattermoe::cpu {

// Checks the contents of a plan that a caller built (ids in range, offsets consistent with the
// ids, scattered ids a permutation) and throws InvalidArgument naming `op` if not.
void check_plan_contents(const char* op, const RoutingPlan& plan);

std::size_t routing_plan_workspace_size(std::int64_t num_tokens, int k, int num_experts);
void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Workspace& ws);

void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y);
void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g);
void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db);

std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan);
void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Workspace& ws);
std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads);
void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_out, const ParallelLinearGrads& grads,
                              const Workspace& ws);

std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Workspace& ws);
std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Workspace& ws);

// MoA attention; `scale` already resolved (never 0 here).
std::size_t moa_attention_forward_workspace_size(const MoaAttentionArgs& args);
void moa_attention_forward(const MoaAttentionArgs& args, const TensorView& out,
                           const TensorView& lse, const Workspace& ws);
std::size_t moa_attention_backward_workspace_size(const MoaAttentionArgs& args);
void moa_attention_backward(const MoaAttentionArgs& args, const TensorView& out,
                            const TensorView& lse, const TensorView& d_out, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const Workspace& ws);

}  // namespace scattermoe::cpu
