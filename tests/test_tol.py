"""decompose(..., tol=...) and like_svd_lowrank: the estimate, per-matrix stopping, the niter cap,
and svd_lowrank_equivalent's accuracy promise, on fast- and slow-decay spectra."""
import math

import pytest
import torch

import pissa_fast as pf
from conftest import spectrum_matrix

M, N_, R = 300, 200, 8
SPECTRA = {
    "slow": [(i + 1) ** -0.3 for i in range(N_)],            # flatter than an LLM weight's
    "llm": [(i + 1) ** -0.35 * (4 if i == 0 else 1) for i in range(N_)],
    "fast": [0.8 ** i for i in range(N_)],
}


def weight(kind, seed=0):
    W, *_ = spectrum_matrix(M, N_, SPECTRA[kind], dtype=torch.float32, seed=seed)
    return W


@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-3])
def test_tol_is_honoured(kind, tol):
    W = weight(kind)
    out = pf.decompose(W, R, 16, tol=tol)
    true = pf.error_vs_exact(W, out).l1_rel
    assert true <= pf.ESTIMATE_SLACK * tol, (kind, tol, out.niter_used, out.estimate, true)
    assert out.estimate <= tol and 1 <= out.niter_used < 16
    # and it stopped at the first niter that met the estimate: one fewer does not
    if out.niter_used > 1:
        p = pf.default_oversample(R, 16)  # the oversampling depends on niter: keep the cap's
        before = pf.decompose(W, R, out.niter_used - 1, oversample=p, estimate=True)
        assert before.estimate > tol


@pytest.mark.parametrize("kind", list(SPECTRA))
def test_estimate_tracks_the_true_error(kind):
    W = weight(kind)
    exact = pf.exact_factors(W.double())
    for niter in range(1, 8):
        out = pf.decompose(W, R, niter, estimate=True)
        true = pf.error_vs_exact(W, out, exact).l1_rel
        if true > 1e-5:  # above the float32 noise floor
            assert true <= pf.ESTIMATE_SLACK * out.estimate, (niter, true, out.estimate)
        if niter >= 2:  # and useful (at niter 1 it is the change from niter 0: one step behind)
            assert out.estimate <= 30 * true + 1e-4, (niter, true, out.estimate)


def test_niter_is_capped_and_reported():
    W = weight("slow")
    out = pf.decompose(W, R, 3, tol=1e-9)
    assert out.niter == 3 and out.niter_used == 3 and out.estimate > 1e-9
    ref = pf.decompose(W, R, 3)
    assert torch.equal(out.A, ref.A) and torch.equal(out.S, ref.S)  # same as a plain niter-3 run
    plain = pf.decompose(W, R, 3)
    assert plain.niter_used == 3 and math.isnan(plain.estimate)
    ex = pf.decompose(W, R, None, tol=1e-3)
    assert ex.niter_used is None and ex.estimate == 0.0
    assert math.isfinite(pf.decompose(W, R, 2, estimate=True).estimate)
    assert math.isnan(pf.decompose(W, R, 0, estimate=True).estimate)  # nothing to compare with


def test_each_matrix_stops_on_its_own():
    ws = {"fast": weight("fast"), "slow": weight("slow", 1), "fast2": weight("fast", 2)}
    outs = pf.decompose_many(ws, R, 12, tol=1e-3, inplace=False)
    assert outs["fast"].niter_used < outs["slow"].niter_used
    for k, w in ws.items():
        one = pf.decompose(w, R, 12, tol=1e-3)
        assert one.niter_used == outs[k].niter_used
        torch.testing.assert_close(outs[k].S, one.S, rtol=1e-5, atol=0)
        torch.testing.assert_close(outs[k].residual + outs[k].B @ outs[k].A, w, rtol=0, atol=1e-5)


