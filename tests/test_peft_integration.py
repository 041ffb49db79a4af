"""pissa_fast.peft.get_peft_model (the drop-in) against peft itself, on tiny transformers models built from configs."""
import hashlib
import threading
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft_models import (  # noqa: E402
    LLAMA_TARGETS, TOL, base_weight, lora_layers, logits, sign_aligned_diff, snapshot, targets, tiny, tokens,
)

from pissa_fast.peft import add_adapter, get_peft_model, pissa_niter  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------------------

def test_pissa_niter_parsing():
    assert pissa_niter("pissa") == (True, None)
    assert pissa_niter("pissa_niter_4") == (True, 4)
    assert pissa_niter("pissa_niter_0") == (True, 0)
    assert pissa_niter(True) == (False, None)
    assert pissa_niter("gaussian") == (False, None)
    for bad in ("pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa_fast"):
        with pytest.raises(ValueError, match="pissa_niter"):
            pissa_niter(bad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_logits_preserved(kind, wdtype, init):
    dtype = wdtype
    x = tokens()
    model = tiny(kind, dtype)
    ref = logits(model, x)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets(kind), init_lora_weights=init)
    pm = get_peft_model(model, config)
    out = logits(pm, x)
    assert pm.peft_config["default"].init_lora_weights == init  # restored, as peft leaves it
    layers = lora_layers(pm)
    assert len(layers) == (14 if kind == "llama" else 8)
    if kind == "gpt2":
        assert all(layer.fan_in_fan_out for layer in layers.values())
    for layer in layers.values():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype, as peft
    # peft's own init on the same model: our deviation is within the same dtype rounding
    pm_ref = peft.get_peft_model(tiny(kind, dtype),
                                 LoraConfig(r=8, lora_alpha=16, target_modules=targets(kind), init_lora_weights=init))
    peft_err = (logits(pm_ref, x) - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= max(TOL[dtype], 2 * peft_err), (err, peft_err)
    # the adapter carries the principal part: without it the outputs change a lot
    with pm.disable_adapter():
        assert (logits(pm, x) - ref).abs().max().item() > 10 * max(err, 1e-3)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_matches_peft_up_to_sign(kind, wdtype):
    dtype = wdtype
    cfg = dict(r=8, lora_alpha=16, target_modules=targets(kind), init_lora_weights="pissa")
    ours = get_peft_model(tiny(kind, dtype), LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny(kind, dtype), LoraConfig(**cfg))
    mine, ref = lora_layers(ours), lora_layers(theirs)
    assert mine.keys() == ref.keys()
    for name in ref:
        l1, l2 = mine[name], ref[name]
        assert l1.scaling == l2.scaling and l1.r == l2.r
        a1, b1 = l1.lora_A["default"].weight.detach(), l1.lora_B["default"].weight.detach()
        a2, b2 = l2.lora_A["default"].weight.detach(), l2.lora_B["default"].weight.detach()
        assert a1.shape == a2.shape and b1.shape == b2.shape and a1.dtype == a2.dtype
        scale = max(a2.abs().max().item(), b2.abs().max().item())
        # (two float32 SVDs agree to ~eps * |W| / gap, and a tiny random model has small gaps)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        assert sign_aligned_diff(a1, b1, a2, b2) <= tol * scale, name
        w1, w2 = base_weight(l1).float(), base_weight(l2).float()
        assert (w1 - w2).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2e-2) * w2.abs().max().item()


def _singular_values(w):
    return torch.linalg.svdvals(w.double())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_rank_and_alpha_patterns(use_rslora):
    """lora_A = diag(sqrt(S/scaling)) V^T, lora_B = U diag(sqrt(S/scaling)) per layer r / alpha."""
    model = tiny("llama")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=use_rslora,
                        rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 5}, init_lora_weights="pissa")
    pm = get_peft_model(model, config)
    for name, layer in lora_layers(pm).items():
        short = name.split("base_model.model.")[-1]
        r = 4 if name.endswith("down_proj") else 8
        alpha = 5 if name.endswith("q_proj") else 16
        scaling = alpha / (r ** 0.5 if use_rslora else r)
        assert layer.r["default"] == r and layer.scaling["default"] == pytest.approx(scaling)
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        S = _singular_values(originals[short])[:r]
        torch.testing.assert_close(torch.diag(A @ A.T), S / scaling, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.diag(B.T @ B), S / scaling, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(base_weight(layer).double() + scaling * B @ A, originals[short].double(),
                                   rtol=0, atol=1e-5)


def test_save_and_reload_round_trip(tmp_path):
    """peft's documented PiSSA workflow: save the adapter (init_lora_weights=True) and the residual base."""
    x = tokens()
    ref = logits(tiny("llama"), x)
    pm = get_peft_model(tiny("llama"), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                  init_lora_weights="pissa_niter_4"))
    out = logits(pm, x)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "pissa_init")
    pm.unload().save_pretrained(tmp_path / "residual")
    residual = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual").eval()
    loaded = PeftModel.from_pretrained(residual, tmp_path / "pissa_init").eval()
    again = logits(loaded, x)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-4)


