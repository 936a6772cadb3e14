"""Fixtures shared by the scattermoe PyTorch tests: the devices they run on.

`device` gives "cpu" and "cuda"; the cuda cases skip, saying why, where there is no GPU or the
package was built without its CUDA backend (SCATTERMOE_CUDA=1). `cuda` is for the tests that
exist only on a GPU (CUDA graphs, large tensors).

Tests marked `raises` expect the library to raise on bad input. On each device they first
check, once, in a child process, that such an error comes back as a ValueError: on the lent H200
one ended the whole Python process instead (SIGSEGV, seen with CUDA tensors; CPU ones were not
tried there), which would stop every test after it. If the check fails they skip, and
test_cuda.py::test_library_errors_raise_value_error fails with the child's output.
"""
import functools
import os
import subprocess
import sys

import pytest

try:
    import torch
except ImportError:  # the test modules skip themselves (pytest.importorskip)
    torch = None

NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False)"


def _cuda_skip_reason():
    """None when the cuda cases can run, else why not."""
    if torch is None or not torch.cuda.is_available():
        return NO_CUDA_REASON
    try:
        import scattermoe
    except ImportError:
        return None  # the test modules skip on the import themselves
    if not scattermoe._C.build_info()["cuda_backend"]:
        return ("scattermoe was built without its CUDA backend: "
                "SCATTERMOE_CUDA=1 pip install --no-build-isolation ./python")
    return None


PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_error.py")


def run_probe(device):
    """probe_error.py on `device` in a child process (its CompletedProcess)."""
    return subprocess.run([sys.executable, "-X", "faulthandler", PROBE, device],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


@functools.lru_cache(maxsize=None)
def errors_raise_cleanly(device):
    """Whether library errors on `device` tensors raise ValueError (in a fresh process)."""
    return run_probe(device).returncode == 0


def pytest_configure(config):
    config.addinivalue_line("markers", "raises: expects the library to raise on bad input")


def _skip_if_errors_crash(request, device):
    if request.node.get_closest_marker("raises") and not errors_raise_cleanly(device):
        pytest.skip(f"a library error on {device} tensors ends the process on this machine "
                    "(test_cuda.py::test_library_errors_raise_value_error has the details)")


def _skip_unless_cuda_runs(request):
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    _skip_if_errors_crash(request, "cuda")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        _skip_unless_cuda_runs(request)
    elif torch is not None and torch.cuda.is_available():
        # Where there is no GPU the CPU errors are known to raise (CI runs these tests), so the
        # child process is only spent on GPU machines.
        _skip_if_errors_crash(request, "cpu")
    return request.param


@pytest.fixture
def cuda(request):
    _skip_unless_cuda_runs(request)
    return "cuda"
