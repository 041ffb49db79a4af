"""`pissa-fast init --quantize nf4`: the residual written in bf16 loads through transformers'
BitsAndBytesConfig (bitsandbytes' CPU backend) bit for bit, PeftModel.from_pretrained puts the QPiSSA
adapter on it, and the loaded model reproduces the original within the quantization error init
reports. Bad flag combinations raise before anything is written."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import LLAMA_ALL, cli, logits, tokens  # noqa: E402
from safetensors import safe_open  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast.errors import CheckpointError  # noqa: E402
from pissa_fast.quant import bnb_config, quant_error, read_settings  # noqa: E402
from pissa_fast.quant.nf4 import QuantSpec, round_trip_exact  # noqa: E402
from pissa_fast.quant.qpissa import DEFAULT_SCALES, DEFAULT_START  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


def make_model(path, dtype, *, gpt2=False, seed=0):
    """A tiny model whose projections have a few dominant directions, as trained ones do (on plain
    random weights PiSSA's principal part carries little), saved locally in `dtype`."""
    torch.manual_seed(seed)
    if gpt2:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                u, v = torch.randn(p.shape[0], 3), torch.randn(3, p.shape[1])
                p += 0.04 * u @ v
    model = model.to(dtype).eval()
    model.save_pretrained(path, max_shard_size="100KB")
    return model


def stored(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_qpissa(out):
    """The loading recipe of the README: the residual in 4-bit with the config init recorded, then the adapter."""
    settings = read_settings(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(out, quantization_config=bnb_config(out),
                                                             dtype=getattr(torch, settings["dtype"])).eval()
    return peft.PeftModel.from_pretrained(base, out, subfolder="pissa_init").eval()


def loaded_4bit(model):
    """module name (as in the checkpoint) -> the weight the loaded 4-bit layer computes with, dequantized
    (transformers transposes a Conv1D weight before quantizing: transposed back to the stored layout)."""
    import bitsandbytes as bnb

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            out[name] = w
    return out


def adapter_modules(pm):
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("qinit") / "model"
    make_model(path, torch.bfloat16)
    return path


def test_nf4_residual_loads_bit_for_bit_and_the_model_matches_the_reported_error(llama_bf16, tmp_path, capsys):
    src, out = llama_bf16, tmp_path / "out"
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    W = {n: p.detach().clone() for n, p in original.named_parameters()}
    assert cli(["init", src, out, "--r", 4, "--target-modules", "all-linear", "--quantize", "nf4",
                "--qpissa-iters", 3, "--json", tmp_path / "run.json"]) == 0
    text = capsys.readouterr().out
    # the final message carries the exact config, and the adapter folder the settings
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=False" in text
    assert "dtype=torch.bfloat16" in text and "QPiSSA error" in text
    settings = json.loads((out / "pissa_init" / "pissa_fast_quantization.json").read_text())
    assert settings["bnb_config"] == QuantSpec().bnb_config_kwargs() and settings["dtype"] == "bfloat16"
    assert settings["qpissa_iters"] == 3
    assert (settings["qpissa_start"], settings["qpissa_scales"]) == (DEFAULT_START, DEFAULT_SCALES)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["quantization"] == settings

    files = stored(out)
    targets = [m for m in adapter_modules_names(W) if m.rsplit(".", 1)[-1] in LLAMA_ALL]
    assert len(targets) == 2 * len(LLAMA_ALL)
    for m in targets:
        assert files[m + ".weight"].dtype == torch.bfloat16
        assert round_trip_exact(files[m + ".weight"], QuantSpec())
    assert torch.equal(files["model.embed_tokens.weight"], W["model.embed_tokens.weight"])  # untouched

    pm = load_qpissa(out)
    loaded = loaded_4bit(pm)
    assert sorted(loaded) == sorted(targets)  # every target in 4-bit (lm_head stays in bf16: transformers skips it)
    for m in targets:  # the 4-bit base is exactly the residual the adapter was fitted to
        assert torch.equal(loaded[m], files[m + ".weight"]), m
    assert pissa_fast.verify(out).paired

    # each layer: W ~ R + B A with the error init reports, seen through the loaded modules' forward
    reported = run["quant_errors"]
    assert sorted(reported) == sorted(targets)
    gen = torch.Generator().manual_seed(0)
    mods = adapter_modules(pm)
    for m in targets:
        w = W[m + ".weight"]
        lin = mods[m]
        A, B = lin.lora_A["default"].weight.double(), lin.lora_B["default"].weight.double()
        e = quant_error(w, loaded[m], lin.scaling["default"] * A, B)
        assert abs(e - reported[m]) <= 1e-5 * e, m
        # E||E x||^2 = ||E||_F^2 for x ~ N(0, I): the outputs' error estimates e ||W||_F
        k = 256
        x = torch.randn(k, w.shape[1], generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            y = lin(x[None])[0].double()
        ref = x.double() @ w.double().T
        est = (y - ref).norm() / (k ** 0.5 * w.double().norm())
        print("EST", m, float(est) / e)
        assert 0.75 * e < est < 1.25 * e, (m, float(est), e)

    # the whole model: closer to the original than QLoRA (the original weights in 4-bit, no adapter)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    qlora = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=qc,
                                                              dtype=torch.bfloat16).eval()
    x = tokens(seed=3, shape=(4, 16))
    ref = logits(original, x)
    d_qpissa, d_qlora = (logits(pm, x) - ref).norm(), (logits(qlora, x) - ref).norm()
    print("LOGITS", float(d_qpissa), float(d_qlora))
    assert d_qpissa < 0.8 * d_qlora, (float(d_qpissa), float(d_qlora))


def adapter_modules_names(W):
    return sorted(n.removesuffix(".weight") for n, p in W.items() if n.endswith("_proj.weight"))



@pytest.mark.parametrize("kwargs, msg", [
    (dict(quantize="nf8"), "quantize must be one of nf4, fp4"),
    (dict(quantize="nf4", qpissa_iters=0), "qpissa_iters"),
    (dict(quantize="nf4", quant_blocksize=128), "quant_blocksize 128"),
    (dict(quantize="nf4", qpissa_start="lora"), "qpissa_start must be one of best, pissa, quantized, got 'lora'"),
    (dict(quantize="nf4", qpissa_scales="mse"), "qpissa_scales must be one of absmax, search, got 'mse'"),
    (dict(qpissa_scales="absmax"), "qpissa_scales only apply with quantize"),
    (dict(qpissa_start="best", double_quant=True), "double_quant, qpissa_start only apply with quantize"),
])
def test_bad_quantize_arguments_raise_before_writing(llama_bf16, tmp_path, kwargs, msg):
    out = tmp_path / "never"
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(")):
        pissa_fast.init_checkpoint(llama_bf16, out, target_modules="all-linear", r=4, **kwargs)
    assert not out.exists()


def test_start_and_scales_reach_qpissa_and_the_settings(llama_bf16, tmp_path):
    """--qpissa-start best --qpissa-scales absmax: recorded beside the adapter, and the residual is
    what qpissa computes with them (same seed as init uses for the weight)."""
    out = tmp_path / "out"
    assert cli(["init", llama_bf16, out, "--r", 4, "--target-modules", "q_proj", "--quantize", "nf4",
                "--qpissa-iters", 2, "--qpissa-start", "best", "--qpissa-scales", "absmax"]) == 0
    settings = read_settings(out)
    assert (settings["qpissa_start"], settings["qpissa_scales"]) == ("best", "absmax")
    files = stored(out)
    src = stored(llama_bf16)
    name = "model.layers.0.self_attn.q_proj.weight"
    from pissa_fast.init.transform import weight_seed
    seed = weight_seed(0, name)  # init seeds each weight from its checkpoint name
    want = pissa_fast.qpissa(src[name], 4, 4, iters=2, start="best", scales="absmax", seed=seed).residual
    other = pissa_fast.qpissa(src[name], 4, 4, iters=2, seed=seed).residual
    assert torch.equal(files[name], want)
    assert not torch.equal(want, other)  # the options change the result, so the check above can fail
