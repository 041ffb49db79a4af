"""decompose / decompose_many against float64 references, identities, in-place semantics,
determinism and awkward-but-valid inputs."""
import math

import pytest
import torch

import pissa_fast as pf
from conftest import acc_eps, eps, spectrum_matrix


def exact_ab(W64, r):
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root, S


def aligned(out, A_ref, B_ref):
    A, B = out.A.double().cpu(), out.B.double().cpu()
    sign = torch.sign((B * B_ref).sum(0))
    sign[sign == 0] = 1
    return A * sign[:, None], B * sign


def check_identity(W, out):
    """W == residual + B A up to one rounding of W's dtype plus the accumulation error of B A
    (the standard GEMM bound (r + 2) u |B| |A|, u the accumulation dtype's rounding unit)."""
    W64 = W.double()
    B, A = out.B.double(), out.A.double()
    R = out.residual.double()
    err = (W64 - (R + B @ A)).abs()
    r = A.shape[0]
    bound = eps(W.dtype) * R.abs() + (r + 2) * acc_eps(W.dtype) * (B.abs() @ A.abs() + W64.abs()) + 1e-300
    assert bool((err <= bound).all()), f"max violation {float((err - bound).max())}"


@pytest.mark.parametrize("method", ["krylov", "subspace", "halko", "exact"])
def test_factors_match_float64_svd(device, dtype, method):
    m, n, r = 96, 80, 6
    top = [10 * 0.9 ** i for i in range(r)]
    tail = [3 * 0.8 ** j for j in range(40)]
    W, *_ = spectrum_matrix(m, n, top + tail, dtype=dtype, device=device)
    W64 = W.double().cpu()  # the reference is the exact SVD of the rounded weight
    A_ref, B_ref, S = exact_ab(W64, r)
    # krylov at 6: its subspace l (niter + 1) = 70 stays below min(m, n) = 80 (12 took the exact SVD)
    niter = None if method == "exact" else 6 if method == "krylov" else 12
    out = pf.decompose(W, r, niter, method=None if method == "exact" else method, oversample=4)
    A, B = aligned(out, A_ref, B_ref)
    assert method != "krylov" or out.niter_used == niter  # a Krylov run, not the exact SVD's fallback
    # Subspace perturbation ~ accumulated rounding / spectral gap (Davis-Kahan), times sqrt(sigma_1)
    # for the scaling of A and B.
    gap = float(S[r - 1] - S[r])
    tol = 20 * acc_eps(dtype) * math.sqrt(max(m, n)) * float(S[0]) / gap * math.sqrt(float(S[0]))
    if method == "krylov":  # its Rayleigh-Ritz step works on Gram matrices (rounding relative to s_1^2)
        tol *= float(S[0]) / gap
    if method in ("subspace", "halko"):  # plain power iteration: (s_{l+1}/s_r)^(2 niter + 1) left over
        tol += math.sqrt(float(S[0])) * float(S[r + 4] / S[r - 1]) ** (2 * niter + 1)
    assert (A - A_ref).abs().max() <= tol
    assert (B - B_ref).abs().max() <= tol
    assert torch.allclose(out.S.double().cpu(), S[:r], rtol=0, atol=tol * math.sqrt(float(S[0])))
    assert out.A.shape == (r, n) and out.B.shape == (m, r) and out.S.shape == (r,)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.A.dtype == out.B.dtype == out.S.dtype == acc
    assert out.residual.dtype == dtype and out.residual.shape == W.shape
    check_identity(W, out)


def test_identity_and_inplace(device, dtype):
    W = torch.randn(70, 50, device=device).to(dtype)
    before = W.clone()
    out = pf.decompose(W, 5, 2)
    assert torch.equal(W, before), "inplace=False must not touch the weight"
    check_identity(W, out)
    ptr = W.data_ptr()
    out2 = pf.decompose(W, 5, 2, inplace=True)
    assert out2.residual.data_ptr() == ptr and out2.residual is W
    assert torch.equal(out2.residual, out.residual)
    assert torch.equal(out2.A, out.A) and torch.equal(out2.B, out.B)
    check_identity(before, out2)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "col_step"])
def test_strided_views(device, layout):
    base = torch.randn(60, 90, device=device)
    if layout == "transposed":
        W = base.t()                     # (90, 60), column-major
    elif layout == "row_slice":
        W = base[:, 5:70]                # unit column stride, row stride 90
    else:
        W = base[:, ::2]                 # no unit stride at all
    ref = pf.decompose(W.contiguous(), 4, 3, method="exact")
    snapshot = base.clone()
    out = pf.decompose(W, 4, 3)
    assert torch.equal(base, snapshot)
    check_identity(W, out)
    e = pf.error_vs_exact(W, out)
    assert e.excess < 0.05
    torch.testing.assert_close(out.S, ref.S, rtol=0.05, atol=0)
    W0 = W.clone()
    out = pf.decompose(W, 4, 3, inplace=True)
    check_identity(W0, out)
    assert out.residual.data_ptr() == W.data_ptr() and torch.equal(out.residual, W)
    if layout == "col_step":  # the untouched columns in between stay as they were
        assert torch.equal(base[:, 1::2], snapshot[:, 1::2])


