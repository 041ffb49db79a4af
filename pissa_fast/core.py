"""Public API: decompose one weight, or many at once, into PiSSA factors and residual."""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._ops import ops
from .memory import prepare_inplace

METHODS = ("krylov", "subspace", "halko", "exact")
NORMALIZERS = ("qr", "cholqr2")
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class Decomposition:
    """PiSSA factors of one weight W (m x n).

    A: (r, n) = sqrt(S) V^T (peft's lora_A); B: (m, r) = U sqrt(S) (lora_B); S: (r,) singular values;
    residual: (m, n) = W - B A in W's dtype (W's own storage when inplace=True). A, B and S are float32,
    float64 for float64 weights.
    """

    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor
    residual: torch.Tensor
    method: str
    niter: int | None

    @property
    def rank(self) -> int:
        return self.S.shape[0]


def default_oversample(r: int, niter: int | None, method: str = "krylov") -> int:
    """Extra sketch columns beyond r, chosen from benchmarks/RESULTS.md.

    Block Krylov grows its subspace by r + p per pass, so few extra columns pay off once niter >= 3;
    at niter 1-2 the subspace is small and oversampling buys most of the accuracy. The
    one-block methods (subspace, halko) need the oversampling at every niter.
    """
    if niter is None or method == "exact":
        return 0
    if method == "krylov":
        return max(8, r // 2) if niter <= 2 else 0
    return r


def _name(key) -> str:
    return "weight" if key is None else f"weights[{key!r}]"


def _check_args(r, niter, method, oversample, normalizer, seed, generator):
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an int, got {type(r).__name__} {r!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, numbers.Integral)):
        raise TypeError(f"niter must be an int or None (exact SVD), got {type(niter).__name__} {niter!r}")
    if niter is not None and niter < 0:
        raise ValueError(f"niter must be >= 0 (or None for exact SVD), got {niter}")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, numbers.Integral)
                                   or oversample < 0):
        raise ValueError(f"oversample must be an int >= 0 or None, got {oversample!r}")
    if generator is None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_weight(key, w, r, inplace):
    name = _name(key)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features x in_features), got shape {tuple(w.shape)}")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(w.shape)}")
    if w.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no data to decompose)")
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"r must be in [1, min(m, n) = {min(w.shape)}] for {name} of shape "
                         f"{tuple(w.shape)}, got {r}")
    if inplace:
        if w.requires_grad and w.is_leaf:
            raise ValueError(f"inplace=True on {name}, a leaf tensor that requires grad; pass "
                             f"weight.data (or weight.detach()) to update the parameter in place")
        if w.requires_grad:
            raise ValueError(f"inplace=True on {name}, which requires grad: autograd cannot see "
                             f"this update; pass weight.detach()")
        if torch._debug_has_internal_overlap(w) == 1:
            raise ValueError(f"inplace=True on {name}, whose elements overlap in memory "
                             f"(strides {w.stride()}); pass a tensor with its own storage")


def _layout(w):
    """(matrix the kernels read, transposed?, is it a copy?). Kernels read rows with unit column
    stride; a transposed weight is decomposed as its transpose (factors swapped back), anything
    else as a contiguous copy in its own dtype."""
    w = w.detach()
    m, n = w.shape
    if (n == 1 or w.stride(1) == 1) and (m == 1 or w.stride(0) >= n):
        return w, False, False
    if (m == 1 or w.stride(0) == 1) and (n == 1 or w.stride(1) >= m):
        return w.t(), True, False
    return w.contiguous(), False, True


