"""The CUDA kernels against their CPU twins and float64 math: every op, every dtype of conftest's test
matrix, odd shapes (1 x n, m x 1, sizes that are multiples of nothing), row-strided views, lists of
matrices, shapes that reach the cluster and the streamed-chunk paths, poisoned outputs, and
torch.library.opcheck on CUDA. Skips cleanly without a CUDA device."""
import pytest
import torch

import pissa_fast as pf
from conftest import acc_eps, eps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = pf.ops

# (b, m, n): single row / column, odd sizes, a list of 3, LLaMA-like rows (column slices joined as
# a cluster on sm_90), and rows too long for shared memory (streamed in column chunks).
PASS_SHAPES = [(1, 1, 40), (1, 37, 1), (3, 37, 53), (3, 70, 300), (1, 130, 1000), (2, 64, 4096),
               (1, 100, 11008), (1, 5, 300001)]
VIEWS = ["contiguous", "cols"]  # cols: W[:, :n] of an [m, n + 3] tensor (row stride > n)
KS = [1, 16, 33]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n, u):
    """n u / (1 - n u): the rounding bound of a length-n dot product in unit roundoff u (any order)."""
    return n * u / (1 - n * u)


def make_weights(b, m, n, dtype, view, gen):
    """The same weights on the CPU and on CUDA, each CUDA one with the CPU one's layout."""
    cpu, cuda = [], []
    for _ in range(b):
        extra = 3 if view == "cols" else 0
        base = torch.randn(m, n + extra, generator=gen).to(dtype)
        gbase = base.cuda()
        cpu.append(base[:, :n])
        cuda.append(gbase[:, :n])
    return cpu, cuda


