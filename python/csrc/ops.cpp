// The torch operators of scattermoe: functional wrappers that allocate their outputs and call the
// torch-free library. Every schema is registered once (TORCH_LIBRARY) and served by the same
// kernels on CPU and CUDA: the library picks its backend from the tensors' device.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "scattermoe/modules.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"
#include "tensor_view.hpp"

namespace scattermoe::torch_binding {
namespace {

using OptTensor = c10::optional<at::Tensor>;

RoutingPlan plan_view(const at::Tensor& sorted_expert_idxs, const at::Tensor& sorted_scattered_idxs,
                      const at::Tensor& expert_offsets) {
  RoutingPlan plan;
  plan.sorted_expert_idxs = view("sorted_expert_idxs", sorted_expert_idxs);
  plan.sorted_scattered_idxs = view("sorted_scattered_idxs", sorted_scattered_idxs);
  plan.expert_offsets = view("expert_offsets", expert_offsets);
  return plan;
}

void expect_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "scattermoe.", op, ": ", name, " has shape ", t.sizes(),
                    "; expected ", dim, " dimensions");
}

// Sorted plan of expert_idxs (T, k) (any leading shape is flattened to rows; a 1-D tensor is
// read as k = 1): (sorted_expert_idxs (L), sorted_scattered_idxs (L), expert_offsets (E)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flatten_sort_count(const at::Tensor& expert_idxs,
                                                                  int64_t num_experts) {
  const c10::DeviceGuard guard(expert_idxs.device());
  const at::Tensor idxs =
      expert_idxs.dim() == 1 ? expert_idxs.unsqueeze(1) : expert_idxs.flatten(0, -2);
  const auto options = expert_idxs.options().dtype(at::kLong);
  const int64_t L = idxs.numel();
  at::Tensor sorted_expert_idxs = at::empty({L}, options);
  at::Tensor sorted_scattered_idxs = at::empty({L}, options);
  at::Tensor expert_offsets = at::empty({num_experts}, options);
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  const TensorView idxs_view = view("expert_idxs", idxs);
  call([&] {
    const OwnedContext owned = make_context(
        idxs.device(), routing_plan_workspace_size(idxs.size(0), static_cast<int>(idxs.size(1)),
                                                   static_cast<int>(num_experts),
                                                   idxs_view.device()));
    build_routing_plan(idxs_view, static_cast<int>(num_experts), plan, owned.ctx);
  });
  return {sorted_expert_idxs, sorted_scattered_idxs, expert_offsets};
}

// Y (L, d_out) = X_row @ W[e] + bias[e] per routed row; w is (E, d_in, d_out), any strides.
at::Tensor scatter2scatter(const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& sorted_expert_idxs,
                           const at::Tensor& sorted_scattered_idxs,
                           const at::Tensor& expert_offsets, int64_t k, const OptTensor& bias,
                           bool x_grouped, bool y_grouped) {
  const c10::DeviceGuard guard(x.device());
  expect_dim("scatter2scatter", "w", w, 3);
  at::Tensor y = at::empty({sorted_expert_idxs.size(0), w.size(2)}, x.options());
  Scatter2ScatterArgs args;
  args.x = view("x", x);
  args.w = view("w", w);
  args.bias = view("bias", bias);
  args.k = static_cast<int>(k);
  args.x_grouped = x_grouped;
  args.y_grouped = y_grouped;
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  call([&] {
    const OwnedContext owned =
        make_context(x.device(), scatter2scatter_workspace_size(args, plan));
    scattermoe::scatter2scatter(args, plan, view("y", y), owned.ctx);
  });
  return y;
}

