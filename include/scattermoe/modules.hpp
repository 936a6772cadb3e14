// Layers built on the primitives: ParallelLinear (with gates) and the SMoE MLP / GLU-MLP,
// forward and backward. Same conventions as ops.hpp: optional tensors are undefined views,
// bad input throws InvalidArgument before anything is written, temporaries live in the
// caller's workspace (query its size with the matching *_workspace_size function, which reads
// only shapes, dtypes and devices of its arguments).
#pragma once

#include <cstddef>
#include <string>

#include "scattermoe/context.hpp"
#include "scattermoe/plan.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {

// ---------------------------------------------------------------------------------------------
// ParallelLinear: Y = scatter2scatter(x, w, plan, k, bias, grouped_in, grouped_out); with gates
// (scattered output only) the rows of each token are combined: out[t] = sum_j gates[t,j] *
// Y[t*kg + j], kg = gates.size(1). The bias is added before the gate.
struct ParallelLinearArgs {
  TensorView x;      // (T, d_in) when !grouped_in, (L, d_in) when grouped_in
  TensorView w;      // (E, d_in, d_out), any strides
  TensorView bias;   // (E, d_out) or undefined
  TensorView gates;  // (Tg, kg) with Tg*kg = L, any float dtype, or undefined
  int k = 1;         // fan-out of a scattered x
  bool grouped_in = false;
  bool grouped_out = false;
};

// out: (Tg, d_out) with gates; otherwise (L, d_out) in grouped or token-major order.
std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan);
void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Context& ctx = {});

// Gradients; leave a view undefined to skip it. dx has x's shape, dw w's (any strides: pass
// the transposed view of an (E, d_out, d_in) parameter gradient), db bias's, d_gates gates'.
struct ParallelLinearGrads {
  TensorView dx;
  TensorView dw;
  TensorView db;
  TensorView d_gates;
};

// d_out has the forward output's shape. d_gates[t,j] = <Y[t*kg+j], d_out[t]> recomputes Y
// from x (no activation is cached by forward).
std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads);
void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_out, const ParallelLinearGrads& grads,
                              const Context& ctx = {});

// ---------------------------------------------------------------------------------------------
// SMoE MLP: H = x @ W1[e] + b1[e] (grouped order), A = act(H), out[t] = sum_j gates[t,j] *
// (A[i] @ W2[e] + b2[e]). GLU: W1 maps d -> 2h, columns [0, h) are "up", [h, 2h) are "gate",
// A = act(gate) * up.
enum class Activation { kGelu, kGeluTanh, kSilu, kRelu };

// "gelu" (erf form, as torch.nn.GELU()), "gelu_tanh", "silu", "relu".
const char* activation_name(Activation activation);
Activation parse_activation(const std::string& name);

struct MlpArgs {
  TensorView x;      // (T, d)
  TensorView w1;     // (E, d, h), or (E, d, 2h) with glu; any strides
  TensorView b1;     // (E, h | 2h) or undefined
  TensorView w2;     // (E, h, d), any strides
  TensorView b2;     // (E, d) or undefined
  TensorView gates;  // (T, k), any float dtype
  Activation activation = Activation::kSilu;
  bool glu = false;
};

// out: (T, d). hidden: (L, h | 2h), receives the pre-activation H in grouped order; it is all
// that backward needs besides the inputs and the plan.
std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Context& ctx = {});

struct MlpGrads {
  TensorView dx;       // (T, d)
  TensorView dw1;      // w1's shape, any strides
  TensorView db1;      // b1's shape
  TensorView dw2;      // w2's shape, any strides
  TensorView db2;      // b2's shape
  TensorView d_gates;  // gates' shape
};

std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan);
void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Context& ctx = {});

}  // namespace scattermoe
