"""ScatterMoE for PyTorch, on the scattermoe C++/CUDA library.

Same import paths as the original ScatterMoE: scattermoe.parallel_experts,
scattermoe.mlp, scattermoe.kernels.ops; and scattermoe.moa (Mixture of Attention).
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, before _C)

from . import _C  # noqa: F401  (registers torch.ops.scattermoe.*)
from . import _fake  # noqa: F401  (fake implementations for torch.compile)
from . import kernels, mlp, moa, parallel_experts
from .mlp import GLUMLP, MLP
from .moa import MoA
from .parallel_experts import ParallelExperts, flatten_sort_count, parallel_linear

__version__ = _C.build_info()["version"]

__all__ = ["GLUMLP", "MLP", "MoA", "ParallelExperts", "flatten_sort_count", "kernels", "mlp",
           "moa", "parallel_experts", "parallel_linear"]
