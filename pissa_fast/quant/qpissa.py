"""QPiSSA (PiSSA paper, Sec. 4.3): PiSSA factors in full precision over a 4-bit NF4 residual.

The principal part B A of W stays in the adapter and only the residual, whose largest directions are
gone, is quantized, so the quantization error is lower than QLoRA's (the whole W quantized) and than
LoftQ's (which starts from the quantized W). Starting from the PiSSA factors of W, each of the T
rounds does

    R_t = nf4(W - B A)                    (bitsandbytes' own quantizer, in W's dtype)
    (A, B) = top-r of (W - R_t)           (pissa_fast.decompose_many: randomized, batched, in place)

and reports e_t = ||W - (R_t + B_t A_t)||_F / ||W||_F (float64, see error.py). The round with the
lowest error is returned, so the error never increases with T. Its residual is checked to load back
bit for bit through bitsandbytes (and so through transformers' BitsAndBytesConfig(load_in_4bit=True)).

Two refinements of the paper's loop, measured with `python benchmarks/qpissa_variants.py CHECKPOINT
--max-matrices 14` on SmolLM2-135M's decoder layers 0-1 (r 16, T 5, against LoftQ's loop; numbers in
benchmarks/RESULTS.md, QPiSSA section):
- scales="search" (the default): nf4(.) is not bnb's absmax rounding but, per block, the scale (a
  fraction of the absmax) with the lowest error, or the last round's block where that is closer
  (quant/fit.py). bnb loads the result bit for bit, and the quantization step becomes a descent step
  of the alternating minimization of ||W - R - B A||, which bnb's rounding is not. Measured: mean error
  6.77e-2 instead of 7.14e-2 at T 5 (5 % lower), below LoftQ on 14/14 matrices at every T (absmax:
  10/14 at T 5), for ~4.5x the time of a call (median; ~1.25x LoftQ's full-SVD loop on these small
  matrices on CPU). Part of the gain is the quantizer itself: nf4(W) with searched scales alone has
  8.5e-2 instead of 9.3e-2. scales="absmax" is the paper's loop and the fast choice.
- start="best": the paper's start (PiSSA's factors) and LoftQ's (B A = 0: round 1 quantizes W) run
  in lockstep and the lower error is kept per weight. On matrices with flat spectra (a transformer's
  MLP projections, s_16 / s_1 ~ 0.4-0.9) the principal part is no outlier and LoftQ's start ends up
  to ~2 % lower after a few rounds; on spiky spectra PiSSA's start wins by far. Twice the work; alone
  (with absmax) it is not enough to stay below LoftQ everywhere (12/14 at T 5), so it is not the default.

Memory, per weight of a call: besides W itself, one working buffer in W's dtype (W - B A, then
W - R, then the top-r step's in-place residual, in turn), the packed codes of the current and of the
best round (1/4 of a bf16 weight each) and the float32 factors; for one weight at a time, R_t again
while its error is measured (in row chunks), and bnb's chunked quantizer temporaries (~20 MB, see
nf4.py). No float32 copy of a bf16/fp16 weight is made. Callers bound the peak by the group they pass
in. Measured on one 2048 x 2048 bf16 weight (benchmarks/qpissa_memory.py): 72 MiB at the peak, i.e.
~30 MiB of chunk temporaries plus ~5 weights' worth of transients (the top-r step's own buffers, R
while the error is measured, the codes).
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._ops import ops
from ..core import Decomposition, decompose_many, weight_seeds
from ..options import progress_enabled
from . import nf4
from .error import quant_error
from .fit import fit_blocks_

STARTS = {"pissa": ("pissa",), "quantized": ("quantized",), "best": ("pissa", "quantized")}
SCALES = ("absmax", "search")
DEFAULT_START, DEFAULT_SCALES = "pissa", "search"  # measured: see the module docstring


@dataclasses.dataclass(kw_only=True)
class QPiSSADecomposition(Decomposition):
    """A Decomposition whose residual is exactly representable in a bnb 4-bit format.

    residual: R in W's dtype with quantize_4bit -> dequantize_4bit(R) == R (when `exact`);
    A, B, S: the top-r factors of W - R. errors[t-1] is ||W - (R_t + B_t A_t)||_F / ||W||_F after
    round t; best_round is the round returned; error is the returned state's error (errors of the best
    round, or of the refit when a 4-bit load had to settle the residual first, see nf4.fixed_point);
    exact: a bnb 4-bit load reproduces the residual bit for bit (None when not verified).
    codes: (packed, QuantState) of the residual, as bitsandbytes stores it.
    start: the start the returned state came from; start_errors: start -> its errors per round.
    """

    errors: list[float] = dataclasses.field(default_factory=list)
    error: float = float("nan")
    best_round: int = 0
    spec: nf4.QuantSpec = dataclasses.field(default_factory=nf4.QuantSpec)
    exact: bool | None = None
    codes: tuple | None = dataclasses.field(default=None, repr=False)
    start: str = "pissa"
    start_errors: dict = dataclasses.field(default_factory=dict)


def _name(key, single) -> str:
    return "weight" if single else f"weights[{key!r}]"


def _fields(d: Decomposition) -> dict:
    """d's constructor fields but the residual (whatever fields core.Decomposition has), without
    keeping d's residual buffer alive."""
    return {f.name: getattr(d, f.name) for f in dataclasses.fields(Decomposition)
            if f.init and f.name != "residual"}


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_weight(name, w, r, inplace):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in nf4.QUANT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (what bitsandbytes quantizes), "
                        f"got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features x in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(w.shape)}")
    if w.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no data to quantize)")
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"r must be in [1, min(m, n) = {min(w.shape)}] for {name} of shape "
                         f"{tuple(w.shape)}, got {r}")
    if inplace and w.requires_grad:
        raise ValueError(f"inplace=True on {name}, which requires grad; pass weight.data "
                         f"(or weight.detach()) to update the parameter in place")