def test_deterministic(device, dtype):
    W = torch.randn(64, 48, device=device).to(dtype)
    a = pf.decompose(W, 4, 3, seed=7)
    b = pf.decompose(W, 4, 3, seed=7)
    c = pf.decompose(W, 4, 3, seed=8)
    for x, y in [(a.A, b.A), (a.B, b.B), (a.S, b.S), (a.residual, b.residual)]:
        assert torch.equal(x, y)
    assert not torch.equal(a.A, c.A)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(pf.decompose(W, 4, 3, generator=g1).A, pf.decompose(W, 4, 3, generator=g2).A)


def test_more_accurate_than_svd_lowrank():
    """At equal niter the default beats the peft path (torch.svd_lowrank, q = r) by a wide margin
    on a slowly decaying spectrum like a real LLM weight's."""
    n, r = 512, 8
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.35
    W64, *_ = spectrum_matrix(n, n, s)
    W = W64.float()
    exact = pf.exact_factors(W64)
    for niter, factor in [(2, 0.7), (4, 0.1)]:
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        peft = pf.Decomposition(A=S.sqrt()[:, None] * V.T, B=U * S.sqrt(), S=S, residual=W,
                                method="peft", niter=niter)
        e_peft = pf.error_vs_exact(W64, peft, exact=exact)
        e_ours = pf.error_vs_exact(W64, pf.decompose(W, r, niter), exact=exact)
        assert e_ours.l1 <= factor * e_peft.l1, (niter, e_ours, e_peft)
        assert e_ours.excess <= e_peft.excess


@pytest.mark.parametrize("shape,r", [((1, 30), 1), ((30, 1), 1), ((20, 20), 20), ((50, 12), 12),
                                     ((12, 50), 12), ((8, 300), 3)])
def test_edge_shapes_and_full_rank(device, shape, r):
    W = torch.randn(*shape, device=device)
    out = pf.decompose(W, r, 2)
    check_identity(W, out)
    ref = pf.decompose(W, r, None)
    torch.testing.assert_close(out.S, ref.S, rtol=1e-3, atol=1e-5)
    if r == min(shape):  # the full rank-r factorization reproduces W: nothing is left
        assert out.residual.abs().max() <= 1e-4 * W.abs().max()


def test_niter_zero_and_methods(device):
    W, *_ = spectrum_matrix(80, 60, [2.0 ** -i for i in range(40)], dtype=torch.float32, device=device)
    for method in ["krylov", "subspace", "halko"]:
        out = pf.decompose(W, 4, 0, method=method, oversample=4)
        check_identity(W, out)
        assert pf.error_vs_exact(W, out).excess < 0.1
    # subspace iteration on fused passes and svd_lowrank's alternating passes span the same space
    a = pf.decompose(W, 4, 3, method="subspace", oversample=2)
    b = pf.decompose(W, 4, 3, method="halko", oversample=2)
    torch.testing.assert_close(a.S, b.S, rtol=1e-4, atol=0)


