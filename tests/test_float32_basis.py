"""The block Krylov basis is orthonormalized in float32 where the passes see it in float32 (every weight
but a float64 one), and a block too ill-conditioned for float32 CholeskyQR2 is redone in float64
(csrc/small_dense.cpp, orthonormalize_against). These weights make the later Krylov blocks nearly
rank-deficient, where float32 CholeskyQR2 alone would lose the basis's orthonormality."""
import pytest
import torch

import pissa_fast as pf
from conftest import spectrum_matrix


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (50, 40), (40, 50)])  # input side, output side
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_rank_reached_inside_the_krylov_basis(shape, wdtype):
    # rank 3 < r: after the first block every new block is rounding noise around W's range
    W, *_ = spectrum_matrix(*shape, [5.0, 3.0, 1.0], dtype=wdtype)
    out = pf.decompose(W, 6, 3)
    assert out.niter_used == 3  # a Krylov run (subspace 8 x 4 < min(m, n)), not the exact SVD's fallback
    ref = torch.linalg.svdvals(W.double())  # bf16's rounding adds singular values of about 2^-9 s_1
    torch.testing.assert_close(out.S[:3].double(), ref[:3], rtol=1e-5, atol=0)
    # Ritz values never exceed the singular values they stand for (beyond rounding)
    assert bool((out.S[3:].double() <= ref[3:6] * (1 + 1e-5) + 1e-6).all()), (out.S, ref[:6])
    # the residual is W - B A, rounded once to W's dtype
    exact = W.double() - out.B.double() @ out.A.double()
    ulp = 2.0 ** -8 if wdtype == torch.bfloat16 else 2.0 ** -23
    assert float((out.residual.double() - exact).abs().max()) <= ulp * float(exact.abs().max()) + 1e-6


def test_dominant_directions_converged_after_one_block():
    # s_4 / s_5 = 100: once the top 4 have converged, the projection leaves a later block too
    # ill-conditioned for the float32 path (one of the three is redone in float64)
    s = [1000.0, 500.0, 200.0, 100.0] + [0.9 ** i for i in range(60)]
    W, *_ = spectrum_matrix(128, 96, s, dtype=torch.float32)
    out = pf.decompose(W, 4, 3)
    assert out.niter_used == 3
    err = pf.error_vs_exact(W, out)
    assert err.sv_rel <= 1e-6 and err.l1_rel <= 1e-5, err


def test_householder_normalizer_agrees():
    # normalizer "qr" keeps the float64 reference path; cholqr2's float32 basis must agree with it
    W, *_ = spectrum_matrix(160, 120, [2.0 ** (-i / 4) for i in range(120)], dtype=torch.float32)
    a = pf.decompose(W, 8, 4)
    b = pf.decompose(W, 8, 4, normalizer="qr")
    torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=0)
    ea, eb = pf.error_vs_exact(W, a), pf.error_vs_exact(W, b)
    assert ea.l1_rel <= 2 * eb.l1_rel + 1e-6, (ea, eb)
