"""Mixture of Attention (scattermoe.moa.MoA): output, dX, every weight gradient and the router
gradient against a float64 eager reference that loops over experts and heads (causal and not,
k = 1 and k > 1, kv_heads = 1 and > 1, padding masks, rotary on and off, bias on and off);
padding, one-sequence input, the load-balancing loss, autocast, torch.compile, clear errors on
bad input; a tiny two-layer MoA + GLUMLP model that learns a synthetic sequence task. CUDA cases
skip without a GPU. (The C++ CPU attention reference is tested in tests/cpu/test_moa.cpp; it
has no Python binding.)"""
import math

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from torch import nn  # noqa: E402

from reference import f64  # noqa: E402
from scattermoe.mlp import GLUMLP  # noqa: E402
from scattermoe.moa import MoA, load_balancing_loss  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """These tensors are tiny: on a busy machine torch's CPU thread pool costs far more than it
    gives, so each test here runs its torch ops on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- float64 reference

def reference_rotary(x, base):
    """x (B, S, ..., hd): channel pair (i, i + hd/2) of position s rotated by the angle
    s * base^(-2i/hd), one pair at a time."""
    S, hd = x.size(1), x.size(-1)
    half = hd // 2
    out = x.clone()
    for s in range(S):
        for i in range(half):
            angle = s * base ** (-2.0 * i / hd)
            c, n = math.cos(angle), math.sin(angle)
            a, b = x[:, s, ..., i], x[:, s, ..., i + half]
            out[:, s, ..., i] = a * c - b * n
            out[:, s, ..., i + half] = b * c + a * n
    return out


def reference_moa(m, x, keep, params):
    """MoA of module m's configuration, in the dtype of params (float64), written without the
    library: the router, then for every expert the query rows of the tokens routed to it, for
    every query head (choice j, kv head g) a softmax over its admissible keys, and for every
    expert the gated output rows. x (B, S, d); keep (B, S) bool or None.
    Returns y (B, S, d), the load-balancing loss, expert_idxs (T, k)."""
    router_w, wq, bq, wkv, bkv, wo, bo = params
    B, S, d = x.shape
    T, k, H, hd, E = B * S, m.top_k, m.kv_heads, m.head_dim, m.num_experts
    x2 = x.reshape(T, d)
    keep = torch.ones(B, S, dtype=torch.bool) if keep is None else keep.cpu()

    probs = (x2 @ router_w.t()).softmax(-1)
    top_p, idx = torch.topk(probs, k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)

    q = x2.new_zeros(T, k, H * hd)
    for e in range(E):
        tok, choice = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            rows = x2[tok] @ wq[e].t() + (0 if bq is None else bq[e])
            q = q.index_put((tok, choice), rows)
    kv = x2 @ wkv.t() + (0 if bkv is None else bkv)
    keys = kv[:, :H * hd].reshape(B, S, H, hd)
    values = kv[:, H * hd:].reshape(B, S, H, hd)
    q = q.reshape(B, S, k, H, hd)
    if m.rotary:
        q = reference_rotary(q, m.rotary_base)
        keys = reference_rotary(keys, m.rotary_base)

    pos = torch.arange(S)
    allowed = keep[:, None, :].expand(B, S, S)                     # (B, query, key)
    if m.causal:
        allowed = allowed & (pos[None, :, None] >= pos[None, None, :])
    heads = []
    for j in range(k):
        per_g = []
        for g in range(H):
            scores = q[:, :, j, g] @ keys[:, :, g].transpose(1, 2) / math.sqrt(hd)  # (B, S, S)
            # A padded query has its output zeroed below; let it see every key meanwhile so
            # that its softmax (and its gradient) stays finite.
            row_ok = allowed | ~keep[:, :, None]
            p = scores.masked_fill(~row_ok, float("-inf")).softmax(-1)
            per_g.append((p @ values[:, :, g]) * keep[:, :, None].to(x.dtype))  # (B, S, hd)
        heads.append(torch.stack(per_g, dim=2))                    # (B, S, H, hd)
    attn = torch.stack(heads, dim=2).reshape(T, k, H * hd)         # (T, k, H*hd)

    y = x2.new_zeros(T, d)
    for e in range(E):
        tok, choice = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            rows = attn[tok, choice] @ wo[e].t() + (0 if bo is None else bo[e])
            y = y.index_add(0, tok, gates[tok, choice].unsqueeze(1) * rows)
    y = y * keep.reshape(T, 1).to(x.dtype)

    w = keep.reshape(T).to(x.dtype)
    f = torch.zeros(E, dtype=x.dtype)
    for t in range(T):
        for j in range(k):
            f[idx[t, j]] += w[t]
    f = f / (w.sum() * k)
    P = (probs * w[:, None]).sum(0) / w.sum()
    aux = E * (f * P).sum()
    return y.reshape(B, S, d), aux, idx


def module_params(m):
    return [m.router.weight, m.q_experts.weight, m.q_experts.bias, m.kv_proj.weight,
            m.kv_proj.bias, m.o_experts.weight, m.o_experts.bias]


PARAM_NAMES = ["router.weight", "q_experts.weight", "q_experts.bias", "kv_proj.weight",
               "kv_proj.bias", "o_experts.weight", "o_experts.bias"]


def make_moa(device, d=16, hd=4, H=2, E=4, k=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = MoA(d, hd, H, E, k, **kwargs)
    with torch.no_grad():  # O(1) activations, so the comparison tests the arithmetic
        m.router.weight.normal_(std=0.5)
        m.q_experts.weight.normal_(std=0.4)
        m.o_experts.weight.normal_(std=0.4)
        m.kv_proj.weight.normal_(std=0.4)
        for p in (m.q_experts.bias, m.o_experts.bias, m.kv_proj.bias):
            if p is not None:
                p.normal_(std=0.3)
    return m.to(device)


def padding(B, S, device):
    """Right padding in row 0, left padding in row 1 (a padded query at position 0 with no
    admissible key under the causal mask), the rest unpadded."""
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, S - 3:] = False
    if B > 1:
        keep[1, :2] = False
    return keep.to(device)


def assert_close(actual, expected, name):
    """fp32 through a handful of small matmuls and a softmax against float64: errors of a few
    fp32 roundings relative to the largest value."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual, expected, atol=2e-5 * scale, rtol=1e-4,
                               msg=lambda msg: f"{name}: {msg}")


