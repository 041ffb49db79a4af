"""Loads the native library and registers a fake (meta) kernel for every op, so each traces under
torch.compile and passes torch.library.opcheck."""
import torch

try:
    from . import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY blocks)
except ImportError as e:  # not built, or built for another torch: say so, and how to build it
    from .errors import NativeLibraryMissing

    raise NativeLibraryMissing(e) from e

BUILD = _C.build  # "cpu" or "cuda:<archs>"

ops = torch.ops.pissa_fast


def _acc(w):
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _wx_fake(W, X):
    return X.new_empty((len(W), W[0].shape[0], X.shape[2]))


def _wtx_fake(W, Y):
    return Y.new_empty((len(W), W[0].shape[1], Y.shape[2]))


def _gram_fake(W, V):
    b, (m, n), k = len(W), W[0].shape, V.shape[2]
    return V.new_empty((b, m, k)), V.new_empty((b, n, k))


def _residual_inplace_fake(W, B, A):
    return None


def _residual_fake(W, B, A):
    return [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in W]


# The passes and their ATen implementation under its own name (pissa_fast::<op>_aten) share a fake.
for _suffix in ("", "_aten"):
    torch.library.register_fake(f"pissa_fast::wx{_suffix}")(_wx_fake)
    torch.library.register_fake(f"pissa_fast::wtx{_suffix}")(_wtx_fake)
    torch.library.register_fake(f"pissa_fast::gram{_suffix}")(_gram_fake)
    torch.library.register_fake(f"pissa_fast::residual{_suffix}_")(_residual_inplace_fake)
    torch.library.register_fake(f"pissa_fast::residual{_suffix}")(_residual_fake)


@torch.library.register_fake("pissa_fast::pissa_factors")
def _pissa_factors_fake(W, omega, rank, niter, method, normalizer, tol=0.0, like_svd_lowrank=-1, estimate=False):
    b, (m, n) = len(W), W[0].shape
    acc = _acc(W[0])
    return (omega.new_empty((b, rank, n), dtype=acc), omega.new_empty((b, m, rank), dtype=acc),
            omega.new_empty((b, rank), dtype=acc), omega.new_empty((b,), dtype=torch.int64),
            omega.new_empty((b,), dtype=acc))