def test_peft_conversion_to_lora(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) on the drop-in's model gives a LoRA
    that reproduces the trained model on the original base."""
    x = tokens()
    pm = get_peft_model(tiny("llama"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights="pissa_niter_4"))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "pissa_init")
    pm.peft_config["default"].init_lora_weights = "pissa_niter_4"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training"
        for layer in lora_layers(pm).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    trained = logits(pm, x)
    pm.save_pretrained(tmp_path / "pissa_lora", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    lora = PeftModel.from_pretrained(tiny("llama"), tmp_path / "pissa_lora").eval()
    assert lora.peft_config["default"].r == 16
    torch.testing.assert_close(logits(lora, x), trained, rtol=0, atol=1e-4)


def test_several_adapters():
    """A second PiSSA adapter decomposes the first one's residual, as in peft; with both active the
    model is unchanged; exact init matches peft's own add_adapter up to sign."""
    x = tokens()
    ref = logits(tiny("llama"), x)
    cfg1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    cfg2 = dict(r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"], init_lora_weights="pissa")
    ours = get_peft_model(tiny("llama"), LoraConfig(**cfg1))
    add_adapter(ours, "second", LoraConfig(**cfg2))
    theirs = peft.get_peft_model(tiny("llama"), LoraConfig(**cfg1))
    theirs.add_adapter("second", LoraConfig(**cfg2))
    assert ours.peft_config["second"].init_lora_weights == "pissa"
    for adapter in ("default", "second"):
        mine, other = lora_layers(ours, adapter), lora_layers(theirs, adapter)
        assert mine.keys() == other.keys() and mine
        for name in mine:
            a1, b1 = (mine[name].lora_A[adapter].weight.detach(), mine[name].lora_B[adapter].weight.detach())
            a2, b2 = (other[name].lora_A[adapter].weight.detach(), other[name].lora_B[adapter].weight.detach())
            assert sign_aligned_diff(a1, b1, a2, b2) <= 1e-4 * a2.abs().max().item()
    ours.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(logits(ours, x), ref, rtol=0, atol=1e-4)


def test_passthrough_unchanged():
    """Not a PiSSA init (or not LoRA): exactly what peft does."""
    for init in (True, "gaussian"):
        torch.manual_seed(5)
        a = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
        torch.manual_seed(5)
        b = peft.get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    ia3 = get_peft_model(tiny("llama"), peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    assert type(ia3) is type(peft.get_peft_model(tiny("llama"), peft.IA3Config(
        target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])))


def test_low_cpu_mem_usage_and_dora():
    """Cases where peft's own PiSSA path fails or needs care still give an unchanged model."""
    x = tokens()
    ref = logits(tiny("llama"), x)
    pm = get_peft_model(tiny("llama"), LoraConfig(r=8, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_4"),
                        low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in pm.parameters())
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=1e-4)
    pm = get_peft_model(tiny("llama"), LoraConfig(r=8, target_modules=["q_proj", "up_proj"], use_dora=True,
                                                  init_lora_weights="pissa_niter_4"))
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=1e-4)