def svd_lowrank_l1_rel(W, r, niter, seeds=4):
    exact = pf.exact_factors(W.double())
    vals = []
    for s in range(seeds):
        torch.manual_seed(s)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        d = pf.Decomposition(A=S.sqrt()[:, None] * V.T, B=U * S.sqrt(), S=S, residual=W, method="peft", niter=niter)
        vals.append(pf.error_vs_exact(W, d, exact).l1_rel)
    return sum(vals) / len(vals), exact


@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_svd_lowrank_equivalent_is_at_least_as_accurate(kind, N):
    W = weight(kind, seed=3)
    kw = pf.svd_lowrank_equivalent(N, R)
    assert kw["niter"] <= max(1, N)
    ref, exact = svd_lowrank_l1_rel(W, R, N)
    for seed in range(2):
        out = pf.decompose(W, R, seed=seed, **kw)
        ours = pf.error_vs_exact(W, out, exact).l1_rel
        assert ours <= ref, (kind, N, out.niter_used, ours, ref)
        assert 1 <= out.niter_used <= kw["niter"]


def test_svd_lowrank_equivalent_saves_work_on_easy_weights():
    # On a fast-decay weight svd_lowrank needs its 2N+2 reads; the estimate stops far earlier.
    out = pf.decompose(weight("fast"), R, **pf.svd_lowrank_equivalent(16, R))
    assert out.niter_used <= 6


@pytest.mark.parametrize("kind", list(SPECTRA))
def test_a_cap_wider_than_the_weight_runs_to_what_fits(kind):
    # pissa_niter_16 at r 16 on a 200-wide weight: the cap's 17 blocks of 16 columns would not fit.
    # It runs to the largest niter that fits (199 // 16 - 1 = 11), stopping earlier where it can, and
    # keeps the promise; only a weight that misses its target there gets the exact SVD.
    W = weight(kind, seed=5)
    r = 16
    kw = pf.svd_lowrank_equivalent(16, r)
    l = r + kw["oversample"]
    assert l * (kw["niter"] + 1) >= min(W.shape)
    ref, exact = svd_lowrank_l1_rel(W, r, 16)
    out = pf.decompose(W, r, **kw)
    assert pf.error_vs_exact(W, out, exact).l1_rel <= ref, (kind, out.niter_used)
    assert out.niter_used is None or 1 <= out.niter_used <= (min(W.shape) - 1) // l - 1


def test_a_cap_wider_than_the_weight_falls_back_to_exact_when_the_target_is_missed():
    W = weight("slow", seed=6)
    out = pf.decompose(W, 16, 16, tol=1e-9)  # below the float32 passes' noise: never met
    assert out.niter_used is None
    assert pf.error_vs_exact(W, out).l1_rel < 1e-4


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(tol=0.0), ValueError, r"tol must be a number > 0"),
    (dict(tol=-1e-3), ValueError, r"tol must be a number > 0.*-0.001"),
    (dict(tol=float("nan")), ValueError, r"tol must be a number > 0"),
    (dict(tol="1e-3"), ValueError, r"tol must be a number > 0.*'1e-3'"),
    (dict(like_svd_lowrank=-2), ValueError, r"like_svd_lowrank must be an int >= 0.*-2"),
    (dict(like_svd_lowrank=2.5), ValueError, r"like_svd_lowrank must be an int >= 0.*2.5"),
    (dict(tol=1e-3, method="halko"), ValueError, r"need method 'krylov'.*'halko'"),
])
def test_bad_stopping_arguments(kwargs, exc, match):
    w = torch.randn(10, 8)
    before = w.clone()
    with pytest.raises(exc, match=match):
        pf.decompose(w, 2, 2, inplace=True, **kwargs)
    assert torch.equal(w, before)


@pytest.mark.parametrize("args,match", [((-1, 4), r"niter must be an int >= 0"), ((4, 0), r"r must be an int >= 1")])
def test_svd_lowrank_equivalent_checks(args, match):
    with pytest.raises(ValueError, match=match):
        pf.svd_lowrank_equivalent(*args)
