"""Public API: decompose one weight, or many at once, into PiSSA factors and residual."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._ops import ops
from ._heap import one_release
from .memory import start_populate
from .options import WEIGHT_DTYPES
from .passes import cpu_passes

METHODS = ("krylov", "subspace", "halko", "exact")
# With tol, the true l1_rel error is at most ESTIMATE_SLACK * tol: the estimate measured at or above
# the true error, or below it by at most 1.4x on synthetic spectra and 2.2x on one of 42 real
# SmolLM2-135M cases (tests/test_tol.py, benchmarks/RESULTS.md), above the float32 noise floor of
# about 1e-5.
ESTIMATE_SLACK = 3.0
NORMALIZERS = ("qr", "cholqr2")


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
    niter_used: int | None = None
    estimate: float = math.nan

    # niter: the niter asked for (the cap when a stopping criterion was given); niter_used: the
    # number of W^T W applications this weight actually got (None for the exact SVD); estimate: the
    # a-posteriori estimate of its l1_rel error against the exact SVD (see ErrorReport.l1_rel), NaN
    # where none was made (it is made with tol / like_svd_lowrank / estimate=True, method krylov,
    # niter >= 1), 0 for the exact SVD.

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
        # At least 8 columns per block: a pass over W costs about the same for 4 columns as for 8
        # (it is bound by reading W), so a block of 4 would waste half of each read.
        return max(8, r // 2) if niter <= 2 else max(0, 8 - r)
    return r


def _name(key) -> str:
    return "weight" if key is None else f"weights[{key!r}]"


def weight_seeds(keys, seed, single=False) -> list[int] | None:
    """Each weight's seed, in the order of keys, where seed is a mapping key -> int (None for one int
    seed): every key must have an int entry."""
    if not isinstance(seed, Mapping):
        return None
    out = []
    for key in keys:
        if key not in seed:
            raise ValueError(f"seed is a mapping of per-weight seeds but has no entry for "
                             f"{_name(None if single else key)}")
        v = seed[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"seed[{key!r}] must be an int, got {type(v).__name__} {v!r}")
        out.append(int(v))
    return out


def _check_stop(tol, like_svd_lowrank, niter, method):
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a number > 0 (or None), got {tol!r}")
    if like_svd_lowrank is not None and (isinstance(like_svd_lowrank, bool) or
                                         not isinstance(like_svd_lowrank, numbers.Integral) or like_svd_lowrank < 0):
        raise ValueError(f"like_svd_lowrank must be an int >= 0 (or None), got {like_svd_lowrank!r}")
    if (tol is not None or like_svd_lowrank is not None) and niter is not None and method not in (None, "krylov"):
        raise ValueError(f"tol and like_svd_lowrank need method 'krylov' (the default), got method={method!r}")


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
    if isinstance(seed, Mapping) and generator is not None:
        raise ValueError("pass seed= (an int, or a mapping key -> int) or generator=, not both")
    if isinstance(seed, Mapping):  # per-weight seeds (checked against the weights' keys in decompose_many)
        bad = next(((k, v) for k, v in seed.items() if isinstance(v, bool) or not isinstance(v, numbers.Integral)),
                   None)
        if bad is not None:
            raise TypeError(f"seed[{bad[0]!r}] must be an int, got {type(bad[1]).__name__} {bad[1]!r}")
    elif generator is None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
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


def _basis_side(mat, method) -> int:
    """Rows of the test matrix: the side of W the Krylov basis lives on. The small dense steps scale
    with the basis side (a 256 x 2048 weight spent most of its time orthonormalizing 2048-long
    vectors), but the output side needs two reads of W per pass (wtx, then wx) instead of the fused
    gram's one. On the CPU that costs nothing where the AMX passes take W (wx + wtx cost what gram
    does, csrc/cpu/gram_amx.cpp; the same conditions as takes_bf16 there) and little on small weights
    (under 2^20 elements), so those keep the basis on the smaller side. Elsewhere the input side, as
    before: the float32 passes would read W twice, and no GPU has measured the other."""
    m, n = mat.shape
    if method != "krylov" or mat.device.type != "cpu" or m >= n:
        return n
    amx = mat.dtype == torch.bfloat16 and m % 32 == 0 and n % 32 == 0 and cpu_passes() == "amx"
    return m if amx or mat.numel() < (1 << 20) else n


def _draw(gen, n, l, dtype, device):
    return torch.randn(n, l, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _batch_bytes(mat, l, niter, method) -> int:
    """Memory one more matrix adds to a group call, at its peak: an upper estimate.

    pissa_factors keeps the basis Q and its images W Q, W^T W Q for every Krylov block (float32 but
    for float64 weights or pathological scales, so at most 8 width (2n + m) bytes; counted as
    8 width 3 (m + n) for the orthonormalization's temporaries), and
    each pass adds its float32 outputs with their float64 copies and, for the ATen passes, the hi/lo
    parts of the test vectors and partial sums: under 64 l (m + n) bytes. The factors A, B, S and the
    residual's split parts (3r wide, r <= l) fit in the same allowance.
    """
    m, n = mat.shape
    width = l * ((niter or 0) + 1 if method == "krylov" else 2)
    return 8 * width * 3 * (m + n) + 64 * l * (m + n)


def _default_budget(device) -> int:
    """Bytes a group call may use. CUDA: what the device and the caching allocator have free, less a
    reserve for cuBLAS/cuSOLVER workspaces and fragmentation (a tenth of the device, at least 1 GiB), so
    that same-shape weights go in as few calls as memory allows (a LLaMA-2-7B at r 16 needs ~3 GiB
    for its 128 square matrices). CPU: 0, one matrix per call; the CPU kernels loop over a group
    anyway, so batching buys nothing there and one matrix's factors is the smallest working set."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        reserve = max(1 << 30, total // 10)
        return max(256 << 20, free + cached - reserve)
    return 0


def _split_group(idxs: list[int], per: int, budget: int) -> list[list[int]]:
    """Chunks of a same-shape group: as few as the budget allows, of balanced sizes (128 matrices with
    room for 100 go as 64 + 64, not 100 + 28: the same number of calls, a lower peak)."""
    most = max(1, min(len(idxs), budget // max(1, per)))
    calls = -(-len(idxs) // most)
    q, extra = divmod(len(idxs), calls)  # the first `extra` chunks take one more
    bounds = [0]
    for c in range(calls):
        bounds.append(bounds[-1] + q + (c < extra))
    return [idxs[a:b] for a, b in zip(bounds, bounds[1:])]


def decompose(weight: torch.Tensor, r: int, niter: int | None = 4, *, tol: float | None = None,
              like_svd_lowrank: int | None = None, inplace: bool = False, method: str | None = None,
              oversample: int | None = None, normalizer: str = "cholqr2", seed: int = 0,
              generator: torch.Generator | None = None, estimate: bool | None = None) -> Decomposition:
    """PiSSA-decompose one weight W (out x in): W = B A + residual, B A its best rank-r approximation.

    niter: applications of W^T W, as in torch.svd_lowrank (None: exact torch.linalg.svd).
        The default method reads W niter + 1 times (torch.svd_lowrank: 2 niter + 2), plus once for
        the residual. With tol or like_svd_lowrank, niter is the most it may use.
    tol: stop at the first niter >= 1 whose a-posteriori estimate of the l1_rel error
        (pissa_fast.error_vs_exact(W, out).l1_rel: the paper's L1 error over the mean magnitude of
        the exact factors' entries) is <= tol. The estimate comes from the change of the Ritz vectors
        between the last passes (no extra read of W); measured on fast- and slow-decay spectra and on
        real weights it is above the true l1_rel or at most 2.2x below it, so the true l1_rel is
        <= ESTIMATE_SLACK * tol = 3 tol. It cannot go below the float32 passes' noise, about 1e-5:
        a smaller tol runs to the niter cap. Method krylov only.
    like_svd_lowrank: N >= 0: stop at the first niter whose estimate is at most the error that
        torch.svd_lowrank(W, q=r, niter=N) (peft's pissa_niter_N) is predicted to make on this
        weight, from its own Ritz values (see svd_lowrank_equivalent).
    inplace: write the residual into weight's own storage (no full-size buffer at all).
    method: "krylov" (default), "subspace", "halko" (svd_lowrank's algorithm) or "exact".
    oversample: sketch columns beyond r (default: default_oversample(r, niter, method)).
    normalizer: "cholqr2" (default: CholeskyQR2 with a shifted fallback, only factorizing l x l Gram
        matrices) or "qr" (Householder on the tall blocks) between passes.
    seed / generator: the random test matrix; the same inputs and seed give bitwise-identical results
        on CPU for a given number of threads.
    estimate: also make the estimate when not stopping early (default: only with tol /
        like_svd_lowrank; it costs two more small Rayleigh-Ritz steps).

    The result's niter_used and estimate say what this weight got.
    """
    return decompose_many([weight], r, niter, tol=tol, like_svd_lowrank=like_svd_lowrank, inplace=inplace,
                          method=method, oversample=oversample, normalizer=normalizer, seed=seed,
                          generator=generator, estimate=estimate, _single=True)[0]


@torch.no_grad()
def decompose_many(weights: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor], r: int,
                   niter: int | None = 4, *, tol: float | None = None, like_svd_lowrank: int | None = None,
                   inplace: bool = False, method: str | None = None,
                   oversample: int | None = None, normalizer: str = "cholqr2", seed: int | Mapping[Any, int] = 0,
                   generator: torch.Generator | None = None, estimate: bool | None = None,
                   max_batch_bytes: int | None = None, progress: bool = False, _single: bool = False):
    """decompose() for many weights at once: a dict name -> tensor (returns a dict) or a list
    (returns a list), any mix of shapes, dtypes and devices. tol / like_svd_lowrank apply per
    weight: each stops at its own niter (reported as its niter_used).

    Weights sharing (shape, dtype, device) form a group whose passes run as one op call over all of
    its matrices (one kernel launch per pass on CUDA), each read where it lives: nothing is stacked
    but the small factors, and a group whose small factors would exceed max_batch_bytes (default on
    CUDA: the free device memory less a reserve, so a model's same-shape weights go in as few calls as
    memory allows; 0 on CPU, i.e. one matrix per call, which keeps the working set to one matrix's
    factors) is split into balanced chunks. Each weight gets a test
    matrix drawn from `seed` exactly as decompose() would, so results match per-weight calls.
    seed may also be a mapping key -> int (a dict's keys, a list's indices): each weight's own seed,
    e.g. {name: pissa_fast.distributed.weight_seed(0, name)}, so a weight's result depends on nothing
    else in the call (`pissa-fast init` does this: the same files on any number of ranks).
    Every weight is validated, and every factor computed, before any residual is written.
    """
    _check_args(r, niter, method, oversample, normalizer, seed, generator)
    _check_stop(tol, like_svd_lowrank, niter, method)
    # --- sharded weights (issue 11): DTensor / ZeRO-3 calls go to pissa_fast.distributed ---
    from .distributed import hook as _sharded
    if _sharded.wants(weights):
        if tol is not None or like_svd_lowrank is not None or estimate:
            raise ValueError("tol, like_svd_lowrank and estimate are not supported for sharded weights yet; "
                             "pass a fixed niter")
        return _sharded.decompose_many(weights, r, niter, inplace=inplace, method=method, oversample=oversample,
                                       normalizer=normalizer, seed=seed, generator=generator, progress=progress,
                                       _single=_single)
    # --- end of the sharded-weights hook ---
    is_map = isinstance(weights, Mapping)
    if not is_map and not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a dict or a list of tensors, got {type(weights).__name__}")
    items = list(weights.items()) if is_map else list(enumerate(weights))
    if not items:
        return {} if is_map else []
    for key, w in items:
        _check_weight(None if _single else key, w, r, inplace)
    own_seeds = weight_seeds([key for key, _ in items], seed, _single)  # None: one seed for all
    populating = None
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
        # --- pissa_fast.memory (peft backend, i9): file-backed weights populated beside the factors ---
        populating = start_populate([w for _, w in items],
                                    [_name(None if _single else key) for key, _ in items])

    meth = "exact" if niter is None else (method or "krylov")
    nit = 0 if niter is None else int(niter)
    p = default_oversample(r, niter, meth) if oversample is None else int(oversample)

    # Test matrices, drawn in the caller's order, each from its seed as decompose() would.
    plans = []
    for idx, (key, w) in enumerate(items):
        mat, transposed, copied = _layout(w)
        n = _basis_side(mat, meth)
        l = min(r + p, n)
        own = seed if own_seeds is None else own_seeds[idx]
        gen = generator if generator is not None else torch.Generator().manual_seed(int(own))
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
        chunks += _split_group(idxs, _batch_bytes(plans[idxs[0]]["mat"], l, nit, meth), budget)

    # One heap release for the whole batch: each weight reuses the pages the previous one freed (_heap.py).
    with one_release():
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(plans), desc="pissa factors", unit="layer")
        try:
            # Phase 1: every factor (reads only); a bad weight raises here with nothing written.
            factors = {}
            for chunk in chunks:
                mats = [plans[i]["mat"] for i in chunk]
                omega = torch.stack([plans[i]["omega"] for i in chunk])
                try:
                    A, B, S, used, est = ops.pissa_factors(mats, omega, r, nit, meth, normalizer, float(tol or 0.0),
                                                           -1 if like_svd_lowrank is None else int(like_svd_lowrank),
                                                           bool(estimate))
                except ValueError as e:
                    msg = str(e)
                    for j, i in enumerate(chunk):
                        msg = msg.replace(f"W[{j}]", _name(None if _single else plans[i]["key"]))
                    raise ValueError(msg.splitlines()[0]) from None
                used, est = used.tolist(), est.tolist()  # one transfer per chunk
                for j, i in enumerate(chunk):
                    factors[i] = (A[j], B[j], S[j], None if used[j] < 0 else used[j], math.nan if est[j] < 0 else est[j])
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        finally:  # the file-backed weights writable before the first residual (memory.py)
            if populating is not None:
                populating.wait()
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
                a, b, s, used_i, est_i = factors[i]
                rj = res[j]
                if pl["transposed"]:  # W^T = B' A'  =>  W = A'^T B'^T
                    a, b, rj = b.t().contiguous(), a.t().contiguous(), rj.t()
                if inplace and pl["copied"]:
                    pl["w"].copy_(rj)
                    rj = pl["w"]
                elif inplace and not pl["transposed"]:
                    rj = pl["w"]
                results[i] = Decomposition(A=a, B=b, S=s, residual=rj, method=meth, niter=niter, niter_used=used_i,
                                           estimate=est_i)
    if is_map:
        return {pl["key"]: res for pl, res in zip(plans, results)}
    return results
