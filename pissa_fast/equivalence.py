"""peft's `init_lora_weights="pissa_niter_N"` as an accuracy promise: the decompose_many arguments
that are at least as accurate as torch.svd_lowrank(W, q=r, niter=N), for the least work."""
from __future__ import annotations

import numbers

from .core import default_oversample


def svd_lowrank_equivalent(niter: int, r: int) -> dict:
    """Keyword arguments for pissa_fast.decompose / decompose_many that give each weight accuracy
    at least that of torch.svd_lowrank(W, q=r, niter=niter) (what peft runs for "pissa_niter_N",
    without oversampling), at the lowest cost:

        pissa_fast.decompose_many(weights, r, **pissa_fast.svd_lowrank_equivalent(16, r))

    The criterion is per weight: each stops at the first niter whose a-posteriori error estimate
    (Decomposition.estimate) is at most the error svd_lowrank is predicted to make on *that* weight,
    computed from its own Ritz values (subspace iteration without oversampling leaves direction j
    off by about (s_{r+1} / s_j)^(2 niter + 1)). The prediction measured 1.3-2.9x below svd_lowrank's
    actual l1_rel and the estimate at or above the true one (benchmarks/RESULTS.md, synthetic and
    SmolLM2-135M weights), so both err towards more accuracy. The cap is niter itself: block Krylov
    at niter N with at least r columns per block is never less accurate than subspace iteration at
    N, so a weight whose estimate never meets the target still keeps the promise. A small weight whose
    Krylov subspace at the cap would reach min(m, n) runs to the largest niter that fits, and takes the
    exact SVD only if its target is still not met there. Where both have
    converged to float32's rounding (l1_rel below about 1e-5), which of the two is closer is noise.
    """
    if isinstance(niter, bool) or not isinstance(niter, numbers.Integral) or niter < 0:
        raise ValueError(f"niter must be an int >= 0 (peft's pissa_niter_N), got {niter!r}")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    cap = max(1, int(niter))
    return {"niter": cap, "like_svd_lowrank": int(niter), "oversample": default_oversample(int(r), cap)}
