// The CUDA backend's ops and modules, composed from the grouped GEMMs and the memory-bound
// kernels. Every temporary comes from the caller's workspace.
#include <algorithm>
#include <string>

#include "core/checks.hpp"
#include "core/workspace.hpp"
#include "cuda/backend.hpp"
#include "cuda/gemm.hpp"
#include "cuda/kernels.hpp"

namespace scattermoe::cuda {

namespace {

cudaStream_t stream_of(const Context& ctx) { return reinterpret_cast<cudaStream_t>(ctx.stream); }

// ---- what only the CUDA kernels require -----------------------------------------------------
void expect_rows_contiguous(const char* op, const char* name, const TensorView& v) {
  if (v.defined() && v.numel() > 0 && ((v.size(1) > 1 && v.stride(1) != 1) || v.stride(0) < 0)) {
    detail::fail(op, name, v.describe(),
                 "unit stride along dim 1 and a non-negative row stride on CUDA");
  }
}

void expect_unit_inner(const char* op, const char* name, const TensorView& v) {
  if (v.defined() && v.numel() > 0 && v.stride(1) != 1 && v.stride(2) != 1) {
    detail::fail(op, name, v.describe(), "unit stride along dim 1 or dim 2 on CUDA");
  }
}

// Kernels run on the current device: the tensors must live there.
void expect_current_device(const char* op, Device device) {
  int current = 0;
  check_cuda(cudaGetDevice(&current), op);
  if (current != device.index) {
    detail::fail(op, "tensors", "on " + device_name(device),
                 "tensors on the current CUDA device, cuda:" + std::to_string(current) +
                     " (select it with cudaSetDevice)");
  }
}

// Every CUDA entry point starts here: the device, the plan's layout and the launch limits.
void expect_plan_contiguous(const char* op, const RoutingPlan& plan) {
  expect_current_device(op, plan.sorted_expert_idxs.device());
  if (plan.num_rows() >= (std::int64_t{1} << 31)) {
    detail::fail(op, "plan", std::to_string(plan.num_rows()) + " routed rows", "fewer than 2^31 on CUDA");
  }
  if (plan.num_experts() > 65535) {
    detail::fail(op, "plan", std::to_string(plan.num_experts()) + " experts",
                 "at most 65535 on CUDA (a launch-grid dimension)");
  }
  const TensorView* views[] = {&plan.sorted_expert_idxs, &plan.sorted_scattered_idxs,
                               &plan.expert_offsets};
  for (const TensorView* v : views) {
    if (v->size(0) > 1 && v->stride(0) != 1) {
      detail::fail(op, "plan", v->describe(), "contiguous index vectors on CUDA");
    }
  }
}

// The varlen-M GEMM's device-built tile list.
void* take_tile_list(detail::WorkspaceCarver& carver, const RoutingPlan& plan) {
  const std::size_t bytes = varlen_m_gemm_workspace_size(static_cast<int>(plan.num_experts()));
  return carver.take<unsigned char>(static_cast<std::int64_t>(bytes));
}

std::int64_t* index_ptr(const TensorView& v) { return static_cast<std::int64_t*>(v.data()); }

RowSource rows_of(const TensorView& v, const std::int64_t* index = nullptr, std::int64_t divisor = 1) {
  return RowSource{v.data(), v.stride(0), index, divisor};
}

std::size_t elem(const TensorView& v) { return dtype_size(v.dtype()); }

// C = per-expert grouped product through the varlen-M GEMM.
struct Linear {
  RowSource a;
  TensorView w;             // (E, K, N) view
  TensorView bias;          // (E, N) or undefined
  void* c = nullptr;
  std::int64_t ldc = 0;
  const std::int64_t* c_index = nullptr;
  void* glu_a = nullptr;  // also A = silu(gate) * first (VarlenMGemm::glu_a)
  std::int64_t glu_lda = 0;
  const MlpBackwardRows* rows_after = nullptr;  // the row pass after it (VarlenMGemm::rows_after)
};

void run_linear(const Linear& l, const RoutingPlan& plan, void* tile_workspace, cudaStream_t stream) {
  VarlenMGemm g;
  g.a = l.a;
  g.b = l.w.data();
  g.b_expert_stride = l.w.stride(0);
  g.b_stride_k = l.w.stride(1);
  g.b_stride_n = l.w.stride(2);
  if (l.bias.defined()) {
    g.bias = l.bias.data();
    g.bias_expert_stride = l.bias.stride(0);
    g.bias_stride_n = l.bias.stride(1);
  }
  g.c = l.c;
  g.ldc = l.ldc;
  g.c_index = l.c_index;
  g.glu_a = l.glu_a;
  g.glu_lda = l.glu_lda;
  g.rows_after = l.rows_after;
  g.rows = plan.num_rows();
  g.n = l.w.size(2);
  g.k = l.w.size(1);
  g.expert_offsets = index_ptr(plan.expert_offsets);
  g.num_experts = static_cast<int>(plan.num_experts());
  run_varlen_m_gemm(l.w.dtype(), g, tile_workspace, stream);
}

// The rows a layer sums over each token's k choices (the second projection's output, dX): the
// GEMM writes them in the grouped order (c_index null) and the aggregation gathers each token's
// rows through the inverse routing order, which aggregation_rows computes into row_of (L
// entries); with SCATTERMOE_GROUPED_AGGREGATION=0 they go to their token-major positions (ss)
// and the aggregation reads them in place (null).
const std::int64_t* aggregated_c_index(const std::int64_t* ss) { return grouped_aggregation() ? nullptr : ss; }
const std::int64_t* aggregation_rows(const std::int64_t* ss, std::int64_t rows, std::int64_t* row_of,
                                     cudaStream_t stream) {
  if (!grouped_aggregation()) return nullptr;
  invert_rows(ss, rows, row_of, stream);
  return row_of;
}

// dW[e] = X_e^T dY_e into any (E, d_in, d_out) view with a unit inner stride; db = column sums.
void weight_grads(DType dtype, RowSource x_rows, std::int64_t d_in, RowSource dy_rows,
                  std::int64_t d_out, const RoutingPlan& plan, const TensorView& dw,
                  const TensorView& db, cudaStream_t stream) {
  const std::int64_t* offsets = index_ptr(plan.expert_offsets);
  const int E = static_cast<int>(plan.num_experts());
  if (dw.defined()) {
    VarlenKGemm g;
    g.c = dw.data();
    g.c_expert_stride = dw.stride(0);
    g.expert_offsets = offsets;
    g.num_experts = E;
    if (dw.stride(2) == 1 || d_out == 1) {  // dW[e] row-major (d_in x d_out)
      g.a = x_rows;
      g.b = dy_rows;
      g.ldc = dw.stride(1);
      g.m = d_in;
      g.n = d_out;
    } else {  // the parameter is stored (E, d_out, d_in): compute dW[e]^T row-major
      g.a = dy_rows;
      g.b = x_rows;
      g.ldc = dw.stride(2);
      g.m = d_out;
      g.n = d_in;
    }
    run_varlen_k_gemm(dtype, g, stream);
  }
  if (db.defined()) {
    expert_column_sums(dtype, dy_rows, offsets, E, d_out, db.data(), db.stride(0), db.stride(1), stream);
  }
}

}  // namespace

// ---- routing plan -----------------------------------------------------------------------------

std::size_t routing_plan_workspace_size(std::int64_t num_tokens, int k, int num_experts) {
  return plan_workspace_size(num_tokens * k, num_experts);
}

void build_routing_plan(const TensorView& expert_idxs, int num_experts, const RoutingPlan& plan,
                        const Context& ctx) {
  constexpr const char* op = "build_routing_plan";
  expect_plan_contiguous(op, plan);
  build_plan(expert_idxs, num_experts, index_ptr(plan.sorted_expert_idxs),
             index_ptr(plan.sorted_scattered_idxs), index_ptr(plan.expert_offsets),
             plan.expert_offsets.stride(0), ctx.workspace.data, ctx.workspace.bytes, stream_of(ctx));
}

// ---- primitives -------------------------------------------------------------------------------

std::size_t scatter2scatter_workspace_size(const Scatter2ScatterArgs&, const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  take_tile_list(carver, plan);
  return carver.used();
}

void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y,
                     const Context& ctx) {
  constexpr const char* op = "scatter2scatter";
  expect_plan_contiguous(op, plan);
  expect_rows_contiguous(op, "x", args.x);
  expect_rows_contiguous(op, "y", y);
  expect_unit_inner(op, "w", args.w);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  Linear l;
  l.a = rows_of(args.x, args.x_grouped ? nullptr : ss, args.x_grouped ? 1 : args.k);
  l.w = args.w;
  l.bias = args.bias;
  l.c = y.data();
  l.ldc = y.stride(0);
  l.c_index = args.y_grouped ? nullptr : ss;
  run_linear(l, plan, ctx.workspace.data, stream_of(ctx));
}

