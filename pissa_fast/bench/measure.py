"""Timed runs of the two PiSSA initializations `pissa-fast bench` compares.

- pissa_fast_matched: `pissa_fast.decompose(W, r, **pissa_fast.svd_lowrank_equivalent(N, r))`, the
  accuracy of peft's pissa_niter_N at the least cost (each weight stops on its own estimate).
- pissa_fast: `pissa_fast.decompose(W, r, niter)` (its default method unless told otherwise), the
  residual written in place into a fresh copy of W made before the clock starts ("inplace"), or
  returned as a new tensor with W left intact ("copy").
- peft: what `init_lora_weights="pissa_niter_N"` runs per layer (REFERENCE.md): `w = W.float()`,
  `U, S, V = torch.svd_lowrank(w, q=r, niter=N)` from the global RNG (seeded here before every run),
  `B = U sqrt(S)`, `A = sqrt(S) V^T`, residual `(w - B A).to(W.dtype)`; for "pissa" (niter = inf)
  `torch.linalg.svd(w, full_matrices=False)` truncated to r.

Each run's time covers the whole initialization, residual included, and nothing else: the copy of W
for an in-place run and any later error computation happen off the clock.
"""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

import pissa_fast

INF = "inf"  # niter of the exact-SVD path, as written in results and tables


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peft_path(W: torch.Tensor, r: int, niter: int | None):
    """peft's PiSSA init of one weight: (factors with .A, .B, .S, residual in W's dtype)."""
    w = W.float()
    if niter is None:  # init_lora_weights="pissa"
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
    else:
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        root = S.sqrt()
        B, A = U * root, root[:, None] * V.T
    residual = (w - B @ A).to(W.dtype)
    return SimpleNamespace(A=A, B=B, S=S), residual


def truncated(out, r: int):
    """Rank-r factors from rank-R ones of the same SVD (what the exact path would give at rank r)."""
    return SimpleNamespace(A=out.A[:r], B=out.B[:, :r], S=out.S[:r])


class Runner:
    """Runs one initialization `repeats` times after `warmup` untimed runs; returns (median time,
    every time, the factors of the last run)."""

    def __init__(self, device: torch.device, *, repeats: int, warmup: int, seed: int,
                 residual: str = "inplace", method: str | None = None, oversample: int | None = None):
        self.device, self.repeats, self.warmup, self.seed = device, repeats, warmup, seed
        self.residual, self.method, self.oversample = residual, method, oversample

    def _pissa_fast_once(self, W, r, niter, matched=False):
        # matched: peft's niter N as an accuracy promise, pissa_fast.svd_lowrank_equivalent(N, r).
        kw = pissa_fast.svd_lowrank_equivalent(niter, r) if matched else \
            dict(niter=niter, method=self.method, oversample=self.oversample)
        Wc = W.clone() if self.residual == "inplace" else W
        sync(self.device)
        t0 = time.perf_counter()
        out = pissa_fast.decompose(Wc, r, inplace=self.residual == "inplace", seed=self.seed, **kw)
        sync(self.device)
        t = time.perf_counter() - t0
        return t, SimpleNamespace(A=out.A, B=out.B, S=out.S, niter_used=out.niter_used, estimate=out.estimate)

    def _peft_once(self, W, r, niter):
        torch.manual_seed(self.seed)  # peft draws from the global RNG; seeded for reproducibility
        sync(self.device)
        t0 = time.perf_counter()
        factors, residual = peft_path(W, r, niter)
        sync(self.device)
        t = time.perf_counter() - t0
        del residual
        return t, factors

    def run(self, method: str, W: torch.Tensor, r: int, niter: int | None, *, repeats: int | None = None,
            warmup: int | None = None):
        once = {"pissa_fast": self._pissa_fast_once, "peft": self._peft_once,
                "pissa_fast_matched": lambda *a: self._pissa_fast_once(*a, matched=True)}[method]
        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        for _ in range(warmup):
            once(W, r, niter)
        times, out = [], None
        for _ in range(repeats):
            t, out = once(W, r, niter)
            times.append(t)
        return statistics.median(times), times, out


def whole_model(weights: dict, pristine: dict, method: str, r: int, niter: int | None, *,
                device: torch.device, seed: int, pf_method=None, oversample=None) -> float:
    """Seconds to PiSSA-initialize every weight of `weights` (restored from `pristine` first, off the
    clock): pissa_fast in one `decompose_many(..., inplace=True)` call, or the peft path layer by
    layer (each residual replacing its weight, as peft assigns `weight.data`)."""
    for k, w in pristine.items():
        if weights[k].shape != w.shape or weights[k].device != w.device:
            weights[k] = torch.empty(w.shape, dtype=w.dtype, device=device)
        weights[k].copy_(w, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    if method == "pissa_fast":
        pissa_fast.decompose_many(weights, r, niter, inplace=True, method=pf_method, oversample=oversample,
                                  seed=seed)
    else:
        torch.manual_seed(seed)
        for k in list(weights):
            _, weights[k] = peft_path(weights[k], r, niter)
    sync(device)
    return time.perf_counter() - t0
