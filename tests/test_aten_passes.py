"""The ATen implementation of the passes (pissa_fast::<op>_aten, the CUDA default) against float64 math
and against the CPU kernels, on the CPU: every dtype, m or n = 1, odd sizes, row-strided and misaligned
views, transposed views (rejected alike), in place, lists of matrices, inputs far outside fp16's range;
in both code paths (the widened row blocks the CPU registration uses, and the native low-precision path
CUDA runs, here with emulated out_dtype GEMMs) and with blocks small enough that every matrix takes
several. Bounds are derived from the arithmetic, see pass_bound and residual_bound; outputs are
poisoned (NaN-filled allocations) so an unwritten entry fails."""
import zlib

import pytest
import torch

import pissa_fast as pf
from pissa_fast._bounds import acc_dtype, gram_bounds, pass_bound, residual_bound
from pissa_fast.passes import _aten_cpu_config, _aten_passes_on_cpu

ops = pf.ops

# (block_bytes, native): the CPU registration's default; 64-byte blocks (16 rows: several blocks per
# matrix); the CUDA code path, with several blocks (the first block of each matrix is the one-block case).
CONFIGS = [(1 << 20, False), (64, False), (64, True)]
CONFIG_IDS = ["widened", "widened-blocks", "native-blocks"]

# (b, m, n, k, view)
PASS_CASES = [(1, 1, 40, 5, "plain"), (1, 37, 1, 3, "plain"), (3, 37, 53, 16, "plain"), (2, 70, 300, 33, "cols"),
              (2, 33, 129, 7, "offset"), (1, 1, 1, 1, "plain"), (2, 40, 30, 0, "plain")]
# (b, m, n, r, view)
RESIDUAL_CASES = [(1, 1, 7, 3, "plain"), (1, 5, 1, 1, "plain"), (3, 67, 131, 16, "plain"), (2, 64, 256, 40, "cols"),
                  (2, 33, 129, 5, "offset")]


@pytest.fixture(params=list(zip(CONFIGS, CONFIG_IDS)), ids=CONFIG_IDS)
def config(request):
    (block, native), _ = request.param
    with _aten_cpu_config(block_bytes=block, native=native):
        yield block, native


@pytest.fixture
def poisoned():
    """Every fresh allocation is filled with NaN (torch's deterministic mode), on the CPU too."""
    import torch.utils.deterministic as det

    old_det, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    det.fill_uninitialized_memory = old_fill


def acc(dtype):
    return acc_dtype(dtype)


def weights(b, m, n, dtype, view, gen):
    ws = []
    for _ in range(b):
        if view == "cols":  # row stride > n
            ws.append(torch.randn(m, n + 3, generator=gen).to(dtype)[:, :n])
        elif view == "offset":  # row stride > n and a start off 16-byte alignment
            ws.append(torch.randn(m, n + 1, generator=gen).to(dtype)[:, 1:])
        else:
            ws.append(torch.randn(m, n, generator=gen).to(dtype))
    return ws


def check(got, ref, bound, what):
    got = got.double()
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten output?)"
    err = (got - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} entries outside the bound, worst "
                           f"err/bound {float((err / bound).max()):.3g}")


@pytest.mark.parametrize("case", PASS_CASES, ids=lambda c: "x".join(map(str, c[:4])) + c[4])
def test_passes_match_float64_and_cpu_kernels(config, poisoned, dtype, case):
    b, m, n, k, view = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, config)).encode()))
    W = weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    V = torch.randn(b, n, k, generator=gen, dtype=a)
    Yin = torch.randn(b, m, k, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in W])
    aW, aWt = W64.abs(), W64.abs().mT
    split = dtype in (torch.bfloat16, torch.float16)
    Yref, Tref = W64 @ V.double(), W64.mT @ Yin.double()
    Zref = W64.mT @ Yref
    Yb, Zb = gram_bounds(aW, V.double(), dtype, split)
    Tb = pass_bound(aWt, Yin.double(), dtype, split)
    # The CPU kernels: one float32 accumulation of exact products, no split.
    Ycb, Zcb = gram_bounds(aW, V.double(), dtype, False)
    Tcb = pass_bound(aWt, Yin.double(), dtype, False)

    Y = ops.wx_aten(W, V)
    check(Y, Yref, Yb, "wx_aten")
    check(Y, ops.wx(W, V).double(), Yb + Ycb, "wx_aten vs CPU kernel")
    T = ops.wtx_aten(W, Yin)
    check(T, Tref, Tb, "wtx_aten")
    check(T, ops.wtx(W, Yin).double(), Tb + Tcb, "wtx_aten vs CPU kernel")
    Yg, Zg = ops.gram_aten(W, V)
    check(Yg, Yref, Yb, "gram_aten Y")
    check(Zg, Zref, Zb, "gram_aten Z")
    Yc, Zc = ops.gram(W, V)
    check(Yg, Yc.double(), Yb + Ycb, "gram_aten Y vs CPU kernel")
    check(Zg, Zc.double(), Zb + Zcb, "gram_aten Z vs CPU kernel")
    # Deterministic: the same call gives the same bits.
    Y2, Z2 = ops.gram_aten(W, V)
    assert torch.equal(Y2, Yg) and torch.equal(Z2, Zg)


