"""torch.ops.scattermoe and scattermoe.kernels.ops against float64 eager references (run on CPU
and CUDA tensors; the references on the CPU)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from reference import (assert_bf16_close, assert_close, cpu, reference_plan,  # noqa: E402
                       reference_scatter2scatter, routing)
from scattermoe.kernels import ops  # noqa: E402
from scattermoe.parallel_experts import flatten_sort_count  # noqa: E402

SHAPES = [  # (T, d_in, d_out, E, k)
    (1, 8, 4, 4, 1),
    (7, 16, 24, 4, 2),
    (33, 32, 20, 8, 4),
    (64, 24, 40, 16, 1),
    (5, 12, 8, 8, 8),
]


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (10, 2, 4), (37, 4, 8), (3, 8, 8), (0, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_flatten_sort_count(T, k, E, dtype, device):
    idxs, _ = (routing(T, k, E, dtype=dtype, device=device) if T
               else (torch.zeros(0, k, dtype=dtype, device=device), None))
    got = flatten_sort_count(idxs, num_experts=E)
    for name, a, b in zip(("sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets"),
                          got, reference_plan(idxs.cpu(), E)):
        assert a.dtype == torch.long and a.device == idxs.device, name
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("T,d_in,d_out,E,k", SHAPES)
@pytest.mark.parametrize("x_grouped", [False, True])
@pytest.mark.parametrize("y_grouped", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_scatter2scatter(T, d_in, d_out, E, k, x_grouped, y_grouped, bias, device):
    idxs, _ = routing(T, k, E, device=device)
    sei, ssi, offsets = flatten_sort_count(idxs, E)
    x = torch.randn(T * k if x_grouped else T, d_in, device=device)
    # The (E, out, in) storage of a parameter, passed as its (E, in, out) view.
    w = torch.randn(E, d_out, d_in, device=device).permute(0, 2, 1)
    b = torch.randn(E, d_out, device=device) if bias else None
    y = ops.scatter2scatter(x, w, sei, ssi, k, b=b, x_grouped=x_grouped, y_grouped=y_grouped)
    expected = reference_scatter2scatter(cpu(x).double(), cpu(w).double(), cpu(sei), cpu(ssi), k,
                                         None if b is None else cpu(b).double(), x_grouped,
                                         y_grouped)
    assert y.shape == (T * k, d_out)
    assert_close(y, expected, "y")
    # The registered op directly, with the plan's offsets.
    y_op = torch.ops.scattermoe.scatter2scatter(x, w, sei, ssi, offsets, k, b, x_grouped, y_grouped)
    assert torch.equal(y_op, y)


def test_scatter2scatter_out_argument(device):
    idxs, _ = routing(9, 2, 4, device=device)
    sei, ssi, _ = flatten_sort_count(idxs, 4)
    x, w = torch.randn(9, 8, device=device), torch.randn(4, 8, 6, device=device)
    out = torch.full((18, 6), float("nan"), device=device)
    result = ops.scatter2scatter(x, w, sei, ssi, 2, out=out)
    assert result is out
    assert_close(out, reference_scatter2scatter(cpu(x).double(), cpu(w).double(), cpu(sei),
                                                cpu(ssi), 2), "out")


@pytest.mark.parametrize("T,d_in,d_out,E,k", [(7, 16, 24, 4, 2), (70, 96, 40, 8, 4)])
@pytest.mark.parametrize("x_grouped,y_grouped", [(False, False), (False, True), (True, False)])
def test_scatter2scatter_bf16(T, d_in, d_out, E, k, x_grouped, y_grouped, device):
    idxs, _ = routing(T, k, E, device=device)
    sei, ssi, _ = flatten_sort_count(idxs, E)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(T * k if x_grouped else T, d_in, **bf16)
    w = torch.randn(E, d_out, d_in, **bf16).permute(0, 2, 1)
    b = torch.randn(E, d_out, **bf16)
    y = ops.scatter2scatter(x, w, sei, ssi, k, b=b, x_grouped=x_grouped, y_grouped=y_grouped)
    assert y.dtype == torch.bfloat16
    expected = reference_scatter2scatter(cpu(x).double(), cpu(w).double(), cpu(sei), cpu(ssi), k,
                                         cpu(b).double(), x_grouped, y_grouped)
    assert_bf16_close(y, expected, "y", reduction=d_in)


@pytest.mark.parametrize("T,k,E", [(1, 1, 2), (13, 2, 4), (20, 4, 8)])
@pytest.mark.parametrize("fan_out_is_k", [True, False])
@pytest.mark.parametrize("coeff", [False, True])
def test_group(T, k, E, fan_out_is_k, coeff, device):
    idxs, gates = routing(T, k, E, device=device)
    _, ssi, _ = flatten_sort_count(idxs, E)
    fan_out = k if fan_out_is_k else 1
    a = torch.randn(T * k // fan_out, 12, device=device)
    c = gates.flatten() if coeff else None
    g = ops.group(a, ssi, coeff=c, fan_out=fan_out)
    expected = cpu(a).double()[cpu(ssi) // fan_out]
    if coeff:
        expected = expected * cpu(c).double()[cpu(ssi)].unsqueeze(-1)
    assert_close(g, expected, "g")


@pytest.mark.parametrize("T,d_in,d_out,E,k", SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_group_bwd_W(T, d_in, d_out, E, k, has_bias, device):
    idxs, _ = routing(T, k, E, device=device)
    sei, _, offsets = flatten_sort_count(idxs, E)
    L = T * k
    dy, x = torch.randn(L, d_out, device=device), torch.randn(L, d_in, device=device)
    dw, db = ops.group_bwd_W(dy, x, offsets, E, has_bias=has_bias)
    assert dw.shape == (E, d_in, d_out)
    assert dw.transpose(1, 2).is_contiguous(), "dW must land in the (E, out, in) parameter layout"
    expected_dw = torch.zeros(E, d_in, d_out, dtype=torch.double)
    expected_db = torch.zeros(E, d_out, dtype=torch.double)
    for e in range(E):
        rows = cpu(sei) == e
        expected_dw[e] = cpu(x).double()[rows].t() @ cpu(dy).double()[rows]
        expected_db[e] = cpu(dy).double()[rows].sum(0)
    assert_close(dw, expected_dw, "dw")
    if has_bias:
        assert_close(db, expected_db, "db")
    else:
        assert db is None


def test_ops_pass_opcheck(device):
    """Schemas, fake implementations and dispatch agree (torch.library.opcheck)."""
    idxs, gates = routing(6, 2, 4, device=device)
    sei, ssi, offsets = flatten_sort_count(idxs, 4)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    x, w, b = randn(6, 8), randn(4, 5, 8).permute(0, 2, 1), randn(4, 5)
    m = torch.ops.scattermoe
    checks = [
        (m.flatten_sort_count, (idxs, 4)),
        (m.scatter2scatter, (x, w, sei, ssi, offsets, 2, b, False, False)),
        (m.group, (x, sei, ssi, offsets, 2, gates.flatten())),
        (m.group_bwd_W, (randn(12, 5), randn(12, 8), sei, ssi, offsets, True)),
        (m.parallel_linear_forward, (x, w, b, gates, sei, ssi, offsets, 2, False, False)),
        (m.parallel_linear_backward, (randn(6, 5), x, w, b, gates, sei, ssi, offsets, 2,
                                      False, False, [True, True, True, True])),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.raises
class TestBadInput:
    """Shapes and dtypes are checked before any backend runs (cpu and cuda alike). Expert ids
    and plan contents are checked only on the CPU: on CUDA that would need a host round trip,
    so there ids are clamped and a caller-built plan is trusted (README, the CUDA backend)."""

    def test_expert_id_out_of_range(self):
        with pytest.raises(ValueError, match="expert"):
            flatten_sort_count(torch.tensor([[0, 5]]), num_experts=4)

    def test_k_larger_than_experts(self, device):
        with pytest.raises(ValueError, match="k"):
            flatten_sort_count(torch.zeros(3, 5, dtype=torch.long, device=device), num_experts=4)

    def test_weight_rank(self, device):
        idxs, _ = routing(4, 1, 2, device=device)
        sei, ssi, _ = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError, match="w"):
            ops.scatter2scatter(torch.randn(4, 8, device=device), torch.randn(8, 6, device=device),
                                sei, ssi, 1)

    def test_mismatched_feature_size(self, device):
        idxs, _ = routing(4, 1, 2, device=device)
        sei, ssi, _ = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError, match="scatter2scatter"):
            ops.scatter2scatter(torch.randn(4, 8, device=device),
                                torch.randn(2, 7, 6, device=device), sei, ssi, 1)

    def test_mixed_dtypes(self, device):
        idxs, _ = routing(4, 1, 2, device=device)
        sei, ssi, _ = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError):
            ops.scatter2scatter(torch.randn(4, 8, device=device),
                                torch.randn(2, 8, 6, dtype=torch.half, device=device), sei, ssi, 1)

    def test_unsupported_dtype(self, device):
        idxs, _ = routing(4, 1, 2, device=device)
        sei, ssi, _ = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError, match="float64"):
            ops.scatter2scatter(torch.randn(4, 8, dtype=torch.double, device=device),
                                torch.randn(2, 8, 6, dtype=torch.double, device=device), sei, ssi,
                                1)

    def test_mixed_devices(self, cuda):
        idxs, _ = routing(4, 1, 2, device=cuda)
        sei, ssi, _ = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError):
            ops.scatter2scatter(torch.randn(4, 8), torch.randn(2, 8, 6, device=cuda), sei, ssi, 1)

    def test_plan_not_a_permutation(self):
        idxs, _ = routing(4, 1, 2)
        sei, ssi, offsets = flatten_sort_count(idxs, 2)
        with pytest.raises(ValueError, match="sorted_scattered_idxs"):
            torch.ops.scattermoe.scatter2scatter(torch.randn(4, 8), torch.randn(2, 8, 6), sei,
                                                 torch.zeros_like(ssi), offsets, 1, None,
                                                 False, False)