def test_model_loaded_from_checkpoint_is_not_written(tmp_path, monkeypatch):
    """The residual is written in place into the loaded weights; never into the (mapped) file. The
    weights are made writable on a background thread from the moment peft's injection names them
    (memory.EarlyPopulate), never on the caller's thread."""
    from pissa_fast import memory

    tiny("llama").save_pretrained(tmp_path / "base")
    path = tmp_path / "base" / "model.safetensors"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    x = tokens()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ref = logits(model, x)
    callers, real = [], memory._madvise
    monkeypatch.setattr(memory, "_madvise", lambda *a: callers.append(threading.current_thread().name) or real(*a))
    pm = get_peft_model(model, LoraConfig(r=8, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_2"))
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=1e-4)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert set(callers) <= {"pissa_fast early populate"}  # nothing populated on the caller's thread
    if not memory._state["unsupported"]:  # a kernel with MADV_POPULATE_WRITE (Linux >= 5.14)
        assert len(callers) >= len(LLAMA_TARGETS)  # every targeted weight of every layer


# ------------------------------------------------------------------------------------------------
# bad configs: a clear error, nothing written, the model as it was

def _assert_untouched(model, snap, tuner_layers=0):
    weights, grads = snap
    assert sum(isinstance(m, BaseTunerLayer) for m in model.modules()) == tuner_layers
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for k in weights:
        assert torch.equal(now[k], weights[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


@pytest.mark.parametrize("case", ["embedding", "r_too_large", "rank_pattern_too_large", "float64", "quantized",
                                  "tensor_subclass", "tied", "bad_niter"])
def test_bad_configs(case):
    model = tiny("llama")
    kwargs = dict(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4")
    match = None
    if case == "embedding":
        kwargs["target_modules"] = ["q_proj", "embed_tokens"]
        match = "Embedding"
    elif case == "r_too_large":
        kwargs["r"] = 48  # k_proj/v_proj are 32 x 64
        kwargs["target_modules"] = ["q_proj", "k_proj"]
        match = "larger than the layer allows"
    elif case == "rank_pattern_too_large":
        kwargs["rank_pattern"] = {"model.layers.1.self_attn.v_proj": 33}
        match = "r=33"
    elif case == "float64":
        model = model.double()
        match = "float32, float16, or bfloat16"
    elif case == "quantized":
        class Params4bit(torch.nn.Parameter):  # what bitsandbytes' 4-bit weights look like to peft
            pass

        layer = model.model.layers[1].self_attn.v_proj
        layer.weight = Params4bit(layer.weight.detach().clone(), requires_grad=False)
        match = "quantized"
    elif case == "tensor_subclass":
        class Packed(torch.Tensor):
            pass

        layer = model.model.layers[0].self_attn.q_proj
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone().as_subclass(Packed), requires_grad=False)
        match = "quantized"
    elif case == "tied":
        model.model.layers[1].self_attn.q_proj.weight = model.model.layers[0].self_attn.q_proj.weight
        match = "shares storage"
    elif case == "bad_niter":
        kwargs["init_lora_weights"] = "pissa_niter_four"
        match = "pissa_niter"
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(**kwargs))
    _assert_untouched(model, snap)


def test_bad_config_on_second_adapter_keeps_first():
    pm = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
    snap = snapshot(pm)
    with pytest.raises(ValueError, match="larger than the layer allows"):
        add_adapter(pm, "big", LoraConfig(r=40, target_modules=["k_proj"], init_lora_weights="pissa"))
    assert "big" not in pm.peft_config
    _assert_untouched(pm, snap, tuner_layers=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_decomposed_on_cuda():  # (no "device"/"dtype" args: conftest parametrizes those)
    import pissa_fast

    if not pissa_fast.build_info().startswith("cuda"):
        pytest.skip("pissa_fast built without CUDA")
    x = tokens().cuda()
    for wdtype in (torch.float32, torch.bfloat16):
        model = tiny("llama", wdtype).cuda()
        ref = logits(model, x)
        pm = get_peft_model(model, LoraConfig(r=8, target_modules=LLAMA_TARGETS, init_lora_weights="pissa_niter_4"))
        for layer in lora_layers(pm).values():
            assert layer.lora_A["default"].weight.device.type == "cuda"
        assert (logits(pm, x) - ref).abs().max().item() <= TOL[wdtype]


def test_progress_bar(capsys, monkeypatch):
    import pissa_fast.peft.layers as layers

    monkeypatch.setenv("PISSA_FAST_PROGRESS", "1")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def init():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
        return capsys.readouterr().err

    monkeypatch.setattr(layers, "_PROGRESS_DELAY_S", 60.0)
    assert "PiSSA init" not in init()  # a short init prints nothing
    monkeypatch.setattr(layers, "_PROGRESS_DELAY_S", 0.0)  # a long one: the bar
    err = init()
    assert "PiSSA init" in err and "2/2" in err
    monkeypatch.setenv("PISSA_FAST_PROGRESS", "0")
    assert "PiSSA init" not in init()


def test_seed_and_switch_state():
    """The drop-in is seeded (seed=0 by default, whatever the global RNG), seed=None follows torch's
    global RNG, and the backend it switches on is off again afterwards."""
    import pissa_fast.peft

    def init(global_seed, **kw):
        model = tiny("llama")
        torch.manual_seed(global_seed)
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_1"), **kw)
        return torch.cat([lay.lora_A["default"].weight.detach().flatten() for lay in lora_layers(pm).values()])

    assert torch.equal(init(0), init(1))
    assert not torch.equal(init(0, seed=0), init(0, seed=5))
    assert torch.equal(init(3, seed=None), init(3, seed=None))
    assert not torch.equal(init(3, seed=None), init(4, seed=None))
    assert not pissa_fast.peft.is_enabled()