// G[i] = A[p / fan_out] * coeff[p], p = sorted_scattered_idxs[i].
at::Tensor group(const at::Tensor& a, const at::Tensor& sorted_expert_idxs,
                 const at::Tensor& sorted_scattered_idxs, const at::Tensor& expert_offsets,
                 int64_t fan_out, const OptTensor& coeff) {
  const c10::DeviceGuard guard(a.device());
  expect_dim("group", "a", a, 2);
  at::Tensor g = at::empty({sorted_scattered_idxs.size(0), a.size(1)}, a.options());
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  call([&] {
    const OwnedContext owned = make_context(a.device(), 0);
    scattermoe::group(view("a", a), plan, static_cast<int>(fan_out), view("coeff", coeff),
                      view("g", g), owned.ctx);
  });
  return g;
}

// dW[e] = X_e^T @ DY_e (E, d_in, d_out) as the transposed view of an (E, d_out, d_in) tensor
// (the layout of the ParallelExperts weight), db[e] = sum of DY_e rows (E, d_out); db is empty
// (0 elements) when has_bias is false.
std::tuple<at::Tensor, at::Tensor> group_bwd_W(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& sorted_expert_idxs,
                                               const at::Tensor& sorted_scattered_idxs,
                                               const at::Tensor& expert_offsets, bool has_bias) {
  const c10::DeviceGuard guard(dy.device());
  expect_dim("group_bwd_W", "dy", dy, 2);
  expect_dim("group_bwd_W", "x", x, 2);
  const int64_t E = expert_offsets.size(0);
  at::Tensor dw = at::empty({E, dy.size(1), x.size(1)}, dy.options()).transpose(1, 2);
  at::Tensor db = at::empty({has_bias ? E : 0, has_bias ? dy.size(1) : 0}, dy.options());
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  call([&] {
    const OwnedContext owned = make_context(dy.device(), 0);
    group_xty(view("dy", dy), view("x", x), plan, view("dw", dw),
              has_bias ? view("db", db) : TensorView{}, owned.ctx);
  });
  return {dw, db};
}

ParallelLinearArgs linear_args(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
                               const OptTensor& gates, int64_t k, bool grouped_in,
                               bool grouped_out) {
  ParallelLinearArgs args;
  args.x = view("x", x);
  args.w = view("w", w);
  args.bias = view("bias", bias);
  args.gates = view("gates", gates);
  args.k = static_cast<int>(k);
  args.grouped_in = grouped_in;
  args.grouped_out = grouped_out;
  return args;
}

// out = scatter2scatter(x, w, plan, k, bias, grouped_in, grouped_out), combined over each
// token's rows with gates when given: (Tg, d_out) with gates, (L, d_out) without.
at::Tensor parallel_linear_forward(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
                                   const OptTensor& gates, const at::Tensor& sorted_expert_idxs,
                                   const at::Tensor& sorted_scattered_idxs,
                                   const at::Tensor& expert_offsets, int64_t k, bool grouped_in,
                                   bool grouped_out) {
  const c10::DeviceGuard guard(x.device());
  expect_dim("parallel_linear", "w", w, 3);
  if (gates.has_value()) expect_dim("parallel_linear", "gates", *gates, 2);
  const int64_t rows = gates.has_value() ? gates->size(0) : sorted_expert_idxs.size(0);
  at::Tensor out = at::empty({rows, w.size(2)}, x.options());
  const ParallelLinearArgs args = linear_args(x, w, bias, gates, k, grouped_in, grouped_out);
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  call([&] {
    const OwnedContext owned =
        make_context(x.device(), parallel_linear_forward_workspace_size(args, plan));
    scattermoe::parallel_linear_forward(args, plan, view("out", out), owned.ctx);
  });
  return out;
}