def poison(*shapes_dtypes):
    """Leave NaN-filled blocks in the CUDA caching allocator where the next outputs will be placed,
    so an entry a kernel fails to write shows up as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=d, device="cuda") for s, d in shapes_dtypes]
    del blocks


def check_bound(got, ref, bound, what):
    got = got.double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten output?)"
    err = (got - ref).abs()
    bad = err > bound + 1e-300
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} entries outside the rounding bound, "
                           f"worst {float(err.max()):.3e}")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("shape", PASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pass_ops_match_cpu(shape, view, k, dtype):
    b, m, n = shape
    if n > 20000 and (k != 16 or view != "contiguous"):
        pytest.skip("long rows: one k and layout suffice")
    gen = torch.Generator().manual_seed(b * 1000003 + m * 1009 + n + k)
    Wc, Wg = make_weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    V = torch.randn(b, n, k, generator=gen, dtype=a)
    Yin = torch.randn(b, m, k, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    aW = W64.abs()
    u = acc_eps(dtype) / 2

    Yref = W64 @ V.double()
    Ybound = gamma(n, u) * (aW @ V.double().abs())
    Zref = W64.mT @ Yref
    Zbound = gamma(n + m, u) * (aW.mT @ (aW @ V.double().abs()))
    Tref = W64.mT @ Yin.double()
    Tbound = gamma(m, u) * (aW.mT @ Yin.double().abs())

    Vg, Yg_in = V.cuda(), Yin.cuda()
    poison(((b, m, k), a), ((b, n, k), a))
    Y = ops.wx(Wg, Vg)
    check_bound(Y, Yref, Ybound, "wx")
    poison(((b, n, k), a))
    T = ops.wtx(Wg, Yg_in)
    check_bound(T, Tref, Tbound, "wtx")
    poison(((b, m, k), a), ((b, n, k), a))
    Yg, Zg = ops.gram(Wg, Vg)
    check_bound(Yg, Yref, Ybound, "gram Y")
    check_bound(Zg, Zref, Zbound, "gram Z")
    # The CPU twin meets the same bounds, so the two agree to within twice of them.
    Yc, Zc = ops.gram(Wc, V)
    check_bound(Yg, Yc.double(), 2 * Ybound, "gram Y vs CPU")
    check_bound(Zg, Zc.double(), 2 * Zbound, "gram Z vs CPU")
    check_bound(T, ops.wtx(Wc, Yin).double(), 2 * Tbound, "wtx vs CPU")


RESIDUAL_SHAPES = [(1, 1, 7, 3), (1, 5, 1, 1), (3, 67, 131, 16), (2, 64, 256, 40), (1, 300, 4099, 16),
                   (2, 129, 257, 300)]


@pytest.mark.parametrize("inplace", [True, False], ids=["residual_", "residual"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_matches_cpu(shape, view, inplace, dtype):
    b, m, n, r = shape
    gen = torch.Generator().manual_seed(b * 7919 + m * 31 + n + r)
    Wc, Wg = make_weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    B = torch.randn(b, m, r, generator=gen, dtype=a)
    A = torch.randn(b, r, n, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    ref = W64 - B.double() @ A.double()
    # One rounding to W's dtype after an accumulation in acc's precision.
    bound = eps(dtype) * ref.abs() + gamma(r + 2, acc_eps(dtype) / 2) * (B.double().abs() @ A.double().abs() + W64.abs())
    bases = [w._base.clone() if w._base is not None else None for w in Wg]
    Bg, Ag = B.cuda(), A.cuda()
    if inplace:
        ops.residual_(Wg, Bg, Ag)
        out = Wg
        for w, base in zip(Wg, bases):  # nothing outside the view was touched
            if base is not None:
                assert torch.equal(w._base[:, n:], base[:, n:])
    else:
        poison(*[((m, n), dtype)] * b)
        out = ops.residual(Wg, Bg, Ag)
        assert all(o.is_contiguous() and o.dtype == dtype for o in out)
    got = torch.stack([o.cpu() for o in out])
    check_bound(got, ref, bound, "residual")
    cpu = torch.stack(ops.residual(Wc, B, A))
    # Both round W - B A once; they may differ by one unit in the last place of W's dtype.
    check_bound(got, cpu.double(), 2 * bound, "residual vs CPU")


def test_opcheck_cuda(dtype):
    gen = torch.Generator().manual_seed(7)
    _, W = make_weights(2, 37, 29, dtype, "cols", gen)
    a = acc(dtype)
    X = torch.randn(2, 29, 5, dtype=a, device="cuda")
    Y = torch.randn(2, 37, 5, dtype=a, device="cuda")
    B = torch.randn(2, 37, 3, dtype=a, device="cuda")
    A = torch.randn(2, 3, 29, dtype=a, device="cuda")
    torch.library.opcheck(ops.wx, (W, X))
    torch.library.opcheck(ops.wtx, (W, Y))
    torch.library.opcheck(ops.gram, (W, X))
    torch.library.opcheck(ops.residual, (W, B, A))
    torch.library.opcheck(ops.residual_, ([w.clone() for w in W], B, A))


def test_errors_name_the_op_on_cuda():
    W = [torch.randn(8, 6, device="cuda")]
    with pytest.raises(RuntimeError, match="gram: "):
        ops.gram(W, torch.randn(1, 5, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="residual_: "):
        ops.residual_(W, torch.randn(1, 8, 2, device="cuda"), torch.randn(1, 2, 6, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be on"):
        ops.wx(W, torch.randn(1, 6, 2))


def test_decompose_on_cuda_matches_cpu(dtype):
    """End to end (orchestration on CUDA through the CUDA ops): same seed, same factors up to rounding."""
    gen = torch.Generator().manual_seed(3)
    m, n, r = 96, 80, 8
    s = torch.logspace(0, -3, min(m, n), dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))
    Vt, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))
    W = ((U * s) @ Vt.T).to(dtype)
    out_c = pf.decompose(W, r, niter=4)
    out_g = pf.decompose(W.cuda(), r, niter=4)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(out_g.S.cpu().double(), out_c.S.double(), rtol=tol, atol=0)
    BAc = out_c.B.double() @ out_c.A.double()
    BAg = out_g.B.cpu().double() @ out_g.A.cpu().double()
    assert float(torch.linalg.matrix_norm(BAg - BAc) / torch.linalg.matrix_norm(BAc)) <= tol
    assert out_g.residual.device.type == "cuda" and out_g.residual.dtype == dtype
