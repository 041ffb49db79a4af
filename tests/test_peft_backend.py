"""pissa_fast.peft.enable(): peft's own entry points (get_peft_model, PeftModel.add_adapter, transformers'
add_adapter) run their PiSSA init on pissa_fast, batched, with peft's semantics."""
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner  # noqa: E402
from peft_models import (  # noqa: E402
    LLAMA_TARGETS, N_LAYERS, TOL, base_weight, count_pissa_fast, factors, lora_layers, logits, sign_aligned_diff,
    snapshot, targets, tiny, tokens,
)

import pissa_fast.peft  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def backend():
    pissa_fast.peft.enable()
    yield
    pissa_fast.peft.disable()


@pytest.fixture(autouse=True)
def _always_off_after():
    yield
    assert not pissa_fast.peft.is_enabled(), "a test left the backend enabled"


# ------------------------------------------------------------------------------------------------
# the switch

def test_enable_disable_put_the_originals_back():
    pissa0, inject0 = LoraLayer.__dict__["pissa_init"], BaseTuner.__dict__["inject_adapter"]
    assert not pissa_fast.peft.is_enabled()
    pissa_fast.peft.enable()
    pissa_fast.peft.enable()  # idempotent
    try:
        assert pissa_fast.peft.is_enabled()
        assert LoraLayer.__dict__["pissa_init"] is not pissa0
        assert LoraLayer.__dict__["pissa_init"].__wrapped__ is pissa0
        assert BaseTuner.__dict__["inject_adapter"].__wrapped__ is inject0
        with pissa_fast.peft.enabled():  # already on: stays on after the block
            pass
        assert pissa_fast.peft.is_enabled()
    finally:
        pissa_fast.peft.disable()
    pissa_fast.peft.disable()  # idempotent
    assert LoraLayer.__dict__["pissa_init"] is pissa0 and BaseTuner.__dict__["inject_adapter"] is inject0
    with pissa_fast.peft.enabled():
        assert pissa_fast.peft.is_enabled()
    assert not pissa_fast.peft.is_enabled() and LoraLayer.__dict__["pissa_init"] is pissa0


def test_disable_refuses_to_clobber_a_later_patch():
    pissa_fast.peft.enable()
    ours = LoraLayer.__dict__["pissa_init"]
    LoraLayer.pissa_init = lambda self, *a: ours(self, *a)  # someone patched on top of us
    try:
        with pytest.raises(RuntimeError, match="replaced by someone else"):
            pissa_fast.peft.disable()
    finally:
        LoraLayer.pissa_init = ours
        pissa_fast.peft.disable()