// (dx, dw, db, d_gates); output_mask picks which are computed, the others come back empty.
// dw has w's strides (the transposed view of an (E, d_out, d_in) parameter stays one).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parallel_linear_backward(
    const at::Tensor& d_out, const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
    const OptTensor& gates, const at::Tensor& sorted_expert_idxs,
    const at::Tensor& sorted_scattered_idxs, const at::Tensor& expert_offsets, int64_t k,
    bool grouped_in, bool grouped_out, std::array<bool, 4> output_mask) {
  const c10::DeviceGuard guard(x.device());
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : empty(x);
  at::Tensor dw = output_mask[1] ? at::empty_like(w) : empty(w);
  const bool want_db = output_mask[2] && bias.has_value();
  const bool want_d_gates = output_mask[3] && gates.has_value();
  at::Tensor db = want_db ? at::empty_like(*bias) : empty(x);
  at::Tensor d_gates = want_d_gates ? at::empty_like(*gates) : empty(x);
  const ParallelLinearArgs args = linear_args(x, w, bias, gates, k, grouped_in, grouped_out);
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  ParallelLinearGrads grads;
  if (output_mask[0]) grads.dx = view("dx", dx);
  if (output_mask[1]) grads.dw = view("dw", dw);
  if (want_db) grads.db = view("db", db);
  if (want_d_gates) grads.d_gates = view("d_gates", d_gates);
  call([&] {
    const OwnedContext owned =
        make_context(x.device(), parallel_linear_backward_workspace_size(args, plan, grads));
    scattermoe::parallel_linear_backward(args, plan, view("d_out", d_out), grads, owned.ctx);
  });
  return {dx, dw, db, d_gates};
}

Activation activation_of(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK_VALUE(false, "scattermoe.mlp: activation is \"", std::string(name),
                    "\"; expected gelu, gelu_tanh, silu or relu");
}

MlpArgs mlp_args(const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1,
                 const at::Tensor& w2, const OptTensor& b2, const at::Tensor& gates,
                 c10::string_view activation, bool glu) {
  MlpArgs args;
  args.x = view("x", x);
  args.w1 = view("w1", w1);
  args.b1 = view("b1", b1);
  args.w2 = view("w2", w2);
  args.b2 = view("b2", b2);
  args.gates = view("gates", gates);
  args.activation = activation_of(activation);
  args.glu = glu;
  return args;
}

// The SMoE MLP in one call: out (T, d) and the pre-activation hidden H (L, h | 2h) in grouped
// order, which is all backward needs besides the inputs and the plan. w1 (E, d, h | 2h) and
// w2 (E, h, d), any strides (the transposed views of (E, out, in) parameters).
std::tuple<at::Tensor, at::Tensor> mlp_forward(
    const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const at::Tensor& w2,
    const OptTensor& b2, const at::Tensor& gates, const at::Tensor& sorted_expert_idxs,
    const at::Tensor& sorted_scattered_idxs, const at::Tensor& expert_offsets,
    c10::string_view activation, bool glu) {
  const c10::DeviceGuard guard(x.device());
  expect_dim("mlp", "x", x, 2);
  expect_dim("mlp", "w1", w1, 3);
  expect_dim("mlp", "w2", w2, 3);
  at::Tensor out = at::empty({x.size(0), w2.size(2)}, x.options());
  at::Tensor hidden = at::empty({sorted_expert_idxs.size(0), w1.size(2)}, x.options());
  const MlpArgs args = mlp_args(x, w1, b1, w2, b2, gates, activation, glu);
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  call([&] {
    const OwnedContext owned = make_context(x.device(), mlp_forward_workspace_size(args, plan));
    scattermoe::mlp_forward(args, plan, view("out", out), view("hidden", hidden), owned.ctx);
  });
  return {out, hidden};
}

