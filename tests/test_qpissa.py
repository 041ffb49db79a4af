"""QPiSSA (pissa_fast.qpissa): NF4-exact residual, error per round, the NF4 bound, validation."""
import sys

import pytest
import torch

bnb_F = pytest.importorskip("bitsandbytes.functional")

import pissa_fast  # noqa: E402
from pissa_fast.quant import QuantSpec, qlora, qpissa, qpissa_many, quant_error  # noqa: E402
from pissa_fast.quant import nf4  # noqa: E402

from conftest import spectrum_matrix  # noqa: E402

QDTYPES = [torch.bfloat16, torch.float16, torch.float32]
QIDS = ["bf16", "fp16", "fp32"]


def llm_like(m, n, dtype=torch.bfloat16, seed=0, device="cpu"):
    """A weight with a few dominant directions over a power-law tail (entries ~1e-2, like LLM
    projections), so the principal part that QPiSSA keeps out of the quantizer matters."""
    k = min(m, n)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.35
    s[:4] *= torch.tensor([8.0, 5.0, 3.0, 2.0], dtype=torch.float64)
    W, *_ = spectrum_matrix(m, n, s * 0.05, dtype=dtype, device=device, seed=seed)
    return W


def block_absmax(x, blocksize):
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize).abs().amax(1).repeat_interleave(blocksize)[: x.numel()].view(x.shape)


# ------------------------------------------------------------------------------------ the bnb wrapper

@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape,blocksize", [((96, 128), 64), ((70, 90), 32), ((33, 257), 256), ((5, 7), 64)])
def test_chunked_quantize_is_bnbs_whole_tensor_call(qdtype, double_quant, shape, blocksize):
    dtype = qdtype
    x = torch.randn(shape, dtype=dtype) * 0.03
    spec = QuantSpec("nf4", blocksize, double_quant)
    p, st = nf4.quantize(x, spec, max_elements=600)  # forces several chunks
    p0, st0 = bnb_F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(p, p0)
    assert torch.equal(st.absmax, st0.absmax)
    if double_quant:
        assert torch.equal(st.offset, st0.offset) and torch.equal(st.state2.absmax, st0.state2.absmax)
    assert torch.equal(nf4.dequantize(p, st), bnb_F.dequantize_4bit(p0, st0))


def reference_dequantize(packed, state):
    """code[nibble] * absmax of its block, blocks running over the flattened tensor (bnb's quantizer and
    CUDA kernels), in plain torch."""
    b = packed.reshape(-1).long()
    q = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:state.shape.numel()]
    absmax = state.absmax.float().repeat_interleave(state.blocksize)[:q.numel()]
    return (state.code.float()[q] * absmax).reshape(state.shape).to(state.dtype)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 96), (64, 160), (37, 101), (96, 128)])
def test_dequantize_follows_the_quantizers_block_layout(quant, shape):
    """bnb 0.50's native CPU dequantize kernel indexes some shapes whose last dimension is not a multiple
    of the blocksize (64 x 96, 64 x 160) by another block layout than its quantizer's; nf4.dequantize
    gives what the quantizer meant (and what CUDA computes) for every shape."""
    x = torch.randn(shape, dtype=torch.bfloat16) * 0.03
    p, st = nf4.quantize(x, QuantSpec(quant))
    assert torch.equal(nf4.dequantize(p, st), reference_dequantize(p, st))


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
def test_dequantized_tensor_is_a_fixed_point_in_its_own_dtype(qdtype):
    dtype = qdtype
    # The reason quantizing in W's dtype (never float32) gives a loadable residual.
    x = torch.randn(64, 192, dtype=dtype) * 0.02
    for quant in ("nf4", "fp4"):
        spec = QuantSpec(quant, 64)
        R = nf4.fake_quantize(x, spec)
        assert R.dtype == dtype and nf4.round_trip_exact(R, spec)


def test_float32_quantization_is_not_exact_after_a_bf16_cast():
    # The subtlety the design avoids: quantize in float32, save as bf16, and a load moves values.
    x = torch.randn(128, 256, dtype=torch.float32) * 0.02
    R = nf4.fake_quantize(x, QuantSpec()).to(torch.bfloat16)
    assert not nf4.round_trip_exact(R, QuantSpec())


# ----------------------------------------------------------------------------------------- QPiSSA

@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
def test_residual_is_exactly_nf4_representable(device, qdtype):
    dtype = qdtype
    W = llm_like(96, 160, dtype, device=device)
    out = qpissa(W, 8, 4, iters=2)
    assert out.residual.dtype == dtype and out.residual.shape == W.shape
    assert out.exact is True
    assert nf4.round_trip_exact(out.residual, QuantSpec())  # bnb's own whole-tensor quantize_4bit
    p, st = out.codes
    assert torch.equal(reference_dequantize(p, st), out.residual)
    assert out.A.shape == (8, 160) and out.B.shape == (96, 8) and out.S.shape == (8,)