# ------------------------------------------------------------------------------------------------
# peft.get_peft_model

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_get_peft_model_runs_on_pissa_fast(backend, monkeypatch, kind, wdtype, init):
    x = tokens()
    model = tiny(kind, wdtype)
    ref = logits(model, x)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets(kind), init_lora_weights=init)
    with count_pissa_fast(monkeypatch) as count:
        pm = peft.get_peft_model(model, config)
    layers = lora_layers(pm)
    assert len(layers) == N_LAYERS[kind] == count.weights
    assert count.calls < count.weights  # batched: one call per chunk of layers, not one per layer
    assert pm.peft_config["default"].init_lora_weights == init
    for layer in layers.values():
        assert layer.get_base_layer().weight.dtype == wdtype
        assert layer.lora_A["default"].weight.dtype == torch.float32  # peft's autocast_adapter_dtype
    err = (logits(pm, x) - ref).abs().max().item()
    assert err <= TOL[wdtype], err
    with pm.disable_adapter():  # the adapter carries the principal part
        assert (logits(pm, x) - ref).abs().max().item() > 10 * max(err, 1e-3)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_exact_init_equals_peft(kind, use_rslora):
    """init "pissa" (exact SVD): the same factors as peft's own code up to sign, same residual, same
    scaling, with rank and alpha patterns."""
    cfg = dict(r=8, lora_alpha=16, target_modules=targets(kind), init_lora_weights="pissa", use_rslora=use_rslora,
               rank_pattern={"layers.1.mlp.down_proj": 4, "h.1.mlp.c_fc": 4}, alpha_pattern={"o_proj": 5, "c_proj": 5})
    theirs = peft.get_peft_model(tiny(kind), LoraConfig(**cfg))
    with pissa_fast.peft.enabled():
        ours = peft.get_peft_model(tiny(kind), LoraConfig(**cfg))
    mine, ref = lora_layers(ours), lora_layers(theirs)
    assert mine.keys() == ref.keys()
    assert {lay.r["default"] for lay in mine.values()} == {4, 8}
    for name in ref:
        l1, l2 = mine[name], ref[name]
        assert l1.scaling == l2.scaling and l1.r == l2.r
        (a1, b1), (a2, b2) = factors(l1), factors(l2)
        assert a1.shape == a2.shape and b1.shape == b2.shape and a1.dtype == a2.dtype
        # two float32 SVDs agree to ~eps |W| / gap; a tiny random model has small gaps
        assert sign_aligned_diff(a1, b1, a2, b2) <= 1e-3 * max(a2.abs().max().item(), b2.abs().max().item()), name
        w1, w2 = base_weight(l1), base_weight(l2)
        assert (w1 - w2).abs().max().item() <= 1e-4 * w2.abs().max().item(), name


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_as_peft(autocast):
    """bf16 model: the factors are rounded through bf16 and held in float32 (autocast_adapter_dtype)
    or bf16, as peft leaves them."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny("llama", torch.bfloat16), LoraConfig(**cfg), autocast_adapter_dtype=autocast)
    with pissa_fast.peft.enabled():
        ours = peft.get_peft_model(tiny("llama", torch.bfloat16), LoraConfig(**cfg), autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    for name, layer in lora_layers(ours).items():
        (a1, b1), (a2, b2) = factors(layer), factors(lora_layers(theirs)[name])
        assert a1.dtype == a2.dtype == want and b1.dtype == want
        assert torch.equal(a1, a1.to(torch.bfloat16).to(want))  # bf16-rounded values
        assert sign_aligned_diff(a1.float(), b1.float(), a2.float(), b2.float()) <= 2e-2 * a2.abs().max().item()


def test_randomness_follows_torch_manual_seed(backend):
    def init(seed):
        model = tiny("llama")
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_1"))
        return torch.cat([f.flatten() for layer in lora_layers(pm).values() for f in factors(layer)])

    a, b, c = init(0), init(0), init(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gather_params_ctx_wraps_every_weight(backend, monkeypatch):
    """DeepSpeed ZeRO-3 needs each weight gathered while it is decomposed: the backend enters peft's
    gather_params_ctx with every weight of a decompose_many call."""
    import contextlib

    import peft.utils.integrations as integrations

    gathered = []

    @contextlib.contextmanager
    def recording(params, modifier_rank=0, fwd_module=None):
        gathered.extend(params)
        yield

    monkeypatch.setattr(integrations, "gather_params_ctx", recording)
    pm = peft.get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                                       init_lora_weights="pissa_niter_2"))
    weights = [layer.get_base_layer().weight for layer in lora_layers(pm).values()]
    assert len(gathered) == len(weights) and {id(w) for w in gathered} == {id(w) for w in weights}


# ------------------------------------------------------------------------------------------------
# other entry points: PeftModel.add_adapter, transformers' add_adapter, a bare pissa_init call

def test_peft_add_adapter_second_adapter_decomposes_the_residual(backend, monkeypatch):
    x = tokens()
    ref = logits(tiny("llama"), x)
    cfg1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    cfg2 = dict(r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"], init_lora_weights="pissa")
    pissa_fast.peft.disable()
    theirs = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg1))
    theirs.add_adapter("second", LoraConfig(**cfg2))
    pissa_fast.peft.enable()
    ours = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg1))
    with count_pissa_fast(monkeypatch) as count:
        ours.add_adapter("second", LoraConfig(**cfg2))
    assert count.weights == 4
    for adapter in ("default", "second"):
        mine, other = lora_layers(ours, adapter), lora_layers(theirs, adapter)
        assert mine.keys() == other.keys() and mine
        for name in mine:
            (a1, b1), (a2, b2) = factors(mine[name], adapter), factors(other[name], adapter)
            assert sign_aligned_diff(a1, b1, a2, b2) <= 1e-4 * a2.abs().max().item(), (adapter, name)
    ours.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(logits(ours, x), ref, rtol=0, atol=1e-4)


def _transformers_accepts_this_peft() -> str | None:
    """transformers' add_adapter refuses peft versions below its MIN_PEFT_VERSION (5.24 wants 0.22)."""
    from transformers.utils import peft_utils

    try:
        import transformers.integrations.peft as integration

        peft_utils.check_peft_version(min_version=integration.MIN_PEFT_VERSION)
    except (ValueError, AttributeError) as e:
        return f"transformers {transformers.__version__} with peft {peft.__version__}: {e}"
    return None


