"""The CUDA ops against their CPU twins and float64 math, for both CUDA implementations of the passes
(the ATen/cuBLAS passes and the hand-written kernels, selected with pissa_fast.use_cuda_passes; test ids
carry "aten" or "kernels" so benchmarks/gpu_check.sh can run them in separate processes): every op,
every dtype of conftest's test matrix, odd shapes (1 x n, m x 1, sizes that are multiples of nothing),
row-strided views, lists of matrices, shapes that reach the kernels' cluster and streamed-chunk paths and
the ATen passes' multi-block path, poisoned outputs, TF32 enabled globally (the ATen passes must not use
it), and torch.library.opcheck on CUDA. Skips cleanly without a CUDA device."""
import os

import pytest
import torch

import pissa_fast as pf
from pissa_fast._bounds import gram_bounds, pass_bound, residual_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, for the poisoning below

ops = pf.ops
IMPLS = ["aten", "kernels"]


@pytest.fixture(params=IMPLS)
def impl(request):
    with pf.use_cuda_passes(request.param):
        yield request.param


@pytest.fixture
def poisoned():
    """Every fresh allocation (outputs included, wherever the caching allocator puts them) is NaN-filled."""
    import torch.utils.deterministic as det

    old, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    det.fill_uninitialized_memory = old_fill


PASS_SHAPES = [(1, 1, 40), (1, 37, 1), (3, 37, 53), (3, 70, 300), (1, 130, 1000), (2, 64, 4096),
               (1, 100, 11008), (1, 5, 300001), (1, 4096, 4096)]
VIEWS = ["contiguous", "cols"]  # cols: W[:, :n] of an [m, n + 3] tensor (row stride > n)
KS = [1, 16, 33]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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
def test_pass_ops_match_cpu(impl, poisoned, shape, view, k, dtype):
    b, m, n = shape
    if (n > 20000 or m * n > 10 ** 7) and (k != 16 or view != "contiguous"):
        pytest.skip("long rows / big blocks: one k and layout suffice")
    gen = torch.Generator().manual_seed(b * 1000003 + m * 1009 + n + k)
    Wc, Wg = make_weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    V = torch.randn(b, n, k, generator=gen, dtype=a)
    Yin = torch.randn(b, m, k, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    aW = W64.abs()
    split = impl == "aten" and dtype in (torch.bfloat16, torch.float16)
    Yref = W64 @ V.double()
    Zref = W64.mT @ Yref
    Tref = W64.mT @ Yin.double()
    Ybound, Zbound = gram_bounds(aW, V.double(), dtype, split)
    Tbound = pass_bound(aW.mT, Yin.double(), dtype, split)
    Ycpu, Zcpu = gram_bounds(aW, V.double(), dtype, False)
    Tcpu = pass_bound(aW.mT, Yin.double(), dtype, False)

    Vg, Yg_in = V.cuda(), Yin.cuda()
    Y = ops.wx(Wg, Vg)
    check_bound(Y, Yref, Ybound, "wx")
    T = ops.wtx(Wg, Yg_in)
    check_bound(T, Tref, Tbound, "wtx")
    Yg, Zg = ops.gram(Wg, Vg)
    check_bound(Yg, Yref, Ybound, "gram Y")
    check_bound(Zg, Zref, Zbound, "gram Z")
    # The CPU twin meets its own bounds, so the two agree to within their sum.
    Yc, Zc = ops.gram(Wc, V)
    check_bound(Yg, Yc.double(), Ybound + Ycpu, "gram Y vs CPU")
    check_bound(Zg, Zc.double(), Zbound + Zcpu, "gram Z vs CPU")
    check_bound(T, ops.wtx(Wc, Yin).double(), Tbound + Tcpu, "wtx vs CPU")
    if impl == "aten":  # no atomics, a fixed order of every sum
        Y2, Z2 = ops.gram(Wg, Vg)
        assert torch.equal(Y2, Yg) and torch.equal(Z2, Zg), "gram (aten) is not deterministic"


RESIDUAL_SHAPES = [(1, 1, 7, 3), (1, 5, 1, 1), (3, 67, 131, 16), (2, 64, 256, 40), (1, 300, 4099, 16),
                   (2, 129, 257, 300)]


@pytest.mark.parametrize("inplace", [True, False], ids=["residual_", "residual"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_matches_cpu(impl, poisoned, shape, view, inplace, dtype):
    b, m, n, r = shape
    gen = torch.Generator().manual_seed(b * 7919 + m * 31 + n + r)
    Wc, Wg = make_weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    B = torch.randn(b, m, r, generator=gen, dtype=a)
    A = torch.randn(b, r, n, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    ref = W64 - B.double() @ A.double()
    split = impl == "aten" and dtype in (torch.bfloat16, torch.float16)
    bound = residual_bound(W64, B.double(), A.double(), dtype, split)
    bases = [w._base.clone() if w._base is not None else None for w in Wg]
    Bg, Ag = B.cuda(), A.cuda()
    if inplace:
        ops.residual_(Wg, Bg, Ag)
        out = Wg
        for w, base in zip(Wg, bases):  # nothing outside the view was touched
            if base is not None:
                assert torch.equal(w._base[:, n:], base[:, n:])
    else:
        out = ops.residual(Wg, Bg, Ag)
        assert all(o.is_contiguous() and o.dtype == dtype for o in out)
    got = torch.stack([o.cpu() for o in out])
    check_bound(got, ref, bound, "residual")
    cpu = torch.stack(ops.residual(Wc, B, A))
    cpu_bound = residual_bound(W64, B.double(), A.double(), dtype, False)
    check_bound(got, cpu.double(), bound + cpu_bound, "residual vs CPU")


def test_aten_passes_ignore_tf32(poisoned):
    """TF32 enabled globally must not reach the ATen passes' float32 GEMMs (10-bit mantissas would
    break the float32 bound by orders of magnitude); the setting is left as it was."""
    gen = torch.Generator().manual_seed(17)
    Wc, Wg = make_weights(2, 300, 1000, torch.float32, "contiguous", gen)
    V = torch.randn(2, 1000, 16, generator=gen)
    W64 = torch.stack([w.double() for w in Wc])
    Yb, Zb = gram_bounds(W64.abs(), V.double(), torch.float32, False)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        Y, Z = ops.gram_aten(Wg, V.cuda())
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)
    check_bound(Y, W64 @ V.double(), Yb, "gram_aten Y under TF32")
    check_bound(Z, W64.mT @ (W64 @ V.double()), Zb, "gram_aten Z under TF32")


def test_opcheck_cuda(impl, dtype):
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
    if impl == "aten":
        torch.library.opcheck(ops.wx_aten, (W, X))
        torch.library.opcheck(ops.wtx_aten, (W, Y))
        torch.library.opcheck(ops.gram_aten, (W, X))
        torch.library.opcheck(ops.residual_aten, (W, B, A))
        torch.library.opcheck(ops.residual_aten_, ([w.clone() for w in W], B, A))


def test_errors_name_the_op_on_cuda(impl):
    W = [torch.randn(8, 6, device="cuda")]
    with pytest.raises(RuntimeError, match="gram: "):
        ops.gram(W, torch.randn(1, 5, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="residual_: "):
        ops.residual_(W, torch.randn(1, 8, 2, device="cuda"), torch.randn(1, 2, 6, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be on"):
        ops.wx(W, torch.randn(1, 6, 2))


def test_decompose_on_cuda_matches_cpu(impl, dtype):
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