@pytest.mark.parametrize("inplace", [True, False], ids=["residual_aten_", "residual_aten"])
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: "x".join(map(str, c[:4])) + c[4])
def test_residual_matches_float64_and_cpu_kernels(config, poisoned, dtype, case, inplace):
    b, m, n, r, view = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, config, inplace)).encode()))
    W = weights(b, m, n, dtype, view, gen)
    a = acc(dtype)
    B = torch.randn(b, m, r, generator=gen, dtype=a)
    A = torch.randn(b, r, n, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in W])
    ref = W64 - B.double() @ A.double()
    split = dtype in (torch.bfloat16, torch.float16)
    bound = residual_bound(W64, B.double(), A.double(), dtype, split)
    cpu = torch.stack(ops.residual(W, B, A)).double()
    cpu_b = residual_bound(W64, B.double(), A.double(), dtype, False)
    bases = [w._base.clone() if w._base is not None else None for w in W]
    ptrs = [w.data_ptr() for w in W]
    if inplace:
        assert ops.residual_aten_(W, B, A) is None
        out = W
        assert [w.data_ptr() for w in W] == ptrs
        for w, base in zip(W, bases):  # nothing outside the view was touched
            if view == "cols":
                assert torch.equal(w._base[:, n:], base[:, n:])
            elif view == "offset":
                assert torch.equal(w._base[:, :1], base[:, :1])
    else:
        out = ops.residual_aten(W, B, A)
        assert all(o.is_contiguous() and o.dtype == dtype for o in out)
        assert torch.equal(torch.stack([w.double() for w in W]), W64), "residual_aten wrote its input"
    got = torch.stack([o.double() for o in out])
    check(got, ref, bound, "residual")
    check(got, cpu, bound + cpu_b, "residual vs CPU kernel")


def test_split_precision_far_outside_fp16_range(config, dtype):
    """Columns whose scale is 1e-8 or 1e8 (fp16 holds neither's parts unscaled), and factors B, A whose
    magnitudes are far apart: the per-column and per-rank power-of-two scaling keeps the bounds."""
    if dtype == torch.float64:
        pytest.skip("no split for float64")
    gen = torch.Generator().manual_seed(11)
    m, n, k, r = 45, 38, 4, 3
    W = weights(2, m, n, dtype, "plain", gen)
    a = acc(dtype)
    scales = torch.tensor([1e-8, 1.0, 1e8, 3e-5])
    V = torch.randn(2, n, k, generator=gen, dtype=a) * scales
    W64 = torch.stack([w.double() for w in W])
    Yref = W64 @ V.double()
    Yb, Zb = gram_bounds(W64.abs(), V.double(), dtype, True)
    check(ops.wx_aten(W, V), Yref, Yb, "wx_aten")
    Yg, Zg = ops.gram_aten(W, V)
    check(Yg, Yref, Yb, "gram_aten Y")
    check(Zg, W64.mT @ Yref, Zb, "gram_aten Z")
    if dtype != torch.float32:  # the bound is far below one rounding of V to W's dtype: the split works
        one_part = torch.finfo(dtype).eps / 2 * (W64.abs() @ V.double().abs())
        assert bool((Yb < 0.01 * one_part).all())
    B = torch.randn(2, m, r, generator=gen, dtype=a) * 3e3
    A = torch.randn(2, r, n, generator=gen, dtype=a) * 1e-4
    out = torch.stack(ops.residual_aten([w.clone() for w in W], B, A)).double()
    check(out, W64 - B.double() @ A.double(), residual_bound(W64, B.double(), A.double(), dtype, True), "residual")