void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g, const Context& ctx) {
  constexpr const char* op = "group";
  expect_plan_contiguous(op, plan);
  expect_rows_contiguous(op, "a", a);
  expect_rows_contiguous(op, "g", g);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  const FlatFloats c = coeff.defined() ? flat_floats(coeff) : FlatFloats{};
  gather_rows(a.dtype(), rows_of(a, ss, fan_out), g.data(), g.stride(0), plan.num_rows(), a.size(1),
              coeff.defined() ? &c : nullptr, ss, stream_of(ctx));
}

void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db, const Context& ctx) {
  constexpr const char* op = "group_xty";
  expect_plan_contiguous(op, plan);
  expect_rows_contiguous(op, "dy", dy);
  expect_rows_contiguous(op, "x", x);
  expect_unit_inner(op, "dw", dw);
  weight_grads(dy.dtype(), rows_of(x), x.size(1), rows_of(dy), dy.size(1), plan, dw, db, stream_of(ctx));
}

// ---- ParallelLinear -------------------------------------------------------------------------------

namespace {

struct LinearForwardScratch {
  void* tiles = nullptr;
  void* y = nullptr;  // (L, d_out) grouped (grouped_aggregation) or token-major, before the gate combine
  std::int64_t* row_of = nullptr;  // (L) each routed row's grouped row (grouped_aggregation)
};

LinearForwardScratch linear_forward_layout(detail::WorkspaceCarver& carver, const ParallelLinearArgs& args,
                                           const RoutingPlan& plan) {
  LinearForwardScratch s;
  s.tiles = take_tile_list(carver, plan);
  if (args.gates.defined()) {
    s.y = carver.take<unsigned char>(plan.num_rows() * args.w.size(2) * static_cast<std::int64_t>(elem(args.x)));
    s.row_of = carver.take<std::int64_t>(plan.num_rows());
  }
  return s;
}

struct LinearBackwardScratch {
  void* tiles = nullptr;
  void* dy_grouped = nullptr;   // (L, d_out) gated dOut rows in grouped order
  void* dx_expanded = nullptr;  // (L, d_in) grouped (grouped_aggregation) or token-major, before the k-sum
  std::int64_t* row_of = nullptr;  // (L) with dx_expanded: each routed row's grouped row
  void* y = nullptr;            // (L, d_out) recomputed for d_gates
};

LinearBackwardScratch linear_backward_layout(detail::WorkspaceCarver& carver, const ParallelLinearArgs& args,
                                             const RoutingPlan& plan, const ParallelLinearGrads& grads) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t bytes = static_cast<std::int64_t>(elem(args.x));
  LinearBackwardScratch s;
  s.tiles = take_tile_list(carver, plan);
  const bool need_dy = grads.dx.defined() || grads.dw.defined() || grads.db.defined();
  if (need_dy && args.gates.defined()) s.dy_grouped = carver.take<unsigned char>(L * args.w.size(2) * bytes);
  if (grads.dx.defined() && !args.grouped_in && args.k > 1) {
    s.dx_expanded = carver.take<unsigned char>(L * args.w.size(1) * bytes);
    s.row_of = carver.take<std::int64_t>(L);
  }
  if (grads.d_gates.defined()) s.y = carver.take<unsigned char>(L * args.w.size(2) * bytes);
  return s;
}

