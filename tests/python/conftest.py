"""Fixtures shared by the scattermoe PyTorch tests: the devices they run on.

`device` gives "cpu" and "cuda"; the cuda cases skip, saying why, where there is no GPU or the
package was built without its CUDA backend (SCATTERMOE_CUDA=1). `cuda` is for the tests that
exist only on a GPU (CUDA graphs, large tensors).
"""
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


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def cuda():
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    return "cuda"
