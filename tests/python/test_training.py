"""Training behaviour of the scattermoe modules: autocast with fp32 master weights, an unmodified
original-ScatterMoE usage example, determinism, and clear errors on bad inputs (CPU; the cuda
cases of the `device` fixture run where a GPU is present)."""
import inspect

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from torch import nn  # noqa: E402

from reference import (cpu, f64, reference_moe_mlp, reference_parallel_linear,  # noqa: E402
                       routing)
from scattermoe.mlp import GLUMLP, MLP  # noqa: E402
from scattermoe.parallel_experts import ParallelExperts, flatten_sort_count  # noqa: E402

def assert_autocast_close(actual, expected, name, rel=3e-2):
    """Autocast bf16 results against a float64 reference on the fp32 (unrounded) values: the
    inputs' own rounding to bf16 (8-bit mantissa, 2^-9 relative) and a few roundings per element
    after it, so the error is bounded relative to the reference's scale."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"


# ----------------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_parallel_experts_autocast_bf16(device, gated, bias):
    torch.manual_seed(3)
    T, d_in, d_out, E, k = 19, 32, 24, 8, 2
    experts = ParallelExperts(E, d_in, d_out, bias=bias).to(device)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.5)
    idxs, gates = routing(T, k, E, device=device)
    plan = flatten_sort_count(idxs, E)
    x = torch.randn(T, d_in, device=device, requires_grad=True)
    g = gates.clone().requires_grad_(True) if gated else None

    with torch.autocast(device, dtype=torch.bfloat16):
        out = experts(x, k, *plan, gates=g)
    assert out.dtype == torch.bfloat16
    d_out = torch.randn(out.shape, device=device)
    out.backward(d_out.to(out.dtype))

    w64, b64 = f64(experts.weight), f64(experts.bias)
    x64, g64 = f64(x), f64(g)
    expected = reference_parallel_linear(x64, w64.permute(0, 2, 1), k, [cpu(t) for t in plan],
                                         b64, g64)
    expected.backward(cpu(d_out).to(out.dtype).double())
    assert_autocast_close(out, expected, "out")
    assert x.grad.dtype == torch.float32
    assert_autocast_close(x.grad, x64.grad, "dx")
    assert experts.weight.grad.dtype == torch.float32
    assert_autocast_close(experts.weight.grad, w64.grad, "dW")
    if bias:
        assert experts.bias.grad.dtype == torch.float32
        assert_autocast_close(experts.bias.grad, b64.grad, "db")
    if gated:
        assert g.grad.dtype == torch.float32
        assert_autocast_close(g.grad, g64.grad, "d_gates")


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_autocast_bf16_fp32_master_weights(device, glu, bias):
    torch.manual_seed(4)
    T, d, h, E, k = 23, 32, 48, 8, 2
    activation = nn.SiLU() if glu else nn.GELU()
    module = (GLUMLP if glu else MLP)(d, h, E, k, bias=bias, activation=activation).to(device)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    idxs, gates = routing(T, k, E, seed=5, device=device)
    x = torch.randn(T, d, device=device, requires_grad=True)
    expert_p = gates.clone().requires_grad_(True)

    with torch.autocast(device, dtype=torch.bfloat16):
        out = module(x, expert_p, idxs)
        loss = out.float().square().sum()
    assert out.dtype == torch.bfloat16
    loss.backward()

    params = [module.experts.weight, module.experts.bias, module.output_experts.weight,
              module.output_experts.bias]
    params64 = [f64(p) for p in params]
    x64, p64 = f64(x), f64(expert_p)
    expected = reference_moe_mlp(x64, p64, cpu(idxs), *params64, activation, glu)
    # The reference's loss is taken on the bf16 output, as the module's is.
    expected.backward(2 * cpu(out).double())
    assert_autocast_close(out, expected, "out")
    assert x.grad.dtype == torch.float32
    assert_autocast_close(x.grad, x64.grad, "dx")
    assert expert_p.grad.dtype == torch.float32
    assert_autocast_close(expert_p.grad, p64.grad, "d_expert_p")
    for name, p, p_ref in zip(("W1", "b1", "W2", "b2"), params, params64):
        if p is not None:
            assert p.dtype == torch.float32, name  # master weights untouched
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert_autocast_close(p.grad, p_ref.grad, "d" + name)


def test_autocast_compiles_without_graph_breaks(device):
    """The autocast casts inside the autograd Function trace with fullgraph=True."""
    torch._dynamo.reset()
    module = GLUMLP(8, 16, 4, 2, bias=True).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    x = torch.randn(6, 8, device=device, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.autocast(device, dtype=torch.bfloat16):
        out = compiled(x, gates, idxs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and module.experts.weight.grad.dtype == torch.float32
    eager_x = x.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = module(eager_x, gates, idxs)
    torch.testing.assert_close(out, expected)
    module.zero_grad()
    expected.float().sum().backward()
    torch.testing.assert_close(x.grad, eager_x.grad)


def test_no_autocast_keeps_dtypes(device):
    """Outside autocast nothing is cast: fp32 in, fp32 out (and bf16 in, bf16 out)."""
    module = GLUMLP(8, 16, 4, 2).to(device)
    idxs, gates = routing(5, 2, 4, device=device)
    assert module(torch.randn(5, 8, device=device), gates, idxs).dtype == torch.float32
    module = module.to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16, device=device, requires_grad=True)
    out = module(x, gates, idxs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert module.experts.weight.grad.dtype == torch.bfloat16


# ------------------------------------------------------------- original ScatterMoE usage example

def test_original_constructor_signatures():
    """ScatterMoE 0.3: MLP/GLUMLP(input_size, hidden_size, num_experts, top_k, bias=False,
    activation=...), forward(x, expert_p, expert_idxs)."""
    for cls in (MLP, GLUMLP):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert [p.name for p in params] == ["input_size", "hidden_size", "num_experts", "top_k",
                                            "bias", "activation"], cls.__name__
        assert params[4].default is False
        fwd = list(inspect.signature(cls.forward).parameters)[1:]
        assert fwd == ["x", "expert_p", "expert_idxs"], cls.__name__
    assert inspect.signature(MLP.__init__).parameters["activation"].default is None


def test_original_readme_mlp_example_runs_unchanged():
    # --- the original ScatterMoE README example, as written for the original package ---
    from scattermoe.mlp import MLP

    x_dim, h_dim, E, k = 64, 128, 8, 2
    X = torch.randn(4, 16, x_dim, requires_grad=True)
    router = nn.Linear(x_dim, E)

    # Initialise module...
    mlp = MLP(
        input_size=x_dim, hidden_size=h_dim,
        activation=nn.GELU(),
        num_experts=E, top_k=k
    )

    logits = router(X).view(-1, E)
    weights = torch.softmax(logits.float(), dim=-1)
    k_weights, k_idxs = torch.topk(weights, k)

    # Calling module...
    Y = mlp(
        X,          # input tensor
        k_weights,  # top-k weights from router
        k_idxs      # top-k indices from router
    )
    # --- end of the example ---
    assert Y.shape == X.shape
    Y.square().sum().backward()
    for name, p in list(mlp.named_parameters()) + list(router.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert X.grad is not None and X.grad.abs().sum() > 0

    expected = reference_moe_mlp(X.detach().view(-1, x_dim).double(), k_weights.detach().double(),
                                 k_idxs, mlp.experts.weight.detach().double(), None,
                                 mlp.output_experts.weight.detach().double(), None, nn.GELU(),
                                 False)
    torch.testing.assert_close(Y.detach().view(-1, x_dim).double(), expected,
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- determinism

def _glu_run(module, x, expert_p, idxs, d_out, autocast=None):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    expert_p = expert_p.clone().requires_grad_(True)
    device = x.device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = module(x, expert_p, idxs)
    out.backward(d_out.to(out.dtype))
    return [out.detach(), x.grad, expert_p.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_glumlp_forward_backward_is_bitwise_deterministic(device, autocast):
    torch.manual_seed(6)
    T, d, h, E, k = 257, 64, 96, 8, 4
    module = GLUMLP(d, h, E, k, bias=True).to(device)
    for p in module.parameters():
        nn.init.normal_(p, std=0.2)
    idxs, gates = routing(T, k, E, seed=7, device=device)
    x = torch.randn(T, d, device=device)
    d_out = torch.randn(T, d, device=device)
    first = _glu_run(module, x, gates, idxs, d_out, autocast)
    second = _glu_run(module, x, gates, idxs, d_out, autocast)
    assert len(first) == 3 + 4
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"result {i} differs between runs"


# ----------------------------------------------------------------------------------- bad inputs

@pytest.mark.raises
@pytest.mark.parametrize("cls", [MLP, GLUMLP])
def test_wrong_x_width_names_x(cls, device):
    module = cls(8, 16, 4, 2, activation=nn.GELU()).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    with pytest.raises(ValueError, match="'x'"):
        module(torch.randn(6, 7, device=device), gates, idxs)


@pytest.mark.parametrize("cls", [MLP, GLUMLP])
@pytest.mark.parametrize("shift", [4, 9, -5])
def test_expert_ids_out_of_range_name_expert_idxs(cls, shift):
    """CPU only: on CUDA, ids are not range-checked (that would need a host round trip)."""
    module = cls(8, 16, 4, 2, activation=nn.GELU())
    idxs, gates = routing(6, 2, 4)
    bad = idxs.clone()
    bad[2, 1] = bad[2, 1] + shift if shift > 0 else shift
    with pytest.raises(ValueError, match="expert_idxs"):
        module(torch.randn(6, 8), gates, bad)
    with pytest.raises(ValueError, match="expert_idxs"):
        flatten_sort_count(bad, 4)


@pytest.mark.raises
def test_parallel_experts_wrong_width_and_gate_shape(device):
    experts = ParallelExperts(4, 8, 6).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    plan = flatten_sort_count(idxs, 4)
    with pytest.raises(ValueError, match="'w'|'x'|'inputs'"):
        experts(torch.randn(6, 5, device=device), 2, *plan)
    with pytest.raises(ValueError, match="'gates'"):
        experts(torch.randn(6, 8, device=device), 2, *plan, gates=gates[:, :1])
    with pytest.raises(ValueError, match="'x'"):
        experts(torch.randn(5, 8, device=device), 2, *plan)


@pytest.mark.raises
@pytest.mark.parametrize("cls", [MLP, GLUMLP])
def test_mismatched_routing_shapes_raise(cls, device):
    module = cls(8, 16, 4, 2, activation=nn.GELU()).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    # 5 tokens, 6 routed: the fused layer names the gates (6 rows where x has 5), the unfused
    # path x (5 rows where the plan routes 6); either names an argument and what it expected.
    with pytest.raises(ValueError, match="'x'|'gates'"):
        module(torch.randn(5, 8, device=device), gates, idxs)
    with pytest.raises(ValueError, match="'gates'"):  # expert_p (T, 1) for (T, 2) routing
        module(torch.randn(6, 8, device=device), gates[:, :1], idxs)
