"""Makes the library raise on `device` tensors (python tests/python/probe_error.py cuda|cpu) and
prints how the errors came back. scripts/gpu-check runs it under gdb when test_cuda.py's error
probes fail, for a native backtrace of the crash. Not a test module (pytest collects test_*)."""
import sys

import torch

import scattermoe  # noqa: F401  (registers torch.ops.scattermoe)
from scattermoe.parallel_experts import flatten_sort_count


def main(device: str) -> int:
    x = torch.randn(8, 6, device=device)
    w = torch.randn(4, 5, 6, device=device).permute(0, 2, 1)
    gates = torch.rand(8, 2, device=device)
    plan = flatten_sort_count(torch.randint(0, 4, (8, 2), device=device), 4)
    d_out = torch.ones(1, 1, device=device).expand(8, 5)  # zero strides: CUDA rejects them
    try:
        torch.ops.scattermoe.parallel_linear_backward(d_out, x, w, None, gates, *plan, 2, False,
                                                      False, [False, True, False, False])
        print(f"{device}: zero-stride gradient accepted")
    except ValueError as e:
        print(f"{device}: ValueError: {e}")
    try:
        flatten_sort_count(torch.zeros(3, 5, dtype=torch.long, device=device), 4)
        print(f"{device}: k > num_experts accepted")
        return 1
    except ValueError as e:
        print(f"{device}: ValueError: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