@pytest.mark.parametrize("quant,blocksize", [("nf4", 128), ("nf4", 32), ("fp4", 64)])
def test_other_formats_are_exact_too(quant, blocksize):
    W = llm_like(64, 96)
    out = qpissa(W, 4, iters=2, quant=quant, blocksize=blocksize)
    spec = QuantSpec(quant, blocksize)
    assert out.spec == spec and out.exact and nf4.round_trip_exact(out.residual, spec)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
def test_double_quant_reports_exactness_truthfully(qdtype):
    spec = QuantSpec(double_quant=True)
    for seed in range(3):
        W = llm_like(64, 128, qdtype, seed=seed)
        out = qpissa(W, 4, iters=2, double_quant=True)
        assert out.exact == nf4.round_trip_exact(out.residual, spec)
        if qdtype == torch.bfloat16:  # the statistics settle on bf16's coarse grid (see nf4.py)
            assert out.exact
        # A, B are fitted to the residual that is returned, whatever the settling did.
        assert quant_error(W, out.residual, out.A, out.B) == pytest.approx(out.error, rel=1e-2)


def test_error_does_not_increase_with_rounds():
    W = llm_like(128, 192, seed=3)
    errs = [qpissa(W, 8, 4, iters=t).error for t in range(1, 6)]
    assert all(b <= a for a, b in zip(errs, errs[1:])), errs
    full = qpissa(W, 8, 4, iters=5)
    # a run of t rounds returns the best of the first t rounds of a longer run (deterministic) ...
    assert errs == [min(full.errors[:t + 1]) for t in range(5)]
    # ... and the rounds themselves improve on this matrix, not only the best-of bookkeeping
    assert all(b < a for a, b in zip(full.errors, full.errors[1:])), full.errors
    assert errs[-1] < errs[0]


def test_reported_error_matches_float64_measure():
    W = llm_like(128, 192, seed=4)
    out = qpissa(W, 8, 4, iters=3)
    assert out.error == out.errors[out.best_round - 1]
    assert quant_error(W, out.residual, out.A, out.B) == out.error  # the float64 measure itself
    # ... and that measure against a plain float64 computation of the whole thing
    E = W.double() - out.residual.double() - out.B.double() @ out.A.double()
    assert out.error == pytest.approx(float(E.norm() / W.double().norm()), rel=1e-12)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=QIDS)
@pytest.mark.parametrize("scales", ["absmax", "search"])
def test_one_round_is_within_the_nf4_bound(qdtype, scales):
    """R = nf4(W - B0 A0) with B0 A0 PiSSA's factors of W: elementwise within half the largest gap
    between adjacent NF4 codes times the block's absmax (plus the rounding of R to W's dtype); with
    searched scales s >= 0.75 absmax, within max(half gap x absmax, the clipped 0.25 absmax). The refit
    (A, B) = top-r(W - R) can only lower the error."""
    from pissa_fast.quant.fit import SCALE_CANDIDATES

    dtype = qdtype
    W = llm_like(96, 128, dtype, seed=5)
    r, bs = 8, 64
    out = qpissa(W, r, 4, iters=1, blocksize=bs, scales=scales)
    X = pissa_fast.decompose(W, r, 4).residual  # what round 1 quantized: same seed, same factors
    code = bnb_F.get_4bit_type("nf4", device="cpu")
    half_gap = float(((code[1:] - code[:-1]) / 2).max())
    if scales == "search":
        half_gap = max(half_gap, 1 - min(SCALE_CANDIDATES))
    amax = block_absmax(X, bs)
    bound = half_gap * amax + amax * torch.finfo(dtype).eps
    dev = (X.float() - out.residual.float()).abs()
    assert (dev <= bound).all(), float((dev - bound).max())
    e_before = float(torch.linalg.norm(X.double() - out.residual.double()) / torch.linalg.norm(W.double()))
    e_after = quant_error(W, out.residual, out.A, out.B)
    assert e_after <= e_before * (1 + 1e-3)
    # and the Frobenius form of the same bound
    assert e_after <= float(torch.linalg.norm(half_gap * amax.double()) / torch.linalg.norm(W.double())) * 1.001


def test_lower_error_than_qlora_and_loftq():
    from pissa_fast.quant import loftq_reference

    W = llm_like(128, 256, seed=6)
    e_qlora = quant_error(W, qlora(W))
    for T in (1, 2):
        e_q = qpissa(W, 8, 4, iters=T).error
        Q, A, B = loftq_reference(W, 8, T)
        e_l = quant_error(W, Q, A, B)
        assert e_q < e_l < e_qlora, (T, e_q, e_l, e_qlora)


