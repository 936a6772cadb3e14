"""parallel_linear, ParallelExperts, MLP and GLUMLP: outputs and every gradient against float64
eager references (CPU)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from torch import nn  # noqa: E402

from reference import (assert_close, f64, reference_moe_mlp, reference_parallel_linear,  # noqa: E402
                       routing)
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
def test_parallel_linear(T, d_in, d_out, E, k, grouped_in, grouped_out, gated, bias):
    idxs, gates = routing(T, k, E)
    plan = flatten_sort_count(idxs, E)
    x = torch.randn(T * k if grouped_in else T, d_in, requires_grad=True)
    weight = torch.randn(E, d_out, d_in, requires_grad=True)  # ParallelExperts layout
    b = torch.randn(E, d_out, requires_grad=True) if bias else None
    g = gates.clone().requires_grad_(True) if gated else None
    # With grouped input, each row is its own token (fan-out 1), as the original MLP uses it.
    k_arg = 1 if grouped_in else k

    out = parallel_linear(x, weight.permute(0, 2, 1), k_arg, *plan, expert_biases=b, gates=g,
                          grouped_in=grouped_in, grouped_out=grouped_out)
    x64, w64, b64, g64 = f64(x), f64(weight), f64(b), f64(g)
    expected = reference_parallel_linear(x64, w64.permute(0, 2, 1), k_arg, plan, b64, g64,
                                         grouped_in, grouped_out)
    assert out.shape == expected.shape
    assert_close(out, expected, "out")

    d_out = torch.randn_like(out)
    out.backward(d_out)
    expected.backward(d_out.double())
    assert_close(x.grad, x64.grad, "dx")
    assert_close(weight.grad, w64.grad, "dW")
    if bias:
        assert_close(b.grad, b64.grad, "db")
    if gated:
        assert_close(g.grad, g64.grad, "d_gates")


def test_parallel_linear_only_some_gradients():
    idxs, gates = routing(8, 2, 4)
    plan = flatten_sort_count(idxs, 4)
    x = torch.randn(8, 6)
    weight = torch.randn(4, 5, 6, requires_grad=True)
    out = parallel_linear(x, weight.permute(0, 2, 1), 2, *plan, gates=gates)
    out.sum().backward()
    expected_w = f64(weight)
    reference_parallel_linear(x.double(), expected_w.permute(0, 2, 1), 2, plan,
                              gates=gates.double()).sum().backward()
    assert x.grad is None
    assert_close(weight.grad, expected_w.grad, "dW")


def test_parallel_experts_module():
    torch.manual_seed(0)
    experts = ParallelExperts(8, 64, 96, bias=True)
    assert experts.weight.shape == (8, 96, 64)
    assert experts.bias.shape == (8, 96)
    assert abs(experts.weight.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(experts.bias) == 0
    assert ParallelExperts(2, 3, 4).bias is None

    idxs, gates = routing(10, 2, 8)
    plan = flatten_sort_count(idxs, 8)
    x = torch.randn(10, 64)
    out = experts(x, 2, *plan, gates=gates)
    expected = reference_parallel_linear(x.double(), experts.weight.double().permute(0, 2, 1), 2,
                                         plan, experts.bias.double(), gates.double())
    assert_close(out, expected, "out")


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("T,d,h,E,k", [(1, 8, 16, 4, 1), (17, 16, 24, 8, 2), (24, 12, 20, 8, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp(glu, T, d, h, E, k, bias):
    torch.manual_seed(1)
    activation = nn.SiLU() if glu else nn.GELU()
    module = (GLUMLP if glu else MLP)(d, h, E, k, bias=bias, activation=activation)
    for p in module.parameters():  # non-zero biases, weights large enough to matter
        nn.init.normal_(p, std=0.5)
    idxs, gates = routing(T, k, E, seed=2)
    x = torch.randn(3, T, d)[1].clone().requires_grad_(True)
    expert_p = gates.clone().requires_grad_(True)

    out = module(x, expert_p, idxs)
    params = [module.experts.weight, module.experts.bias, module.output_experts.weight,
              module.output_experts.bias]
    params64 = [f64(p) for p in params]
    x64, p64 = f64(x), f64(expert_p)
    expected = reference_moe_mlp(x64, p64, idxs, *params64, activation, glu)
    assert_close(out, expected, "out")

    d_out = torch.randn_like(out)
    out.backward(d_out)
    expected.backward(d_out.double())
    assert_close(x.grad, x64.grad, "dx")
    assert_close(expert_p.grad, p64.grad, "d_expert_p")
    for name, p, p_ref in zip(("W1", "b1", "W2", "b2"), params, params64):
        if p is not None:
            assert_close(p.grad, p_ref.grad, "d" + name)


def test_mlp_keeps_leading_shape():
    module = MLP(8, 16, 4, 2, activation=nn.ReLU())
    idxs, gates = routing(6, 2, 4)
    out = module(torch.randn(2, 3, 8), gates, idxs)
    assert out.shape == (2, 3, 8)


def test_mlp_compiles_without_graph_breaks():
    """fullgraph tracing needs the fake implementations of every op the modules use."""
    torch._dynamo.reset()
    module = GLUMLP(8, 16, 4, 2, bias=True)
    idxs, gates = routing(6, 2, 4)
    x = torch.randn(6, 8, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x, gates, idxs)
    out.sum().backward()
    eager_x = x.detach().clone().requires_grad_(True)
    expected = module(eager_x, gates, idxs)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, eager_x.grad)
