// The three primitive operations of ScatterMoE. Shapes use T tokens, k choices per token,
// L = T*k routed rows, E experts. Every function checks its arguments and throws
// InvalidArgument (writing nothing) when they are wrong (on CUDA the contents of a caller-built
// plan are trusted: checking them would need a host round trip); optional arguments are passed as an
// undefined TensorView{}. Float tensors of one call share one dtype (f32, f16 or bf16);
// products accumulate in fp32.
#pragma once

#include <cstddef>

#include "scattermoe/context.hpp"
#include "scattermoe/plan.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {

// Y = per-row X_row @ W[e] (+ bias[e]) for every routed row.
//   x:    (T, d_in) when !x_grouped (row p/k feeds flat position p), (L, d_in) when x_grouped
//   w:    (E, d_in, d_out), any strides: an nn.Linear weight stored (E, d_out, d_in) is passed
//         as its transposed(1, 2) view
//   bias: (E, d_out) or undefined
//   y:    (L, d_out), row i (grouped) when y_grouped, row p (token-major) otherwise
// `k` is the fan-out of a scattered x (ignored when x_grouped).
struct Scatter2ScatterArgs {
  TensorView x;
  TensorView w;
  TensorView bias;
  int k = 1;
  bool x_grouped = false;
  bool y_grouped = false;
};
// Scratch bytes scatter2scatter needs (the device-built tile list on CUDA; 0 on the CPU).
std::size_t scatter2scatter_workspace_size(const Scatter2ScatterArgs& args, const RoutingPlan& plan);
void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y,
                     const Context& ctx = {});

// G[i] = A[p / fan_out] * coeff[p] (coeff optional, flat (L) or (T, k)): gathers rows into
// grouped order. a: (L / fan_out, d); g: (L, d).
void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g, const Context& ctx = {});

// dW[e] = X_e^T @ DY_e and db[e] = sum of DY_e rows over each expert's grouped rows.
//   dy: (L, d_out) grouped; x: (L, d_in) grouped
//   dw: (E, d_in, d_out), any strides (pass the transposed view of an (E, d_out, d_in) weight
//       gradient so it lands in the parameter's layout); db: (E, d_out) or undefined.
// Experts with no rows get zeros.
void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db, const Context& ctx = {});

}  // namespace scattermoe