def _check_disjoint(items, single):
    """inplace=True writes every residual into its weight: views of one storage (a fused qkv's
    slices) are fine as long as they do not overlap."""
    spans = []
    for key, w in items:
        if torch._debug_has_internal_overlap(w) == 1:
            raise ValueError(f"inplace=True on {_name(key, single)}, whose elements overlap in memory "
                             f"(strides {w.stride()})")
        lo = w.data_ptr() - sum((s - 1) * abs(st) for s, st in zip(w.shape, w.stride()) if st < 0)
        size = sum((s - 1) * abs(st) for s, st in zip(w.shape, w.stride())) + 1
        spans.append((str(w.device), lo, lo + size * w.element_size(), key))
    spans.sort(key=lambda s: (s[0], s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"inplace=True: {_name(b[3], single)} overlaps {_name(a[3], single)} in memory")


def qpissa(weight: torch.Tensor, r: int, niter: int | None = 4, *, iters: int = 1, quant: str = "nf4",
           blocksize: int = 64, double_quant: bool = False, start: str = DEFAULT_START, scales: str = DEFAULT_SCALES,
           inplace: bool = False, method: str | None = None, oversample: int | None = None, seed: int = 0,
           verify: bool = True, on_round=None) -> QPiSSADecomposition:
    """QPiSSA-decompose one weight W (out x in, float32/bf16/fp16): W ~ R + B A with R exactly
    representable in bitsandbytes' 4-bit `quant` format and (A, B) the top-r factors of W - R.

    iters: rounds T of R = nf4(W - B A), (A, B) = top-r(W - R).
    start: "pissa" (the paper's: B A = PiSSA's factors of W before round 1), "quantized" (LoftQ's:
        B A = 0, so round 1 quantizes W itself) or "best" (both, in lockstep; per weight the one with the
        lower error after `iters` rounds is returned: about twice the time and working memory).
    scales: "search" (per block the scale that minimizes the error, still loaded bit for bit by bnb,
        and never worse than the previous round's block: see quant/fit.py) or "absmax" (bnb's own
        rounding, every block scaled by its absmax: the paper's loop).
    niter, method, oversample, seed: the top-r step, as in pissa_fast.decompose (None: exact SVD).
    quant ("nf4" or "fp4"), blocksize, double_quant: the bnb format. transformers loads with
        blocksize 64, the default; QuantSpec.bnb_config_kwargs() gives the matching BitsAndBytesConfig.
    inplace: write R into weight's own storage at the end (after everything else has succeeded).
    verify: check that a bnb 4-bit load gives R back bit for bit (one more quantization), settling it
        first where it does not (double quantization), and refitting A, B to the settled R.
    on_round(t): called when round t's error is known.
    Raises ImportError naming the `quant` extra when bitsandbytes is missing.
    """
    return qpissa_many([weight], r, niter, iters=iters, quant=quant, blocksize=blocksize,
                       double_quant=double_quant, start=start, scales=scales, inplace=inplace, method=method,
                       oversample=oversample, seed=seed, verify=verify, on_round=on_round, _single=True)[0]


@torch.no_grad()
def qpissa_many(weights: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor], r: int,
                niter: int | None = 4, *, iters: int = 1, quant: str = "nf4", blocksize: int = 64,
                double_quant: bool = False, start: str = DEFAULT_START, scales: str = DEFAULT_SCALES,
                inplace: bool = False, method: str | None = None,
                oversample: int | None = None, seed: int | Mapping[Any, int] = 0, verify: bool = True,
                progress: bool = False, on_round=None, _single: bool = False):
    """qpissa() for many weights (a dict name -> tensor returns a dict, a list returns a list): every
    round's top-r step is one decompose_many call over all of them (same-shape weights share one
    launch per pass on CUDA). Everything is validated, and every round computed, before the first
    residual is written (inplace=True). Peak memory: see the module docstring; pass one group of
    layers at a time (a decoder layer, a shard) to bound it. on_round(t), if given, is called when
    round t's errors are known (benchmarks time the rounds with it). seed may also be a mapping
    key -> int, each weight's own seed, as in decompose_many."""
    spec = nf4.QuantSpec(quant, blocksize, double_quant)
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {', '.join(SCALES)}, got {scales!r}")
    _check_int("r", r, 1)
    _check_int("iters", iters, 1)
    is_map = isinstance(weights, Mapping)
    if not is_map and not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a dict or a list of tensors, got {type(weights).__name__}")
    items = list(weights.items()) if is_map else list(enumerate(weights))
    for key, w in items:
        _check_weight(_name(key, _single), w, r, inplace)
    own = weight_seeds([key for key, _ in items], seed, _single)
    if inplace:
        _check_disjoint(items, _single)
    nf4.bnb_functional()  # a missing bitsandbytes is named before any work
    if not items:
        return {} if is_map else []
    kw = dict(method=method, oversample=oversample)
    Ws = [w.detach() for _, w in items]

    def seed_of(idx):  # decompose_many's seed for a list call over the weights at positions idx
        return seed if own is None else {p: own[i] for p, i in enumerate(idx)}

    lanes = _rounds(Ws, r, niter, kw, seed_of, spec, iters=iters, starts=STARTS[start],
                    search=scales == "search", progress=progress, on_round=on_round)

    results = []
    for i, w in enumerate(Ws):
        runs = lanes[i]  # start -> its best round and per-round errors
        chosen = min(runs, key=lambda k: runs[k]["error"])
        b = runs[chosen]
        packed, state = b["codes"]
        exact, error, fields = None, b["error"], b["fields"]
        if verify:
            packed, state, R, exact, changed = nf4.fixed_point(packed, state, spec)
            if changed:  # the load settles R elsewhere: refit the factors to what it will give
                fields = _fields(decompose_many([torch.sub(w, R)], r, niter, inplace=True, seed=seed_of([i]),
                                                **kw)[0])
                error = quant_error(w, R, fields["A"], fields["B"])
        else:
            R = nf4.dequantize(packed, state)
        results.append(QPiSSADecomposition(**fields, residual=R, errors=b["errors"], error=error,
                                           best_round=b["round"], spec=spec, exact=exact,
                                           codes=(packed, state), start=chosen,
                                           start_errors={k: v["errors"] for k, v in runs.items()}))
    if inplace:  # only now, with every residual computed, touch the weights
        for (key, w), res in zip(items, results):
            w.detach().copy_(res.residual)
            res.residual = w
    if is_map:
        return {key: res for (key, _), res in zip(items, results)}
    return results


