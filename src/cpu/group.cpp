// group on the CPU: gather rows into grouped order, optionally scaled by a per-row coefficient.
#include "cpu/access.hpp"
#include "cpu/backend.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

void group(const TensorView& a, const RoutingPlan& plan, int fan_out, const TensorView& coeff,
           const TensorView& g) {
  const std::int64_t L = plan.num_rows();
  const std::int64_t d = a.size(1);
  const Matrix in(a);
  const Matrix out(g);
  const Indices sorted_scattered(plan.sorted_scattered_idxs);
  const bool has_coeff = coeff.defined();
  // coeff is (L) or (T, k): either way element p sits at flat offset p of a contiguous-row view.
  const std::int64_t coeff_k = has_coeff && coeff.rank() == 2 ? coeff.size(1) : 1;

  parallel_for(L, d, [&](std::int64_t i) {
    const std::int64_t p = sorted_scattered[i];
    float scale = 1.0f;
    if (has_coeff) {
      scale = coeff.rank() == 2
                  ? load(coeff.data(), coeff.dtype(), (p / coeff_k) * coeff.stride(0) + (p % coeff_k) * coeff.stride(1))
                  : load(coeff.data(), coeff.dtype(), p * coeff.stride(0));
    }
    for (std::int64_t c = 0; c < d; ++c) out.set(i, c, in.get(p / fan_out, c) * scale);
  });
}

}  // namespace scattermoe::cpu