// (dx, dw1, db1, dw2, db2, d_gates); output_mask picks which are computed, the others come back
// empty. dw1 and dw2 have w1's and w2's strides.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_backward(
    const at::Tensor& d_out, const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1,
    const at::Tensor& w2, const OptTensor& b2, const at::Tensor& gates,
    const at::Tensor& sorted_expert_idxs, const at::Tensor& sorted_scattered_idxs,
    const at::Tensor& expert_offsets, const at::Tensor& hidden, c10::string_view activation,
    bool glu, std::array<bool, 6> output_mask) {
  const c10::DeviceGuard guard(x.device());
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  const auto grad_if = [&](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty_like(like) : empty(x);
  };
  at::Tensor dx = grad_if(output_mask[0], x);
  at::Tensor dw1 = grad_if(output_mask[1], w1);
  at::Tensor db1 = grad_if(output_mask[2] && b1.has_value(), b1.has_value() ? *b1 : x);
  at::Tensor dw2 = grad_if(output_mask[3], w2);
  at::Tensor db2 = grad_if(output_mask[4] && b2.has_value(), b2.has_value() ? *b2 : x);
  at::Tensor d_gates = grad_if(output_mask[5], gates);
  const MlpArgs args = mlp_args(x, w1, b1, w2, b2, gates, activation, glu);
  const RoutingPlan plan = plan_view(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets);
  MlpGrads grads;
  if (output_mask[0]) grads.dx = view("dx", dx);
  if (output_mask[1]) grads.dw1 = view("dw1", dw1);
  if (output_mask[2] && b1.has_value()) grads.db1 = view("db1", db1);
  if (output_mask[3]) grads.dw2 = view("dw2", dw2);
  if (output_mask[4] && b2.has_value()) grads.db2 = view("db2", db2);
  if (output_mask[5]) grads.d_gates = view("d_gates", d_gates);
  call([&] {
    const OwnedContext owned = make_context(x.device(), mlp_backward_workspace_size(args, plan));
    scattermoe::mlp_backward(args, plan, view("hidden", hidden), view("d_out", d_out), grads,
                             owned.ctx);
  });
  return {dx, dw1, db1, dw2, db2, d_gates};
}

}  // namespace
}  // namespace scattermoe::torch_binding

TORCH_LIBRARY(scattermoe, m) {
  m.def("flatten_sort_count(Tensor expert_idxs, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scatter2scatter(Tensor x, Tensor w, Tensor sorted_expert_idxs, "
      "Tensor sorted_scattered_idxs, Tensor expert_offsets, int k, Tensor? bias, "
      "bool x_grouped, bool y_grouped) -> Tensor");
  m.def(
      "group(Tensor a, Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, "
      "Tensor expert_offsets, int fan_out, Tensor? coeff) -> Tensor");
  m.def(
      "group_bwd_W(Tensor dy, Tensor x, Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, "
      "Tensor expert_offsets, bool has_bias) -> (Tensor, Tensor)");
  m.def(
      "parallel_linear_forward(Tensor x, Tensor w, Tensor? bias, Tensor? gates, "
      "Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, Tensor expert_offsets, int k, "
      "bool grouped_in, bool grouped_out) -> Tensor");
  m.def(
      "parallel_linear_backward(Tensor d_out, Tensor x, Tensor w, Tensor? bias, Tensor? gates, "
      "Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, Tensor expert_offsets, int k, "
      "bool grouped_in, bool grouped_out, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor gates, "
      "Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, Tensor expert_offsets, "
      "str activation, bool glu) -> (Tensor, Tensor)");
  m.def(
      "mlp_backward(Tensor d_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "Tensor gates, Tensor sorted_expert_idxs, Tensor sorted_scattered_idxs, "
      "Tensor expert_offsets, Tensor hidden, str activation, bool glu, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define SCATTERMOE_REGISTER_KERNELS(m)                                                   \
  do {                                                                                   \
    using namespace scattermoe::torch_binding;                                           \
    m.impl("flatten_sort_count", &flatten_sort_count);                                   \
    m.impl("scatter2scatter", &scatter2scatter);                                         \
    m.impl("group", &group);                                                             \
    m.impl("group_bwd_W", &group_bwd_W);                                                 \
    m.impl("parallel_linear_forward", &parallel_linear_forward);                         \
    m.impl("parallel_linear_backward", &parallel_linear_backward);                       \
    m.impl("mlp_forward", &mlp_forward);                                                 \
    m.impl("mlp_backward", &mlp_backward);                                               \
  } while (0)

TORCH_LIBRARY_IMPL(scattermoe, CPU, m) { SCATTERMOE_REGISTER_KERNELS(m); }

#ifdef SCATTERMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(scattermoe, CUDA, m) { SCATTERMOE_REGISTER_KERNELS(m); }
#endif
