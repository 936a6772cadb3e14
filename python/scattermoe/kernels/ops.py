"""The primitive operations with the signatures of the original scattermoe.kernels.ops.

Each returns a new tensor computed by the scattermoe library (torch.ops.scattermoe.*). `out=`
is accepted for compatibility: the result is copied into it and `out` is returned.
"""
from typing import Optional, Tuple

import torch

_ops = torch.ops.scattermoe


def _into(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _single_expert_plan(sorted_scattered_idxs: torch.Tensor):
    """A one-expert plan around a permutation: enough for ops that only gather rows."""
    rows = sorted_scattered_idxs.size(0)
    sorted_expert_idxs = torch.zeros_like(sorted_scattered_idxs)
    expert_offsets = sorted_scattered_idxs.new_full((1,), rows)
    return sorted_expert_idxs, expert_offsets


def _offsets_of_sorted(sorted_expert_idxs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inclusive end offsets (E,) of sorted expert ids, with no host sync: CUDA's bincount reads
    the ids' maximum back to the host, which a CUDA-graph capture refuses."""
    experts = torch.arange(num_experts, device=sorted_expert_idxs.device,
                           dtype=sorted_expert_idxs.dtype)
    return torch.searchsorted(sorted_expert_idxs, experts, right=True)


def _plan_from_offsets(expert_offsets: torch.Tensor, rows: int):
    """The plan of rows already in grouped order, from inclusive end offsets (no host sync)."""
    counts = torch.diff(expert_offsets, prepend=expert_offsets.new_zeros(1))
    experts = torch.arange(expert_offsets.size(0), device=expert_offsets.device)
    sorted_expert_idxs = torch.repeat_interleave(experts, counts, output_size=rows)
    sorted_scattered_idxs = torch.arange(rows, device=expert_offsets.device)
    return sorted_expert_idxs, sorted_scattered_idxs


def scatter2scatter(X: torch.Tensor, W: torch.Tensor, sorted_expert_idxs: torch.Tensor,
                    sorted_scattered_idxs: torch.Tensor, k: int, b: Optional[torch.Tensor] = None,
                    x_grouped: bool = False, y_grouped: bool = False,
                    out: Optional[torch.Tensor] = None,
                    expert_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y (L, d_out) = X_row @ W[e] + b[e] for every routed row. W: (E, d_in, d_out), any strides.

    expert_offsets may be passed when at hand; otherwise it is counted from sorted_expert_idxs.
    """
    sorted_expert_idxs = sorted_expert_idxs.long()
    if expert_offsets is None:
        expert_offsets = _offsets_of_sorted(sorted_expert_idxs, W.size(0))
    y = _ops.scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs.long(),
                             expert_offsets.long(), k, b, x_grouped, y_grouped)
    return _into(y, out)


def group(A: torch.Tensor, sorted_expert_idxs: torch.Tensor, coeff: Optional[torch.Tensor] = None,
          fan_out: int = 1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G[i] = A[p // fan_out] * coeff[p], p = sorted_expert_idxs[i].

    As in the original, the second argument holds the sorted *scattered* indices.
    """
    sorted_scattered_idxs = sorted_expert_idxs.long()
    experts, offsets = _single_expert_plan(sorted_scattered_idxs)
    g = _ops.group(A, experts, sorted_scattered_idxs, offsets, fan_out, coeff)
    return _into(g, out)


def group_bwd_W(DY: torch.Tensor, X: torch.Tensor, expert_offsets: torch.Tensor, E: int,
                has_bias: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dW (E, d_in, d_out), a view of (E, d_out, d_in) storage; db (E, d_out) or None)."""
    torch._check(expert_offsets.size(0) == E,
                 lambda: f"expert_offsets has {expert_offsets.size(0)} entries, E = {E}")
    expert_offsets = expert_offsets.long()
    sorted_expert_idxs, sorted_scattered_idxs = _plan_from_offsets(expert_offsets, DY.size(0))
    dw, db = _ops.group_bwd_W(DY, X, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                              has_bias)
    return dw, (db if has_bias else None)