@pytest.mark.parametrize("entry", ["inject_adapter_in_model", "add_adapter"])
def test_transformers_add_adapter(backend, monkeypatch, entry):
    """transformers' model.add_adapter(LoraConfig(...)) is peft.inject_adapter_in_model(config, model, name)
    after a version check; both are covered where the installed versions allow."""
    x = tokens()
    model = tiny("llama")
    ref = logits(model, x)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_4")
    if entry == "add_adapter" and _transformers_accepts_this_peft():
        pytest.skip(_transformers_accepts_this_peft())
    with count_pissa_fast(monkeypatch) as count:
        if entry == "add_adapter":
            model.add_adapter(config)
        else:
            peft.inject_adapter_in_model(config, model, "default")
    assert count.weights == 14 and count.calls < 14
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=TOL[torch.float32])
    for layer in lora_layers(model).values():
        layer.enable_adapters(False)
    assert (logits(model, x) - ref).abs().max().item() > 1e-2


def test_bare_pissa_init_call_runs_at_once(backend):
    """pissa_init called outside any injection (a layer built by hand) is initialized right away."""
    pm = peft.get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    before = base_weight(layer).clone()
    layer.pissa_init("default", "pissa_niter_4")
    a, b = factors(layer)
    torch.testing.assert_close(base_weight(layer) + layer.scaling["default"] * b @ a, before, rtol=0, atol=1e-5)
    assert (a @ a.T).diagonal().argsort(descending=True).tolist() == list(range(4))  # principal part, sorted


def test_dora_on_pissa_matches_peft():
    """A LoRA variant's init runs right after pissa_init inside update_layer; with DoRA the layer is
    initialized at once, and the magnitude vector is peft's."""
    x = tokens()
    ref = logits(tiny("llama"), x)
    cfg = dict(r=4, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg))
    with pissa_fast.peft.enabled():
        ours = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg))
    torch.testing.assert_close(logits(ours, x), ref, rtol=0, atol=1e-4)
    for name, layer in lora_layers(ours).items():
        m1 = layer.lora_magnitude_vector["default"].weight.detach()
        m2 = lora_layers(theirs)[name].lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# what pissa_fast does not handle: peft's own code, with one warning naming the layers

def test_quantized_layer_falls_back_to_peft_with_one_warning(backend, monkeypatch):
    class Params4bit(torch.nn.Parameter):  # what a bitsandbytes weight's type looks like (float here)
        pass

    x = tokens()
    model = tiny("llama")
    ref = logits(model, x)
    v = model.model.layers[1].self_attn.v_proj
    v.weight = Params4bit(v.weight.detach().clone(), requires_grad=False)
    with count_pissa_fast(monkeypatch, forbid_peft_svd=False) as count, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights="pissa_niter_4"))
    ours = [str(m.message) for m in w if "pissa_fast PiSSA backend" in str(m.message)]
    assert len(ours) == 1 and "model.layers.1.self_attn.v_proj" in ours[0] and "quantized" in ours[0]
    assert count.weights == 3
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=1e-4)


