"""What only a GPU shows: CUDA-graph capture and replay of forward+backward with new routing,
bitwise determinism at sizes where reductions are split, and addressing beyond 2^31 elements.
Every test here skips without a CUDA device (the `cuda` fixture says why)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the scattermoe package tests need it")
scattermoe = pytest.importorskip("scattermoe", reason="the scattermoe package (and its _C extension) is not built: pip install --no-build-isolation ./python")

from torch import nn  # noqa: E402

from reference import assert_bf16_close, cpu, routing  # noqa: E402
from scattermoe.kernels import ops  # noqa: E402
from scattermoe.mlp import GLUMLP  # noqa: E402
from scattermoe.parallel_experts import flatten_sort_count, parallel_linear  # noqa: E402


def capture(step):
    """Warms step up on a side stream (as torch.cuda.graph asks), then captures one call.
    Returns the graph and the static tensors step returned; they hold values only after a
    replay, since capturing runs nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def skewed_routing(T, k, E, device):
    """Every token to experts 0..k-1: the other experts get no rows."""
    idxs = torch.arange(k, device=device).expand(T, k).contiguous()
    gates = torch.full((T, k), 1.0 / k, device=device)
    return idxs, gates


def new_routings(T, k, E, device):
    """Routings to copy into the captured graph's static index tensor, one after the other."""
    return [routing(T, k, E, seed=11, device=device), skewed_routing(T, k, E, device),
            routing(T, k, E, seed=12, device=device)]


def assert_all_close(actual, expected, names):
    """Graph replay against eager on the same inputs: the same kernels, so equal up to fp32
    rounding at most (torch.testing's float32 tolerance); stale routing would be far off."""
    assert len(actual) == len(expected) == len(names)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- CUDA graphs

def test_glumlp_graph_replays_forward_backward_with_new_routing(cuda):
    torch.manual_seed(0)
    T, d, h, E, k = 96, 32, 48, 8, 2
    module = GLUMLP(d, h, E, k, bias=True).to(cuda)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    params = list(module.parameters())
    idxs, gates = routing(T, k, E, seed=10, device=cuda)
    static_x = torch.randn(T, d, device=cuda, requires_grad=True)
    static_p = gates.clone().requires_grad_(True)
    static_idxs = idxs.clone()  # flatten_sort_count runs inside the graph, on these
    static_dy = torch.randn(T, d, device=cuda)
    names = ["out", "dx", "d_expert_p", "dW1", "db1", "dW2", "db2"]

    def step(x=static_x, p=static_p, idx=static_idxs):
        out = module(x, p, idx)
        return [out.detach()] + list(torch.autograd.grad(out, [x, p] + params, static_dy))

    def eager(x, p, idx):
        return step(x.detach().clone().requires_grad_(True),
                    p.detach().clone().requires_grad_(True), idx.clone())

    graph, static = capture(step)
    graph.replay()
    assert_all_close(static, eager(static_x, static_p, static_idxs), names)
    before = static[0].clone()

    for new_idxs, new_gates in new_routings(T, k, E, cuda):
        with torch.no_grad():
            static_idxs.copy_(new_idxs)
            static_p.copy_(new_gates)
            static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        assert_all_close(static, eager(static_x, static_p, static_idxs), names)
        assert not torch.allclose(static[0], before), "replay did not change the output"
        before = static[0].clone()


