"""SMoE MLP and GLU-MLP with the signatures of the original ScatterMoE.

The hidden activations stay in grouped (expert-sorted) order between the two projections.
"""
import torch
from torch import nn

from .parallel_experts import ParallelExperts, flatten_sort_count


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
