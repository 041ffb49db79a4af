"""`pissa-fast init` / `convert-to-lora` on tiny transformers checkpoints written locally (no hub)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PISSA_FAST_PROGRESS", "0")

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from pissa_fast import checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine OpenMP spin-waits make each
    tiny op far slower. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(argv):
    """The real `pissa-fast` entry point, with only this module's subcommands (the others, e.g. bench,
    may not be importable in this checkout)."""
    from pissa_fast import cli as cli_mod

    saved = dict(cli_mod.SUBCOMMANDS)
    try:
        for name in list(cli_mod.SUBCOMMANDS):
            if cli_mod.SUBCOMMANDS[name][0] != "pissa_fast.checkpoint":
                del cli_mod.SUBCOMMANDS[name]
        return cli_mod.main([str(a) for a in argv])
    finally:
        cli_mod.SUBCOMMANDS.clear()
        cli_mod.SUBCOMMANDS.update(saved)


def make_llama(path, dtype=torch.float32, shard="100KB", seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (Path(path) / "tokenizer.json").write_text("{}")
    return model


def make_gpt2(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def tokens(seed=1):
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


def load_pissa(out):
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "residual_model").eval()
    return PeftModel.from_pretrained(base, out / "pissa_init").eval()


def tree_digest(path):
    """Names, sizes, mtimes and contents of every file under path."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model"
    make_llama(path)
    return path


# ------------------------------------------------------------------------------------------------

def test_round_trip_sharded_llama(llama_dir, tmp_path, capsys):
    before = tree_digest(llama_dir)
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    out = tmp_path / "out"
    rc = cli(["init", llama_dir, out, "--r", 8, "--alpha", 16, "--niter", 4, "--target-modules", "all-linear",
              "--report-error"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "14 layers" in text and "peak memory" in text and "error vs exact SVD" in text
    assert sorted(os.listdir(out)) == ["pissa_init", "residual_model"]
    assert tree_digest(llama_dir) == before  # the input is only read
    # same shards, same index, config + tokenizer copied
    shards = sorted(n for n in os.listdir(llama_dir) if n.endswith(".safetensors"))
    assert len(shards) > 1
    assert sorted(n for n in os.listdir(out / "residual_model") if n.endswith(".safetensors")) == shards
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / "residual_model" / name).read_bytes() == (llama_dir / name).read_bytes(), name
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and len(cfg["target_modules"]) == 14
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert len(adapter) == 28
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    # residual + adapter == original; the residual alone is not
    residual_only = logits(transformers.AutoModelForCausalLM.from_pretrained(out / "residual_model").eval(), x)
    assert (residual_only - ref).abs().max() > 1e-2
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_round_trip_bf16_suffix_targets(tmp_path):
    src = tmp_path / "bf16"
    make_llama(src, dtype=torch.bfloat16, shard="60KB")
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 4, "--alpha", 8, "--target-modules", "q_proj,v_proj,down_proj"]) == 0
    for name in os.listdir(out / "residual_model"):
        if name.endswith(".safetensors"):
            assert all(v.dtype == torch.bfloat16 for v in load_file(out / "residual_model" / name).values())
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert len(adapter) == 12 and all(v.dtype == torch.float32 for v in adapter.values())
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "residual_model", dtype=torch.bfloat16).eval()
    assert next(base.parameters()).dtype == torch.bfloat16
    pm = PeftModel.from_pretrained(base, out / "pissa_init").eval()
    assert (logits(pm, x) - ref).abs().max().item() < 3e-2


