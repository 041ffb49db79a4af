"""QPiSSA's error-minimizing block scales (quant/fit.py, scales="search") and its starts (start=
"pissa" | "quantized" | "best"): what bitsandbytes loads is still exactly the residual, the
quantization step never increases the error, and "best" keeps the lower of the two starts."""
import pytest
import torch

bnb_F = pytest.importorskip("bitsandbytes.functional")

from pissa_fast.quant import QuantSpec, qlora, qpissa, qpissa_many, quant_error  # noqa: E402
from pissa_fast.quant import nf4  # noqa: E402
from pissa_fast.quant.fit import fit_blocks_  # noqa: E402

from test_qpissa import QDTYPES, QIDS, llm_like, reference_dequantize  # noqa: E402


def block_errors(x, R, blocksize):
    d = (x.double() - R.double()).reshape(-1)
    pad = (-d.numel()) % blocksize
    return torch.nn.functional.pad(d, (0, pad)).view(-1, blocksize).square().sum(1)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
@pytest.mark.parametrize("quant,blocksize,shape", [("nf4", 64, (96, 128)), ("nf4", 32, (37, 101)),
                                                   ("fp4", 64, (64, 160)), ("nf4", 256, (33, 257))])
def test_fitted_blocks_load_exactly_and_lower_the_error(qdtype, quant, blocksize, shape):
    spec = QuantSpec(quant, blocksize)
    x = (torch.randn(shape) * 0.02).to(qdtype)
    R0 = nf4.fake_quantize(x, spec)  # bnb's absmax rounding
    z = fit_blocks_(x.clone(), spec)
    p, st = nf4.quantize(z, spec)
    R = nf4.dequantize(p, st)
    assert R.dtype == qdtype and nf4.round_trip_exact(R, spec)  # a 4-bit load gives R back bit for bit
    assert torch.equal(reference_dequantize(p, st), R)
    # each block's absmax is its chosen scale, at most bnb's own (values beyond it clipped to the end codes)
    assert (st.absmax <= nf4.quantize(x, spec)[1].absmax).all()
    # lower overall: Gaussian-like blocks are best scaled below their absmax (4-8 % here, at 1e5 values)
    assert quant_error(x, R) < 0.97 * quant_error(x, R0)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
def test_a_block_is_never_worse_than_the_previous_one(qdtype):
    spec = QuantSpec()
    x = (torch.randn(64, 192) * 0.02).to(qdtype)
    fine = tuple(1 - i / 200 for i in range(60))  # a finer grid than the default's: often closer
    previous = {"absmax of a nearby x": nf4.fake_quantize(x + (torch.randn(64, 192) * 0.002).to(qdtype), spec),
                "finer grid": nf4.fake_quantize(fit_blocks_(x.clone(), spec, candidates=fine), spec)}
    kept = {}
    for name, prev in previous.items():
        R = nf4.fake_quantize(fit_blocks_(x.clone(), spec, previous=prev), spec)
        assert nf4.round_trip_exact(R, spec)
        assert (block_errors(x, R, 64) <= block_errors(x, prev, 64)).all(), name
        kept[name] = (R.reshape(-1, 64) == prev.reshape(-1, 64)).all(1).float().mean()
    assert kept["absmax of a nearby x"] < 0.5 and kept["finer grid"] > 0.5, kept


def test_fit_validates_its_input():
    spec = QuantSpec()
    with pytest.raises(ValueError, match="contiguous"):
        fit_blocks_(torch.zeros(64, 64, dtype=torch.bfloat16).t(), spec)
    with pytest.raises(ValueError, match="previous must have"):
        fit_blocks_(torch.zeros(64, 64, dtype=torch.bfloat16), spec, previous=torch.zeros(64, 64))


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
def test_searched_scales_descend_with_exact_factors(qdtype):
    """With exact SVDs each round is a descent step: the quantization step keeps a block only when it is
    closer than the last round's, and the top-r step is optimal for the new R."""
    W = llm_like(96, 128, qdtype, seed=4)
    out = qpissa(W, 8, None, iters=4, scales="search")
    assert out.exact and nf4.round_trip_exact(out.residual, QuantSpec())
    assert all(b <= a * (1 + 1e-9) for a, b in zip(out.errors, out.errors[1:])), out.errors
    absmax = qpissa(W, 8, None, iters=4, scales="absmax")
    assert out.error < absmax.error < quant_error(W, qlora(W))


def test_searched_scales_survive_double_quantization():
    W = llm_like(64, 128, seed=5)
    out = qpissa(W, 4, iters=2, double_quant=True, scales="search")
    assert out.exact and nf4.round_trip_exact(out.residual, QuantSpec(double_quant=True))
    assert quant_error(W, out.residual, out.A, out.B) == pytest.approx(out.error, rel=1e-9)


def test_best_start_keeps_the_lower_of_both_starts():
    Ws = {"spiky": llm_like(64, 128, seed=6), "flat": (torch.randn(64, 128) * 0.02).to(torch.bfloat16)}
    outs = qpissa_many(Ws, 4, 4, iters=3, start="best")
    for name, out in outs.items():
        assert set(out.start_errors) == {"pissa", "quantized"}
        lanes = {k: min(v) for k, v in out.start_errors.items()}
        assert out.start == min(lanes, key=lanes.get) and out.error == min(lanes.values())
        assert out.errors == out.start_errors[out.start] and out.exact
        for start in ("pissa", "quantized"):  # each lane is what that start alone reports
            alone = qpissa(Ws[name], 4, 4, iters=3, start=start)
            assert alone.start == start and alone.error == pytest.approx(lanes[start], rel=0.05)
    # an LLM-like spectrum (a few large singular values) favors PiSSA's start: its principal part leaves W
    assert outs["spiky"].start == "pissa"