def _draw(gen, n, l, dtype, device):
    return torch.randn(n, l, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _batch_bytes(mat, l, niter, method) -> int:
    # float64 small factors kept by the Krylov loop: Q, Y, Z ([n|m] x l per pass) and temporaries.
    m, n = mat.shape
    width = l * ((niter or 0) + 1 if method == "krylov" else 2)
    return 8 * width * 3 * (m + n)


def _default_budget(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(256 << 20, min(4 << 30, free // 4))
    return 0  # CPU: one matrix at a time; the CPU kernels loop over a group anyway, so batching buys nothing



def decompose(weight: torch.Tensor, r: int, niter: int | None = 4, *, inplace: bool = False,
              method: str | None = None, oversample: int | None = None, normalizer: str = "qr",
              seed: int = 0, generator: torch.Generator | None = None) -> Decomposition:
    """PiSSA-decompose one weight W (out x in): W = B A + residual, B A its best rank-r approximation.

    niter: applications of W^T W, as in torch.svd_lowrank (None: exact torch.linalg.svd).
        The default method reads W niter + 1 times (torch.svd_lowrank: 2 niter + 2), plus once for
        the residual.
    inplace: write the residual into weight's own storage (no full-size buffer at all).
    method: "krylov" (default), "subspace", "halko" (svd_lowrank's algorithm) or "exact".
    oversample: sketch columns beyond r (default: default_oversample(r, niter, method)).
    normalizer: "qr" (Householder) or "cholqr2" between passes.
    seed / generator: the random test matrix; the same inputs and seed give bitwise-identical results
        on CPU for a given number of threads.
    """
    return decompose_many([weight], r, niter, inplace=inplace, method=method, oversample=oversample,
                          normalizer=normalizer, seed=seed, generator=generator, _single=True)[0]


@torch.no_grad()
def decompose_many(weights: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor], r: int,
                   niter: int | None = 4, *, inplace: bool = False, method: str | None = None,
                   oversample: int | None = None, normalizer: str = "qr", seed: int = 0,
                   generator: torch.Generator | None = None, max_batch_bytes: int | None = None,
                   progress: bool = False, _single: bool = False):
    """decompose() for many weights at once: a dict name -> tensor (returns a dict) or a list
    (returns a list), any mix of shapes, dtypes and devices.

    Weights sharing (shape, dtype, device) form a group whose passes run as one op call over all of
    its matrices (one kernel launch per pass on CUDA), each read where it lives: nothing is stacked
    but the small factors, and a group whose small factors would exceed max_batch_bytes (default:
    a quarter of free memory up to 4 GiB on CUDA; 0 on CPU, i.e. one matrix per call, which keeps
    the working set to one matrix's factors) is split. Each weight gets a test
    matrix drawn from `seed` exactly as decompose() would, so results match per-weight calls.
    Every weight is validated, and every factor computed, before any residual is written.
    """
    _check_args(r, niter, method, oversample, normalizer, seed, generator)
    is_map = isinstance(weights, Mapping)
    if not is_map and not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a dict or a list of tensors, got {type(weights).__name__}")
    items = list(weights.items()) if is_map else list(enumerate(weights))
    if not items:
        return {} if is_map else []
    for key, w in items:
        _check_weight(None if _single else key, w, r, inplace)
    if inplace:  # views of one storage are fine (a fused qkv's slices) as long as they are disjoint
        spans = []
        for key, w in items:
            last = sum((size - 1) * abs(st) for size, st in zip(w.shape, w.stride()))
            lo = w.data_ptr() - sum((size - 1) * abs(st) for size, st in zip(w.shape, w.stride()) if st < 0)
            spans.append((w.device, lo, lo + (last + 1) * w.element_size(), key))
        spans.sort(key=lambda s: (str(s[0]), s[1]))
        for a, b in zip(spans, spans[1:]):
            if a[0] == b[0] and b[1] < a[2]:
                raise ValueError(f"inplace=True: {_name(b[3])} overlaps {_name(a[3])} in memory")
        # --- pissa_fast.memory (peft backend, i9): file-backed weights populated before the passes ---
        prepare_inplace([w for _, w in items], [_name(None if _single else key) for key, _ in items])

    meth = "exact" if niter is None else (method or "krylov")
    nit = 0 if niter is None else int(niter)
    p = default_oversample(r, niter, meth) if oversample is None else int(oversample)

    # Test matrices, drawn in the caller's order, each from `seed` as decompose() would.
    plans = []
    for idx, (key, w) in enumerate(items):
        mat, transposed, copied = _layout(w)
        n = mat.shape[1]
        l = min(r + p, n)
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        omega = _draw(gen, n, l, acc, w.device)
        plans.append(dict(key=key, w=w, mat=mat, transposed=transposed, copied=copied, omega=omega))

    groups: dict[tuple, list[int]] = {}
    for i, pl in enumerate(plans):
        mat = pl["mat"]
        groups.setdefault((tuple(mat.shape), mat.dtype, mat.device, pl["omega"].shape[1]), []).append(i)

    chunks = []
    for (shape, dtype, device, l), idxs in groups.items():
        budget = max_batch_bytes if max_batch_bytes is not None else _default_budget(device)
        per = max(1, _batch_bytes(plans[idxs[0]]["mat"], l, nit, meth))
        size = max(1, min(len(idxs), budget // per))
        chunks += [idxs[i:i + size] for i in range(0, len(idxs), size)]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plans), desc="pissa factors", unit="layer")
    # Phase 1: every factor (reads only); a bad weight raises here with nothing written.
    factors = {}
    for chunk in chunks:
        mats = [plans[i]["mat"] for i in chunk]
        omega = torch.stack([plans[i]["omega"] for i in chunk])
        try:
            A, B, S = ops.pissa_factors(mats, omega, r, nit, meth, normalizer)
        except ValueError as e:
            msg = str(e)
            for j, i in enumerate(chunk):
                msg = msg.replace(f"W[{j}]", _name(None if _single else plans[i]["key"]))
            raise ValueError(msg.splitlines()[0]) from None
        for j, i in enumerate(chunk):
            factors[i] = (A[j], B[j], S[j])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()

    # Phase 2: residuals, W - B A in W's dtype, one op call per chunk.
    results = [None] * len(plans)
    for chunk in chunks:
        mats = [plans[i]["mat"] for i in chunk]
        A = torch.stack([factors[i][0] for i in chunk])
        B = torch.stack([factors[i][1] for i in chunk])
        if inplace:
            ops.residual_(mats, B, A)
            res = mats
        else:
            res = ops.residual(mats, B, A)
        for j, i in enumerate(chunk):
            pl = plans[i]
            a, b, s = factors[i]
            rj = res[j]
            if pl["transposed"]:  # W^T = B' A'  =>  W = A'^T B'^T
                a, b, rj = b.t().contiguous(), a.t().contiguous(), rj.t()
            if inplace and pl["copied"]:
                pl["w"].copy_(rj)
                rj = pl["w"]
            elif inplace and not pl["transposed"]:
                rj = pl["w"]
            results[i] = Decomposition(A=a, B=b, S=s, residual=rj, method=meth, niter=niter)
    if is_map:
        return {pl["key"]: res for pl, res in zip(plans, results)}
    return results