void expect_linear_layouts(const char* op, const ParallelLinearArgs& args, const RoutingPlan& plan) {
  expect_plan_contiguous(op, plan);
  expect_rows_contiguous(op, "x", args.x);
  expect_unit_inner(op, "w", args.w);
}

}  // namespace

std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  linear_forward_layout(carver, args, plan);
  return carver.used();
}

void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Context& ctx) {
  constexpr const char* op = "parallel_linear_forward";
  expect_linear_layouts(op, args, plan);
  expect_rows_contiguous(op, "out", out);
  detail::WorkspaceCarver carver(ctx.workspace);
  const LinearForwardScratch s = linear_forward_layout(carver, args, plan);
  const cudaStream_t stream = stream_of(ctx);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  const std::int64_t d_out = args.w.size(2);
  Linear l;
  l.a = rows_of(args.x, args.grouped_in ? nullptr : ss, args.grouped_in ? 1 : args.k);
  l.w = args.w;
  l.bias = args.bias;
  if (!args.gates.defined()) {
    l.c = out.data();
    l.ldc = out.stride(0);
    l.c_index = args.grouped_out ? nullptr : ss;
    run_linear(l, plan, s.tiles, stream);
    return;
  }
  l.c = s.y;
  l.ldc = d_out;
  l.c_index = aggregated_c_index(ss);
  run_linear(l, plan, s.tiles, stream);
  gate_combine(args.x.dtype(), s.y, d_out, flat_floats(args.gates), args.gates.size(0), out.data(),
               out.stride(0), d_out, stream, aggregation_rows(ss, plan.num_rows(), s.row_of, stream));
}