def test_round_trip_gpt2_conv1d(tmp_path):
    src = tmp_path / "gpt2"
    make_gpt2(src)
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", src, out, "--r", 8, "--target-modules", "all-linear", "--use-rslora"]) == 0
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["use_rslora"] is True and cfg["lora_alpha"] == 8
    assert not any("lm_head" in t for t in cfg["target_modules"])  # tied output layer left out, as peft does
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 64)
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 8)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_matches_the_peft_drop_in(llama_dir, tmp_path):
    """Same algorithm, same seed: the CLI's adapter is the drop-in's (fp32 model, so no rounding)."""
    from pissa_fast.peft import get_peft_model

    out = tmp_path / "out"
    assert cli(["init", llama_dir, out, "--r", 8, "--alpha", 16, "--target-modules", "q_proj,down_proj"]) == 0
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    pm = get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights="pissa_niter_4"))
    ours = peft.get_peft_model_state_dict(pm)
    assert ours.keys() == adapter.keys()
    for k in ours:
        torch.testing.assert_close(adapter[k], ours[k], rtol=1e-5, atol=1e-6)


def _train(pm, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())


def test_convert_to_lora(llama_dir, tmp_path):
    x = tokens()
    out = tmp_path / "out"
    assert cli(["init", llama_dir, out, "--r", 8, "--alpha", 16, "--target-modules", "q_proj,v_proj,up_proj"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "residual_model").eval()
    pm = PeftModel.from_pretrained(base, out / "pissa_init", is_trainable=True)
    _train(pm)
    trained = logits(pm.eval(), x)
    pm.save_pretrained(tmp_path / "trained")
    lora_dir = tmp_path / "lora"
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tmp_path / "trained", lora_dir]) == 0
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["init_lora_weights"] is True
    assert cfg["base_model_name_or_path"] == os.path.realpath(llama_dir)
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    lora = PeftModel.from_pretrained(original, lora_dir).eval()
    torch.testing.assert_close(logits(lora, x), trained, rtol=0, atol=1e-4)
    # the same tensors as peft's own conversion (which reads the initial adapter from that path)
    _copy(out / "pissa_init", tmp_path / "peft_init")
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    ours, theirs = load_file(lora_dir / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    # refuses to overwrite, then does with --overwrite
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tmp_path / "trained", lora_dir]) == 2
    assert cli(["convert-to-lora", "--initial", out / "pissa_init", "--trained", tmp_path / "trained", lora_dir,
                "--overwrite"]) == 0