def test_rank_above_layer_size_falls_back_to_peft(backend):
    """peft builds a min(out, in)-rank adapter for r > min(out, in); the backend leaves that to peft."""
    cfg = dict(r=40, target_modules=["k_proj"], init_lora_weights="pissa")  # k_proj: 32 x 64
    with pytest.warns(RuntimeWarning, match="r=40 is larger"):
        ours = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg))
    pissa_fast.peft.disable()
    theirs = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg))
    pissa_fast.peft.enable()
    for name, layer in lora_layers(ours).items():
        (a1, b1), (a2, b2) = factors(layer), factors(lora_layers(theirs)[name])
        assert a1.shape == a2.shape == (32, 64)
        torch.testing.assert_close(b1 @ a1, b2 @ a2, rtol=0, atol=1e-5)


def test_tied_weights_decompose_in_peft_order():
    """Two targeted layers sharing one weight: peft decomposes the residual the first one left; the
    backend does the same (in a second wave) and warns."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(48, 40)
            self.b = torch.nn.Linear(48, 40)
            self.b.weight = self.a.weight

    def build():
        torch.manual_seed(0)
        return Tied()

    cfg = dict(r=4, target_modules=["a", "b"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(build(), LoraConfig(**cfg))
    with pissa_fast.peft.enabled(), pytest.warns(RuntimeWarning, match="shares its weight with a"):
        ours = peft.get_peft_model(build(), LoraConfig(**cfg))
    for name, layer in lora_layers(ours).items():
        (a1, b1), (a2, b2) = factors(layer), factors(lora_layers(theirs)[name])
        assert sign_aligned_diff(a1, b1, a2, b2) <= 1e-4 * a2.abs().max().item(), name
    torch.testing.assert_close(ours.base_model.model.a.weight, theirs.base_model.model.a.weight, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors come before any weight is written

def _base_weights_unchanged(model, snap):
    weights, _ = snap
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not any(k in name for k in ("lora_", "base_layer")):
            key = f"{name}.weight"
            if key in weights:
                assert torch.equal(w, weights[key]), key
    for name, layer in lora_layers(model).items():
        key = f"{name}.weight".replace("base_model.model.", "", 1)
        assert torch.equal(layer.get_base_layer().weight, weights[key]), key


@pytest.mark.parametrize("case", ["float64_last_layer", "bad_niter", "bad_env"])
def test_errors_before_any_weight_is_written(backend, monkeypatch, case):
    model = tiny("llama")
    kwargs = dict(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_4")
    error, match = ValueError, None
    if case == "float64_last_layer":  # peft itself would have decomposed the 13 layers before it
        model.model.layers[1].mlp.down_proj.double()
        error, match = TypeError, "float32, float16, or bfloat16"
    elif case == "bad_niter":
        kwargs["init_lora_weights"] = "pissa_niter_four"
        match = "pissa_niter"
    else:
        monkeypatch.setenv("PISSA_FAST_NITER", "sometimes")
        match = "PISSA_FAST_NITER"
    snap = snapshot(model)
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(model, LoraConfig(**kwargs))
    _base_weights_unchanged(model, snap)


def test_failed_injection_leaves_no_pending_work(backend, monkeypatch):
    """peft raising inside inject_adapter (no module matched) runs no PiSSA init, and the next call is clean."""
    with count_pissa_fast(monkeypatch) as count:
        with pytest.raises(ValueError):
            peft.get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["nothing_matches"],
                                                          init_lora_weights="pissa_niter_4"))
        assert count.calls == 0
        peft.get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
        assert count.weights == 2
