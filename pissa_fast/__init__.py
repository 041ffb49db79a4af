"""pissa_fast: fast, accurate PiSSA initialization for PyTorch.

    out = pissa_fast.decompose(weight, r=16, niter=4)   # out.A, out.B, out.S, out.residual
    outs = pissa_fast.decompose_many({"q": wq, ...}, r=16, niter=4, inplace=True)
    pissa_fast.error_vs_exact(weight, out)              # L1 vs exact SVD, reconstruction, excess
"""
from ._ops import BUILD, ops
from .core import Decomposition, decompose, decompose_many, default_oversample
from .metrics import ErrorReport, error_vs_exact, exact_factors
from .passes import cuda_passes, cuda_passes_setting, set_cuda_passes, use_cuda_passes

__version__ = "0.1.0"


def build_info() -> str:
    """What the native library was compiled with: "cpu", or "cuda:<archs>" (e.g. "cuda:8.0,9.0").
    Which of the two CUDA implementations of the passes runs: cuda_passes()."""
    return BUILD


__all__ = [
    "Decomposition", "ErrorReport", "build_info", "cuda_passes", "cuda_passes_setting", "decompose",
    "decompose_many", "default_oversample", "error_vs_exact", "exact_factors", "ops", "set_cuda_passes",
    "use_cuda_passes",
]