def _rounds(Ws, r, niter, kw, seed_of, spec, *, iters, starts, search, progress, on_round) -> list[dict]:
    """The rounds of every (weight, start) lane, in lockstep: each round's top-r step is one
    decompose_many call over all lanes (seed_of(weight positions): its seed). Returns per weight
    {start: {error, round, codes, fields, errors}} of its best round."""
    lanes = [(i, s) for s in starts for i in range(len(Ws))]
    work: list = [None] * len(lanes)
    # Round 0. "pissa": PiSSA's factors of W, whose residual W - B A (new buffers in W's dtype) round 1
    # quantizes; decompose_many validates niter/method/oversample/seed here, before anything is written.
    # "quantized": no factors, round 1 quantizes (a copy of) W.
    pissa = [j for j, (i, s) in enumerate(lanes) if s == "pissa"]
    if pissa:
        idx = [lanes[j][0] for j in pissa]
        for j, d in zip(pissa, decompose_many([Ws[i] for i in idx], r, niter, inplace=False, seed=seed_of(idx),
                                              **kw)):
            work[j] = d.residual
    for j, (i, s) in enumerate(lanes):
        if s == "quantized":
            work[j] = Ws[i].clone(memory_format=torch.contiguous_format)
    errors: list[list[float]] = [[] for _ in lanes]
    best: list[dict | None] = [None] * len(lanes)
    codes: list = [None] * len(lanes)
    bar = None
    if progress and progress_enabled():
        from tqdm.auto import tqdm
        bar = tqdm(total=iters * len(lanes), desc="qpissa rounds", unit="layer")

    for t in range(1, iters + 1):
        for j, (i, _) in enumerate(lanes):
            if search:  # clip each block to its best scale (or keep the last round's), then bnb rounds it
                x = work[j] if work[j].is_contiguous() else work[j].contiguous()
                work[j] = None
                prev = None if codes[j] is None else nf4.dequantize(*codes[j])
                work[j] = fit_blocks_(x, spec, previous=prev)
                del x, prev
            packed, state = nf4.quantize(work[j], spec)
            work[j] = None  # let the next buffer reuse this one's memory
            R = nf4.dequantize(packed, state)
            torch.sub(Ws[i], R, out=R)  # W - R_t, in W's dtype (exact where R is within 2x of W: Sterbenz)
            work[j] = R
            codes[j] = (packed, state)
        fits = decompose_many(work, r, niter, inplace=True, seed=seed_of([i for i, _ in lanes]),
                              **kw)  # work <- W - R_t - B_t A_t
        for j, ((i, _), d) in enumerate(zip(lanes, fits)):
            w = Ws[i]
            # Measured in float64 from W, R_t (dequantized again: the buffer now holds W - R_t - B A
            # rounded twice to W's dtype, whose norm is off by ~2^-9 |B A| / |error| ~ 0.1-1 % in bf16).
            e = quant_error(w, nf4.dequantize(*codes[j]), d.A, d.B)
            errors[j].append(e)
            if best[j] is None or e < best[j]["error"]:
                best[j] = dict(error=e, round=t, codes=codes[j], fields=_fields(d))
            if t < iters:  # next round quantizes W - B_t A_t, written over this buffer
                work[j].copy_(w)
                ops.residual_([work[j]], d.B.contiguous()[None], d.A.contiguous()[None])
            if bar is not None:
                bar.update(1)
        del fits
        if on_round is not None:
            on_round(t)
    if bar is not None:
        bar.close()
    del work
    out: list[dict] = [{} for _ in Ws]
    for j, (i, s) in enumerate(lanes):
        out[i][s] = dict(best[j], errors=errors[j])
    return out
