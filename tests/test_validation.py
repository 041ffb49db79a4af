"""Bad input: a clear error naming the argument and the value, and the weight left exactly as it was."""
import pytest
import torch

import pissa_fast as pf


def unchanged(w, before):
    assert torch.equal(torch.nan_to_num(w, 1.0, 2.0, 3.0), torch.nan_to_num(before, 1.0, 2.0, 3.0))
    assert torch.equal(w.isnan(), before.isnan())


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("r,niter,exc,match", [
    (0, 2, ValueError, r"r must be in \[1, min\(m, n\) = 8\].*got 0"),
    (-3, 2, ValueError, r"got -3"),
    (9, 2, ValueError, r"r must be in \[1, min\(m, n\) = 8\].*got 9"),
    (2.0, 2, TypeError, r"r must be an int, got float 2.0"),
    (True, 2, TypeError, r"r must be an int, got bool"),
    (2, -1, ValueError, r"niter must be >= 0.*got -1"),
    (2, 1.5, TypeError, r"niter must be an int or None.*1.5"),
])
def test_bad_rank_and_niter(r, niter, exc, match, inplace):
    w = torch.randn(10, 8)
    before = w.clone()
    with pytest.raises(exc, match=match):
        pf.decompose(w, r, niter, inplace=inplace)
    unchanged(w, before)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: torch.randn(4, 5, 6), ValueError, r"weight must be 2-D.*\(4, 5, 6\)"),
    (lambda: torch.randn(7), ValueError, r"weight must be 2-D.*\(7,\)"),
    (lambda: torch.empty(0, 5), ValueError, r"weight is empty, shape \(0, 5\)"),
    (lambda: torch.ones(6, 5, dtype=torch.int32), TypeError, r"float32.*got torch.int32"),
    (lambda: torch.ones(6, 5, dtype=torch.bool), TypeError, r"got torch.bool"),
    (lambda: torch.randn(6, 5, dtype=torch.complex64), TypeError, r"got torch.complex64"),
    (lambda: torch.empty(6, 5, device="meta"), ValueError, r"meta tensor"),
    (lambda: [[1.0, 2.0]], TypeError, r"weight must be a torch.Tensor, got list"),
])
def test_bad_weight(make, exc, match):
    w = make()
    before = w.clone() if isinstance(w, torch.Tensor) and w.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        pf.decompose(w, 2, 2, inplace=True)
    if before is not None:
        assert torch.equal(w, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["krylov", "halko", "exact"])
def test_nan_inf_rejected_and_weight_untouched(dtype, value, method):
    w = torch.randn(40, 30).to(dtype)
    w[17, 3] = value
    before = w.clone()
    with pytest.raises(ValueError, match=r"weight contains NaN or Inf"):
        pf.decompose(w, 3, 2, inplace=True, method=method)
    unchanged(w, before)


def test_leaf_requiring_grad_inplace():
    p = torch.nn.Parameter(torch.randn(12, 10))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"inplace=True on weight, a leaf tensor that requires grad.*weight.data"):
        pf.decompose(p, 2, 2, inplace=True)
    assert torch.equal(p.detach(), before)
    out = pf.decompose(p, 2, 2)  # not in place: fine, and nothing tracked
    assert not out.residual.requires_grad
    out = pf.decompose(p.data, 2, 2, inplace=True)
    assert out.residual.data_ptr() == p.data_ptr()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="lanczos"), ValueError, r"method must be one of .*'lanczos'"),
    (dict(normalizer="gs"), ValueError, r"normalizer must be one of .*'gs'"),
    (dict(oversample=-1), ValueError, r"oversample must be an int >= 0.*-1"),
    (dict(seed="x"), TypeError, r"seed must be an int, got str"),
    (dict(generator=3), TypeError, r"generator must be a torch.Generator, got int"),
])
def test_bad_options(kwargs, exc, match):
    w = torch.randn(10, 8)
    before = w.clone()
    with pytest.raises(exc, match=match):
        pf.decompose(w, 2, 2, inplace=True, **kwargs)
    assert torch.equal(w, before)


def test_overlapping_and_shared_storage_inplace():
    base = torch.randn(10)
    w = base.expand(6, 10)
    with pytest.raises(ValueError, match=r"overlap in memory"):
        pf.decompose(w, 2, 1, inplace=True)
    a = torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"weights\['y'\] overlaps weights\['x'\] in memory"):
        pf.decompose_many({"x": a, "y": a}, 2, 1, inplace=True)
    with pytest.raises(ValueError, match=r"overlaps"):
        pf.decompose_many([a[:5], a[4:]], 2, 1, inplace=True)
    fused = torch.randn(24, 6)  # disjoint slices of one storage (a fused qkv) are fine
    q, k = fused[:12], fused[12:]
    q0, k0 = q.clone(), k.clone()
    outs = pf.decompose_many({"q": q, "k": k}, 2, 1, inplace=True)
    torch.testing.assert_close(outs["q"].residual + outs["q"].B @ outs["q"].A, q0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["k"].residual + outs["k"].B @ outs["k"].A, k0, rtol=1e-5, atol=1e-5)
    w = torch.randn(8, 6)
    with pytest.raises(TypeError, match=r"weights must be a dict or a list"):
        pf.decompose_many(w, 2, 1)


def test_native_op_checks_name_the_argument():
    w = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match=r"gram: the second argument must have shape \[1, 8, 3\]"):
        pf.ops.gram([w], torch.randn(1, 9, 3))
    with pytest.raises(RuntimeError, match=r"residual_: A must have dtype Float"):
        pf.ops.residual_([w], torch.randn(1, 10, 2), torch.randn(1, 2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"W\[1\] must have shape \[10, 8\] like W\[0\], got \[8, 10\]"):
        pf.ops.wx([w, w.t()], torch.randn(2, 8, 3))
    with pytest.raises(RuntimeError, match=r"pissa_factors: omega must have at least rank = 4 columns, got 3"):
        pf.ops.pissa_factors([w], torch.randn(1, 8, 3), 4, 1, "krylov", "qr")
