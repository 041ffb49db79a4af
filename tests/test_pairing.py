"""The pairing guard: pissa-fast init fingerprints the residual in the adapter, and verify tells an
adapter on its own residual from one on the original model or on another run's residual, from files
or from a loaded model, and says so while an interrupted --overwrite is half moved."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import cli, load_pissa, logits, make_llama, tokens, train_adapter  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast import pairing  # noqa: E402
from pissa_fast.init import outdir  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(source, out of run A, out of run B): two inits of the same model with different settings."""
    base = tmp_path_factory.mktemp("pairing")
    src = base / "model"
    make_llama(src)
    a, b = base / "a", base / "b"
    assert cli(["init", src, a, "--r", 4, "--target-modules", "q_proj,v_proj,down_proj"]) == 0
    assert cli(["init", src, b, "--r", 2, "--seed", 7, "--target-modules", "q_proj,v_proj,down_proj"]) == 0
    return src, a, b


def test_verify_files(runs, capsys):
    src, a, b = runs
    rep = pissa_fast.verify(str(a))
    assert rep.paired and rep.status == "paired" and set(rep.layers.values()) == {"residual"} and len(rep.layers) == 6
    rep = pissa_fast.verify(str(src), adapter=str(a / "pissa_init"))
    assert not rep and rep.status == "original" and "ORIGINAL model" in rep.message
    rep = pissa_fast.verify(str(b), adapter=str(a / "pissa_init"))  # another run's residual
    assert not rep and rep.status == "mismatch" and set(rep.layers.values()) == {"other"}
    capsys.readouterr()
    assert cli(["verify", a]) == 0
    assert "paired" in capsys.readouterr().out
    assert cli(["verify", src, "--adapter", a / "pissa_init"]) == 1
    assert "ORIGINAL" in capsys.readouterr().out
    assert cli(["verify", src]) == 1  # no adapter there at all
    assert cli(["verify", a / "nowhere"]) == 1


def test_verify_loaded_models(runs, tmp_path):
    src, a, _ = runs
    adapter = str(a / "pissa_init")
    assert pissa_fast.verify(load_pissa(a), adapter=adapter).paired
    # the same residual loaded in a coarser dtype is still recognized (tolerance of the dtype's rounding)
    assert pissa_fast.verify(load_pissa(a, dtype=torch.bfloat16), adapter=adapter).paired
    on_original = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src), adapter,
                                                 is_trainable=True)
    assert pissa_fast.verify(on_original, adapter=adapter).status == "original"
    plain = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert pissa_fast.verify(plain, adapter=adapter).status == "original"
    # peft's save_pretrained does not keep the fingerprint: verify says so and points at the initial adapter
    pm = load_pissa(a)
    train_adapter(pm)
    pm.save_pretrained(tmp_path / "trained")
    rep = pissa_fast.verify(str(a), adapter=str(tmp_path / "trained"))
    assert rep.status == "no-fingerprint" and "pissa_init" in rep.message


def test_sketch_separates_dtype_rounding_from_the_principal_part():
    """d for the same rows rounded to bf16 stays under the tolerance; removing a rank-1 part of 5 % of
    the norm (smaller than any PiSSA part of a real model) does not."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64)
    u, v = torch.randn(64, 1, generator=g, dtype=torch.float64), torch.randn(1, 256, generator=g, dtype=torch.float64)
    part = u @ v * (0.05 * w.norm() / (u @ v).norm())
    rows = pairing.sample_rows(64)
    fp = pairing.entry("w", (64, 256), "F32", w[rows].float(), (w - part)[rows].float())
    assert pairing.classify(fp, (w - part)[rows].float(), "F32")[0] == "residual"
    assert pairing.classify(fp, (w - part)[rows].bfloat16(), "BF16")[0] == "residual"
    assert pairing.classify(fp, w[rows].bfloat16(), "BF16")[0] == "original"
    assert pairing.classify(fp, (w + part)[rows].float(), "F32")[0] == "other"


def test_interrupted_overwrite_never_pairs_silently(runs, tmp_path, monkeypatch):
    """--overwrite of run A's folder by run B, interrupted at every rename of the final moves: at each
    point verify says the run is incomplete (never paired: the old adapter leaves first), and the rerun
    finishes with B's pair, which reproduces the original model."""
    src, a, _ = runs
    x = tokens()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), x)
    argv = ["init", src, None, "--r", 2, "--seed", 7, "--target-modules", "q_proj,v_proj,down_proj", "--overwrite"]
    real_replace = os.replace
    calls = {"n": 0, "stop_at": None}

    def replace(s, d):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return real_replace(s, d)

    # B up to the point where only the moves are left (stopped at the first rename of the moves)
    moving = tmp_path / "moving"
    shutil.copytree(a, moving)
    real_move = outdir.move_into_place

    def counted_move(*args):
        calls.update(n=0, stop_at=1)
        monkeypatch.setattr(outdir.os, "replace", replace)
        try:
            return real_move(*args)
        finally:
            monkeypatch.setattr(outdir.os, "replace", real_replace)

    monkeypatch.setattr(outdir, "move_into_place", counted_move)
    assert cli([moving if v is None else v for v in argv]) == 130
    monkeypatch.setattr(outdir, "move_into_place", real_move)
    assert (moving / ".pissa_fast_staging" / "moving").exists()
    assert pissa_fast.verify(str(moving)).status == "incomplete"
    # how many renames the moves take
    probe = tmp_path / "probe"
    shutil.copytree(moving, probe)
    calls.update(n=0, stop_at=None)
    monkeypatch.setattr(outdir.os, "replace", replace)
    assert cli([probe if v is None else v for v in argv]) == 0
    monkeypatch.setattr(outdir.os, "replace", real_replace)
    total = calls["n"]
    assert total >= 5
    for k in range(1, total + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(moving, out)
        calls.update(n=0, stop_at=k)
        monkeypatch.setattr(outdir.os, "replace", replace)
        try:
            assert cli([out if v is None else v for v in argv]) == 130
        finally:
            monkeypatch.setattr(outdir.os, "replace", real_replace)
        rep = pissa_fast.verify(str(out))  # whatever was moved already: not paired, and says why
        assert not rep.paired and rep.status == "incomplete", rep.message
        assert "rerun the same command" in rep.message
        assert cli([out if v is None else v for v in argv]) == 0  # the rerun finishes the moves
        rep = pissa_fast.verify(str(out))
        assert rep.paired
        assert json.loads((out / "pissa_init" / "adapter_config.json").read_text())["r"] == 2
        torch.testing.assert_close(logits(load_pissa(out), x), ref, rtol=0, atol=1e-4)
