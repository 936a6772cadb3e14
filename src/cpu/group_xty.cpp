// group_xty on the CPU: per-expert X^T @ DY over that expert's grouped rows, in row order.
#include "cpu/access.hpp"
#include "cpu/backend.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

void group_xty(const TensorView& dy, const TensorView& x, const RoutingPlan& plan,
               const TensorView& dw, const TensorView& db) {
  const std::int64_t E = plan.num_experts();
  const std::int64_t d_in = x.size(1);
  const std::int64_t d_out = dy.size(1);
  const Matrix dy_m(dy);
  const Matrix x_m(x);
  const Indices offsets(plan.expert_offsets);
  const std::int64_t L = plan.num_rows();

  // One task per (expert, input feature): a row of dW[e]. (dw may be undefined when a caller
  // inside the backend wants db alone.)
  if (dw.defined()) {
  const Batched dw_m(dw);
  parallel_for(E * d_in, (L / (E > 0 ? E : 1) + 1) * d_out, [&](std::int64_t task) {
    const std::int64_t e = task / d_in;
    const std::int64_t a = task % d_in;
    const std::int64_t begin = e == 0 ? 0 : offsets[e - 1];
    const std::int64_t end = offsets[e];
    for (std::int64_t b = 0; b < d_out; ++b) {
      float acc = 0.0f;
      for (std::int64_t i = begin; i < end; ++i) acc += x_m.get(i, a) * dy_m.get(i, b);
      dw_m.set(e, a, b, acc);
    }
  });
  }

  if (db.defined()) {
    const Matrix db_m(db);
    for (std::int64_t e = 0; e < E; ++e) {
      const std::int64_t begin = e == 0 ? 0 : offsets[e - 1];
      const std::int64_t end = offsets[e];
      for (std::int64_t b = 0; b < d_out; ++b) {
        float acc = 0.0f;
        for (std::int64_t i = begin; i < end; ++i) acc += dy_m.get(i, b);
        db_m.set(e, b, acc);
      }
    }
  }
}

}  // namespace scattermoe::cpu
