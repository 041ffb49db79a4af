"""What peft's `init_lora_weights="pissa..."` asks for, and which pissa_fast setting delivers it.

`decompose_kwargs` is the one place where a peft niter becomes `decompose_many` arguments: the
backend, the drop-in and the benchmarks all go through it.
"""
from __future__ import annotations

import os

NITER_ENV = "PISSA_FAST_NITER"
NITER_MODES = ("equivalent", "literal")


def pissa_niter(init_lora_weights) -> tuple[bool, int | None]:
    """(is it a PiSSA init, niter): "pissa" -> (True, None) (exact SVD), "pissa_niter_N" -> (True, N);
    anything that is not a string starting with "pissa" -> (False, None). Raises ValueError for any
    other "pissa..." string, with peft's message (peft raises it too, at the first layer)."""
    if not isinstance(init_lora_weights, str) or not init_lora_weights.startswith("pissa"):
        return False, None
    if init_lora_weights == "pissa":
        return True, None
    parts = init_lora_weights.split("_niter_")  # peft's own test (LoraLayer.pissa_init)
    if len(parts) == 2:
        try:
            niter = int(parts[1])
        except ValueError:
            niter = -1
        if niter >= 0:
            return True, niter
    raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got "
                     f"{init_lora_weights!r} instead.")


def niter_mode() -> str:
    """PISSA_FAST_NITER: "equivalent" (default) or "literal"; read at call time."""
    mode = os.environ.get(NITER_ENV, "").strip().lower() or "equivalent"
    if mode not in NITER_MODES:
        raise ValueError(f"{NITER_ENV} must be one of {', '.join(NITER_MODES)} (or unset), got "
                         f"{os.environ[NITER_ENV]!r}")
    return mode


def decompose_kwargs(niter: int | None, r: int) -> dict:
    """decompose_many keyword arguments for peft's `pissa_niter_{niter}` at rank r (niter None:
    `"pissa"`, the exact SVD).

    The promise: with PISSA_FAST_NITER unset (or "equivalent"), the cheapest pissa_fast setting at
    least as accurate as `torch.svd_lowrank(W, r, niter)`, which is what peft runs:
    pissa_fast.svd_lowrank_equivalent(niter, r), a per-weight stopping criterion capped at niter N
    (each weight stops at the first niter whose error estimate is at most the error svd_lowrank is
    predicted to make on it). With PISSA_FAST_NITER=literal, pissa_fast's own niter N, every weight.
    """
    mode = niter_mode()  # a bad PISSA_FAST_NITER raises before any weight is touched
    if niter is None or mode == "literal":
        return {"niter": niter}
    from ..equivalence import svd_lowrank_equivalent

    return svd_lowrank_equivalent(niter, r)


def literal(kwargs: dict) -> dict:
    """The fixed-niter form of decompose_kwargs' result, for weights whose decompose_many path takes
    no per-matrix stopping criterion (sharded weights). It still keeps the promise: block Krylov at
    niter N with at least r columns per block is never less accurate than svd_lowrank at N."""
    return {k: v for k, v in kwargs.items() if k not in ("like_svd_lowrank", "tol", "estimate")}