CONFIGS = [  # (k, kv_heads, E, bias)
    (1, 1, 4, False),
    (2, 1, 4, True),
    (1, 2, 3, True),
    (3, 2, 5, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,H,E,bias", CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_moa_matches_reference(device, k, H, E, bias, causal, masked, rotary):
    B, S, d, hd = 3, 7, 16, 4
    m = make_moa(device, d, hd, H, E, k, seed=k * 10 + H, causal=causal, bias=bias,
                 rotary=rotary, aux_loss_coef=0.1)
    x = torch.randn(B, S, d, device=device, requires_grad=True)
    keep = padding(B, S, device) if masked else None
    y = m(x, keep)
    assert y.shape == x.shape
    d_y = torch.randn(B, S, d, device=device)
    ((y * d_y).sum() + m.aux_loss).backward()

    params = module_params(m)
    params64 = [None if p is None else f64(p).cpu() for p in params]
    x64 = f64(x).cpu()
    y64, aux64, idx64 = reference_moa(m, x64, keep, params64)
    _, idx, _ = m.route(x.detach().reshape(B * S, d))
    assert torch.equal(idx.cpu(), idx64), "the router picked other experts than the reference"
    ((y64 * d_y.double().cpu()).sum() + 0.1 * aux64).backward()

    assert_close(y, y64, "y")
    assert_close(m.aux_loss, 0.1 * aux64, "aux_loss")
    assert_close(x.grad, x64.grad, "dx")
    for name, p, p64 in zip(PARAM_NAMES, params, params64):
        assert (p is None) == (p64 is None), name
        if p is not None:
            assert p.grad is not None, name
            assert_close(p.grad, p64.grad, "d " + name)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_positions_output_zero_and_do_not_leak(device):
    B, S, d = 3, 9, 16
    m = make_moa(device, d, bias=True, rotary=True)
    keep = padding(B, S, device)
    x = torch.randn(B, S, d, device=device, requires_grad=True)
    y = m(x, keep)
    assert torch.all(y[~keep] == 0)
    y.square().sum().backward()
    assert torch.all(x.grad[~keep] == 0)
    # Whatever sits in the padded positions changes nothing.
    x2 = torch.where(keep[..., None], x.detach(), 100 * torch.randn_like(x))
    torch.testing.assert_close(m(x2, keep), y.detach())
    # An all-True mask is the same as no mask.
    torch.testing.assert_close(m(x.detach(), torch.ones_like(keep)), m(x.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_one_sequence_input(device):
    m = make_moa(device, rotary=True)
    x = torch.randn(2, 6, 16, device=device)
    keep = padding(2, 6, device)
    torch.testing.assert_close(m(x[1]), m(x)[1])
    torch.testing.assert_close(m(x[0], keep[0]), m(x, keep)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_are_independent(device):
    """Batch rows do not attend to each other: each row alone gives the same output."""
    m = make_moa(device, k=3, H=1, E=4)
    x = torch.randn(3, 5, 16, device=device)
    y = m(x)
    for b in range(3):
        torch.testing.assert_close(m(x[b:b + 1])[0], y[b])


def test_causal_output_ignores_the_future():
    m = make_moa("cpu")
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(m(x)[:, :5], m(x2)[:, :5])
    m.causal = False
    assert not torch.allclose(m(x)[:, :5], m(x2)[:, :5])


def test_query_heads_pair_with_their_kv_head():
    """Query head (j, g) uses kv head g: with the values of kv head 1 zeroed, the output columns
    of every expert's kv head 1 block are zero."""
    m = make_moa("cpu", H=2, k=2, E=4, hd=4)
    with torch.no_grad():
        m.kv_proj.weight[3 * 4:] = 0      # values of kv head 1: rows [(H + 1)*hd, 2*H*hd)
        m.o_experts.weight[:, :, :4] = 0  # drop kv head 0's contribution to the output
    assert torch.all(m(torch.randn(2, 6, 16)) == 0)


def test_load_balancing_loss():
    E, T, k = 4, 8, 2
    probs = torch.full((T, E), 1.0 / E, requires_grad=True)
    idx = torch.arange(T * k).reshape(T, k) % E  # every expert gets T*k/E slots
    loss = load_balancing_loss(probs, idx, E)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.full((T, E), 1.0 / T))  # E * f_e / T
    # All slots on expert 0, with all its probability: the maximum, E.
    probs = torch.zeros(T, E)
    probs[:, 0] = 1
    assert load_balancing_loss(probs, torch.zeros(T, 1, dtype=torch.long), E).item() == E
    # Weights leave tokens out.
    w = torch.tensor([1.0] * 4 + [0.0] * 4)
    idx = torch.cat([torch.zeros(4, 1), torch.ones(4, 1)]).long()
    p = torch.zeros(T, E)
    p[:4, 0] = 1
    p[4:, 1] = 1
    assert load_balancing_loss(p, idx, E, w).item() == pytest.approx(E)


def test_aux_loss_attribute():
    x = torch.randn(2, 4, 16)
    m = make_moa("cpu")
    m(x)
    assert m.aux_loss is None
    m.aux_loss_coef = 0.5
    m(x)
    assert m.aux_loss.dim() == 0 and m.aux_loss.requires_grad
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16(device):
    """bf16 autocast with fp32 master weights: the router stays fp32 (same experts as the
    reference), bf16 output close to the float64 reference, fp32 gradients (on CUDA this runs
    SDPA's flash kernel with enable_gqa)."""
    B, S = 2, 16
    m = make_moa(device, d=32, hd=16, H=2, E=4, k=2, rotary=True, seed=5)
    x = torch.randn(B, S, 32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
        _, idx, _ = m.route(x.detach().reshape(B * S, 32))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    params64 = [None if p is None else f64(p).cpu() for p in module_params(m)]
    x64 = f64(x).cpu()
    y64, _, idx64 = reference_moa(m, x64, None, params64)
    assert torch.equal(idx.cpu(), idx64), "the router (fp32 under autocast) picked other experts"
    (2 * y.detach().double().cpu() * y64).sum().backward()
    for name, a, b in [("y", y, y64), ("dx", x.grad, x64.grad),
                       ("d q_experts.weight", m.q_experts.weight.grad, params64[1].grad),
                       ("d o_experts.weight", m.o_experts.weight.grad, params64[5].grad),
                       ("d kv_proj.weight", m.kv_proj.weight.grad, params64[3].grad)]:
        a, b = a.detach().double().cpu(), b.detach().double()
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 4e-2 * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"
    assert x.grad.dtype == torch.float32 and m.q_experts.weight.grad.dtype == torch.float32


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the router, both projections, the attention and the
    aux_loss attribute; same output and gradients as eager."""
    torch._dynamo.reset()
    m = make_moa("cpu", rotary=True, aux_loss_coef=0.1)
    keep = padding(2, 6, "cpu")
    x = torch.randn(2, 6, 16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x, keep)
    (y.sum() + m.aux_loss).backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    x_eager = x.detach().requires_grad_(True)
    m.zero_grad()
    y_eager = m(x_eager, keep)
    (y_eager.sum() + m.aux_loss).backward()
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, [x_eager.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- bad input

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="'top_k' is 5; expected at most num_experts = 4"):
        MoA(16, 4, 2, 4, 5)
    with pytest.raises(ValueError, match="'top_k' is 0"):
        MoA(16, 4, 2, 4, 0)
    with pytest.raises(ValueError, match="'kv_heads' is 0"):
        MoA(16, 4, 0, 4, 1)
    with pytest.raises(ValueError, match="'head_dim' is 5; rotary"):
        MoA(16, 5, 2, 4, 1, rotary=True)
    with pytest.raises(ValueError, match="'aux_loss_coef'"):
        MoA(16, 4, 2, 4, 1, aux_loss_coef=-1.0)


def test_bad_input_shapes():
    m = make_moa("cpu", d=16)
    with pytest.raises(ValueError,
                       match=r"'x' has shape \(2, 5, 12\); expected \(batch, seq, 16\)"):
        m(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="'x' has shape"):
        m(torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="'x' has shape"):
        m(torch.randn(16))
    with pytest.raises(ValueError, match="at least one position"):
        m(torch.randn(2, 0, 16))
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"'padding_mask' has shape \(2, 4\); expected \(2, 5\)"):
        m(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'padding_mask' has shape \(5,\)"):
        m(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="'padding_mask' has dtype torch.float32"):
        m(x, torch.ones(2, 5))


# ---------------------------------------------------------------------------------- training

class Block(nn.Module):
    def __init__(self, d, E, k):
        super().__init__()
        self.norm1 = nn.RMSNorm(d)
        self.attn = MoA(d, head_dim=16, kv_heads=2, num_experts=E, top_k=k, rotary=True,
                        aux_loss_coef=0.01)
        self.norm2 = nn.RMSNorm(d)
        self.router = nn.Linear(d, E, bias=False)
        self.mlp = GLUMLP(d, 2 * d, E, k)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x).reshape(-1, x.size(-1))
        p, idx = torch.topk(self.router(h).softmax(-1), self.mlp.top_k, dim=-1)
        return x + self.mlp(h, p / p.sum(-1, keepdim=True), idx).view_as(x)


class TinyLM(nn.Module):
    def __init__(self, vocab, d=64, E=4, k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, E, k) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        aux = sum(b.attn.aux_loss for b in self.blocks)
        return self.head(self.norm(x)), aux


def arithmetic_sequences(batch, seq, vocab, gen):
    """x_s = (start + s*step) mod vocab, start and step in {1, 2, 3} drawn per sequence: the
    next token needs the step, which only the previous tokens reveal (through attention)."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(seq)) % vocab


def train(device, steps, batch, seq, d, lr, vocab=16):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyLM(vocab, d).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        tokens = arithmetic_sequences(batch, seq + 1, vocab, gen).to(device)
        logits, aux = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    return losses


# The loss starts near ln 16 = 2.77. A model that cannot look back cannot tell the step and
# stays above ln 3 = 1.10; with attention to the previous tokens only position 0 is uncertain.

def test_tiny_model_learns_cpu():
    """Forty steps of a smaller model on the CPU (a few seconds)."""
    losses = train("cpu", steps=40, batch=16, seq=24, d=32, lr=1e-2)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.5 * first and last < 0.7, f"loss {first:.3f} -> {last:.3f}"


@CUDA
def test_tiny_model_learns_cuda():
    """A few hundred steps on the GPU."""
    losses = train("cuda", steps=300, batch=32, seq=32, d=64, lr=3e-3)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.5 * first and last < 0.7, f"loss {first:.3f} -> {last:.3f}"
