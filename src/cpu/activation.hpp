// The (GLU) activation of a grouped hidden and its backward (the activations themselves:
// core/activation_math.hpp).
#pragma once

#include "scattermoe/modules.hpp"

namespace scattermoe::cpu {

// A (L, h) = act(H) for H (L, h), or act(H[:, h:]) * H[:, :h] for H (L, 2h) when glu.
void activation_forward(Activation act, bool glu, const TensorView& hidden, const TensorView& a);
// dH (L, h | 2h) from dA (L, h) and the pre-activation H.
void activation_backward(Activation act, bool glu, const TensorView& hidden, const TensorView& d_a,
                         const TensorView& d_hidden);

}  // namespace scattermoe::cpu