std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads) {
  detail::WorkspaceCarver carver;
  linear_backward_layout(carver, args, plan, grads);
  return carver.used();
}

void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_output, const ParallelLinearGrads& grads,
                              const Context& ctx) {
  constexpr const char* op = "parallel_linear_backward";
  expect_linear_layouts(op, args, plan);
  expect_rows_contiguous(op, "d_out", d_output);
  expect_rows_contiguous(op, "grads.dx", grads.dx);
  expect_unit_inner(op, "grads.dw", grads.dw);
  detail::WorkspaceCarver carver(ctx.workspace);
  const LinearBackwardScratch s = linear_backward_layout(carver, args, plan, grads);
  const cudaStream_t stream = stream_of(ctx);
  const DType dtype = args.x.dtype();
  const std::int64_t L = plan.num_rows();
  const std::int64_t d_in = args.w.size(1);
  const std::int64_t d_out = args.w.size(2);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  const bool gated = args.gates.defined();
  const std::int64_t kg = gated ? args.gates.size(1) : 1;

  // dY rows in grouped order: gathered straight from d_out unless the gates scale them.
  RowSource dy = rows_of(d_output, args.grouped_out ? nullptr : ss, 1);
  if (s.dy_grouped) {
    const FlatFloats g = flat_floats(args.gates);
    gather_rows(dtype, rows_of(d_output, ss, kg), s.dy_grouped, d_out, L, d_out, &g, ss, stream);
    dy = RowSource{s.dy_grouped, d_out, nullptr, 1};
  }
  const RowSource x_rows = rows_of(args.x, args.grouped_in ? nullptr : ss, args.grouped_in ? 1 : args.k);
  weight_grads(dtype, x_rows, d_in, dy, d_out, plan, grads.dw, grads.db, stream);

  if (grads.dx.defined()) {
    Linear l;
    l.a = dy;
    l.w = args.w.transposed(1, 2);  // (E, d_out, d_in)
    if (args.grouped_in) {
      l.c = grads.dx.data();
      l.ldc = grads.dx.stride(0);
    } else if (args.k == 1) {
      l.c = grads.dx.data();
      l.ldc = grads.dx.stride(0);
      l.c_index = ss;
    } else {
      l.c = s.dx_expanded;
      l.ldc = d_in;
      l.c_index = aggregated_c_index(ss);
    }
    run_linear(l, plan, s.tiles, stream);
    if (s.dx_expanded) {
      sum_k_rows(dtype, s.dx_expanded, d_in, args.k, args.x.size(0), grads.dx.data(), grads.dx.stride(0), d_in,
                 stream, aggregation_rows(ss, L, s.row_of, stream));
    }
  }

  if (grads.d_gates.defined()) {
    // d_gates[t, j] = <Y[t*kg + j], dOut[t]> with Y recomputed token-major (bias included).
    Linear l;
    l.a = x_rows;
    l.w = args.w;
    l.bias = args.bias;
    l.c = s.y;
    l.ldc = d_out;
    l.c_index = ss;
    run_linear(l, plan, s.tiles, stream);
    RowDot r;
    r.a = RowSource{s.y, d_out, nullptr, 1};
    r.b = RowSource{d_output.data(), d_output.stride(0), nullptr, kg};
    r.out = flat_floats(grads.d_gates);
    r.rows = L;
    r.cols = d_out;
    row_dot(dtype, r, stream);
  }
}

// ---- MLP ----------------------------------------------------------------------------------------

