"""Hugging Face ``transformers`` integration: run MoE experts through scattermoe.

``transformers`` (>= 5) stores the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, GraniteMoE, GPT-OSS, ...) as stacked 3-D parameters in an ``*Experts`` module decorated
with ``@use_experts_implementation``, and dispatches that module's forward through its
``ExpertsInterface`` (``config._experts_implementation``). This module registers a
``"scattermoe"`` implementation there. It reads the experts' existing stacked parameters in
place (no copy, no re-layout, checkpoints stay loadable/savable), keeps the model's router and
its top-k / renormalisation exactly as the model computes them (the experts forward receives
the router's ``top_k_index`` and ``top_k_weights``), and applies the module's own gating
(``self._apply_gate``: SiLU(gate) * up for the concatenated [gate; up] layout, GPT-OSS's
interleaved clamped gate) or activation.

Usage::

    from scattermoe.integrations import replace_moe_blocks
    model = replace_moe_blocks(model)          # or: model.set_experts_implementation("scattermoe")
"""
import torch

from .parallel_experts import flatten_sort_count, parallel_linear

IMPLEMENTATION_NAME = "scattermoe"


def _as_in_out(weight: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """parallel_linear wants (E, d_in, d_out) (any strides); HF stores (E, out, in) unless
    is_transposed, in which case it stores (E, in, out)."""
    return weight if is_transposed else weight.transpose(1, 2)


def scattermoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for the eager forward of a ``@use_experts_implementation`` experts module.

    hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k) -> (T, d).
    """
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("scattermoe: expert-parallel experts modules (sentinel expert "
                                  "ids) are not supported by the scattermoe experts forward")
    is_transposed = getattr(self, "is_transposed", False)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape

    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = flatten_sort_count(
        top_k_index, num_experts=self.num_experts)

    if has_gate:
        w_up, b_up = self.gate_up_proj, (self.gate_up_proj_bias if has_bias else None)
    else:
        w_up, b_up = self.up_proj, (self.up_proj_bias if has_bias else None)
    h = parallel_linear(hidden_states, _as_in_out(w_up, is_transposed), num_top_k,
                        sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                        expert_biases=b_up, grouped_out=True)  # (T*k, out) in expert order
    # The module's own gating/activation, on columns in the module's own layout.
    h = self._apply_gate(h) if has_gate else self.act_fn(h)

    w_down = _as_in_out(self.down_proj, is_transposed)
    b_down = self.down_proj_bias if has_bias else None
    if getattr(self, "has_post_expert_norm", False):
        # The norm comes before the routing weights: scatter back ungated, then weight and sum.
        y = parallel_linear(h, w_down, 1, sorted_expert_idxs, sorted_scattered_idxs,
                            expert_offsets, expert_biases=b_down, grouped_in=True)  # (T*k, d)
        y = self.post_expert_norm(y)
        y = (y.view(num_tokens, num_top_k, hidden_dim)
             * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    else:
        y = parallel_linear(h, w_down, 1, sorted_expert_idxs, sorted_scattered_idxs,
                            expert_offsets, expert_biases=b_down, gates=top_k_weights,
                            grouped_in=True)  # (T, d)
    return y.to(hidden_states.dtype)


def register() -> None:
    """Register ``"scattermoe"`` in transformers' ExpertsInterface (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("scattermoe.integrations needs transformers >= 5 (with "
                          "transformers.integrations.moe.ExpertsInterface)") from e
    ExpertsInterface.register(IMPLEMENTATION_NAME, scattermoe_experts_forward)


def replace_moe_blocks(model):
    """Route every experts module of a transformers model through scattermoe; returns model.

    The router, its top-k and its renormalisation are untouched; the expert parameters are used
    in place (they are already stacked (E, out, in) in transformers >= 5), so nothing is copied.
    Raises ValueError if the model has no experts module that supports the interface.
    """
    register()
    experts = [m for m in model.modules()
               if hasattr(m, "_apply_gate") and hasattr(m, "down_proj") and hasattr(m, "config")]
    if not experts or not hasattr(model, "set_experts_implementation"):
        raise ValueError(f"scattermoe: {type(model).__name__} has no experts module using "
                         "transformers' @use_experts_implementation; nothing to replace")
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    if any(m.config._experts_implementation != IMPLEMENTATION_NAME for m in experts):
        raise ValueError(f"scattermoe: could not set the experts implementation of "
                         f"{type(model).__name__} to {IMPLEMENTATION_NAME!r}")
    return model


try:  # register on import when transformers is there, so experts_implementation="scattermoe"
    register()  # works in from_pretrained / set_experts_implementation
except ImportError:
    pass
