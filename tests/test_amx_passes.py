"""The bf16 gram and residual passes on AMX tiles (csrc/cpu/gram_amx.cpp, residual_amx.cpp) against
float64 math and against the float32 paths they replace; skipped where the CPU or the OS has no AMX."""
import pytest
import torch

import pissa_fast as pf
from pissa_fast._bounds import gamma

ops = pf.ops
amx = torch.ops.pissa_fast._cpu_amx

pytestmark = pytest.mark.skipif(not amx(-1), reason="no AMX-BF16 on this CPU (or switched off)")

U32 = 2.0 ** -24


@pytest.fixture(autouse=True)
def restore_mode():
    before = amx(-1)
    torch.manual_seed(0)  # every random operand below is the same on every run
    yield
    amx(1 if before else 0)


def bf16_weights(m, n, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(m, n + 32, generator=g).to(torch.bfloat16)
    # the second matrix is a row-sliced view: a row stride larger than n
    return [torch.randn(m, n, generator=g).to(torch.bfloat16), big[:, 32:n + 32]][:b]


def gram_with(mode, W, X):
    amx(mode)
    return ops.gram(W, X)


@pytest.mark.parametrize("m,n", [(32, 32), (64, 96), (96, 64), (320, 160), (576, 64)])
@pytest.mark.parametrize("k", [1, 5, 16, 24, 40])
def test_against_float64(m, n, k):
    W = bf16_weights(m, n)
    X = torch.randn(len(W), n, k)
    Y, Z = gram_with(1, W, X)
    for w, x, y, z in zip(W, X, Y, Z):
        wd, xd = w.double(), x.double()
        yr = wd @ xd
        # |fl(W x) - W x| <= n u |W| |x| (the dot-product bound the float32 path is held to)
        yb = n * U32 * (wd.abs() @ xd.abs())
        assert bool(((y.double() - yr).abs() <= yb + 1e-300).all())
        zr = wd.T @ y.double()  # Z is W^T times the Y the pass returned
        zb = m * U32 * (wd.abs().T @ y.double().abs())
        assert bool(((z.double() - zr).abs() <= zb + 1e-300).all())


def test_matches_float32_path_closely_and_is_deterministic():
    W = bf16_weights(320, 192)
    X = torch.randn(2, 192, 24)
    Y, Z = gram_with(1, W, X)
    Y2, Z2 = ops.gram(W, X)
    assert torch.equal(Y, Y2) and torch.equal(Z, Z2)
    Y0, Z0 = gram_with(0, W, X)
    assert torch.allclose(Y, Y0, rtol=1e-5, atol=1e-5 * float(Y0.abs().max()))
    assert torch.allclose(Z, Z0, rtol=1e-5, atol=1e-5 * float(Z0.abs().max()))


def test_other_shapes_and_dtypes_take_the_float32_path():
    for W in ([torch.randn(37, 29).to(torch.bfloat16)],  # not multiples of 32
              [torch.randn(64, 64).to(torch.float16)]):  # no fp16 AMX on these CPUs
        X = torch.randn(1, W[0].shape[1], 8)
        Y, Z = gram_with(1, W, X)
        Y0, Z0 = gram_with(0, W, X)
        assert torch.equal(Y, Y0) and torch.equal(Z, Z0)


def test_nan_reaches_the_outputs():
    W = bf16_weights(64, 64, b=1)
    W[0][5, 7] = float("nan")
    Y, Z = gram_with(1, W, torch.randn(1, 64, 8))
    assert not bool(torch.isfinite(Y[0, 5]).any())
    assert not bool(torch.isfinite(Z).all())


@pytest.mark.parametrize("m,n", [(32, 32), (64, 96), (96, 64), (320, 160), (64, 576)])
@pytest.mark.parametrize("k", [1, 16, 24, 40])
def test_wx_wtx_against_float64(m, n, k):
    W = bf16_weights(m, n)
    amx(1)
    X, Yin = torch.randn(len(W), n, k), torch.randn(len(W), m, k)
    Y, Z = ops.wx(W, X), ops.wtx(W, Yin)
    for w, x, yin, y, z in zip(W, X, Yin, Y, Z):
        wd = w.double()
        assert bool(((y.double() - wd @ x.double()).abs() <= n * U32 * (wd.abs() @ x.double().abs()) + 1e-300).all())
        zb = m * U32 * (wd.abs().T @ yin.double().abs())
        assert bool(((z.double() - wd.T @ yin.double()).abs() <= zb + 1e-300).all())


def test_wx_wtx_match_gram_and_the_float32_path():
    W = bf16_weights(320, 192)
    X = torch.randn(2, 192, 24)
    amx(1)
    Y, Z = ops.gram(W, X)
    # the same tiles in the same order: wx is gram's Y, wtx of that Y is gram's Z
    assert torch.equal(ops.wx(W, X), Y) and torch.equal(ops.wtx(W, Y), Z)
    amx(0)
    Y0, Z0 = ops.wx(W, X), ops.wtx(W, Y)
    assert torch.allclose(Y, Y0, rtol=1e-5, atol=1e-5 * float(Y0.abs().max()))
    assert torch.allclose(Z, Z0, rtol=1e-5, atol=1e-5 * float(Z0.abs().max()))


def test_wx_wtx_other_shapes_take_the_float32_path():
    W = [torch.randn(37, 64).to(torch.bfloat16)]
    X, Yin = torch.randn(1, 64, 8), torch.randn(1, 37, 8)
    amx(1)
    Y, Z = ops.wx(W, X), ops.wtx(W, Yin)
    amx(0)
    assert torch.equal(Y, ops.wx(W, X)) and torch.equal(Z, ops.wtx(W, Yin))


def test_decompose_is_as_accurate_as_with_the_float32_path():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(192, 192, dtype=torch.float64, generator=g))
    s = torch.arange(1, 193, dtype=torch.float64) ** -1.0
    W = ((U[:, :192] * s) @ V.T).to(torch.bfloat16)
    errs = {}
    for mode in (1, 0):
        amx(mode)
        d = pf.decompose(W, 8, niter=3)
        errs[mode] = pf.error_vs_exact(W, d).l1_rel
    assert errs[1] <= 1.5 * errs[0] + 1e-6