namespace {

struct MlpForwardScratch {
  void* tiles = nullptr;
  void* a = nullptr;  // (L, h) activation output, grouped
  void* y = nullptr;  // (L, d) second projection, grouped (grouped_aggregation) or token-major
  std::int64_t* row_of = nullptr;  // (L) each routed row's grouped row (grouped_aggregation)
};

MlpForwardScratch mlp_forward_layout(detail::WorkspaceCarver& carver, const MlpArgs& args,
                                     const RoutingPlan& plan) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t bytes = static_cast<std::int64_t>(elem(args.x));
  MlpForwardScratch s;
  s.tiles = take_tile_list(carver, plan);
  s.a = carver.take<unsigned char>(L * args.w2.size(1) * bytes);
  s.y = carver.take<unsigned char>(L * args.x.size(1) * bytes);
  s.row_of = carver.take<std::int64_t>(L);
  return s;
}

// The backward's scratch in two regions whose contents change as the pass goes on (one stream,
// so each buffer is dead before the next one is written over it):
//   P (L x h1): with b2, A = act(H) (L x h, compact) until dW2 is done; then dH.
//   Q: dA' (L x h), and the gated dOut rows (L x d) behind it when db2 needs them, until dH is
//      computed (without b2, g * A over dA' until dW2 is done); then the dX rows (L x d) before
//      the k-sum.
struct MlpBackwardScratch {
  void* tiles = nullptr;
  void* a = nullptr;            // (L, h) recomputed activation (region P)
  void* d_hidden = nullptr;     // (L, h | 2h) (region P, after A)
  void* d_a = nullptr;          // (L, h) dOut @ W2^T before gating (region Q)
  void* dy_grouped = nullptr;   // (L, d) gated dOut rows, grouped; only with b2 (region Q)
  void* dx_expanded = nullptr;  // (L, d) grouped or token-major (as in the forward), before the
                                // k-sum; only for k > 1 (region Q)
  std::int64_t* row_of = nullptr;  // (L) with dx_expanded: each routed row's grouped row
  float* d_gates_partial = nullptr;  // (L, h / 256) d_gates shares of the fused row pass; no b2
};

MlpBackwardScratch mlp_backward_layout(detail::WorkspaceCarver& carver, const MlpArgs& args,
                                       const RoutingPlan& plan) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t bytes = static_cast<std::int64_t>(elem(args.x));
  const std::int64_t d = args.x.size(1);
  const std::int64_t h = args.w2.size(1);
  const bool k_sum = args.gates.size(1) > 1;
  MlpBackwardScratch s;
  s.tiles = take_tile_list(carver, plan);
  unsigned char* p = carver.take<unsigned char>(L * args.w1.size(2) * bytes);
  const std::int64_t q_first = L * (h + (args.b2.defined() ? d : 0));
  unsigned char* q = carver.take<unsigned char>(std::max(q_first, k_sum ? L * d : 0) * bytes);
  s.a = p;
  s.d_hidden = p;
  s.d_a = q;
  if (args.b2.defined() && q != nullptr) s.dy_grouped = q + L * h * bytes;
  if (k_sum) {
    s.dx_expanded = q;
    s.row_of = carver.take<std::int64_t>(L);
  }
  if (!args.b2.defined()) s.d_gates_partial = carver.take<float>(L * ceil_div(h, kGluBackwardTileColumns));
  return s;
}

void expect_mlp_layouts(const char* op, const MlpArgs& args, const RoutingPlan& plan) {
  expect_plan_contiguous(op, plan);
  expect_rows_contiguous(op, "x", args.x);
  expect_unit_inner(op, "w1", args.w1);
  expect_unit_inner(op, "w2", args.w2);
}

// Whether the backward needs dH: for dX or the first layer's weight or bias gradient.
bool wants_first_layer(const MlpGrads& grads) {
  return grads.dx.defined() || grads.dw1.defined() || grads.db1.defined();
}