def test_convert_to_lora_bad_inputs(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["init", llama_dir, out, "--r", 4, "--target-modules", "q_proj"]) == 0
    init = out / "pissa_init"
    other = tmp_path / "other"
    assert cli(["init", llama_dir, other, "--r", 2, "--target-modules", "q_proj"]) == 0
    capsys.readouterr()
    assert cli(["convert-to-lora", "--initial", init, "--trained", other / "pissa_init", tmp_path / "x"]) == 2
    assert "mismatched adapters: r" in capsys.readouterr().err
    assert cli(["convert-to-lora", "--initial", init, "--trained", tmp_path / "nowhere", tmp_path / "x"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    # same config, different layers
    third = tmp_path / "third"
    assert cli(["init", llama_dir, third, "--r", 4, "--target-modules", "v_proj"]) == 0
    capsys.readouterr()
    cfg = json.loads((third / "pissa_init" / "adapter_config.json").read_text())
    cfg["target_modules"] = json.loads((init / "adapter_config.json").read_text())["target_modules"]
    (third / "pissa_init" / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli(["convert-to-lora", "--initial", init, "--trained", third / "pissa_init", tmp_path / "x"]) == 2
    assert "different layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# streaming

def _count_buffers(monkeypatch):
    """Count every bulk host buffer the CLI holds at once (loaded tensors and copy chunks)."""
    live = {"now": 0, "peak": 0}
    real = checkpoint._alloc

    def alloc(n):
        buf = real(n)
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(buf, lambda: live.__setitem__("now", live["now"] - n))
        return buf

    monkeypatch.setattr(checkpoint, "_alloc", alloc)
    return live


def test_streams_one_shard_at_a_time(llama_dir, tmp_path, monkeypatch):
    ckpt = checkpoint.open_checkpoint(str(llama_dir))
    largest_shard = max(st.data_bytes for st in ckpt.files.values())
    total = sum(st.data_bytes for st in ckpt.files.values())
    largest_tensor = max(t.nbytes for st in ckpt.files.values() for t in st.tensors.values())
    live = _count_buffers(monkeypatch)
    assert cli(["init", llama_dir, tmp_path / "a", "--r", 4, "--target-modules", "all-linear"]) == 0
    assert 0 < live["peak"] <= largest_shard < total
    assert live["now"] == 0
    # a tighter bound than a shard: a group of tensors under --max-memory (+ one tensor being copied)
    live.update(now=0, peak=0)
    bound = 20_000
    assert cli(["init", llama_dir, tmp_path / "b", "--r", 4, "--target-modules", "all-linear",
                "--max-memory", bound]) == 0
    assert live["peak"] <= max(bound, largest_tensor) + largest_tensor
    assert live["peak"] < largest_shard
    # the results do not depend on the grouping
    for name in os.listdir(tmp_path / "a" / "residual_model"):
        assert (tmp_path / "a" / "residual_model" / name).read_bytes() == \
            (tmp_path / "b" / "residual_model" / name).read_bytes(), name


def test_interrupted_run_resumes(llama_dir, tmp_path, monkeypatch, capsys):
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, "--r", 8, "--target-modules", "all-linear"]
    done = []

    def crash_after_first(shard):
        done.append(shard)
        raise KeyboardInterrupt  # Ctrl-C right after the first shard is on disk

    monkeypatch.setattr(checkpoint, "_after_shard", crash_after_first)
    assert cli(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    # nothing that looks like a finished output
    assert os.listdir(out) == [checkpoint.STAGING]
    staged = [p for p in (out / checkpoint.STAGING).rglob("*") if p.is_file()]
    assert not any(checkpoint._is_tmp(p.name) for p in staged)
    assert not any(p.name in ("config.json", "adapter_config.json", "model.safetensors.index.json") for p in staged)
    monkeypatch.setattr(checkpoint, "_after_shard", lambda shard: done.append(shard))
    capsys.readouterr()
    assert cli(argv) == 0
    io = capsys.readouterr()
    assert "resuming" in io.err
    assert len(done) == len(checkpoint.open_checkpoint(str(llama_dir)).shards)  # the first shard only once
    assert sorted(os.listdir(out)) == ["pissa_init", "residual_model"]
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)
    # a finished OUT_DIR is refused without --overwrite
    assert cli(argv) == 2


def test_interrupted_while_moving_outputs_resumes(llama_dir, tmp_path, monkeypatch):
    """Interrupted between the two final renames: the rerun only finishes the moves."""
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, "--r", 4, "--target-modules", "q_proj"]
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        if str(dst) == str(out / "pissa_init"):
            calls.append(dst)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert cli(argv) == 130
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert sorted(os.listdir(out)) == [checkpoint.STAGING, "residual_model"]
    decomposed = []
    monkeypatch.setattr(checkpoint, "_after_shard", lambda shard: decomposed.append(shard))
    assert cli(argv) == 0
    assert decomposed == [] and sorted(os.listdir(out)) == ["pissa_init", "residual_model"]
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_killed_mid_write_resumes(llama_dir, tmp_path):
    """A hard kill (no cleanup at all) in the middle of writing a shard; the rerun finishes."""
    out = tmp_path / "out"
    script = (
        "import os, sys\n"
        "from pissa_fast import checkpoint as c\n"
        "real = c.SafetensorsWriter.tensor\n"
        "calls = [0]\n"
        "def tensor(self, name, t):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 6:\n"
        "        self._fh.flush()\n"
        "        os._exit(9)\n"
        "    return real(self, name, t)\n"
        "c.SafetensorsWriter.tensor = tensor\n"
        "sys.exit(c.main(sys.argv[1:]))\n")
    argv = ["init", str(llama_dir), str(out), "--r", "8", "--target-modules", "all-linear"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = [p.name for p in (out / checkpoint.STAGING).rglob("*") if p.is_file()]
    assert any(checkpoint._is_tmp(n) for n in leftovers)  # the partial shard, under a temporary name
    assert not (out / "residual_model").exists() and not (out / "pissa_init").exists()
    assert checkpoint.main(argv) == 0
    assert sorted(os.listdir(out)) == ["pissa_init", "residual_model"]
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_out_dir_rules(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["init", llama_dir, out, "--r", 4, "--target-modules", "q_proj"]
    assert cli(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(argv + ["--overwrite"]) == 0
    first = (out / "pissa_init" / "adapter_model.safetensors").read_bytes()
    assert cli(["init", llama_dir, out, "--r", 2, "--target-modules", "q_proj", "--overwrite"]) == 0
    assert (out / "pissa_init" / "adapter_model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["notes.txt", "pissa_init", "residual_model"]
    # never inside the input
    before = tree_digest(llama_dir)
    assert cli(["init", llama_dir, llama_dir / "out", "--r", 4, "--target-modules", "q_proj"]) == 2
    assert "must not contain" in capsys.readouterr().err
    assert tree_digest(llama_dir) == before


# ------------------------------------------------------------------------------------------------
# bad inputs: a clear error, exit status 2, nothing written

def _copy(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("case", ["truncated", "corrupt_header", "missing_shard", "mismatched_shape", "r_too_large",
                                  "embedding_target", "no_match", "bin_only", "no_config", "int8_weight"])
def test_bad_inputs(llama_dir, tmp_path, capsys, case):
    src = _copy(llama_dir, tmp_path / "src")
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    q_shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    args = ["--r", 4, "--target-modules", "q_proj,v_proj"]
    if case == "truncated":
        data = (src / q_shard).read_bytes()
        (src / q_shard).write_bytes(data[: len(data) - 1000])
        want = "truncated"
    elif case == "corrupt_header":
        data = bytearray((src / shards[-1]).read_bytes())
        data[8:20] = b"#garbage####"
        (src / shards[-1]).write_bytes(bytes(data))
        want = "corrupt safetensors header"
    elif case == "missing_shard":
        (src / shards[-1]).unlink()
        want = "missing shard"
    elif case == "mismatched_shape":
        tensors = load_file(src / q_shard)
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 64)
        save_file(tensors, src / q_shard, metadata={"format": "pt"})
        want = "mismatched shapes"
    elif case == "r_too_large":
        args = ["--r", 40, "--target-modules", "q_proj,v_proj"]  # v_proj is 32 x 64
        want = "larger than the layer allows"
    elif case == "embedding_target":
        args = ["--r", 4, "--target-modules", "q_proj,embed_tokens"]
        want = "Embedding layers cannot be PiSSA-initialized"
    elif case == "no_match":
        args = ["--r", 4, "--target-modules", "qkv"]
        want = "matches no layer"
    elif case == "bin_only":
        for n in os.listdir(src):
            if "safetensors" in n:
                (src / n).unlink()
        (src / "pytorch_model.bin").write_bytes(b"\0" * 10)
        want = "no safetensors weights"
    elif case == "no_config":
        (src / "config.json").unlink()
        want = "no config.json"
    elif case == "int8_weight":
        tensors = load_file(src / q_shard)
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64, dtype=torch.int8)
        save_file(tensors, src / q_shard, metadata={"format": "pt"})
        want = "dtype I8"
    before = tree_digest(src)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(["init", src, out, *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and want in err, err
    assert not out.exists()
    assert tree_digest(src) == before


def test_entry_point_is_wired():
    """`pissa-fast` finds this module's functions under the names cli.py expects."""
    for name in ("add_arguments_init", "run_init", "add_arguments_convert_to_lora", "run_convert_to_lora"):
        assert callable(getattr(checkpoint, name))
    if importlib.util.find_spec("pissa_fast.bench") is not None:
        from pissa_fast import cli as cli_mod

        with pytest.raises(SystemExit) as e:
            cli_mod.main(["init", "--help"])
        assert e.value.code == 0
