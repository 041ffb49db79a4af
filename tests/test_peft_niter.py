"""peft's `pissa_niter_N` as an accuracy promise (PISSA_FAST_NITER unset or "equivalent") or as
pissa_fast's own niter N (PISSA_FAST_NITER=literal)."""
from types import SimpleNamespace

import pytest
import torch

import pissa_fast
from pissa_fast.metrics import error_vs_exact
from pissa_fast.peft.niter import NITER_ENV, decompose_kwargs, literal


def _weight(m, n, spectrum, seed=0):
    """float32 W = U diag(s) V^T with a known spectrum, built in float64."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    j = torch.arange(k, dtype=torch.float64)
    s = 0.97 ** j if spectrum == "geometric" else (j + 1) ** -1.0
    return ((U[:, :k] * s) @ V[:, :k].T).float()


def _peft_factors(w, r, niter):
    """What peft's pissa_niter_N computes (LoraLayer.pissa_init, scaling 1): torch.svd_lowrank at N."""
    V, S, U = torch.svd_lowrank(w, r, niter=niter)
    root = S.sqrt()
    return SimpleNamespace(A=root[:, None] * U.T, B=V * root, S=S)


def test_modes_map_to_decompose_kwargs(monkeypatch):
    monkeypatch.delenv(NITER_ENV, raising=False)
    assert decompose_kwargs(16, 8) == pissa_fast.svd_lowrank_equivalent(16, 8)
    assert decompose_kwargs(16, 8)["like_svd_lowrank"] == 16
    assert decompose_kwargs(None, 8) == {"niter": None}  # "pissa": the exact SVD either way
    monkeypatch.setenv(NITER_ENV, "equivalent")
    assert decompose_kwargs(4, 8) == pissa_fast.svd_lowrank_equivalent(4, 8)
    monkeypatch.setenv(NITER_ENV, " Literal ")
    assert decompose_kwargs(4, 8) == {"niter": 4}
    assert decompose_kwargs(None, 8) == {"niter": None}
    monkeypatch.setenv(NITER_ENV, "fast")
    with pytest.raises(ValueError, match="PISSA_FAST_NITER must be one of equivalent, literal"):
        decompose_kwargs(4, 8)


def test_literal_form_drops_only_the_stopping_criterion():
    kw = pissa_fast.svd_lowrank_equivalent(4, 8)
    assert literal(kw) == {"niter": 4, "oversample": kw["oversample"]}
    assert literal({"niter": 2}) == {"niter": 2}


@pytest.mark.parametrize("spectrum", ["geometric", "power"])
@pytest.mark.parametrize("r", [4, 8])
def test_equivalent_is_at_least_as_accurate_as_svd_lowrank(spectrum, r):
    """Spectra that leave svd_lowrank's error well above float32 rounding at every N tried (where both
    have converged to rounding, which one is closer is noise). Errors against the float64 exact SVD."""
    w = _weight(192, 160, spectrum)
    fewer = 0
    for niter in (0, 1, 2, 4, 16):
        torch.manual_seed(niter)
        ref = error_vs_exact(w, _peft_factors(w, r, niter))
        d = pissa_fast.decompose(w, r, seed=niter, **pissa_fast.svd_lowrank_equivalent(niter, r))
        got = error_vs_exact(w, d)
        assert got.l1 <= ref.l1, (niter, got.l1, ref.l1)
        assert got.sv_rel <= ref.sv_rel, (niter, got.sv_rel, ref.sv_rel)
        assert 1 <= d.niter_used <= max(1, niter)
        fewer += d.niter_used < niter
    assert fewer >= 1  # the criterion stops early somewhere: it is not the literal niter in disguise


def test_backend_passes_the_mode_to_decompose_many(monkeypatch):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft_models import LLAMA_TARGETS, tiny

    import pissa_fast.core as core
    import pissa_fast.peft

    seen = []
    original = core.decompose_many

    def spy(weights, r, *args, **kwargs):
        seen.append(dict(kwargs))
        return original(weights, r, *args, **kwargs)

    monkeypatch.setattr(core, "decompose_many", spy)
    config = dict(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_3")
    for mode, expected in (("equivalent", pissa_fast.svd_lowrank_equivalent(3, 4)), ("literal", {"niter": 3})):
        monkeypatch.setenv(NITER_ENV, mode)
        seen.clear()
        with pissa_fast.peft.enabled():
            pm = peft.get_peft_model(tiny("llama"), peft.LoraConfig(**config))
        assert seen, mode
        for kwargs in seen:
            assert {k: kwargs[k] for k in expected} == expected, mode
            assert ("like_svd_lowrank" in kwargs) == (mode == "equivalent")
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        assert torch.isfinite(layer.lora_A["default"].weight).all()
