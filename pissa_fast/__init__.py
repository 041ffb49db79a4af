"""pissa_fast: fast, accurate PiSSA initialization for PyTorch.

    out = pissa_fast.decompose(weight, r=16, niter=4)   # out.A, out.B, out.S, out.residual
    outs = pissa_fast.decompose_many({"q": wq, ...}, r=16, niter=4, inplace=True)
    pissa_fast.error_vs_exact(weight, out)              # L1 vs exact SVD, reconstruction, excess
    pissa_fast.init_checkpoint(model, out, target_modules=..., r=16)   # a checkpoint on disk
    pissa_fast.convert_to_lora(initial, trained, out, rank=None)       # trained PiSSA -> LoRA
    pissa_fast.verify(out)                                              # adapter on its own residual?
"""
from .convert import convert_to_lora
from .errors import CheckpointError, NativeLibraryMissing
from .init import init_checkpoint
from .metrics import ErrorReport, error_vs_exact, exact_factors
from .pairing import verify

try:
    from ._ops import BUILD, ops
    from .core import ESTIMATE_SLACK, Decomposition, decompose, decompose_many, default_oversample
    from .equivalence import svd_lowrank_equivalent
    from .passes import cpu_passes, cuda_passes, cuda_passes_setting, set_cuda_passes, use_cuda_passes
    from .quant import QPiSSADecomposition, qpissa, qpissa_many
except NativeLibraryMissing as _missing:  # convert_to_lora, verify and the CLI's --help still work
    BUILD = "missing"
    __getattr__ = _missing.module_getattr(__name__, ("ops", "Decomposition", "decompose", "decompose_many",
                                                     "default_oversample", "QPiSSADecomposition", "qpissa",
                                                     "qpissa_many", "ESTIMATE_SLACK", "svd_lowrank_equivalent",
                                                     "cpu_passes", "cuda_passes", "cuda_passes_setting",
                                                     "set_cuda_passes", "use_cuda_passes"))

__version__ = "0.1.0"


def build_info() -> str:
    """What the native library was compiled with: "cpu", or "cuda:<archs>" (e.g. "cuda:8.0,9.0").
    Which of the two CUDA implementations of the passes runs: cuda_passes()."""
    return BUILD


__all__ = [
    "CheckpointError", "Decomposition", "ErrorReport", "NativeLibraryMissing", "build_info", "convert_to_lora",
    "decompose", "decompose_many", "default_oversample", "error_vs_exact", "exact_factors", "init_checkpoint",
    "ops", "QPiSSADecomposition", "qpissa", "qpissa_many", "verify", "ESTIMATE_SLACK", "svd_lowrank_equivalent",
    "cpu_passes", "cuda_passes", "cuda_passes_setting", "set_cuda_passes", "use_cuda_passes",
]
