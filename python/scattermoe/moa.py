"""Mixture of Attention (MoA): attention whose query and output projections are experts.

Each of E experts owns a query projection d_model -> kv_heads*head_dim and an output projection
kv_heads*head_dim -> d_model; keys and values come from one shared dense projection. A token's
k routed experts give it k*kv_heads query heads, grouped over the shared kv heads (GQA):
query head (j, g), from the j-th expert of the token, attends with kv head g.

    q = ParallelLinear(x, W_q, k, scattered in, scattered out)   (T*k, kv_heads*head_dim)
    attn = scaled_dot_product_attention(q heads, shared k/v)    (T*k, kv_heads*head_dim)
    y = ParallelLinear(attn, W_o, 1, scattered in, scattered out, gates)   (T, d_model)

Both projections read and write token-major rows, so attention sees tokens in time order with no
copy into per-expert buffers (the scattered-in / scattered-out mode of ParallelLinear). Backward
runs through the autograd Functions of the scattermoe ops and of PyTorch's attention.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .parallel_experts import ParallelExperts, flatten_sort_count


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, head_dim) of the rotary embedding in the rotate-half (GPT-NeoX / Llama)
    layout: frequency i of [0, head_dim/2) rotates the channel pair (i, i + head_dim/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
                              / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) rotated by cos/sin broadcast to it: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def load_balancing_loss(probs: torch.Tensor, expert_idxs: torch.Tensor, num_experts: int,
                        weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss E * sum_e f_e * P_e.

    probs (T, E) router softmax; expert_idxs (T, k); weights (T,) 1 for the tokens that count
    (None: all). f_e = share of the counted routed slots that go to expert e (no gradient),
    P_e = mean router probability of e over the counted tokens. Balanced routing gives 1.0 for
    any k (Mixtral's form, with f summed over the k choices, is k times this).
    """
    T, k = expert_idxs.shape
    if weights is None:
        weights = probs.new_ones(T)
    weights = weights.to(probs.dtype)
    count = weights.sum().clamp_min(1.0)
    with torch.no_grad():
        slots = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
        slots.index_add_(0, expert_idxs.reshape(-1),
                         weights.unsqueeze(1).expand(T, k).reshape(-1))
        f = slots / (count * k)
    p = (probs * weights.unsqueeze(1)).sum(0) / count
    return num_experts * (f * p).sum()