def ulp_bf16(x):
    """One bf16 ulp at |x| (2^-7 of the power of two below it; normal range)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return 2.0 ** (e - 7)


@pytest.mark.parametrize("m,n", [(16, 32), (64, 96), (272, 160)])
@pytest.mark.parametrize("r", [1, 4, 16, 40])
def test_residual_against_float64(m, n, r):
    W = bf16_weights(m, n)
    B = torch.randn(len(W), m, r) * 0.3
    A = torch.randn(len(W), r, n) * 0.3
    amx(1)
    out = ops.residual(W, B, A)
    inplace = [w.clone() for w in W]
    ops.residual_(inplace, B, A)
    amx(0)
    out0 = ops.residual(W, B, A)
    for w, b, a, o, i, o0 in zip(W, B, A, out, inplace, out0):
        wd, bd, ad = w.double(), b.double(), a.double()
        exact = wd - bd @ ad
        # one rounding to bf16 (half an ulp, taken in the larger binade of the two: the result may
        # round up to the next power of two) after the split products' float32 sum (the CUDA
        # residual's arithmetic: 3r products of bf16 parts, the dropped ones 3 u_p^2 |B| |A|)
        ulp = ulp_bf16(torch.maximum(exact.abs(), o.double().abs()))
        up = 2.0 ** -8
        math_err = gamma(3 * r + 2, U32) * (1 + up) ** 2 * (bd.abs() @ ad.abs() + wd.abs()) \
            + 3 * up ** 2 * (1 + up) ** 2 * (bd.abs() @ ad.abs())
        assert bool(((o.double() - exact).abs() <= 0.5 * ulp + math_err + 1e-30).all())
        assert torch.equal(i, o)  # in place writes what the out-of-place op returns
        # and the float32 path agrees to a bf16 ulp of the larger of the two (ties may round either way)
        # plus both paths' arithmetic errors (where W - B A cancels, they exceed the result's ulp)
        f32_err = (r + 2) * U32 * (wd.abs() + bd.abs() @ ad.abs())
        ulp2 = ulp_bf16(torch.maximum(o.double().abs(), o0.double().abs()))
        assert bool(((o.double() - o0.double()).abs() <= ulp2 * 1.01 + math_err + f32_err + 1e-30).all())


def test_residual_other_shapes_take_the_float32_path():
    W = [torch.randn(37, 29).to(torch.bfloat16)]
    B, A = torch.randn(1, 37, 3), torch.randn(1, 3, 29)
    amx(1)
    o1 = ops.residual(W, B, A)[0]
    amx(0)
    assert torch.equal(o1, ops.residual(W, B, A)[0])


def test_residual_nan_stays():
    W = bf16_weights(32, 64, b=1)
    W[0][3, 9] = float("nan")
    amx(1)
    out = ops.residual(W, torch.randn(1, 32, 4), torch.randn(1, 4, 64))[0]
    assert bool(torch.isnan(out[3, 9])) and int(torch.isnan(out).sum()) == 1
