"""Error-minimizing 4-bit blocks that bitsandbytes still loads bit for bit (QPiSSA's `scales="search"`).

bnb scales every block of `blocksize` values by its absmax and rounds each value to the nearest code.
That is not the 4-bit tensor nearest to x: a smaller scale s < absmax clips the block's largest values
to the end codes (+-1) but gives every other value a finer grid, and for blocks of 64 roughly Gaussian
values the squared error is lowest near s ~ 0.8-0.9 absmax (the MSE-optimal clipping of the
quantization literature). Any such block is still what a 4-bit load reproduces: with the values
clipped to [-s, s] (s a value of x's dtype), bnb's own quantizer measures absmax = s, rounds to the same
codes, and the block's largest magnitude is s again when it is dequantized.

So `fit_blocks_` picks per block the scale of SCALE_CANDIDATES x absmax with the lowest squared
error and clips the block to it, in place; bnb's quantize_4bit of the result is the chosen 4-bit
tensor. Given `previous` (a tensor a load already reproduces, e.g. the last round's R), a block keeps
its previous values where that is closer still, so the quantization step of QPiSSA's alternation
never increases ||W - R - B A|| for fixed B A (a descent step; bnb's absmax rounding is not one).
"""
from __future__ import annotations

import functools

import torch

from .nf4 import QuantSpec, _row_chunks, bnb_functional

# fractions of a block's absmax tried as its scale: 1 (bnb's own) down to 0.75 in steps of 0.025; below
# 0.75 no block of the checkpoints we measured chose one (benchmarks/RESULTS.md, QPiSSA section)
SCALE_CANDIDATES = tuple(1 - i / 40 for i in range(11))
FIT_CHUNK_ELEMENTS = 1 << 16  # the search's float32 buffers stay in cache


LUT_CELLS = 8192  # nearest-code lookup table over [-1, 1] used to rank the candidate scales


@functools.lru_cache(maxsize=8)
def _tables(quant_type: str, device: str):
    """Sorted codes, their midpoints (bnb rounds to the nearest code: bucketize on the midpoints), and a
    lookup table of the nearest code at LUT_CELLS + 1 points of [-1, 1]: torch.bucketize costs ~30x a
    table lookup on CPU, and the ranking of scales does not need exact rounding of values within
    1/LUT_CELLS of a midpoint (the chosen block is then rounded by bnb itself)."""
    code = bnb_functional().get_4bit_type(quant_type, device=device).float().sort().values
    mid = (code[:-1] + code[1:]) / 2
    lut = code[torch.bucketize(torch.linspace(-1, 1, LUT_CELLS + 1, device=device), mid)]
    return code, mid, lut


def _nearest(t: torch.Tensor, code, mid) -> torch.Tensor:
    """The code nearest to each value of t in [-1, 1], exactly as bnb rounds (ties to the lower code),
    by comparisons with the 15 midpoints (cheaper than torch.bucketize on CPU)."""
    q = torch.zeros(t.shape, dtype=torch.uint8, device=t.device)
    for m in mid.tolist():
        q += t > m
    return code.take(q.long())


def _blocks(flat: torch.Tensor, blocksize: int):
    """Views of the whole blocks (b, blocksize) and of the partial tail block (1, rem) of a flat tensor."""
    full = flat.numel() - flat.numel() % blocksize
    parts = [flat[:full].view(-1, blocksize)] if full else []
    if full < flat.numel():
        parts.append(flat[full:].view(1, -1))
    return parts


_TINY = torch.finfo(torch.float32).tiny


def _rounded(xb: torch.Tensor, code, mid) -> torch.Tensor:
    """What bnb's quantize -> dequantize makes of the blocks xb (b, k), in float32: codes nearest to
    xb / absmax, times absmax, rounded to xb's dtype."""
    f = xb.to(torch.float32, copy=True)
    s = f.abs().amax(1, keepdim=True)
    f.mul_(1.0 / s.clamp(min=1e-38)).clamp_(-1, 1)  # bnb's own arithmetic (backends/default/ops.py)
    return _nearest(f, code, mid).mul_(s).to(xb.dtype).float()


@torch.no_grad()
def _fit(x: torch.Tensor, prev: torch.Tensor | None, tables, candidates) -> None:
    """One set of blocks x (b, k), in place."""
    y = x.to(torch.float32, copy=True)  # the values to approximate (a copy: x is clipped below)
    amax = y.abs().amax(1, keepdim=True)
    u = y / amax.clamp(min=_TINY)  # each block in [-1, 1]
    best = torch.full_like(amax, float("inf"))
    best_a = torch.ones_like(amax)
    code, mid, lut = tables
    half = LUT_CELLS / 2
    t, v = torch.empty_like(u), torch.empty_like(u)  # reused: fresh buffers cost more than the arithmetic
    cell = torch.empty(u.shape, dtype=torch.int64, device=u.device)
    for a in candidates:  # squared error in units of absmax^2, which is fixed per block
        torch.mul(u, half / a, out=t).add_(half).clamp_(0, LUT_CELLS).round_()  # nearest table point of u / a
        cell.copy_(t)
        torch.take(lut, cell, out=v)
        err = v.mul_(a).sub_(u).square_().sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_a = torch.where(better, a, best_a)
    del u
    s = (best_a * amax).to(x.dtype)  # a value of x's dtype: exactly what a load measures as the block's absmax
    torch.maximum(torch.minimum(x, s), -s, out=x)
    if prev is not None:  # keep the previous block where it is closer (exact errors, as bnb would round)
        e_new = (_rounded(x, code, mid) - y).square_().sum(1, keepdim=True)
        e_prev = (prev.float() - y).square_().sum(1, keepdim=True)
        x.copy_(torch.where(e_prev < e_new, prev, x))


@torch.no_grad()
def fit_blocks_(x: torch.Tensor, spec: QuantSpec, previous: torch.Tensor | None = None,
                candidates=SCALE_CANDIDATES, max_elements: int = FIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Clip every block of the contiguous 2-D x (in place) to the scale of `candidates` x absmax with
    the lowest rounding error, or set it to `previous`'s block where that is closer; returns x. Then
    nf4.quantize(x, spec) is the chosen 4-bit tensor, and dequantizing it gives a tensor a 4-bit load
    reproduces (bnb's absmax of each block is the chosen scale)."""
    if not x.is_contiguous():
        raise ValueError("fit_blocks_ needs a contiguous tensor (it clips blocks of the flat storage in place)")
    if previous is not None and (previous.shape != x.shape or previous.dtype != x.dtype):
        raise ValueError(f"previous must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(previous.shape)} {previous.dtype}")
    tables = _tables(spec.quant_type, str(x.device))
    x2 = x.view(x.shape[0], -1) if x.dim() != 2 else x
    p2 = None if previous is None else previous.contiguous().view(x2.shape)
    for lo, hi in _row_chunks(x2.shape[0], x2.shape[1], spec.blocksize, max_elements):
        xs = _blocks(x2[lo:hi].reshape(-1), spec.blocksize)
        ps = [None] * len(xs) if p2 is None else _blocks(p2[lo:hi].reshape(-1), spec.blocksize)
        for xb, pb in zip(xs, ps):
            _fit(xb, pb, tables, candidates)
    return x
