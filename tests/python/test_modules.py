"""parallel_linear, ParallelExperts, MLP and GLUMLP: outputs and every gradient against float64
eager references (run on CPU and CUDA tensors; the references on the CPU)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from torch import nn  # noqa: E402

from reference import (assert_bf16_close, assert_close, cpu, f64, reference_moe_mlp,  # noqa: E402
                       reference_parallel_linear, routing)
from scattermoe.mlp import GLUMLP, MLP  # noqa: E402
from scattermoe.parallel_experts import (ParallelExperts, flatten_sort_count,  # noqa: E402
                                         parallel_linear)

SHAPES = [  # (T, d_in, d_out, E, k)
    (1, 8, 4, 4, 1),
    (9, 16, 24, 4, 2),
    (33, 32, 20, 8, 4),
    (5, 12, 8, 8, 8),
]
MODES = [(False, False), (False, True), (True, False), (True, True)]  # (grouped_in, grouped_out)


# Gates combine token-major rows: they go with scattered output only.
CONFIGS = [(gi, go, gated) for gi, go in MODES for gated in (False, True) if not (gated and go)]


@pytest.mark.parametrize("T,d_in,d_out,E,k", SHAPES)
@pytest.mark.parametrize("grouped_in,grouped_out,gated", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
def test_parallel_linear(T, d_in, d_out, E, k, grouped_in, grouped_out, gated, bias, device):
    idxs, gates = routing(T, k, E, device=device)
    plan = flatten_sort_count(idxs, E)
    x = torch.randn(T * k if grouped_in else T, d_in, device=device, requires_grad=True)
    # ParallelExperts layout
    weight = torch.randn(E, d_out, d_in, device=device, requires_grad=True)
    b = torch.randn(E, d_out, device=device, requires_grad=True) if bias else None
    g = gates.clone().requires_grad_(True) if gated else None
    # With grouped input, each row is its own token (fan-out 1), as the original MLP uses it.
    k_arg = 1 if grouped_in else k

    out = parallel_linear(x, weight.permute(0, 2, 1), k_arg, *plan, expert_biases=b, gates=g,
                          grouped_in=grouped_in, grouped_out=grouped_out)
    x64, w64, b64, g64 = f64(x), f64(weight), f64(b), f64(g)
    expected = reference_parallel_linear(x64, w64.permute(0, 2, 1), k_arg,
                                         [cpu(t) for t in plan], b64, g64, grouped_in,
                                         grouped_out)
    assert out.shape == expected.shape and out.device == x.device
    assert_close(out, expected, "out")

    d_out = torch.randn_like(out)
    out.backward(d_out)
    expected.backward(cpu(d_out).double())
    assert_close(x.grad, x64.grad, "dx")
    assert_close(weight.grad, w64.grad, "dW")
    if bias:
        assert_close(b.grad, b64.grad, "db")
    if gated:
        assert_close(g.grad, g64.grad, "d_gates")


@pytest.mark.parametrize("T,d_in,d_out,E,k", [(9, 16, 24, 4, 2), (70, 96, 40, 8, 4)])
@pytest.mark.parametrize("grouped_in,grouped_out,gated", [(False, False, True),
                                                         (False, True, False),
                                                         (True, False, True)])
def test_parallel_linear_bf16(T, d_in, d_out, E, k, grouped_in, grouped_out, gated, device):
    """bf16 storage, fp32 accumulation; the reference takes the same bf16 values in float64."""
    idxs, gates = routing(T, k, E, device=device)
    plan = flatten_sort_count(idxs, E)
    bf16 = dict(device=device, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(T * k if grouped_in else T, d_in, **bf16)
    weight = torch.randn(E, d_out, d_in, **bf16)
    b = torch.randn(E, d_out, **bf16)
    g = gates.to(torch.bfloat16).requires_grad_(True) if gated else None
    k_arg = 1 if grouped_in else k

    out = parallel_linear(x, weight.permute(0, 2, 1), k_arg, *plan, expert_biases=b, gates=g,
                          grouped_in=grouped_in, grouped_out=grouped_out)
    assert out.dtype == torch.bfloat16
    x64, w64, b64, g64 = f64(x), f64(weight), f64(b), f64(g)
    expected = reference_parallel_linear(x64, w64.permute(0, 2, 1), k_arg,
                                         [cpu(t) for t in plan], b64, g64, grouped_in,
                                         grouped_out)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(cpu(grad_out).double())
    # Reduction lengths: out sums d_in products (and k rows with gates); dx sums d_out products
    # over each token's k rows; dW and db sum over an expert's rows (at most T*k); d_gates is
    # one d_out-long dot product.
    rows = T * k
    assert_bf16_close(out, expected, "out", reduction=d_in * k)
    assert_bf16_close(x.grad, x64.grad, "dx", reduction=d_out * k)
    assert_bf16_close(weight.grad, w64.grad, "dW", reduction=rows)
    assert_bf16_close(b.grad, b64.grad, "db", reduction=rows)
    if gated:
        assert_bf16_close(g.grad, g64.grad, "d_gates", reduction=d_out)


def test_parallel_linear_only_some_gradients(device):
    idxs, gates = routing(8, 2, 4, device=device)
    plan = flatten_sort_count(idxs, 4)
    x = torch.randn(8, 6, device=device)
    weight = torch.randn(4, 5, 6, device=device, requires_grad=True)
    out = parallel_linear(x, weight.permute(0, 2, 1), 2, *plan, gates=gates)
    out.sum().backward()
    expected_w = f64(weight)
    reference_parallel_linear(cpu(x).double(), expected_w.permute(0, 2, 1), 2,
                              [cpu(t) for t in plan], gates=cpu(gates).double()).sum().backward()
    assert x.grad is None
    assert_close(weight.grad, expected_w.grad, "dW")


def test_parallel_experts_module(device):
    torch.manual_seed(0)
    experts = ParallelExperts(8, 64, 96, bias=True).to(device)
    assert experts.weight.shape == (8, 96, 64)
    assert experts.bias.shape == (8, 96)
    assert abs(experts.weight.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(experts.bias) == 0
    assert ParallelExperts(2, 3, 4).bias is None

    idxs, gates = routing(10, 2, 8, device=device)
    plan = flatten_sort_count(idxs, 8)
    x = torch.randn(10, 64, device=device)
    out = experts(x, 2, *plan, gates=gates)
    expected = reference_parallel_linear(cpu(x).double(),
                                         cpu(experts.weight).double().permute(0, 2, 1), 2,
                                         [cpu(t) for t in plan], cpu(experts.bias).double(),
                                         cpu(gates).double())
    assert_close(out, expected, "out")


# The library's activations run as one fused call (torch.ops.scattermoe.mlp_*); any other
# (here tanh) as two ParallelLinear calls around torch's activation.
ACTIVATIONS = {
    "library": lambda glu: nn.SiLU() if glu else nn.GELU(),
    "gelu_tanh": lambda glu: nn.GELU(approximate="tanh"),
    "relu": lambda glu: nn.ReLU(),
    "other": lambda glu: nn.Tanh(),
}


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("T,d,h,E,k", [(1, 8, 16, 4, 1), (17, 16, 24, 8, 2), (24, 12, 20, 8, 4)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_mlp(glu, T, d, h, E, k, bias, act, device):
    torch.manual_seed(1)
    activation = ACTIVATIONS[act](glu)
    module = (GLUMLP if glu else MLP)(d, h, E, k, bias=bias, activation=activation)
    for p in module.parameters():  # non-zero biases, weights large enough to matter
        nn.init.normal_(p, std=0.5)
    module.to(device)
    idxs, gates = routing(T, k, E, seed=2, device=device)
    x = torch.randn(3, T, d)[1].to(device).requires_grad_(True)
    expert_p = gates.clone().requires_grad_(True)

    out = module(x, expert_p, idxs)
    params = [module.experts.weight, module.experts.bias, module.output_experts.weight,
              module.output_experts.bias]
    params64 = [f64(p) for p in params]
    x64, p64 = f64(x), f64(expert_p)
    expected = reference_moe_mlp(x64, p64, cpu(idxs), *params64, activation, glu)
    assert_close(out, expected, "out")

    d_out = torch.randn_like(out)
    out.backward(d_out)
    expected.backward(cpu(d_out).double())
    assert_close(x.grad, x64.grad, "dx")
    assert_close(expert_p.grad, p64.grad, "d_expert_p")
    for name, p, p_ref in zip(("W1", "b1", "W2", "b2"), params, params64):
        if p is not None:
            assert_close(p.grad, p_ref.grad, "d" + name)


@pytest.mark.parametrize("glu", [False, True])
def test_mlp_bf16(glu, device):
    """A bf16 module (bf16 parameters, no autocast): the reference takes the same bf16 values in
    float64; the hidden activations are rounded to bf16 between the two projections."""
    torch.manual_seed(1)
    T, d, h, E, k = 40, 32, 48, 8, 2
    activation = nn.SiLU() if glu else nn.GELU()
    module = (GLUMLP if glu else MLP)(d, h, E, k, bias=True, activation=activation)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    module.to(device=device, dtype=torch.bfloat16)
    idxs, gates = routing(T, k, E, seed=2, device=device)
    x = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    expert_p = gates.to(torch.bfloat16).requires_grad_(True)

    out = module(x, expert_p, idxs)
    assert out.dtype == torch.bfloat16
    params = [module.experts.weight, module.experts.bias, module.output_experts.weight,
              module.output_experts.bias]
    params64 = [f64(p) for p in params]
    x64, p64 = f64(x), f64(expert_p)
    expected = reference_moe_mlp(x64, p64, cpu(idxs), *params64, activation, glu)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    expected.backward(cpu(d_out).double())
    # Two chained projections with bf16 hidden rows between them: the longest chain of sums
    # behind out, dx and d_expert_p runs over d and h (and k rows); dW1/db1, dW2/db2 sum over
    # an expert's rows (at most T*k) after that chain.
    chain = (d + h) * k
    assert_bf16_close(out, expected, "out", reduction=chain)
    assert_bf16_close(x.grad, x64.grad, "dx", reduction=chain)
    assert_bf16_close(expert_p.grad, p64.grad, "d_expert_p", reduction=chain)
    for name, p, p_ref in zip(("W1", "b1", "W2", "b2"), params, params64):
        assert_bf16_close(p.grad, p_ref.grad, "d" + name, reduction=chain + T * k)


def test_mlp_keeps_leading_shape(device):
    module = MLP(8, 16, 4, 2, activation=nn.ReLU()).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    out = module(torch.randn(2, 3, 8, device=device), gates, idxs)
    assert out.shape == (2, 3, 8)


def test_mlp_compiles_without_graph_breaks(device):
    """fullgraph tracing needs the fake implementations of every op the modules use."""
    torch._dynamo.reset()
    module = GLUMLP(8, 16, 4, 2, bias=True).to(device)
    idxs, gates = routing(6, 2, 4, device=device)
    x = torch.randn(6, 8, device=device, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x, gates, idxs)
    out.sum().backward()
    eager_x = x.detach().clone().requires_grad_(True)
    expected = module(eager_x, gates, idxs)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, eager_x.grad)
