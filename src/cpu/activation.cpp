#include "cpu/activation.hpp"

#include "core/activation_math.hpp"
#include "cpu/access.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

void activation_forward(Activation act, bool glu, const TensorView& hidden, const TensorView& a) {
  const std::int64_t L = a.size(0);
  const std::int64_t h = a.size(1);
  const Matrix hid(hidden);
  const Matrix out(a);
  parallel_for(L, h * 8, [&](std::int64_t i) {
    for (std::int64_t c = 0; c < h; ++c) {
      const float value = glu ? activation_at(act, hid.get(i, h + c)).value * hid.get(i, c)
                              : activation_at(act, hid.get(i, c)).value;
      out.set(i, c, value);
    }
  });
}

void activation_backward(Activation act, bool glu, const TensorView& hidden, const TensorView& d_a,
                         const TensorView& d_hidden) {
  const std::int64_t L = d_a.size(0);
  const std::int64_t h = d_a.size(1);
  const Matrix hid(hidden);
  const Matrix da(d_a);
  const Matrix dh(d_hidden);
  parallel_for(L, h * 8, [&](std::int64_t i) {
    for (std::int64_t c = 0; c < h; ++c) {
      const float g = da.get(i, c);
      if (glu) {
        const float up = hid.get(i, c);
        const ActivationAt f = activation_at(act, hid.get(i, h + c));
        dh.set(i, c, g * f.value);
        dh.set(i, h + c, g * up * f.grad);
      } else {
        dh.set(i, c, g * activation_at(act, hid.get(i, c)).grad);
      }
    }
  });
}

}  // namespace scattermoe::cpu
