"""`pissa-fast init` on tiny LLaMA and GPT-2 checkpoints written locally: layout, round trip, streaming,
resuming, the output folder's rules and bad inputs."""
import contextlib
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import (LLAMA_ALL, ROOT, cli, load_pissa, logits, make_gpt2, make_llama,  # noqa: E402
                          tokens, tree_digest)
from safetensors.torch import load_file, save_file  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast.hf.checkpoint import open_checkpoint  # noqa: E402
from pissa_fast.init import outdir, pipeline  # noqa: E402
from pissa_fast.io.staging import is_tmp  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]
STAGING = ".pissa_fast_staging"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model"
    make_llama(path)
    return path


def test_round_trip_sharded_llama(llama_dir, tmp_path, capsys):
    before = tree_digest(llama_dir)
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    out = tmp_path / "out"
    assert cli(["init", llama_dir, out, "--r", 8, "--alpha", 16, "--niter", 4, "--target-modules", "all-linear",
                "--report-error"]) == 0
    text = capsys.readouterr().out
    assert "14 layers of LlamaForCausalLM" in text and "peak memory" in text and "error vs exact SVD" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "subfolder='pissa_init', is_trainable=True" in text
    assert tree_digest(llama_dir) == before  # the input is only read
    # OUT is the residual model: same shards, same index, every other file copied; the adapter inside
    src_files = sorted(os.listdir(llama_dir))
    assert sorted(os.listdir(out)) == sorted(src_files + ["pissa_init"])
    shards = [n for n in src_files if n.endswith(".safetensors")]
    assert len(shards) > 1
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes(), name
    for name in shards:  # same tensors, dtypes, shapes and metadata
        with open(llama_dir / name, "rb") as a, open(out / name, "rb") as b:
            assert a.read(8) == b.read(8)
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(llama_dir)  # the source as given, not a temporary path
    parts = (("self_attn", LLAMA_ALL[:4]), ("mlp", LLAMA_ALL[4:]))
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.{i}.{p}.{n}" for i in range(2)
                                                   for p, names in parts for n in names)
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert len(adapter) == 28
    assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    # residual + adapter == original; the residual alone is not
    residual_only = logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), x)
    assert (residual_only - ref).abs().max() > 1e-2
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_python_api_and_bf16_suffix_targets(tmp_path):
    src = tmp_path / "bf16"
    make_llama(src, dtype=torch.bfloat16, shard="60KB")
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), x)
    out = tmp_path / "out"
    res = pissa_fast.init_checkpoint(str(src), str(out), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                           "down_proj"])
    assert res.layers == 6 and res.loader == "AutoModelForCausalLM" and "is_trainable=True" in res.load_code()
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            assert all(v.dtype == torch.bfloat16 for v in load_file(out / name).values())
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert len(adapter) == 12 and all(v.dtype == torch.float32 for v in adapter.values())
    cfg = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]  # as given (peft keeps a set)
    pm = load_pissa(out, dtype=torch.bfloat16)
    assert next(pm.get_base_model().parameters()).dtype == torch.bfloat16
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
    assert not any("lm_head" in t for t in cfg["target_modules"])  # the tied output layer left out, as peft does
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 64)
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 8)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_matches_the_peft_drop_in(llama_dir, tmp_path):
    """The drop-in's adapter keys and conventions; each weight's factors are pissa_fast.decompose's with
    the weight's own seed, weight_seed(seed, checkpoint name) (fp32 model, so no rounding). The drop-in
    draws every weight's test matrix from the seed itself, so its factors differ within niter's accuracy."""
    from pissa_fast.distributed import weight_seed
    from pissa_fast.peft import get_peft_model

    out = tmp_path / "out"
    assert cli(["init", llama_dir, out, "--r", 8, "--alpha", 16, "--target-modules", "q_proj,down_proj"]) == 0
    adapter = load_file(out / "pissa_init" / "adapter_model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    weights = {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules()
               if n.endswith(("q_proj", "down_proj"))}
    pm = get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights="pissa_niter_4"))
    ours = peft.get_peft_model_state_dict(pm)
    assert ours.keys() == adapter.keys()
    root = 2 ** 0.5  # sqrt(lora_alpha / r)
    for key, w in weights.items():
        d = pissa_fast.decompose(w, 8, 4, seed=weight_seed(0, key))
        prefix = "base_model.model." + key[: -len(".weight")]
        torch.testing.assert_close(adapter[prefix + ".lora_A.weight"], d.A / root, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter[prefix + ".lora_B.weight"], d.B / root, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# streaming

def _count_loads(monkeypatch):
    """Count the bytes of weights the pipeline holds at once (every load goes through load_tensor)."""
    live = {"now": 0, "peak": 0}
    real = pipeline.load_tensor

    def load(handle, name):
        t = real(handle, name)
        n = t.numel() * t.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(t, lambda: live.__setitem__("now", live["now"] - n))
        return t

    monkeypatch.setattr(pipeline, "load_tensor", load)
    return live


def test_bounded_memory_and_grouping_independent(llama_dir, tmp_path, monkeypatch):
    """The weights in memory at once (prefetched, decomposing, waiting to be written) stay within
    --max-memory, or one tensor when a single tensor is larger; results do not depend on it."""
    ckpt = open_checkpoint(str(llama_dir))
    total = ckpt.data_bytes
    largest = max(t.nbytes for h in ckpt.files.values() for t in h.tensors.values())
    live = _count_loads(monkeypatch)
    assert cli(["init", llama_dir, tmp_path / "a", "--r", 4, "--target-modules", "all-linear"]) == 0
    assert 0 < live["peak"] < total and live["now"] == 0
    for bound in (20_000, 70_000):  # below and above the largest weight (32 KiB)
        live.update(now=0, peak=0)
        out = tmp_path / f"b{bound}"
        assert cli(["init", llama_dir, out, "--r", 4, "--target-modules", "all-linear", "--max-memory", bound]) == 0
        assert 0 < live["peak"] <= max(bound, largest) and live["now"] == 0
        for name in os.listdir(tmp_path / "a"):  # the results do not depend on the grouping
            if name.endswith(".safetensors"):
                assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
        assert load_file(tmp_path / "a" / "pissa_init" / "adapter_model.safetensors").keys() == \
            load_file(out / "pissa_init" / "adapter_model.safetensors").keys()


def test_interrupted_run_resumes(llama_dir, tmp_path, monkeypatch, capsys):
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, "--r", 8, "--target-modules", "all-linear"]
    done = []

    def crash_after_first(shard):
        done.append(shard)
        raise KeyboardInterrupt  # Ctrl-C right after the first shard is on disk

    monkeypatch.setattr(pipeline, "after_shard", crash_after_first)
    assert cli(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert os.listdir(out) == [STAGING]  # nothing that looks like a finished output
    staged = [p for p in (out / STAGING).rglob("*") if p.is_file()]
    assert not any(is_tmp(p.name) for p in staged)
    assert not any(p.name in ("config.json", "adapter_config.json", "model.safetensors.index.json") for p in staged)
    assert pissa_fast.verify(str(out)).status == "incomplete"
    monkeypatch.setattr(pipeline, "after_shard", lambda shard: done.append(shard))
    capsys.readouterr()
    assert cli(argv) == 0
    assert "finished by an earlier, interrupted run" in capsys.readouterr().out
    assert len(done) == len(open_checkpoint(str(llama_dir)).shards)  # the first shard only once
    assert STAGING not in os.listdir(out) and "pissa_init" in os.listdir(out)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)
    assert pissa_fast.verify(str(out)).paired
    assert cli(argv) == 2  # a finished OUT is refused without --overwrite


