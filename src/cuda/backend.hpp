// The CUDA backend: the same entry points as the CPU backend, run on the stream of the
// Context, with temporaries carved from the caller's workspace. Arguments arrive checked by
// src/core; what only CUDA requires (tensors on the current device, row-contiguous matrices with
// non-negative row strides, weights with a unit stride, contiguous plan vectors, fewer than 2^31
// routed rows and at most 65535 experts) is checked here. The contents of a caller-built plan
// cannot be checked without a host round trip and are trusted. No function synchronises with
// the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "scattermoe/context.hpp"
#include "scattermoe/modules.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"

namespace scattermoe::cuda {

std::size_t routing_plan_workspace_size(std::int64_t num_tokens, int k, int num_experts);
void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Context& ctx);

std::size_t scatter2scatter_workspace_size(const Scatter2ScatterArgs& args, const RoutingPlan& plan);
void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y,
                     const Context& ctx);
void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g, const Context& ctx);
void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db, const Context& ctx);

std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan);
void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Context& ctx);
std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads);
void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_out, const ParallelLinearGrads& grads,
                              const Context& ctx);

std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Context& ctx);
std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Context& ctx);

// Devices the runtime reports (empty without a driver or GPU).
struct CudaDevice {
  int index = 0;
  char name[256] = {};
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
  std::size_t memory_bytes = 0;
};
int device_count();
CudaDevice device_properties(int index);

}  // namespace scattermoe::cuda
