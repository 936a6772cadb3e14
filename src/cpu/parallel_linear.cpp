// ParallelLinear on the CPU, composed from the primitives exactly as the spec states it.
#include "core/workspace.hpp"
#include "cpu/access.hpp"
#include "cpu/backend.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

namespace {

struct ForwardScratch {
  float* y = nullptr;  // (L, d_out) token-major, before the gate combine
};

ForwardScratch forward_layout(detail::WorkspaceCarver& carver, const ParallelLinearArgs& args,
                              const RoutingPlan& plan) {
  ForwardScratch s;
  if (args.gates.defined()) s.y = carver.take<float>(plan.num_rows() * args.w.size(2));
  return s;
}

struct BackwardScratch {
  float* dy_grouped = nullptr;    // (L, d_out)
  float* x_grouped = nullptr;     // (L, d_in) when the input was scattered
  float* dx_expanded = nullptr;   // (L, d_in) token-major, before the k-sum
  float* y = nullptr;             // (L, d_out) token-major, recomputed for d_gates
};

BackwardScratch backward_layout(detail::WorkspaceCarver& carver, const ParallelLinearArgs& args,
                                const RoutingPlan& plan, const ParallelLinearGrads& grads) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t d_in = args.w.size(1);
  const std::int64_t d_out = args.w.size(2);
  const bool need_weight_grads = grads.dw.defined() || grads.db.defined();
  BackwardScratch s;
  if (grads.dx.defined() || need_weight_grads) s.dy_grouped = carver.take<float>(L * d_out);
  if (grads.dw.defined() && !args.grouped_in) s.x_grouped = carver.take<float>(L * d_in);
  if (grads.dx.defined() && !args.grouped_in) s.dx_expanded = carver.take<float>(L * d_in);
  if (grads.d_gates.defined()) s.y = carver.take<float>(L * d_out);
  return s;
}

// gates (Tg, kg) read at flat position p = t*kg + j.
float gate_at(const TensorView& gates, std::int64_t p) {
  const std::int64_t kg = gates.size(1);
  return load(gates.data(), gates.dtype(), (p / kg) * gates.stride(0) + (p % kg) * gates.stride(1));
}

}  // namespace

std::size_t parallel_linear_forward_workspace_size(const ParallelLinearArgs& args,
                                                   const RoutingPlan& plan) {
  detail::WorkspaceCarver carver;
  forward_layout(carver, args, plan);
  return carver.used();
}

void parallel_linear_forward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                             const TensorView& out, const Workspace& ws) {
  const Scatter2ScatterArgs s2s{args.x, args.w, args.bias, args.k, args.grouped_in, args.grouped_out};
  if (!args.gates.defined()) {
    cpu::scatter2scatter(s2s, plan, out);
    return;
  }
  detail::WorkspaceCarver carver(ws);
  const ForwardScratch scratch = forward_layout(carver, args, plan);
  const std::int64_t L = plan.num_rows();
  const std::int64_t d_out = args.w.size(2);
  const TensorView y = f32_matrix(scratch.y, L, d_out);
  cpu::scatter2scatter(s2s, plan, y);

  // out[t] = sum_j gates[t, j] * Y[t*kg + j]
  const std::int64_t T = args.gates.size(0);
  const std::int64_t kg = args.gates.size(1);
  const Matrix y_m(y);
  const Matrix out_m(out);
  parallel_for(T, kg * d_out, [&](std::int64_t t) {
    for (std::int64_t n = 0; n < d_out; ++n) {
      float acc = 0.0f;
      for (std::int64_t j = 0; j < kg; ++j) acc += gate_at(args.gates, t * kg + j) * y_m.get(t * kg + j, n);
      out_m.set(t, n, acc);
    }
  });
}

std::size_t parallel_linear_backward_workspace_size(const ParallelLinearArgs& args,
                                                    const RoutingPlan& plan,
                                                    const ParallelLinearGrads& grads) {
  detail::WorkspaceCarver carver;
  backward_layout(carver, args, plan, grads);
  return carver.used();
}

