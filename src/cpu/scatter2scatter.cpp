// scatter2scatter on the CPU: one output row per routed row, each element an fp32 dot product.
#include "cpu/access.hpp"
#include "cpu/backend.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

void scatter2scatter(const Scatter2ScatterArgs& args, const RoutingPlan& plan, const TensorView& y) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t d_in = args.w.size(1);
  const std::int64_t d_out = args.w.size(2);
  const Matrix x(args.x);
  const Batched w(args.w);
  const bool has_bias = args.bias.defined();
  const Matrix bias = has_bias ? Matrix(args.bias) : Matrix(y);
  const Matrix out(y);
  const Indices sorted_expert(plan.sorted_expert_idxs);
  const Indices sorted_scattered(plan.sorted_scattered_idxs);

  parallel_for(L, d_in * d_out, [&](std::int64_t i) {
    const std::int64_t p = sorted_scattered[i];
    const std::int64_t e = sorted_expert[i];
    const std::int64_t x_row = args.x_grouped ? i : p / args.k;
    const std::int64_t y_row = args.y_grouped ? i : p;
    for (std::int64_t n = 0; n < d_out; ++n) {
      float acc = 0.0f;
      for (std::int64_t a = 0; a < d_in; ++a) acc += x.get(x_row, a) * w.get(e, a, n);
      if (has_bias) acc += bias.get(e, n);
      out.set(y_row, n, acc);
    }
  });
}

}  // namespace scattermoe::cpu
