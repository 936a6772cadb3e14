"""ParallelLinear and ParallelExperts with the signatures of the original ScatterMoE.

Forward and backward run in the scattermoe library (torch.ops.scattermoe.parallel_linear_*);
backward recomputes what it needs from the inputs, so no activation beyond them is saved.
"""
from typing import Optional

import torch
import torch.nn as nn

_ops = torch.ops.scattermoe


def flatten_sort_count(expert_idxs: torch.Tensor, num_experts: int):
    """(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets) of expert_idxs (T, k).

    Stable order (ties by flat position); expert_offsets are inclusive end offsets (E,).
    """
    with torch.no_grad():
        return _ops.flatten_sort_count(expert_idxs, num_experts)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for device_type ("cpu", "cuda", ...), or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """As autocast casts an op's inputs: floating tensors other than float64 go to dtype."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _to(grad: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return grad if dtype is None or grad.dtype == dtype else grad.to(dtype)


class ParallelLinear(torch.autograd.Function):
    """Under torch.autocast x, expert_weights and expert_biases are cast to the autocast dtype
    inside the Function (gates keep their dtype: the library takes any float gates); backward
    computes in that dtype and returns each gradient in the dtype of its original input, so fp32
    master weights get fp32 gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_weights: torch.Tensor, k: int,
                sorted_expert_idxs: torch.Tensor, sorted_scattered_idxs: torch.Tensor,
                expert_offsets: torch.Tensor, expert_biases: Optional[torch.Tensor] = None,
                gates: Optional[torch.Tensor] = None, grouped_in: bool = False,
                grouped_out: bool = False) -> torch.Tensor:
        ctx.input_dtypes = (x.dtype, expert_weights.dtype,
                            None if expert_biases is None else expert_biases.dtype)
        cast_to = _autocast_dtype(x.device.type)
        x = _cast(x, cast_to)
        expert_weights = _cast(expert_weights, cast_to)
        expert_biases = _cast(expert_biases, cast_to)
        output = _ops.parallel_linear_forward(
            x, expert_weights, expert_biases, gates, sorted_expert_idxs, sorted_scattered_idxs,
            expert_offsets, k, grouped_in, grouped_out)
        ctx.save_for_backward(x, expert_weights, expert_biases, gates, sorted_expert_idxs,
                              sorted_scattered_idxs, expert_offsets)
        ctx.k = k
        ctx.grouped_in = grouped_in
        ctx.grouped_out = grouped_out
        return output

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x, expert_weights, expert_biases, gates, sorted_expert_idxs, sorted_scattered_idxs,
         expert_offsets) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # The compute dtype (the autocast one, if any), with unit-stride rows: the gradient of a
        # sum arrives as an expanded (stride 0) tensor, which the CUDA kernels do not take.
        grad_out = _to(grad_out, x.dtype).contiguous()
        output_mask = [needs[0], needs[1], needs[6], needs[7]]
        d_x, d_weights, d_biases, d_gates = _ops.parallel_linear_backward(
            grad_out, x, expert_weights, expert_biases, gates, sorted_expert_idxs,
            sorted_scattered_idxs, expert_offsets, ctx.k, ctx.grouped_in, ctx.grouped_out,
            output_mask)
        x_dtype, w_dtype, b_dtype = ctx.input_dtypes
        return (
            _to(d_x, x_dtype) if needs[0] else None,
            _to(d_weights, w_dtype) if needs[1] else None,
            None, None, None, None,  # k and the plan
            _to(d_biases, b_dtype) if needs[6] else None,
            d_gates if needs[7] else None,
            None, None,  # grouped_in, grouped_out
        )


def parallel_linear(inputs: torch.Tensor, expert_weights: torch.Tensor, k: int,
                    sorted_expert_idxs: torch.Tensor, sorted_scattered_idxs: torch.Tensor,
                    expert_offsets: torch.Tensor, expert_biases: Optional[torch.Tensor] = None,
                    gates: Optional[torch.Tensor] = None, grouped_in: bool = False,
                    grouped_out: bool = False) -> torch.Tensor:
    """Y = inputs_row @ expert_weights[e] (+ expert_biases[e]) for every routed row.

    expert_weights: (E, d_in, d_out), any strides (ParallelExperts passes the transposed view of
    its (E, out, in) weight). With gates (T, k) the k rows of each token are summed with those
    weights: (T, d_out); otherwise (T*k, d_out), in grouped order when grouped_out.
    """
    return ParallelLinear.apply(inputs, expert_weights, k, sorted_expert_idxs,
                                sorted_scattered_idxs, expert_offsets, expert_biases, gates,
                                grouped_in, grouped_out)


class ParallelExperts(nn.Module):
    """E linear maps: weight (E, output_size, input_size), bias (E, output_size)."""

    def __init__(self, num_experts: int, input_size: int, output_size: int,
                 bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, output_size))
        else:
            self.bias = None
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, input_size={self.input_size}, "
                f"output_size={self.output_size}")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, inputs: torch.Tensor, k: int, sorted_expert_idxs: torch.Tensor,
                sorted_scattered_idxs: torch.Tensor, expert_offsets: torch.Tensor,
                gates: Optional[torch.Tensor] = None, grouped_in: bool = False,
                grouped_out: bool = False) -> torch.Tensor:
        return parallel_linear(inputs, self.weight.permute(0, 2, 1), k, sorted_expert_idxs,
                               sorted_scattered_idxs, expert_offsets, expert_biases=self.bias,
                               gates=gates, grouped_in=grouped_in, grouped_out=grouped_out)