def test_transposed_views_rejected_like_the_cpu_kernels(dtype):
    W = [torch.randn(6, 9).to(dtype).t()]
    X = torch.randn(1, 6, 2, dtype=acc(dtype))
    for op in (ops.wx, ops.wx_aten):
        with pytest.raises(RuntimeError, match=r"wx: W\[0\] must have unit column stride"):
            op(W, X)
    B, A = torch.randn(1, 9, 2, dtype=acc(dtype)), torch.randn(1, 2, 6, dtype=acc(dtype))
    for op in (ops.residual_, ops.residual_aten_):
        with pytest.raises(RuntimeError, match=r"residual_: W\[0\] must have unit column stride"):
            op(W, B, A)


def test_errors_name_the_op():
    W = [torch.randn(8, 6)]
    with pytest.raises(RuntimeError, match=r"gram: the second argument must have shape \[1, 6, 2\]"):
        ops.gram_aten(W, torch.randn(1, 5, 2))
    with pytest.raises(RuntimeError, match="wtx: the second argument must have dtype Float"):
        ops.wtx_aten(W, torch.randn(1, 8, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="residual: A must have shape"):
        ops.residual_aten(W, torch.randn(1, 8, 2), torch.randn(1, 3, 6))
    with pytest.raises(RuntimeError, match="must hold at least one matrix"):
        ops.wx_aten([], torch.randn(1, 6, 2))
    with pytest.raises(RuntimeError, match="block_bytes must be > 0"):
        ops._set_aten_cpu_config(0, False)


@pytest.mark.parametrize("native", [False, True], ids=["widened", "native"])
def test_opcheck_aten_ops(native, dtype):
    gen = torch.Generator().manual_seed(5)
    W = weights(2, 37, 29, dtype, "cols", gen)
    a = acc(dtype)
    X = torch.randn(2, 29, 5, dtype=a)
    Y = torch.randn(2, 37, 5, dtype=a)
    B = torch.randn(2, 37, 3, dtype=a)
    A = torch.randn(2, 3, 29, dtype=a)
    with _aten_cpu_config(block_bytes=256, native=native):
        torch.library.opcheck(ops.wx_aten, (W, X))
        torch.library.opcheck(ops.wtx_aten, (W, Y))
        torch.library.opcheck(ops.gram_aten, (W, X))
        torch.library.opcheck(ops.residual_aten, (W, B, A))
        torch.library.opcheck(ops.residual_aten_, ([w.clone() for w in W], B, A))


@pytest.mark.parametrize("native", [False, True], ids=["widened", "native"])
def test_decomposition_through_the_aten_passes(dtype, native):
    """End to end: the whole decomposition with the ATen passes in place of the CPU kernels, against the
    CPU path: singular values and B A agree to the passes' precision, and the error against the exact
    SVD stays within 2x of the CPU path's (REFERENCE.md's spectrum s_i = i^-0.35, r 8, niter 4)."""
    from conftest import spectrum_matrix

    m, n, r = 160, 120, 8
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.35
    W, _, _, _ = spectrum_matrix(m, n, s, dtype=dtype, seed=3)
    cpu = pf.decompose(W, r, niter=4)
    with _aten_cpu_config(block_bytes=4096, native=native), _aten_passes_on_cpu():
        aten = pf.decompose(W, r, niter=4)
        inplace = pf.decompose(W.clone(), r, niter=4, inplace=True)
    assert torch.equal(inplace.B, aten.B) and torch.equal(inplace.residual, aten.residual)
    exact = pf.exact_factors(W)
    l1_cpu = pf.error_vs_exact(W, cpu, exact=exact).l1
    l1_aten = pf.error_vs_exact(W, aten, exact=exact).l1
    assert l1_aten <= 2 * l1_cpu, (l1_aten, l1_cpu)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert torch.allclose(aten.S.double(), cpu.S.double(), rtol=tol, atol=0)
    # The CPU kernels are back after the block.
    assert torch.equal(pf.decompose(W, r, niter=4).B, cpu.B)
