"""SMoE MLP and GLU-MLP with the signatures of the original ScatterMoE.

The hidden activations stay in grouped (expert-sorted) order between the two projections. With
one of the activations the library implements (nn.SiLU, nn.GELU with approximate "none" or
"tanh", nn.ReLU, or their torch.nn.functional forms), the whole layer is one library call each
way (torch.ops.scattermoe.mlp_forward / mlp_backward): forward keeps only x, the pre-activation
hidden rows and the routing plan for backward. Any other activation runs as two ParallelLinear
calls around it.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .parallel_experts import (ParallelExperts, _autocast_dtype, _cast, _to,
                               flatten_sort_count)

_ops = torch.ops.scattermoe


def _library_activation(activation) -> Optional[str]:
    """The library's name for activation, or None when it is not one the library implements."""
    if isinstance(activation, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(activation.approximate)
    if isinstance(activation, nn.SiLU) or activation is F.silu:
        return "silu"
    if isinstance(activation, nn.ReLU) or activation is F.relu:
        return "relu"
    if activation is F.gelu:
        return "gelu"
    return None


class _FusedMLP(torch.autograd.Function):
    """out = sum_j gates[t, j] * (act(x W1[e] + b1[e]) W2[e] + b2[e]) over each token's experts;
    under torch.autocast x, the weights and the biases are cast to the autocast dtype inside
    (gates keep theirs), and gradients come back in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gates, sorted_expert_idxs, sorted_scattered_idxs,
                expert_offsets, activation, glu):
        ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (x, w1, b1, w2, b2))
        cast_to = _autocast_dtype(x.device.type)
        x, w1, b1, w2, b2 = (_cast(t, cast_to) for t in (x, w1, b1, w2, b2))
        out, hidden = _ops.mlp_forward(x, w1, b1, w2, b2, gates, sorted_expert_idxs,
                                       sorted_scattered_idxs, expert_offsets, activation, glu)
        ctx.save_for_backward(x, w1, b1, w2, b2, gates, sorted_expert_idxs,
                              sorted_scattered_idxs, expert_offsets, hidden)
        ctx.activation = activation
        ctx.glu = glu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, w1, b1, w2, b2, gates, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
         hidden) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # The compute dtype, with unit-stride rows (a sum's gradient arrives expanded).
        grad_out = _to(grad_out, x.dtype).contiguous()
        mask = [needs[0], needs[1], needs[2] and b1 is not None, needs[3],
                needs[4] and b2 is not None, needs[5]]
        grads = _ops.mlp_backward(grad_out, x, w1, b1, w2, b2, gates, sorted_expert_idxs,
                                  sorted_scattered_idxs, expert_offsets, hidden, ctx.activation,
                                  ctx.glu, mask)
        out = [_to(g, dtype) if wanted else None
               for g, wanted, dtype in zip(grads[:5], mask[:5], ctx.input_dtypes)]
        return (*out, grads[5] if mask[5] else None, None, None, None, None, None)


def _check_width(x: torch.Tensor, input_size: int) -> None:
    if x.dim() == 0 or x.size(-1) != input_size:
        raise ValueError(f"scattermoe: argument 'x' has shape {tuple(x.shape)}; expected "
                         f"(..., {input_size}) (input_size)")


class _ExpertMLP(nn.Module):
    """The two ParallelExperts projections around `_activate`; first width = d -> width_factor*h."""

    width_factor = 1

    def __init__(self, input_size: int, hidden_size: int, num_experts: int, top_k: int,
                 bias: bool, activation) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.experts = ParallelExperts(num_experts, input_size, self.width_factor * hidden_size,
                                       bias=bias)
        self.output_experts = ParallelExperts(num_experts, hidden_size, input_size, bias=bias)
        self.top_k = min(top_k, self.num_experts)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"k={self.top_k}"

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, expert_p: torch.Tensor,
                expert_idxs: torch.Tensor) -> torch.Tensor:
        """x (..., d), expert_p and expert_idxs (T, k) -> (..., d)."""
        _check_width(x, self.input_size)
        x_shape = x.size()
        x = x.reshape(-1, x_shape[-1])
        sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = flatten_sort_count(
            expert_idxs, num_experts=self.num_experts)
        name = _library_activation(self.activation)
        if name is not None and expert_p.dim() == 2:
            y = _FusedMLP.apply(x, self.experts.weight.permute(0, 2, 1), self.experts.bias,
                                self.output_experts.weight.permute(0, 2, 1),
                                self.output_experts.bias, expert_p, sorted_expert_idxs,
                                sorted_scattered_idxs, expert_offsets, name, self.width_factor == 2)
            return y.view(*x_shape[:-1], y.size(-1))
        h = self.experts(x, self.top_k, sorted_expert_idxs, sorted_scattered_idxs,
                         expert_offsets, grouped_out=True)
        h = self._activate(h)
        y = self.output_experts(h, 1, sorted_expert_idxs, sorted_scattered_idxs,
                                expert_offsets, grouped_in=True, gates=expert_p)
        return y.view(*x_shape[:-1], y.size(-1))


class MLP(_ExpertMLP):
    def __init__(self, input_size: int, hidden_size: int, num_experts: int, top_k: int,
                 bias: bool = False, activation=None) -> None:
        super().__init__(input_size, hidden_size, num_experts, top_k, bias, activation)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        return self.activation(h)


class GLUMLP(_ExpertMLP):
    """experts maps d -> 2h: columns [0, h) are "up", [h, 2h) "gate"; h = act(gate) * up."""

    width_factor = 2

    def __init__(self, input_size: int, hidden_size: int, num_experts: int, top_k: int,
                 bias: bool = False, activation=nn.SiLU()) -> None:
        super().__init__(input_size, hidden_size, num_experts, top_k, bias, activation)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        up, gate = h.chunk(2, dim=-1)
        return self.activation(gate) * up
