"""`pissa-fast init` builds the class config.json names, so encoders, decoders and encoder-decoders
round-trip: the original model's outputs equal the residual's plus the adapter's, loaded the way the
ecosystem loads them (AutoModel*.from_pretrained(OUT), PeftModel.from_pretrained(.., OUT,
subfolder="pissa_init")). Also: regex targets, tied embeddings stored twice, Hub ids through the
local cache, and models whose code ships with the checkpoint."""
import json
import os
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import cli, load_pissa, logits, make_llama, tokens  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast.errors import CheckpointError  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


def test_bert_encoder_sentence_embedding_layout(tmp_path, capsys):
    """The issue's case: a BertModel checkpoint with sentence-transformers files beside it."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=128, max_position_embeddings=64)
    src = tmp_path / "bert"
    transformers.BertModel(cfg).eval().save_pretrained(src)
    (src / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Transformer"},
                                                  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"}]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64}))
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"original weights")
    (src / "pytorch_model.bin").write_bytes(b"original weights")
    x = tokens()
    with torch.no_grad():
        ref = transformers.AutoModel.from_pretrained(src).eval()(input_ids=x).last_hidden_state
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--target-modules", "query,key,value,dense"]) == 0
    text = capsys.readouterr().out
    assert "layers of BertModel" in text and "AutoModel.from_pretrained" in text
    assert "left out onnx/" in text and "left out pytorch_model.bin" in text
    assert (out / "1_Pooling" / "config.json").read_text() == (src / "1_Pooling" / "config.json").read_text()
    assert (out / "modules.json").exists() and not (out / "onnx").exists() and not (out / "pytorch_model.bin").exists()
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in adapter  # no head prefix
    assert "base_model.model.pooler.dense.lora_B.weight" in adapter
    pm = load_pissa(out, auto="AutoModel")
    with torch.no_grad():
        got = pm(input_ids=x).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_t5_encoder_decoder(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                                vocab_size=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    src = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(src)
    x, y = tokens(1), tokens(2)
    with torch.no_grad():
        ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(src).eval()(input_ids=x, decoder_input_ids=y).logits
    out = tmp_path / "out"
    res = pissa_fast.init_checkpoint(str(src), str(out), r=4, target_modules="all-linear")
    assert res.loader == "AutoModelForSeq2SeqLM" and res.layers == 2 * 6 + 2 * 10  # enc q,k,v,o,wi,wo; dec + cross
    cfg_json = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg_json["task_type"] == "SEQ_2_SEQ_LM" and "lm_head" not in cfg_json["target_modules"]
    pm = load_pissa(out, auto="AutoModelForSeq2SeqLM")
    with torch.no_grad():
        got = pm(input_ids=x, decoder_input_ids=y).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_regex_targets(tmp_path):
    src = tmp_path / "llama"
    make_llama(src)
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--target-modules", r"model\.layers\.1\..*\.(q|v)_proj"]) == 0
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert sorted(k.split(".")[-3] for k in adapter) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert all(".layers.1." in k for k in adapter)
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r"model\.layers\.1\..*\.(q|v)_proj"
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_tied_embeddings_stored_twice(tmp_path, capsys):
    """A tied checkpoint that stores the tied weight under both names (as some do): both copies are
    copied as they are, and targeting the tied layer is refused (transformers re-ties on load)."""
    src = tmp_path / "tied"
    make_llama(src, tie=True, shard="10MB")
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--target-modules", "all-linear"]) == 0
    res = load_file(out / "model.safetensors")
    assert torch.equal(res["lm_head.weight"], tensors["lm_head.weight"])
    assert torch.equal(res["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)
    capsys.readouterr()
    assert cli(["init", src, tmp_path / "bad", "--r", 4, "--target-modules", "q_proj,lm_head"]) == 2
    err = capsys.readouterr().err
    assert "lm_head: its weight is tied to model.embed_tokens.weight" in err
    assert not (tmp_path / "bad").exists()


def _fake_hub_cache(cache, repo_id, files_from):
    """A Hugging Face cache entry for repo_id, as snapshot_download leaves it (refs/main + snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for p in files_from.iterdir():
        (snap / p.name).write_bytes(p.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_through_the_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    src = tmp_path / "llama"
    make_llama(src)
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someone/tiny-llama", src)
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", "someone/tiny-llama", out, "--r", 4, "--target-modules", "q_proj",
                "--cache-dir", cache]) == 0
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "someone/tiny-llama"
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)
    with pytest.raises(CheckpointError, match="not available from the Hugging Face Hub or its local cache"):
        pissa_fast.init_checkpoint("someone/not-cached", str(tmp_path / "o2"), target_modules="q_proj",
                                   cache_dir=str(cache))
    with pytest.raises(CheckpointError, match="not a valid Hugging Face Hub model id"):
        pissa_fast.init_checkpoint("no//such//thing", str(tmp_path / "o3"), target_modules="q_proj")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


_CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "pissa_fast_tiny"

    def __init__(self, width=32, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''
_MODEL_PY = '''
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.up = torch.nn.Linear(config.width, 2 * config.width)
        self.down = torch.nn.Linear(2 * config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
'''


def test_remote_code_needs_the_flag(tmp_path, capsys):
    src = tmp_path / "custom"
    src.mkdir()
    (src / "configuration_tiny.py").write_text(textwrap.dedent(_CONFIG_PY))
    (src / "modeling_tiny.py").write_text(textwrap.dedent(_MODEL_PY))
    (src / "config.json").write_text(json.dumps({
        "model_type": "pissa_fast_tiny", "width": 32, "architectures": ["TinyModel"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinyModel"}}))
    torch.manual_seed(0)
    weights = {"up.weight": torch.randn(64, 32), "up.bias": torch.randn(64), "down.weight": torch.randn(32, 64),
               "down.bias": torch.randn(32)}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--target-modules", "up,down"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not out.exists()
    assert cli(["init", src, out, "--r", 4, "--target-modules", "up,down", "--trust-remote-code"]) == 0
    assert "AutoModel.from_pretrained" in capsys.readouterr().out
    assert (out / "modeling_tiny.py").exists()  # the code travels with the residual
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    original = transformers.AutoModel.from_pretrained(src, trust_remote_code=True).eval()
    pm = load_pissa(out, auto="AutoModel", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), original(x), rtol=0, atol=1e-4)
