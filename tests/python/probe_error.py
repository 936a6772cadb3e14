"""Makes the library raise on `device` tensors (python tests/python/probe_error.py cuda|cpu),
prints how each error came back, and exits 0 when every one came back as a ValueError.

Run in a child process by the tests (conftest.errors_raise_cleanly, test_cuda.py): on the lent
H200 such an error once ended the whole Python process (SIGSEGV) instead of raising. When the
probe fails there, scripts/gpu-check runs it under gdb for a native backtrace. Not a test module
(pytest collects test_*)."""
import sys

import torch

import scattermoe  # noqa: F401  (registers torch.ops.scattermoe)
from scattermoe.kernels import ops
from scattermoe.parallel_experts import flatten_sort_count


def main(device: str) -> int:
    x = torch.randn(8, 6, device=device)
    w = torch.randn(4, 5, 6, device=device).permute(0, 2, 1)
    gates = torch.rand(8, 2, device=device)
    plan = flatten_sort_count(torch.randint(0, 4, (8, 2), device=device), 4)
    zero_strides = torch.ones(1, 1, device=device).expand(8, 5)
    cases = {
        # The CUDA kernels take rows with unit stride only; the CPU backend takes any strides.
        "zero-stride gradient": (device == "cuda", lambda: torch.ops.scattermoe.parallel_linear_backward(
            zero_strides, x, w, None, gates, *plan, 2, False, False, [False, True, False, False])),
        "k larger than the experts": (True, lambda: flatten_sort_count(
            torch.zeros(3, 5, dtype=torch.long, device=device), 4)),
        "mismatched feature size": (True, lambda: ops.scatter2scatter(
            x, torch.randn(4, 7, 5, device=device), *plan[:2], 2)),
    }
    failed = 0
    for name, (must_raise, call) in cases.items():
        try:
            call()
            print(f"{device}, {name}: accepted")
            failed += must_raise
        except ValueError as e:
            print(f"{device}, {name}: ValueError: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