def test_interrupted_while_moving_outputs_resumes(llama_dir, tmp_path, monkeypatch, capsys):
    """Interrupted between the final renames: the rerun only finishes the moves."""
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, "--r", 4, "--target-modules", "q_proj"]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(out / "pissa_init"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    assert cli(argv) == 130
    monkeypatch.setattr(outdir.os, "replace", real_replace)
    assert "pissa_init" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert pissa_fast.verify(str(out)).status == "incomplete"
    decomposed = []
    monkeypatch.setattr(pipeline, "after_shard", lambda shard: decomposed.append(shard))
    capsys.readouterr()
    assert cli(argv) == 0
    assert decomposed == [] and STAGING not in os.listdir(out)
    text = capsys.readouterr().out
    assert "2 layers of LlamaForCausalLM" in text and "AutoModelForCausalLM.from_pretrained" in text
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), x)
    torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)


def test_killed_mid_write_resumes(llama_dir, tmp_path):
    """A hard kill (no cleanup at all) in the middle of writing a shard; the rerun finishes."""
    out = tmp_path / "out"
    script = (
        "import os, sys\n"
        "from pissa_fast.io import safetensors as s\n"
        "real = s.ShardWriter.write\n"
        "calls = [0]\n"
        "def write(self, name, t):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 6:\n"
        "        os._exit(9)\n"
        "    return real(self, name, t)\n"
        "s.ShardWriter.write = write\n"
        "from pissa_fast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    argv = ["init", str(llama_dir), str(out), "--r", "8", "--target-modules", "all-linear"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = [p.name for p in (out / STAGING).rglob("*") if p.is_file()]
    assert any(is_tmp(n) for n in leftovers)  # the partial shard, under a temporary name
    assert sorted(os.listdir(out)) == [STAGING]
    assert cli(argv) == 0
    assert STAGING not in os.listdir(out)
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
    assert os.listdir(out) == ["notes.txt"]
    assert cli(argv + ["--overwrite"]) == 0
    first = (out / "pissa_init" / "adapter_model.safetensors").read_bytes()
    # a stale single-file checkpoint in OUT would shadow the new shards: --overwrite removes it
    save_file({"x": torch.zeros(1)}, out / "model.safetensors")
    assert cli(["init", llama_dir, out, "--r", 2, "--target-modules", "q_proj", "--overwrite"]) == 0
    assert (out / "pissa_init" / "adapter_model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "model.safetensors").exists() and STAGING not in os.listdir(out)
    assert pissa_fast.verify(str(out)).paired
    before = tree_digest(llama_dir)  # never inside the input
    assert cli(["init", llama_dir, llama_dir / "out", "--r", 4, "--target-modules", "q_proj"]) == 2
    assert "must not contain" in capsys.readouterr().err
    assert tree_digest(llama_dir) == before


# ------------------------------------------------------------------------------------------------
# bad inputs: a clear error, exit status 2, nothing written

@pytest.mark.parametrize("case", ["truncated", "corrupt_header", "missing_shard", "mismatched_shape", "r_too_large",
                                  "embedding_target", "no_match", "bin_only", "no_config", "int8_weight", "bad_niter",
                                  "regex_in_list"])
def test_bad_inputs(llama_dir, tmp_path, capsys, case):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
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
        want = "matches no module of LlamaForCausalLM"
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
    elif case == "bad_niter":
        args = ["--r", 4, "--niter", "-1", "--target-modules", "q_proj"]
        want = "niter must be >= 0"
    elif case == "regex_in_list":
        args = ["--r", 4, "--target-modules", "q_proj", ".*v_proj"]  # a regex must come alone
        want = "looks like a regex"
    before = tree_digest(src)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) if case == "bad_niter" else contextlib.nullcontext():
        assert cli(["init", src, out, *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and want in err, err
    assert not out.exists()
    assert tree_digest(src) == before
