"""pissa_factors is batched end to end (issue 8, item 3), checked with the profiler on CPU:

- a group of 16 same-shape weights makes exactly the same ATen calls outside the passes, and the
  same host syncs (aten::_local_scalar_dense, aten::item, copies to the host), as a group of 1;
- every factorization (Cholesky, eigh, QR, SVD) sees matrices at most basis-width square: the tall
  n x l blocks only go through GEMMs and triangular solves.
The exact path is exempt."""
from collections import Counter

import pytest
import torch

import pissa_fast as pf

PASSES = {"pissa_fast::gram", "pissa_fast::wx", "pissa_fast::wtx"}
FACTORIZATIONS = ("cholesky", "eigh", "qr", "svd", "lu", "eig", "inv", "lstsq", "geqrf", "syevd")
SYNCS = ("aten::_local_scalar_dense", "aten::item")


def _inside_pass(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in PASSES:
            return True
        p = p.cpu_parent
    return False


def profile(W, omega, r, niter, method="krylov", **kw):
    args = (float(kw.get("tol", 0.0)), int(kw.get("like_svd_lowrank", -1)), bool(kw.get("estimate", False)))
    pf.ops.pissa_factors(W, omega, r, niter, method, "cholqr2", *args)  # warm up lazy inits
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = pf.ops.pissa_factors(W, omega, r, niter, method, "cholqr2", *args)
    events = [e for e in prof.events() if e.name.startswith(("aten::", "pissa_fast::")) and not _inside_pass(e)]
    return events, out


def calls(events) -> Counter:
    """The ATen calls pissa_factors makes itself (its direct children; what an ATen op does inside,
    e.g. any() over 1 element vs 16, is that op's business), plus every host sync at any depth."""
    top = Counter(e.name for e in events if e.cpu_parent is not None and e.cpu_parent.name == "pissa_fast::pissa_factors")
    top.update(e.name for e in events if e.name in SYNCS and not (e.cpu_parent and e.cpu_parent.name == "pissa_fast::pissa_factors"))
    return top


def is_factorization(name: str) -> bool:
    op = name.split("::")[-1]
    return any(f in op for f in FACTORIZATIONS) and "solve_triangular" not in op


def group(b, m=120, n=90, seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(m, n, generator=g) for _ in range(1 if same else b)]
    return W * b if same else W


@pytest.mark.parametrize("method,niter,kw", [
    ("krylov", 3, {}),
    ("krylov", 4, {"estimate": True}),
    ("subspace", 3, {}),
    ("halko", 2, {}),
])
def test_calls_and_syncs_do_not_grow_with_the_group(method, niter, kw):
    r, l = 4, 8
    counts = {}
    for b in (1, 16):
        W = group(b)
        omega = torch.randn(b, W[0].shape[1], l, generator=torch.Generator().manual_seed(1))
        events, _ = profile(W, omega, r, niter, method, **kw)
        counts[b] = calls(events)
        assert sum(counts[b][s] for s in SYNCS) >= 1  # the counter sees syncs at all
        assert any(is_factorization(k) for k in counts[b])  # ... and factorizations
    assert counts[16] == counts[1], (counts[16] - counts[1]) + (counts[1] - counts[16])


def test_stopping_early_does_not_grow_with_the_group():
    # The same weight and test matrix 16 times: every copy stops at the same niter, so the calls of
    # the per-matrix stopping bookkeeping must not depend on how many there are.
    r, l, niter = 4, 8, 8
    counts, used = {}, {}
    for b in (1, 16):
        W = group(b, same=True)
        omega = torch.randn(1, W[0].shape[1], l, generator=torch.Generator().manual_seed(1)).expand(b, -1, -1).contiguous()
        events, out = profile(W, omega, r, niter, tol=1e-2)
        counts[b] = calls(events)
        used[b] = out[3].tolist()
    assert used[16] == used[1] * 16 and 1 <= used[1][0] < niter
    assert counts[16] == counts[1], (counts[16] - counts[1]) + (counts[1] - counts[16])


def test_mixed_group_stops_per_matrix_with_bounded_calls():
    # Fast- and slow-decay weights in one group stop at different niters; the bookkeeping adds a
    # bounded number of calls (at most niter stopping events), not one per matrix.
    from conftest import spectrum_matrix

    fast, *_ = spectrum_matrix(120, 90, [0.5 ** i for i in range(90)], dtype=torch.float32, seed=1)
    slow, *_ = spectrum_matrix(120, 90, [(i + 1) ** -0.2 for i in range(90)], dtype=torch.float32, seed=2)
    W = [fast, slow] * 8
    omega = torch.randn(16, 90, 8, generator=torch.Generator().manual_seed(3))
    events, out = profile(W, omega, 4, 8, tol=1e-3)
    used = out[3].tolist()
    assert len(set(used[0::2])) == 1 and len(set(used[1::2])) == 1 and used[0] < used[1], used
    syncs = sum(1 for e in events if e.name in SYNCS)
    assert syncs < 100, syncs


@pytest.mark.parametrize("method,niter", [("krylov", 4), ("subspace", 3), ("halko", 2)])
def test_factorizations_only_on_small_matrices(method, niter):
    r, l, b = 4, 8, 3
    W = group(b, m=300, n=200)
    omega = torch.randn(b, 200, l, generator=torch.Generator().manual_seed(2))
    events, _ = profile(W, omega, r, niter, method, estimate=True)
    width = l * (niter + 1) if method == "krylov" else l
    seen = 0
    for e in events:
        if not is_factorization(e.name):
            continue
        for shape in e.input_shapes:
            if len(shape) >= 2:
                seen += 1
                assert max(shape[-2:]) <= width, (e.name, shape, width)
    assert seen > 0


def test_householder_reference_still_available():
    W = group(2)
    omega = torch.randn(2, 90, 8, generator=torch.Generator().manual_seed(1))
    a = pf.ops.pissa_factors(W, omega, 4, 3, "krylov", "qr")
    b = pf.ops.pissa_factors(W, omega, 4, 3, "krylov", "cholqr2")
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=0)


def test_shifted_fallback_on_ill_conditioned_blocks():
    # Rank 3 weights in float64 (no float32 noise to fill the null space): later Krylov blocks are
    # numerically inside the span of earlier ones and CholeskyQR's Gram matrix is singular.
    from conftest import spectrum_matrix

    W, U, s, V = spectrum_matrix(80, 60, [4.0, 2.0, 1.0], dtype=torch.float64)
    Z = torch.zeros(80, 60, dtype=torch.float64)
    omega = torch.randn(3, 60, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A, B, S, used, est = pf.ops.pissa_factors([W, Z, W], omega, 5, 4, "krylov", "cholqr2")
    # Singular values of W Q come from eigh of its Gram matrix: exact zeros come out at sqrt(u64) of
    # the largest one, 1.5e-8 relative.
    for j in (0, 2):
        torch.testing.assert_close(S[j, :3], s, rtol=1e-10, atol=1e-10)
        assert float(S[j, 3:].abs().max()) < 1e-7 * float(s[0])
        torch.testing.assert_close(B[j] @ A[j], W, rtol=0, atol=1e-7 * float(s[0]))
    assert torch.equal(S[1], torch.zeros_like(S[1])) and torch.isfinite(A).all() and torch.isfinite(B).all()