// dW1, db1 and dX from dH (region P); the dX rows go through region Q when k > 1.
void mlp_backward_first_layer(const MlpArgs& args, const RoutingPlan& plan, const MlpGrads& grads,
                              const MlpBackwardScratch& s, cudaStream_t stream) {
  if (!wants_first_layer(grads)) return;
  const DType dtype = args.x.dtype();
  const std::int64_t d = args.x.size(1);
  const std::int64_t h1 = args.w1.size(2);
  const std::int64_t k = args.gates.size(1);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  const RowSource dh_rows{s.d_hidden, h1, nullptr, 1};
  weight_grads(dtype, rows_of(args.x, ss, k), d, dh_rows, h1, plan, grads.dw1, grads.db1, stream);

  if (grads.dx.defined()) {
    Linear back1;
    back1.a = dh_rows;
    back1.w = args.w1.transposed(1, 2);
    if (k == 1) {
      back1.c = grads.dx.data();
      back1.ldc = grads.dx.stride(0);
      back1.c_index = ss;
    } else {
      back1.c = s.dx_expanded;
      back1.ldc = d;
      back1.c_index = aggregated_c_index(ss);
    }
    run_linear(back1, plan, s.tiles, stream);
    if (k > 1) {
      sum_k_rows(dtype, s.dx_expanded, d, k, args.x.size(0), grads.dx.data(), grads.dx.stride(0), d, stream,
                 aggregation_rows(ss, plan.num_rows(), s.row_of, stream));
    }
  }
}

}  // namespace

std::size_t mlp_forward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  mlp_forward_layout(carver, args, plan);
  return carver.used();
}

void mlp_forward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& out,
                 const TensorView& hidden, const Context& ctx) {
  constexpr const char* op = "mlp_forward";
  expect_mlp_layouts(op, args, plan);
  expect_rows_contiguous(op, "out", out);
  expect_rows_contiguous(op, "hidden", hidden);
  detail::WorkspaceCarver carver(ctx.workspace);
  const MlpForwardScratch s = mlp_forward_layout(carver, args, plan);
  const cudaStream_t stream = stream_of(ctx);
  const DType dtype = args.x.dtype();
  const std::int64_t L = plan.num_rows();
  const std::int64_t d = args.x.size(1);
  const std::int64_t h = args.w2.size(1);
  const std::int64_t k = args.gates.size(1);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);

  Linear first;
  first.a = rows_of(args.x, ss, k);
  first.w = args.w1;
  first.bias = args.b1;
  first.c = hidden.data();
  first.ldc = hidden.stride(0);
  // SwiGLU: the GEMM writes A as well (in its epilogue where the kernel can).
  const bool swiglu = args.glu && args.activation == Activation::kSilu;
  if (swiglu) {
    first.glu_a = s.a;
    first.glu_lda = h;
  }
  run_linear(first, plan, s.tiles, stream);
  if (!swiglu) {
    activation_forward(dtype, args.activation, args.glu, hidden.data(), hidden.stride(0), L, h, s.a, h, stream);
  }
  Linear second;
  second.a = RowSource{s.a, h, nullptr, 1};
  second.w = args.w2;
  second.bias = args.b2;
  second.c = s.y;
  second.ldc = d;
  second.c_index = aggregated_c_index(ss);
  run_linear(second, plan, s.tiles, stream);
  gate_combine(dtype, s.y, d, flat_floats(args.gates), args.x.size(0), out.data(), out.stride(0), d, stream,
               aggregation_rows(ss, L, s.row_of, stream));
}

std::size_t mlp_backward_workspace_size(const MlpArgs& args, const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  mlp_backward_layout(carver, args, plan);
  return carver.used();
}

