"""Decomposing likely targets while the plan is made (init/speculate.py): the outputs are bit for bit
those of a run without it, wrong guesses are dropped, memory stays bounded, a failing plan stops it."""
import os
import threading
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ckpt_helpers import make_llama  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast.errors import CheckpointError  # noqa: E402
from pissa_fast.hf import skeleton  # noqa: E402
from pissa_fast.hf.checkpoint import open_checkpoint  # noqa: E402
from pissa_fast.init import api, pipeline, speculate  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(autouse=True)
def _spare_core(monkeypatch):
    """Early work runs only when a core is free for it; these tests want it on any machine."""
    monkeypatch.setattr(api, "_spare_core", lambda device: True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("early") / "model"
    make_llama(path)
    return path


def _files(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".safetensors")} | \
        {"adapter": load_file(out / "pissa_init" / "adapter_model.safetensors")}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "adapter":
            assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert a[k] == b[k], k


def _slow_planning(monkeypatch):
    """Planning waits until the early thread has tried every guess, so it surely did work."""
    started = []
    real_start, real_build = speculate.Speculator.start, skeleton.build_skeleton

    def start(self):
        started.append(self)
        return real_start(self)

    def build(*a, **k):
        if started and started[-1]._thread.ident is not None:
            started[-1]._thread.join(120)
        return real_build(*a, **k)

    monkeypatch.setattr(speculate.Speculator, "start", start)
    monkeypatch.setattr(skeleton, "build_skeleton", build)
    return started


@pytest.mark.parametrize("spec", ["all-linear", ["q_proj", "down_proj"], r"model\.layers\.1\..*\.q_proj"])
def test_same_files_with_and_without_early_work(llama_dir, tmp_path, monkeypatch, spec):
    monkeypatch.setattr(api, "guess_targets", lambda *a, **k: [])
    plain = pissa_fast.init_checkpoint(str(llama_dir), str(tmp_path / "plain"), r=4, target_modules=spec)
    assert plain.early_layers == 0
    monkeypatch.undo()
    _slow_planning(monkeypatch)
    early = pissa_fast.init_checkpoint(str(llama_dir), str(tmp_path / "early"), r=4, target_modules=spec)
    assert early.early_layers == early.layers  # every target was guessed (and extra guesses dropped)
    _same(_files(tmp_path / "plain"), _files(tmp_path / "early"))
    assert pissa_fast.verify(str(tmp_path / "early")).paired


def test_early_work_counts_against_max_memory(llama_dir, tmp_path, monkeypatch):
    live = {"now": 0, "peak": 0}

    def counting(real):
        def load(handle, name):
            t = real(handle, name)
            n = t.numel() * t.element_size()
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, lambda: live.__setitem__("now", live["now"] - n))
            return t
        return load

    monkeypatch.setattr(pipeline, "load_tensor", counting(pipeline.load_tensor))
    monkeypatch.setattr(speculate, "load_tensor", counting(speculate.load_tensor))
    _slow_planning(monkeypatch)
    bound = 100_000
    res = pissa_fast.init_checkpoint(str(llama_dir), str(tmp_path / "out"), r=4, target_modules="all-linear",
                                     max_memory=bound)
    assert 0 < res.early_layers < res.layers  # the early thread stopped at half the bound
    assert 0 < live["peak"] <= bound and live["now"] == 0


def test_early_work_only_with_a_spare_core(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(api.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not api._spare_core(torch.device("cpu"))  # both cores decompose: no room for planning
        torch.set_num_threads(1)
        assert api._spare_core(torch.device("cpu"))
    finally:
        torch.set_num_threads(n)
    assert api._spare_core(torch.device("cuda"))


def test_a_failing_plan_stops_the_early_work(llama_dir, tmp_path):
    ckpt = open_checkpoint(str(llama_dir))
    assert [t.module.split(".")[-1] for t in speculate.guess_targets(ckpt, ["q_proj", "embed_tokens"], 4)] == \
        ["q_proj", "q_proj"]  # embeddings are not worth a guess (the plan refuses them anyway)
    with pytest.raises(CheckpointError, match="Embedding layers cannot be PiSSA-initialized"):
        pissa_fast.init_checkpoint(str(llama_dir), str(tmp_path / "out"), r=4,
                                   target_modules=["q_proj", "embed_tokens"])
    assert not (tmp_path / "out").exists()
    assert not any(t.name == "pissa-fast-early" and t.is_alive() for t in threading.enumerate())