def test_rank_deficient_and_zero(device):
    W, *_ = spectrum_matrix(50, 40, [5.0, 3.0, 1.0], dtype=torch.float32, device=device)
    out = pf.decompose(W, 6, 3)
    check_identity(W, out)
    torch.testing.assert_close(out.S[:3].double().cpu(), torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert float(out.S[3:].abs().max()) <= 1e-5
    assert out.residual.abs().max() <= 1e-5
    Z = torch.zeros(30, 20, device=device)
    out = pf.decompose(Z, 4, 2)
    assert torch.equal(out.residual, Z) and float(out.A.abs().max()) == 0 and float(out.B.abs().max()) == 0
    assert torch.isfinite(out.S).all() and float(out.S.abs().max()) == 0


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales_float32(device, scale):
    W, _, s, _ = spectrum_matrix(64, 48, [3.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64, device=device)
    Ws = (W * scale).float()
    out = pf.decompose(Ws, 3, 3)
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    torch.testing.assert_close(out.S.double().cpu() / scale, s[:3], rtol=1e-4, atol=0)
    check_identity(Ws, out)


def test_float16_near_limit(device):
    W, _, s, _ = spectrum_matrix(64, 48, [4.0, 2.0, 1.0, 0.5], dtype=torch.float64, device=device)
    W = W / W.abs().max() * 60000.0
    Wh = W.half()
    assert torch.isfinite(Wh).all()
    out = pf.decompose(Wh, 2, 3)
    check_identity(Wh, out)
    assert torch.isfinite(out.residual).all()
    ref = torch.linalg.svdvals(Wh.double())
    torch.testing.assert_close(out.S.double().cpu(), ref[:2].cpu(), rtol=1e-4, atol=0)


def test_fallback_to_exact_when_subspace_too_wide(device):
    W = torch.randn(30, 25, device=device)
    out = pf.decompose(W, 10, 8)           # krylov subspace 10 * 9 > 25: exact
    ref = pf.decompose(W, 10, None)
    torch.testing.assert_close(out.S, ref.S, rtol=1e-5, atol=1e-5)
    check_identity(W, out)


def test_error_vs_exact_definitions():
    W, *_ = spectrum_matrix(60, 40, [4.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    out = pf.decompose(W, 3, None)
    e = pf.error_vs_exact(W, out)
    assert e.l1 < 1e-12 and e.rel_recon < 1e-12 and abs(e.excess) < 1e-12 and e.sv_rel < 1e-12
    bad = pf.Decomposition(A=out.A * 1.1, B=out.B, S=out.S, residual=out.residual, method="x", niter=0)
    e = pf.error_vs_exact(W, bad)
    # A off by 10% everywhere: mean |0.1 A| is half the l1 (B is exact)
    assert e.l1 == pytest.approx(0.5 * 0.1 * float(out.A.abs().mean()), rel=1e-9)
    assert e.rel_recon == pytest.approx(0.1, rel=1e-9)
    assert e.excess > 0


def test_decompose_many_matches_decompose(device):
    ws = {"q": torch.randn(64, 48, device=device), "k": torch.randn(64, 48, device=device),
          "up": torch.randn(80, 48, device=device).bfloat16(), "down": torch.randn(48, 80, device=device).t(),
          "h": torch.randn(40, 40, device=device).half()}
    outs = pf.decompose_many(ws, 4, 3)
    assert list(outs) == list(ws)
    for k, w in ws.items():
        one = pf.decompose(w, 4, 3)
        torch.testing.assert_close(outs[k].A, one.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[k].B, one.B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[k].residual, one.residual, rtol=1e-3, atol=1e-3)
    lst = pf.decompose_many(list(ws.values()), 4, 3)
    assert isinstance(lst, list) and len(lst) == len(ws)
    for a, b in zip(lst, outs.values()):
        assert torch.equal(a.A, b.A)


def test_decompose_many_groups_split_and_reads_in_place(monkeypatch):
    """Weights reach the op where they live (no stacked copy), groups split under max_batch_bytes,
    and splitting changes nothing."""
    ws = [torch.randn(64, 32) for _ in range(5)] + [torch.randn(32, 64) for _ in range(2)]
    seen = []
    real = pf.ops.pissa_factors

    class Spy:
        def __call__(self, W, *args):
            seen.append([w.data_ptr() for w in W])
            return real(W, *args)

    import pissa_fast.core as core
    monkeypatch.setattr(core.ops, "pissa_factors", Spy(), raising=False)
    whole = pf.decompose_many(ws, 4, 2, max_batch_bytes=1 << 40)
    assert sorted(len(c) for c in seen) == [2, 5]
    assert {p for c in seen for p in c} == {w.data_ptr() for w in ws}
    seen.clear()
    split = pf.decompose_many(ws, 4, 2, max_batch_bytes=1)
    assert [len(c) for c in seen] == [1] * 7
    for a, b in zip(whole, split):
        torch.testing.assert_close(a.A, b.A, rtol=1e-6, atol=1e-7)


def test_decompose_many_inplace_validates_all_first():
    good = torch.randn(30, 20)
    bad = torch.randn(30, 20)
    bad[3, 4] = float("nan")
    g0 = good.clone()
    with pytest.raises(ValueError, match=r"weights\['b'\].*NaN"):
        pf.decompose_many({"a": good, "b": bad}, 3, 2, inplace=True)
    assert torch.equal(good, g0)


def _largest_allocation(fn, tmp_path):
    """The largest single CPU allocation while fn runs (profiler memory events)."""
    import json
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return max(e["args"]["Bytes"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_krylov_state_is_float32_and_widened_in_chunks(wdtype, tmp_path):
    # The Krylov basis Q and its images Y = W Q, Z = W^T W Q of a float32/bf16 weight are stored in
    # float32 and widened to float64 about 1 MiB at a time: no allocation is larger than one float32
    # n x L block (the float64 state allocated 8 n L bytes at once; benchmarks/RESULTS.md has the
    # peak of a 7B layer).
    # L = 80 < min(m, n): not the exact path; 4 n L is above the passes' own ~2 MiB row buffer.
    m, n, r, niter = 96, 12000, 16, 4
    W = spectrum_matrix(m, n, [4.0, 2.0, 1.0, 0.5] + [0.1] * 40, dtype=torch.float32)[0].to(wdtype)
    omega = torch.randn(1, n, r, generator=torch.Generator().manual_seed(0))
    L = r * (niter + 1)
    run = lambda: pf.ops.pissa_factors([W], omega, r, niter, "krylov", "cholqr2", 0.0, -1, False)  # noqa: E731
    run()
    assert _largest_allocation(run, tmp_path) <= 4 * n * L
    # And the factors still match the float64 SVD of this well-separated spectrum.
    out = pf.decompose(W, 4, niter)
    assert pf.error_vs_exact(W, out).l1_rel < 1e-3