void mlp_backward(const MlpArgs& args, const RoutingPlan& plan, const TensorView& hidden,
                  const TensorView& d_out, const MlpGrads& grads, const Context& ctx) {
  constexpr const char* op = "mlp_backward";
  expect_mlp_layouts(op, args, plan);
  expect_rows_contiguous(op, "hidden", hidden);
  expect_rows_contiguous(op, "d_out", d_out);
  expect_rows_contiguous(op, "grads.dx", grads.dx);
  expect_unit_inner(op, "grads.dw1", grads.dw1);
  expect_unit_inner(op, "grads.dw2", grads.dw2);
  detail::WorkspaceCarver carver(ctx.workspace);
  const MlpBackwardScratch s = mlp_backward_layout(carver, args, plan);
  const cudaStream_t stream = stream_of(ctx);
  const DType dtype = args.x.dtype();
  const std::int64_t L = plan.num_rows();
  const std::int64_t d = args.x.size(1);
  const std::int64_t h = args.w2.size(1);
  const std::int64_t h1 = args.w1.size(2);
  const std::int64_t k = args.gates.size(1);
  const std::int64_t* ss = index_ptr(plan.sorted_scattered_idxs);
  const FlatFloats gates = flat_floats(args.gates);

  // dA' = dOut[t] @ W2[e]^T (ungated), read straight from d_out.
  Linear back2;
  back2.a = rows_of(d_out, ss, k);
  back2.w = args.w2.transposed(1, 2);
  back2.c = s.d_a;
  back2.ldc = h;

  if (!args.b2.defined()) {
    // One pass over the rows computes A = act(H), d_gates = <dA', A>, dH (region P) and g * A
    // over dA' (region Q): in the dA' GEMM's epilogue where it can (SwiGLU on the Hopper path),
    // else after it.
    MlpBackwardRows r;
    r.act = args.activation;
    r.glu = args.glu;
    r.hidden = hidden.data();
    r.ld_hidden = hidden.stride(0);
    r.d_a = s.d_a;
    r.ld_d_a = h;
    r.gates = gates;
    r.gate_index = ss;
    if (wants_first_layer(grads)) {
      r.d_hidden = s.d_hidden;
      r.ld_d_hidden = h1;
    }
    r.scale_a_in_place = grads.dw2.defined();
    if (grads.d_gates.defined()) {
      r.d_gates = flat_floats(grads.d_gates);
      r.has_d_gates = true;
    }
    r.rows = L;
    r.h = h;
    r.d_gates_partial = s.d_gates_partial;
    back2.rows_after = &r;
    run_linear(back2, plan, s.tiles, stream);
    if (grads.dw2.defined()) {
      weight_grads(dtype, RowSource{s.d_a, h, nullptr, 1}, h, rows_of(d_out, ss, k), d, plan, grads.dw2,
                   TensorView{}, stream);
    }
    mlp_backward_first_layer(args, plan, grads, s, stream);
    return;
  }

  run_linear(back2, plan, s.tiles, stream);

  // With b2: A = act(H), recomputed from the saved pre-activation (region P).
  activation_forward(dtype, args.activation, args.glu, hidden.data(), hidden.stride(0), L, h, s.a, h, stream);
  const RowSource a_rows{s.a, h, nullptr, 1};

  // d_gates[t, j] = <dA'[i], A[i]> + <dOut[t], b2[e]>, written at flat position p = ss[i].
  if (grads.d_gates.defined()) {
    RowDot r;
    r.a = RowSource{s.d_a, h, nullptr, 1};
    r.b = a_rows;
    r.out = flat_floats(grads.d_gates);
    r.out_index = ss;
    r.rows = L;
    r.cols = h;
    r.c = rows_of(d_out, ss, k);  // the bias term: <dOut[t], b2[e]> over d columns
    r.bias = args.b2.data();
    r.bias_expert_stride = args.b2.stride(0);
    r.bias_stride = args.b2.stride(1);
    r.bias_cols = d;
    r.expert = index_ptr(plan.sorted_expert_idxs);
    row_dot(dtype, r, stream);
  }

  // dW2 = sum over rows of A^T (g dOut[t]). db2 sums the gated rows, so with db2 they are
  // gathered once; otherwise the gate scales A in place (A is not read again) and dOut rows are
  // gathered by the GEMM itself.
  if (grads.db2.defined()) {
    gather_rows(dtype, rows_of(d_out, ss, k), s.dy_grouped, d, L, d, &gates, ss, stream);
    weight_grads(dtype, a_rows, h, RowSource{s.dy_grouped, d, nullptr, 1}, d, plan, grads.dw2,
                 grads.db2, stream);
  } else if (grads.dw2.defined()) {
    gather_rows(dtype, a_rows, s.a, h, L, h, &gates, ss, stream);
    weight_grads(dtype, a_rows, h, rows_of(d_out, ss, k), d, plan, grads.dw2, TensorView{}, stream);
  }
  if (!wants_first_layer(grads)) return;

  // dH = act'(H) * (g * dA')
  activation_backward(dtype, args.activation, args.glu, hidden.data(), hidden.stride(0), s.d_a, h,
                      &gates, ss, L, h, s.d_hidden, h1, stream);
  mlp_backward_first_layer(args, plan, grads, s, stream);
}

// ---- devices ------------------------------------------------------------------------------------

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

CudaDevice device_properties(int index) {
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, index), "device properties");
  CudaDevice d;
  d.index = index;
  for (std::size_t i = 0; i + 1 < sizeof(d.name) && prop.name[i]; ++i) d.name[i] = prop.name[i];
  d.major = prop.major;
  d.minor = prop.minor;
  d.multiprocessors = prop.multiProcessorCount;
  d.memory_bytes = prop.totalGlobalMem;
  return d;
}

}  // namespace scattermoe::cuda
