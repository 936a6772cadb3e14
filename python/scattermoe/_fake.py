"""Fake (meta) implementations of the torch.ops.scattermoe operators.

They give torch.compile / FakeTensor the output shapes, dtypes and strides without running
anything, so graphs that use the operators trace without breaks.
"""
import torch


@torch.library.register_fake("scattermoe::flatten_sort_count")
def _flatten_sort_count(expert_idxs, num_experts):
    rows = expert_idxs.numel()
    new = expert_idxs.new_empty
    return (new(rows, dtype=torch.long), new(rows, dtype=torch.long),
            new(num_experts, dtype=torch.long))


@torch.library.register_fake("scattermoe::scatter2scatter")
def _scatter2scatter(x, w, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, k, bias,
                     x_grouped, y_grouped):
    torch._check(w.dim() == 3, lambda: f"w must be (E, d_in, d_out), got {tuple(w.shape)}")
    return x.new_empty(sorted_expert_idxs.size(0), w.size(2))


@torch.library.register_fake("scattermoe::group")
def _group(a, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, fan_out, coeff):
    return a.new_empty(sorted_scattered_idxs.size(0), a.size(1))


@torch.library.register_fake("scattermoe::group_bwd_W")
def _group_bwd_w(dy, x, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, has_bias):
    num_experts = expert_offsets.size(0)
    dw = dy.new_empty(num_experts, dy.size(1), x.size(1)).transpose(1, 2)
    db = dy.new_empty(num_experts if has_bias else 0, dy.size(1) if has_bias else 0)
    return dw, db


@torch.library.register_fake("scattermoe::parallel_linear_forward")
def _parallel_linear_forward(x, w, bias, gates, sorted_expert_idxs, sorted_scattered_idxs,
                             expert_offsets, k, grouped_in, grouped_out):
    rows = gates.size(0) if gates is not None else sorted_expert_idxs.size(0)
    return x.new_empty(rows, w.size(2))


@torch.library.register_fake("scattermoe::parallel_linear_backward")
def _parallel_linear_backward(d_out, x, w, bias, gates, sorted_expert_idxs,
                              sorted_scattered_idxs, expert_offsets, k, grouped_in, grouped_out,
                              output_mask):
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    dw = torch.empty_like(w) if output_mask[1] else w.new_empty(0)
    db = torch.empty_like(bias) if output_mask[2] and bias is not None else x.new_empty(0)
    d_gates = torch.empty_like(gates) if output_mask[3] and gates is not None else x.new_empty(0)
    return dx, dw, db, d_gates


@torch.library.register_fake("scattermoe::mlp_forward")
def _mlp_forward(x, w1, b1, w2, b2, gates, sorted_expert_idxs, sorted_scattered_idxs,
                 expert_offsets, activation, glu):
    return x.new_empty(x.size(0), w2.size(2)), x.new_empty(sorted_expert_idxs.size(0), w1.size(2))


@torch.library.register_fake("scattermoe::mlp_backward")
def _mlp_backward(d_out, x, w1, b1, w2, b2, gates, sorted_expert_idxs, sorted_scattered_idxs,
                  expert_offsets, hidden, activation, glu, output_mask):
    def grad(wanted, like):
        return torch.empty_like(like) if wanted and like is not None else x.new_empty(0)
    return (grad(output_mask[0], x), grad(output_mask[1], w1), grad(output_mask[2], b1),
            grad(output_mask[3], w2), grad(output_mask[4], b2), grad(output_mask[5], gates))