def test_parallel_linear_graph_replays_with_new_routing(cuda):
    """The plan, parallel_linear forward+backward (bias, gates) and the original-API
    scatter2scatter (which counts the expert offsets itself) in one graph."""
    torch.manual_seed(1)
    T, d_in, d_out, E, k = 80, 24, 40, 8, 4
    idxs, gates = routing(T, k, E, seed=20, device=cuda)
    static_x = torch.randn(T, d_in, device=cuda, requires_grad=True)
    static_g = gates.clone().requires_grad_(True)
    static_idxs = idxs.clone()
    weight = torch.randn(E, d_out, d_in, device=cuda, requires_grad=True)
    bias = torch.randn(E, d_out, device=cuda, requires_grad=True)
    static_dy = torch.randn(T, d_out, device=cuda)
    names = ["out", "dx", "dW", "db", "d_gates", "scatter2scatter"]

    def step(x=static_x, g=static_g, idx=static_idxs):
        sei, ssi, offsets = flatten_sort_count(idx, E)
        out = parallel_linear(x, weight.permute(0, 2, 1), k, sei, ssi, offsets,
                              expert_biases=bias, gates=g)
        grads = torch.autograd.grad(out, [x, weight, bias, g], static_dy)
        y = ops.scatter2scatter(x.detach(), weight.detach().permute(0, 2, 1), sei, ssi, k)
        return [out.detach()] + list(grads) + [y]

    def eager(x, g, idx):
        return step(x.detach().clone().requires_grad_(True),
                    g.detach().clone().requires_grad_(True), idx.clone())

    graph, static = capture(step)
    graph.replay()
    assert_all_close(static, eager(static_x, static_g, static_idxs), names)
    for new_idxs, new_gates in new_routings(T, k, E, cuda):
        with torch.no_grad():
            static_idxs.copy_(new_idxs)
            static_g.copy_(new_gates)
        graph.replay()
        assert_all_close(static, eager(static_x, static_g, static_idxs), names)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glumlp_is_bitwise_deterministic_at_scale(cuda, dtype):
    """Thousands of rows per expert: a weight-gradient reduction split across thread blocks
    and combined with atomics would differ between runs here."""
    torch.manual_seed(2)
    T, d, h, E, k = 8192, 256, 512, 8, 2
    module = GLUMLP(d, h, E, k, bias=True).to(device=cuda, dtype=dtype)
    idxs, gates = routing(T, k, E, seed=21, device=cuda)
    x = torch.randn(T, d, device=cuda, dtype=dtype)
    dy = torch.randn(T, d, device=cuda, dtype=dtype)
    p = gates.to(dtype)

    def run():
        xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        out = module(xr, pr, idxs)
        return [out] + list(torch.autograd.grad(out, [xr, pr] + list(module.parameters()), dy))

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two runs"


# ------------------------------------------------------------------------------- int64 safety

def test_addresses_beyond_two_to_the_31_elements(cuda):
    """x and dx of 2^31 + 2^16 bf16 elements (4 GiB each): row offsets times the row stride
    overflow 32 bits for the last tokens. Forward, dx and dW are checked on the first and last
    tokens against float64 on the CPU, and dW against torch's fp32-accumulated products."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    T, d_in, d_out, E, k = 2**21 + 64, 1024, 16, 4, 1
    torch.manual_seed(3)
    idxs, _ = routing(T, k, E, seed=30, device=cuda)
    x = torch.randn(T, d_in, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    assert x.numel() > 2**31
    weight = torch.randn(E, d_out, d_in, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d_out, device=cuda, dtype=torch.bfloat16)
    plan = flatten_sort_count(idxs, E)
    out = parallel_linear(x, weight.permute(0, 2, 1), k, *plan)
    dx, dw = torch.autograd.grad(out, [x, weight], dy)

    rows = torch.cat([torch.arange(64), torch.arange(T - 64, T)]).to(cuda)

    def at_rows(t):  # the checked rows, copied to the CPU in float64
        return cpu(t[rows]).double()

    w64 = cpu(weight).double()[cpu(idxs[rows, 0])]  # (rows, d_out, d_in)
    expected_out = torch.einsum("ti,toi->to", at_rows(x), w64)
    expected_dx = torch.einsum("to,toi->ti", at_rows(dy), w64)
    assert_bf16_close(at_rows(out), expected_out, "out rows", reduction=d_in)
    assert_bf16_close(at_rows(dx), expected_dx, "dx rows", reduction=d_out)
    del dx
    expected_dw = torch.stack([
        (dy[idxs[:, 0] == e].float().t() @ x[idxs[:, 0] == e].detach().float())
        for e in range(E)])  # (E, d_out, d_in), fp32 accumulation on the GPU
    # An expert's ~2^19 rows, summed in fp32 in two orders: the sums' difference stays far
    # below one bf16 rounding of the result, which is what reduction=1 allows.
    assert_bf16_close(dw, expected_dw, "dW", reduction=1)


# Errors the library raises, probed in a child process (probe_error.py): on the lent H200 the
# first such error (on CUDA tensors) ended the Python process (SIGSEGV) instead of raising, so a
# crash here fails this test with the child's output instead of stopping the whole run. The CPU
# case tells whether it is the CUDA path or any error raised through the extension there.
@pytest.mark.parametrize("tensors", ["cuda", "cpu"])
def test_library_errors_raise_value_error(cuda, tensors):
    from conftest import run_probe
    child = run_probe(tensors)
    assert child.returncode == 0, (f"the probe failed ({child.returncode}):\n{child.stdout}"
                                   f"{child.stderr[-3000:]}")