def test_many_matches_single_and_inplace():
    Ws = {"a": llm_like(64, 96, seed=7), "b": llm_like(96, 64, seed=8), "c": llm_like(64, 96, seed=9)}
    ref = {k: qpissa(w, 4, 4, iters=2) for k, w in Ws.items()}
    work = {k: w.clone() for k, w in Ws.items()}
    outs = qpissa_many(work, 4, 4, iters=2, inplace=True)
    assert set(outs) == set(Ws)
    for k in Ws:
        o = outs[k]
        assert o.residual.data_ptr() == work[k].data_ptr()  # written into the weight itself
        assert torch.equal(work[k], ref[k].residual)
        assert torch.equal(o.A, ref[k].A) and torch.equal(o.B, ref[k].B)
        assert o.errors == ref[k].errors
    lst = qpissa_many(list(Ws.values()), 4, 4, iters=2)
    assert isinstance(lst, list) and torch.equal(lst[1].residual, ref["b"].residual)
    assert qpissa_many({}, 4) == {} and qpissa_many([], 4) == []


def test_many_takes_a_seed_per_weight():
    # One call with a seed mapping gives each weight what a call with its own seed gives it.
    Ws = {"a": llm_like(64, 96, seed=7), "b": llm_like(96, 64, seed=8), "c": llm_like(64, 96, seed=9)}
    seeds = {"a": 3, "b": 11, "c": 5}
    outs = qpissa_many(Ws, 4, 4, iters=2, seed=seeds)
    for k, w in Ws.items():
        ref = qpissa(w, 4, 4, iters=2, seed=seeds[k])
        assert torch.equal(outs[k].residual, ref.residual)
        assert torch.equal(outs[k].A, ref.A) and torch.equal(outs[k].B, ref.B)
        assert outs[k].errors == ref.errors
    with pytest.raises(ValueError, match=r"no entry for weights\['c'\]"):
        qpissa_many(Ws, 4, 4, seed={"a": 3, "b": 11})
    with pytest.raises(TypeError, match=r"seed\['a'\] must be an int"):
        qpissa_many(Ws, 4, 4, seed={"a": 1.5, "b": 11, "c": 5})


def test_transposed_view_and_exact_svd():
    W = llm_like(96, 64, seed=10)
    Wt = W.t().contiguous().t()  # same values, column-major
    a, b = qpissa(W, 4, 4, iters=2), qpissa(Wt, 4, 4, iters=2)
    assert b.exact and nf4.round_trip_exact(b.residual, QuantSpec())
    assert quant_error(W, b.residual, b.A, b.B) == pytest.approx(a.error, rel=2e-2)
    ex = qpissa(W, 4, None, iters=2)
    assert ex.exact and ex.niter is None and ex.error <= a.error * 1.01


# ------------------------------------------------------------------------------------- bad inputs

BAD = [
    (dict(W=torch.zeros(32, 64, dtype=torch.int8)), TypeError, "float32, bfloat16 or float16"),
    (dict(W=torch.zeros(32, 64, dtype=torch.float64)), TypeError, "float32, bfloat16 or float16"),
    (dict(r=33), ValueError, "r must be in"),
    (dict(r=0), ValueError, "r must be >= 1"),
    (dict(blocksize=48), ValueError, "blocksize must be one of"),
    (dict(blocksize=63), ValueError, "blocksize must be one of"),
    (dict(quant="int4"), ValueError, "quant must be one of"),
    (dict(iters=0), ValueError, "iters must be >= 1"),
    (dict(double_quant="yes"), TypeError, "double_quant must be a bool"),
    (dict(niter=-1), ValueError, "niter"),
    (dict(W=torch.zeros(4, 5, 6, dtype=torch.bfloat16)), ValueError, "2-D"),
    (dict(start="loftq"), ValueError, "start must be one of"),
    (dict(scales="mse"), ValueError, "scales must be one of"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD, ids=[b[2][:20] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_raises_before_anything_is_written(bad, exc, msg):
    good = llm_like(32, 64, seed=11)
    W = bad.pop("W", llm_like(32, 64, seed=12))
    kw = dict(r=4, niter=4, iters=1, blocksize=64, quant="nf4", double_quant=False) | bad
    before_good, before_W = good.clone(), W.clone()
    with pytest.raises(exc, match=msg):
        qpissa_many({"good": good, "bad": W}, kw.pop("r"), kw.pop("niter"), inplace=True, **kw)
    assert torch.equal(good, before_good) and torch.equal(W, before_W)


def test_inplace_on_a_parameter_and_overlapping_views_raise():
    p = torch.nn.Parameter(llm_like(32, 64))
    with pytest.raises(ValueError, match="requires grad"):
        qpissa(p, 4, inplace=True)
    W = llm_like(64, 64)
    with pytest.raises(ValueError, match="overlaps"):
        qpissa_many([W[:40], W[20:]], 4, inplace=True)
    qpissa_many([W[:32], W[32:]], 4, inplace=True)  # disjoint slices of one storage are fine
    assert nf4.round_trip_exact(W[:32].contiguous(), QuantSpec())


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    W = llm_like(32, 64)
    before = W.clone()
    for mod in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pissa_fast\[quant\]'"):
        qpissa(W, 4, inplace=True)
    assert torch.equal(W, before)
    with pytest.raises(ImportError, match=r"pissa_fast\[quant\]"):
        qlora(W)