class MoA(nn.Module):
    """Mixture of Attention on ParallelLinear.

    Args:
        d_model: token width.
        head_dim: width of one attention head.
        kv_heads: shared key/value heads; each routed expert adds kv_heads query heads.
        num_experts: E; top_k: k experts per token (k <= E).
        causal: position s attends to positions <= s of its sequence.
        bias: biases on the expert projections and on the shared k/v projection.
        rotary: rotary position embedding on queries and keys (rotate-half layout, positions
            0..seq-1 of each sequence); rotary_base: its base.
        aux_loss_coef: weight of the load-balancing loss (0 turns it off).

    Parameters: router (nn.Linear d_model -> E, no bias), q_experts (ParallelExperts d_model ->
    kv_heads*head_dim), kv_proj (nn.Linear d_model -> 2*kv_heads*head_dim: keys, then values),
    o_experts (ParallelExperts kv_heads*head_dim -> d_model).

    Router: softmax over the E logits, top-k, the k probabilities renormalised to sum to 1; they
    are the gates of the output projection, so the router learns through them (with top_k = 1
    the gate is 1, and the router learns only through the load-balancing loss).

    After each forward, ``self.aux_loss`` holds ``aux_loss_coef * load_balancing_loss`` (a 0-dim
    tensor in the autograd graph; add it to the training loss), or None when aux_loss_coef is 0.
    """

    def __init__(self, d_model: int, head_dim: int, kv_heads: int, num_experts: int,
                 top_k: int, causal: bool = True, bias: bool = False, rotary: bool = False,
                 rotary_base: float = 10000.0, aux_loss_coef: float = 0.0) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("head_dim", head_dim),
                            ("kv_heads", kv_heads), ("num_experts", num_experts),
                            ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"scattermoe.MoA: argument '{name}' is {value!r}; expected a "
                                 f"positive integer")
        if top_k > num_experts:
            raise ValueError(f"scattermoe.MoA: argument 'top_k' is {top_k}; expected at most "
                             f"num_experts = {num_experts}")
        if rotary and head_dim % 2 != 0:
            raise ValueError(f"scattermoe.MoA: argument 'head_dim' is {head_dim}; rotary "
                             f"embeddings need an even head_dim")
        if aux_loss_coef < 0:
            raise ValueError(f"scattermoe.MoA: argument 'aux_loss_coef' is {aux_loss_coef}; "
                             f"expected >= 0")
        self.d_model = d_model
        self.head_dim = head_dim
        self.kv_heads = kv_heads
        self.num_experts = num_experts
        self.top_k = top_k
        self.causal = causal
        self.rotary = rotary
        self.rotary_base = rotary_base
        self.aux_loss_coef = aux_loss_coef
        width = kv_heads * head_dim
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.q_experts = ParallelExperts(num_experts, d_model, width, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * width, bias=bias)
        self.o_experts = ParallelExperts(num_experts, width, d_model, bias=bias)
        self.aux_loss: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, head_dim={self.head_dim}, kv_heads={self.kv_heads}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, causal={self.causal}, "
                f"rotary={self.rotary}, aux_loss_coef={self.aux_loss_coef}")

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d_model) -> gates (T, k) renormalised, expert_idxs (T, k), probs (T, E).

        The router runs in fp32 (outside autocast too), so the choice of experts does not
        depend on the compute dtype."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, expert_idxs = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k == 1:
            # p / p: exactly 1 with exactly zero gradient, without the rounding noise that
            # differentiating the division would leave.
            gates = torch.ones_like(top_p)
        else:
            gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return gates, expert_idxs, probs

    def _check(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        if x.dim() not in (2, 3) or x.size(-1) != self.d_model:
            raise ValueError(f"scattermoe.MoA: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"(batch, seq, {self.d_model}) or (seq, {self.d_model}) (d_model)")
        if x.size(-2) == 0:
            raise ValueError(f"scattermoe.MoA: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"at least one position")
        if padding_mask is None:
            return
        if tuple(padding_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"scattermoe.MoA: argument 'padding_mask' has shape "
                             f"{tuple(padding_mask.shape)}; expected {tuple(x.shape[:-1])} "
                             f"(x's shape without d_model; True for real tokens)")
        if padding_mask.is_floating_point() or padding_mask.is_complex():
            raise ValueError(f"scattermoe.MoA: argument 'padding_mask' has dtype "
                             f"{padding_mask.dtype}; expected torch.bool (True for real tokens)")
        if padding_mask.device != x.device:
            raise ValueError(f"scattermoe.MoA: argument 'padding_mask' is on "
                             f"{padding_mask.device}; expected x's device {x.device}")

    def forward(self, x: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (batch, seq, d_model), or (seq, d_model) for one sequence -> the same shape.

        padding_mask: bool, x's shape without d_model, True for real tokens. Padded positions
        are masked out as keys; their outputs are zero and they get no gradient and do not count
        in the load-balancing loss.
        """
        self._check(x, padding_mask)
        one_sequence = x.dim() == 2
        if one_sequence:
            x = x.unsqueeze(0)
            padding_mask = None if padding_mask is None else padding_mask.unsqueeze(0)
        B, S, _ = x.shape
        T, k, H, hd = B * S, self.top_k, self.kv_heads, self.head_dim
        keep = None if padding_mask is None else padding_mask.to(torch.bool)
        x2 = x.reshape(T, self.d_model)

        gates, expert_idxs, probs = self.route(x2)
        if self.aux_loss_coef > 0:
            weights = None if keep is None else keep.reshape(T)
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(
                probs, expert_idxs, self.num_experts, weights)
        else:
            self.aux_loss = None
        plan = flatten_sort_count(expert_idxs, self.num_experts)

        # Row t*k + j of q is token t through its j-th expert: query heads (j, 0..H-1).
        q = self.q_experts(x2, k, *plan)                                      # (T*k, H*hd)
        kv = self.kv_proj(x2)                                                 # (T, 2*H*hd)
        q = q.view(B, S, k, H, hd)
        key, value = kv.view(B, S, 2, H, hd).unbind(dim=2)                    # (B, S, H, hd)
        if self.rotary:
            cos, sin = rotary_cos_sin(S, hd, self.rotary_base, x.device)
            q = apply_rotary(q.float(), cos[:, None, None], sin[:, None, None]).to(q.dtype)
            key = apply_rotary(key.float(), cos[:, None], sin[:, None]).to(key.dtype)

        # SDPA heads: query head (j, g) is head g*k + j, so that GQA's grouping (query head i
        # uses kv head i // k) pairs it with kv head g.
        q = q.permute(0, 3, 2, 1, 4).reshape(B, H * k, S, hd)                 # (B, H*k, S, hd)
        key = key.transpose(1, 2)                                             # (B, H, S, hd)
        value = value.transpose(1, 2)
        attn = gqa_attention(q, key, value, keep, self.causal, k)            # (B, H*k, S, hd)
        attn = attn.view(B, H, k, S, hd).permute(0, 3, 2, 1, 4)              # (B, S, k, H, hd)
        if keep is not None:
            attn = attn * keep.view(B, S, 1, 1, 1).to(attn.dtype)
        attn = attn.reshape(T * k, H * hd)

        y = self.o_experts(attn, 1, *plan, gates=gates)                      # (T, d_model)
        if keep is not None and self.o_experts.bias is not None:
            y = y * keep.reshape(T, 1).to(y.dtype)
        y = y.view(B, S, self.d_model)
        return y[0] if one_sequence else y


def _native_gqa(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
    """Whether SDPA's enable_gqa keeps a fused backend: only the flash kernel (CUDA, fp16/bf16,
    head_dim <= 256, no mask) supports it; elsewhere SDPA would fall back to its math kernel,
    which materialises the (S, S) scores, so the kv heads are expanded instead."""
    return (q.is_cuda and attn_mask is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.size(-1) <= 256)


def gqa_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  keep: Optional[torch.Tensor], causal: bool, group: int) -> torch.Tensor:
    """Grouped-query attention through scaled_dot_product_attention: q (B, H*group, S, hd),
    key/value (B, H, S, hd); query head i uses kv head i // group. keep (B, S) bool, True for
    real tokens, or None: padded keys are masked out; padded queries get finite values that the
    caller is expected to zero. Returns (B, H*group, S, hd)."""
    B, _, S, _ = q.shape
    attn_mask = None
    if keep is not None:
        # (B, 1, S, S): admissible keys; a padded query row admits every key so that it never
        # has an empty softmax (its output is zeroed by the caller).
        attn_mask = keep.view(B, 1, 1, S).expand(B, 1, S, S)
        if causal:
            attn_mask = attn_mask & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = attn_mask | ~keep.view(B, 1, S, 1)
    if group > 1 and _native_gqa(q, attn_mask):
        return F.scaled_dot_product_attention(q, key, value, is_causal=causal,
                                              enable_gqa=True)
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask,
                                          is_causal=causal and attn_mask is None)


__all__ = ["MoA", "apply_rotary", "gqa_attention", "load_balancing_loss", "rotary_cos_sin"]
