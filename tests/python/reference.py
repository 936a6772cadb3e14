"""Shared helpers of the scattermoe PyTorch tests: float64 eager references, written here in
plain torch so they share nothing with the library under test."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")


def routing(T, k, E, seed=0, device="cpu", dtype=torch.long):
    """expert_idxs (T, k) with k distinct experts per token, and softmax gates (T, k)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    gates, idxs = torch.topk(logits.softmax(-1), k, dim=-1)
    return idxs.to(device=device, dtype=dtype), gates.to(device)


def reference_plan(expert_idxs, num_experts):
    flat = expert_idxs.flatten().long()
    sorted_expert_idxs, sorted_scattered_idxs = torch.sort(flat, stable=True)
    expert_offsets = torch.bincount(flat, minlength=num_experts).cumsum(-1)
    return sorted_expert_idxs, sorted_scattered_idxs, expert_offsets


def reference_scatter2scatter(x, w, sorted_expert_idxs, sorted_scattered_idxs, k, bias=None,
                              x_grouped=False, y_grouped=False):
    """Y (L, d_out); w (E, d_in, d_out). Differentiable, so it also gives reference gradients."""
    L = sorted_expert_idxs.size(0)
    rows = torch.arange(L, device=sorted_expert_idxs.device)
    rows_in = rows if x_grouped else sorted_scattered_idxs // k
    rows_out = rows if y_grouped else sorted_scattered_idxs
    values = torch.bmm(x[rows_in].unsqueeze(1), w[sorted_expert_idxs]).squeeze(1)
    if bias is not None:
        values = values + bias[sorted_expert_idxs]
    y = values.new_zeros(L, w.size(2))
    return y.index_copy(0, rows_out, values)


def reference_parallel_linear(x, w, k, plan, bias=None, gates=None, grouped_in=False,
                              grouped_out=False):
    sorted_expert_idxs, sorted_scattered_idxs, _ = plan
    y = reference_scatter2scatter(x, w, sorted_expert_idxs, sorted_scattered_idxs, k, bias,
                                  grouped_in, grouped_out)
    if gates is None:
        return y
    return (gates.unsqueeze(1) @ y.view(gates.size(0), gates.size(1), -1)).squeeze(1)


def reference_moe_mlp(x, expert_p, expert_idxs, w1, b1, w2, b2, activation, glu):
    """Loop over experts: out[t] = sum_j p[t,j] * expert_{idx[t,j]}(x[t]); w1 (E, h|2h, d),
    w2 (E, d, h) in the ParallelExperts (E, out, in) layout."""
    out = x.new_zeros(x.size(0), w2.size(1))
    for e in range(w1.size(0)):
        token, choice = torch.nonzero(expert_idxs == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token] @ w1[e].t()
        if b1 is not None:
            h = h + b1[e]
        if glu:
            up, gate = h.chunk(2, dim=-1)
            h = activation(gate) * up
        else:
            h = activation(h)
        y = h @ w2[e].t()
        if b2 is not None:
            y = y + b2[e]
        out = out.index_add(0, token, expert_p[token, choice].unsqueeze(-1) * y)
    return out


def f64(t):
    """A float64 CPU leaf copy of t (keeping requires_grad): the reference runs on the CPU."""
    return None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad)


def cpu(t):
    return None if t is None else t.detach().cpu()


def assert_close(actual, expected, name="", atol=2e-5, rtol=1e-4):
    """fp32 results (any device) against a float64 reference: fp32 accumulation over d <= 128
    terms."""
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding errs by <= 2^-9 relative


def assert_bf16_close(actual, expected, name, reduction):
    """bf16 results against a float64 reference computed from the same bf16 values (inputs,
    weights and incoming gradients rounded to bf16 first, then widened).

    The error left is the library's: fp32 accumulation (negligible next to bf16) and the
    roundings to bf16 of the output and of intermediate rows, <= 2^-9 relative each. Summed over
    `reduction` terms, independent roundings grow like sqrt(reduction) (a random walk), so the
    bound is 2^-8 * sqrt(reduction) * max|expected| (the terms' scale is at most the result's
    largest magnitude for these random inputs), twice the 2^-9 estimate. A wrong row, expert or
    weight gives an error of the order of max|expected| and fails it for reduction < 2^14.
    """
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tol = BF16_ULP * reduction ** 0.5 * scale + 1e-30
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol, (f"{name}: max error {err:.3g} > 2^-8 * sqrt({reduction}) * {scale:.3g} "
                        f"= {tol:.3g}")