void parallel_linear_backward(const ParallelLinearArgs& args, const RoutingPlan& plan,
                              const TensorView& d_output, const ParallelLinearGrads& grads,
                              const Workspace& ws) {
  detail::WorkspaceCarver carver(ws);
  const BackwardScratch scratch = backward_layout(carver, args, plan, grads);
  const std::int64_t L = plan.num_rows();
  const std::int64_t d_in = args.w.size(1);
  const std::int64_t d_out = args.w.size(2);
  const bool gated = args.gates.defined();
  const Matrix dout_m(d_output);
  const Indices sorted_scattered(plan.sorted_scattered_idxs);

  // dY in grouped order: dOut[t] * gates[t, j] with gates, else dOut's own row.
  if (scratch.dy_grouped) {
    const Matrix dy_m(f32_matrix(scratch.dy_grouped, L, d_out));
    const std::int64_t kg = gated ? args.gates.size(1) : 1;
    parallel_for(L, d_out, [&](std::int64_t i) {
      const std::int64_t p = sorted_scattered[i];
      const float scale = gated ? gate_at(args.gates, p) : 1.0f;
      const std::int64_t row = gated ? p / kg : (args.grouped_out ? i : p);
      for (std::int64_t n = 0; n < d_out; ++n) dy_m.set(i, n, dout_m.get(row, n) * scale);
    });
  }
  const TensorView dy_grouped = f32_matrix(scratch.dy_grouped, L, d_out);

  if (grads.dw.defined() || grads.db.defined()) {
    TensorView x_grouped = args.x;
    if (grads.dw.defined() && !args.grouped_in) {
      x_grouped = f32_matrix(scratch.x_grouped, L, d_in);
      cpu::group(args.x, plan, args.k, TensorView{}, x_grouped);
    }
    cpu::group_xty(dy_grouped, x_grouped, plan, grads.dw, grads.db);
  }

  if (grads.dx.defined()) {
    const TensorView w_t = args.w.transposed(1, 2);  // (E, d_out, d_in)
    if (args.grouped_in) {
      cpu::scatter2scatter({dy_grouped, w_t, TensorView{}, 1, true, true}, plan, grads.dx);
    } else {
      const TensorView dx_expanded = f32_matrix(scratch.dx_expanded, L, d_in);
      cpu::scatter2scatter({dy_grouped, w_t, TensorView{}, 1, true, false}, plan, dx_expanded);
      const Matrix dxe(dx_expanded);
      const Matrix dx(grads.dx);
      const std::int64_t T = args.x.size(0);
      const std::int64_t k = args.k;
      parallel_for(T, k * d_in, [&](std::int64_t t) {
        for (std::int64_t c = 0; c < d_in; ++c) {
          float acc = 0.0f;
          for (std::int64_t j = 0; j < k; ++j) acc += dxe.get(t * k + j, c);
          dx.set(t, c, acc);
        }
      });
    }
  }

  if (grads.d_gates.defined()) {
    // d_gates[t, j] = <Y[t*kg + j], dOut[t]>, with Y recomputed (bias included).
    const TensorView y = f32_matrix(scratch.y, L, d_out);
    cpu::scatter2scatter({args.x, args.w, args.bias, args.k, args.grouped_in, false}, plan, y);
    const Matrix y_m(y);
    const Matrix dg(grads.d_gates);
    const std::int64_t T = args.gates.size(0);
    const std::int64_t kg = args.gates.size(1);
    parallel_for(T, kg * d_out, [&](std::int64_t t) {
      for (std::int64_t j = 0; j < kg; ++j) {
        float acc = 0.0f;
        for (std::int64_t n = 0; n < d_out; ++n) acc += y_m.get(t * kg + j, n) * dout_m.get(t, n);
        dg.set(t, j, acc);
      }
    });
  }
}

}  // namespace scattermoe::cpu
