"""The Krylov basis on W's output side (omega [b, m, l]): what decompose does on the CPU for m < n,
against float64 references and against the input-side basis, with the awkward inputs of test_core."""
import math

import pytest
import torch

import pissa_fast as pf
from conftest import acc_eps, spectrum_matrix

ops = pf.ops


def factors(W, omega, r, niter, method="krylov", **kw):
    args = dict(tol=0.0, like_svd_lowrank=-1, estimate=False) | kw
    return ops.pissa_factors([W], omega, r, niter, method, "cholqr2", args["tol"], args["like_svd_lowrank"],
                             args["estimate"])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_side_matches_float64_svd(wdtype):
    dtype = wdtype
    m, n, r = 80, 96, 6
    top = [10 * 0.9 ** i for i in range(r)]
    tail = [3 * 0.8 ** j for j in range(40)]
    W, *_ = spectrum_matrix(m, n, top + tail, dtype=dtype)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(3)
    A, B, Sr, used, _ = factors(W, torch.randn(1, m, r + 4, generator=g, dtype=acc), r, 5)
    root = S[:r].sqrt()
    A_ref, B_ref = root[:, None] * Vh[:r], U[:, :r] * root
    sign = torch.sign((B[0].double() * B_ref).sum(0))
    gap = float(S[r - 1] - S[r])
    # test_core's bound for krylov: the Rayleigh-Ritz step's Gram matrices add a factor s_1 / gap
    tol = 20 * acc_eps(dtype) * math.sqrt(n) * (float(S[0]) / gap) ** 2 * math.sqrt(float(S[0]))
    assert A.shape == (1, r, n) and B.shape == (1, m, r)
    assert (A[0].double() * sign[:, None] - A_ref).abs().max() <= tol
    assert (B[0].double() * sign - B_ref).abs().max() <= tol
    assert (Sr[0].double() - S[:r]).abs().max() <= tol * math.sqrt(float(S[0]))
    assert int(used[0]) == 5  # a Krylov run, not the exact SVD's fallback


def test_decompose_puts_the_basis_on_the_smaller_side(monkeypatch):
    rows = []
    real = ops.pissa_factors

    def spy(W, omega, *a):
        rows.append(omega.shape[1])
        return real(W, omega, *a)

    monkeypatch.setattr(pf.core.ops, "pissa_factors", spy, raising=False)
    wide, tall = torch.randn(48, 96), torch.randn(96, 48)
    pf.decompose(wide, 4, 3)
    pf.decompose(tall, 4, 3)
    pf.decompose(wide, 4, 3, method="halko")  # torch.svd_lowrank's algorithm keeps its own layout
    assert rows == [48, 48, 96]
    # a big weight the float32 passes would read twice per pass on the output side: input side
    big = torch.randn(512, 2048)
    pf.decompose(big, 4, 1)
    assert rows[-1] == 2048
    # the same shape in bf16 on the AMX passes: wx + wtx cost what gram does, so the smaller side
    pf.decompose(big.bfloat16(), 4, 1)
    assert rows[-1] == (512 if pf.cpu_passes() == "amx" else 2048)


@pytest.mark.parametrize("like", [-1, 4])
def test_output_side_agrees_with_input_side(like):
    W, *_ = spectrum_matrix(64, 160, [2.0 ** -i for i in range(40)], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    a = factors(W, torch.randn(1, 64, 8, generator=g), 4, 6, like_svd_lowrank=like)
    b = factors(W, torch.randn(1, 160, 8, generator=g), 4, 6, like_svd_lowrank=like)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=0)  # S
    for x, y in ((a[0], b[0]), (a[1], b[1])):  # A, B up to the sign of each pair
        sign = torch.sign((x * y).sum(-1 if x.shape[-2] == 4 else -2, keepdim=True))
        torch.testing.assert_close(x * sign, y, rtol=0, atol=1e-4)


def test_output_side_rank_deficient_zero_and_extreme_scales():
    W, *_ = spectrum_matrix(40, 50, [5.0, 3.0, 1.0], dtype=torch.float32)
    out = pf.decompose(W, 6, 3)
    torch.testing.assert_close(out.S[:3].double(), torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert float(out.S[3:].abs().max()) <= 1e-5 and float(out.residual.abs().max()) <= 1e-5
    Z = torch.zeros(20, 30)
    out = pf.decompose(Z, 4, 2)
    assert torch.equal(out.residual, Z) and float(out.S.abs().max()) == 0
    for scale in (1e30, 1e-30):
        W, _, s, _ = spectrum_matrix(48, 64, [3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
        out = pf.decompose((W * scale).float(), 3, 3)
        assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
        torch.testing.assert_close(out.S.double() / scale, s[:3], rtol=1e-4, atol=0)


def test_output_side_checks():
    W = torch.randn(48, 96)
    with pytest.raises(RuntimeError, match="omega"):  # halko reads omega on the input side only
        factors(W, torch.randn(1, 48, 8), 4, 2, method="halko")
    with pytest.raises(RuntimeError, match="omega"):
        factors(W, torch.randn(1, 50, 8), 4, 2)
