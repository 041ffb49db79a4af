"""Every native op through torch.library.opcheck (schema, fake kernel, dispatcher registrations),
the kernels against float64 math with poisoned outputs, and a hypothesis property test."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pissa_fast as pf
from conftest import DTYPES, acc_eps, eps

ops = pf.ops


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def weights(dtype, device, b=2, m=37, n=29):
    # the second matrix is a row-sliced view: a row stride larger than n
    big = torch.randn(m, n + 5, device=device).to(dtype)
    return [torch.randn(m, n, device=device).to(dtype), big[:, 2:n + 2]][:b]


def test_opcheck_all_ops(device, dtype):
    W = weights(dtype, device)
    a = acc(dtype)
    X = torch.randn(2, 29, 5, device=device, dtype=a)
    Y = torch.randn(2, 37, 5, device=device, dtype=a)
    B = torch.randn(2, 37, 3, device=device, dtype=a)
    A = torch.randn(2, 3, 29, device=device, dtype=a)
    torch.library.opcheck(ops.wx, (W, X))
    torch.library.opcheck(ops.wtx, (W, Y))
    torch.library.opcheck(ops.gram, (W, X))
    torch.library.opcheck(ops.residual, (W, B, A))
    torch.library.opcheck(ops.residual_, ([w.clone() for w in W], B, A))
    torch.library.opcheck(ops.pissa_factors, (W, X, 3, 2, "krylov", "qr"))


def test_kernels_against_float64(device, dtype):
    W = weights(dtype, device, b=2, m=53, n=41)
    a = acc(dtype)
    k = 11
    X = torch.randn(2, 41, k, device=device, dtype=a)
    Wd = [w.double() for w in W]
    Y, Z = ops.gram(W, X)
    Yr = torch.stack([w @ x.double() for w, x in zip(Wd, X)])
    Zr = torch.stack([w.T @ y for w, y in zip(Wd, Yr)])
    u = acc_eps(dtype)
    # |fl(W x) - W x| <= n u |W| |x| (standard dot-product bound)
    Yb = 41 * u * torch.stack([w.abs() @ x.double().abs() for w, x in zip(Wd, X)])
    assert bool(((Y.double() - Yr).abs() <= Yb + 1e-300).all())
    Zb = 53 * u * torch.stack([w.abs().T @ y.abs() for w, y in zip(Wd, Yr)]) + \
        torch.stack([w.abs().T @ yb for w, yb in zip(Wd, Yb)])
    assert bool(((Z.double() - Zr).abs() <= Zb + 1e-300).all())
    Y2 = ops.wx(W, X)
    Z2 = ops.wtx(W, Yr.to(a))
    assert bool(((Y2.double() - Yr).abs() <= Yb + 1e-300).all())
    Zr2 = torch.stack([w.T @ y.to(a).double() for w, y in zip(Wd, Yr)])
    Zb2 = 53 * u * torch.stack([w.abs().T @ y.to(a).double().abs() for w, y in zip(Wd, Yr)])
    assert bool(((Z2.double() - Zr2).abs() <= Zb2 + 1e-300).all())


def test_residual_kernels_poisoned(device, dtype):
    W = weights(dtype, device, b=2, m=45, n=33)
    a = acc(dtype)
    B = torch.randn(2, 45, 4, device=device, dtype=a)
    A = torch.randn(2, 4, 33, device=device, dtype=a)
    ref = [(w.double() - b.double() @ x.double()) for w, b, x in zip(W, B, A)]
    bound = [eps(dtype) * r.abs() + 6 * acc_eps(dtype) * (w.double().abs() + b.double().abs() @ x.double().abs())
             for r, w, b, x in zip(ref, W, B, A)]
    out = ops.residual(W, B, A)
    for o, r, bd, w in zip(out, ref, bound, W):
        assert o.dtype == dtype and o.is_contiguous() and o.shape == w.shape
        assert bool(((o.double() - r).abs() <= bd + 1e-300).all())
    # in place on poisoned copies: every element must be overwritten by W - B A
    Wc = [w.clone() for w in W]
    ops.residual_(Wc, B, A)
    for o, r, bd in zip(Wc, ref, bound):
        assert bool(((o.double() - r).abs() <= bd + 1e-300).all())


def test_gram_outputs_fully_written(device):
    """The kernels must write every output element: run on poisoned memory (NaN-filled caching
    allocator blocks) by first allocating and freeing NaN tensors of the output size."""
    W = [torch.randn(33, 21, device=device)]
    X = torch.randn(1, 21, 7, device=device)
    for _ in range(3):
        junk = torch.full((1, 33 * 21 * 4), float("nan"), device=device)
        del junk
        Y, Z = ops.gram(W, X)
        assert torch.isfinite(Y).all() and torch.isfinite(Z).all()


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from(DTYPES), niter=st.integers(0, 3),
       method=st.sampled_from(["krylov", "subspace", "halko"]), inplace=st.booleans(),
       transposed=st.booleans())
def test_property_any_shape_rank_dtype(m, n, data, dtype, niter, method, inplace, transposed):
    r = data.draw(st.integers(1, min(m, n)))
    W = torch.randn(n, m).t() if transposed else torch.randn(m, n)
    W = W.to(dtype)
    W0 = W.clone()
    out = pf.decompose(W, r, niter, method=method, inplace=inplace)
    assert out.A.shape == (r, n) and out.B.shape == (m, r) and out.S.shape == (r,)
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    S = out.S.double()
    assert bool((S >= 0).all()) and bool((S[:-1] >= S[1:] - 1e-6 * S[0]).all())
    # residual + B A reproduces W to the dtype's rounding
    W64 = W0.double()
    B, A = out.B.double(), out.A.double()
    err = (W64 - out.residual.double() - B @ A).abs()
    bound = eps(dtype) * out.residual.double().abs() + (r + 2) * acc_eps(dtype) * (B.abs() @ A.abs() + W64.abs())
    assert bool((err <= bound + 1e-300).all())
    # never better than optimal, and the singular values never exceed the exact ones (interlacing)
    sv = torch.linalg.svdvals(W64)
    assert bool((S <= sv[:r] * (1 + 1e-4) + 1e-6).all())
    e = pf.error_vs_exact(W64, out)
    assert e.excess >= -1e-4
    if inplace:
        assert out.residual.data_ptr() == W.data_ptr()
