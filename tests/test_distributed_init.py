"""`pissa-fast init` on several ranks (CPU, gloo, one thread per rank): `torchrun -m pissa_fast init`
writes bitwise the files of one process and resumes after a rank is killed; a rank that fails (a
shard missing on its host, a NaN in a weight it decomposes, an OUT it does not share) fails every
rank with that rank's message, and no final output is ever written; an interrupted run resumes on
any number of ranks. torchrun runs as a subprocess; the other cases fork ranks with
tests/distributed_harness.py (imports paid once)."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from ckpt_helpers import ROOT, cli, make_llama  # noqa: E402
from distributed_harness import run_ranks  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import pissa_fast  # noqa: E402
from pissa_fast.hf.checkpoint import open_checkpoint  # noqa: E402
from pissa_fast.init.plan import split_shards  # noqa: E402
from pissa_fast.io.staging import is_tmp  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]
STAGING = ".pissa_fast_staging"
ARGS = ["--r", 8, "--target-modules", "all-linear"]
ENV = {"PISSA_FAST_DIST_TIMEOUT": "60", "PISSA_FAST_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
PRELOAD = ("transformers", "peft", "pissa_fast.init", "pissa_fast.hf.skeleton", "pissa_fast.hf.targets")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model"
    make_llama(path)  # 4 shards
    return path


@pytest.fixture(scope="module")
def reference(llama_dir, tmp_path_factory):
    """The files of one process (the 2-rank runs must match them bit for bit)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli(["init", llama_dir, out, *ARGS]) == 0
    return out


def files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_files(out, reference):
    got, want = files(out), files(reference)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []


def only_staging_left(out):
    """Nothing final in OUT: only the staging folder, and no partial file under a final name."""
    assert sorted(os.listdir(out)) == [STAGING]
    assert pissa_fast.verify(str(out)).status == "incomplete"


def owned_by(llama_dir, rank, world=2):
    ckpt = open_checkpoint(str(llama_dir))
    return split_shards([(s, ckpt.header(s).data_bytes) for s in ckpt.shards], world)[rank]


def _cli(rank, world, argv_by_rank, patch=None):
    """One rank of the CLI: its exit status, stdout and stderr, and what `patch` recorded."""
    record = {}
    if patch is not None:
        patch(rank, record)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(argv_by_rank[rank])
        except Exception as e:  # noqa: BLE001 - not a CheckpointError: `python -m pissa_fast` prints a traceback
            rc = 1
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), **record}


def run_cli(argv_by_rank, patch=None):
    return run_ranks(functools.partial(_cli, argv_by_rank=argv_by_rank, patch=patch), world=len(argv_by_rank),
                     timeout=240, env=ENV, preload=PRELOAD)


def torchrun(*args, script=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **ENV)
    target = [script] if script else ["-m", "pissa_fast"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target,
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)


# ------------------------------------------------------------------------------------------------

def test_torchrun_writes_the_files_of_one_process(llama_dir, reference, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("init", llama_dir, out, "--lora-rank", 8, "--target-modules", "all-linear")  # --r is torchrun's
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1 of 2 done" in proc.stdout and "2 ranks on 1 host(s)" in proc.stdout
    assert_same_files(out, reference)
    assert pissa_fast.verify(str(out)).paired


def _kill_rank1_mid_write(rank, record):
    from pissa_fast.io import safetensors

    real, calls = safetensors.ShardWriter.write, [0]

    def write(self, name, t):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            os._exit(9)  # killed in the middle of writing a shard: no cleanup at all
        return real(self, name, t)
    safetensors.ShardWriter.write = write


def test_a_rank_killed_mid_write_fails_the_others_and_one_process_resumes(llama_dir, reference, tmp_path):
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, *ARGS]
    r0, r1 = run_ranks(functools.partial(_cli, argv_by_rank=[argv, argv], patch=_kill_rank1_mid_write), world=2,
                       timeout=240, env=ENV, preload=PRELOAD, may_die=(1,))
    assert r1 == {"died": 9}
    assert r0["rc"] == 2 and "decomposing: rank 0 of 2 lost contact with the other ranks" in r0["err"]
    only_staging_left(out)
    assert any(is_tmp(p.name) for p in (out / STAGING).rglob("*"))  # rank 1's partial shard, unnamed
    assert cli(argv) == 0  # the same command in one process finishes the run
    assert_same_files(out, reference)


def test_a_shard_missing_on_one_rank_fails_every_rank_before_anything_is_written(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    (broken / owned_by(llama_dir, 0)[0]).unlink()  # as if this host's copy of MODEL lacked a file
    out = tmp_path / "out"
    r0, r1 = run_cli([["init", llama_dir, out, *ARGS], ["init", broken, out, *ARGS]])
    assert r1["rc"] == 2 and "missing shard" in r1["err"]
    assert r0["rc"] == 2 and "reading MODEL and checking OUT: rank 1 of 2 failed: CheckpointError" in r0["err"]
    assert "missing shard" in r0["err"]
    assert not out.exists()
    r0, r1 = run_cli([["init", llama_dir, out, *ARGS], ["init", llama_dir, out, "--r", 4, *ARGS[2:]]])
    for r in (r0, r1):  # different settings on one rank: the same refusal on every rank
        assert r["rc"] == 2 and "rank 1 and rank 0 of 2 disagree on MODEL's files and the settings" in r["err"]
    assert not out.exists()


def _nan_on_rank1_while_rank0_works(rank, record):
    """Rank 0's first group waits until the heartbeat says another rank failed: it must then stop
    before its next group instead of finishing its share."""
    from pissa_fast.init import api

    if rank != 0:
        return
    real = api.run_jobs

    class Watching:
        def __init__(self, transform, cancel):
            self.transform, self.cancel = transform, cancel
            record["groups"] = 0

        def __getattr__(self, name):
            return getattr(self.transform, name)

        def __call__(self, weights, targets):
            record["groups"] += 1
            record["saw_cancel"] = self.cancel.wait(60)
            return self.transform(weights, targets)

    def run_jobs(jobs, transform, staging, **kw):
        record["total_groups"] = sum(len(j.groups) for j in jobs)
        return real(jobs, Watching(transform, kw["cancel"]), staging, **kw)

    api.run_jobs = run_jobs


def test_a_rank_that_raises_mid_run_stops_every_rank_and_leaves_no_output(llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    shard = next(s for s in owned_by(llama_dir, 1) if any(".mlp." in k for k in load_file(src / s)))
    tensors = load_file(src / shard)
    key = next(k for k in tensors if ".mlp." in k)
    tensors[key][3, 5] = float("nan")
    save_file(tensors, src / shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    argv = ["init", src, out, *ARGS, "--max-memory", 20_000]  # one weight per group
    r0, r1 = run_cli([argv, argv], patch=_nan_on_rank1_while_rank0_works)
    assert r1["rc"] == 1 and "ValueError: pissa_factors" in r1["err"] and "contains NaN" in r1["err"]
    assert r0["rc"] == 2 and "decomposing: rank 1 of 2 failed: ValueError" in r0["err"] and "NaN" in r0["err"]
    assert r0["saw_cancel"] and r0["groups"] == 1 < r0["total_groups"]
    only_staging_left(out)
    assert not any(is_tmp(p.name) for p in (out / STAGING).rglob("*"))


def _interrupt_rank1_after_its_first_shard(rank, record):
    from pissa_fast.init import pipeline

    def after(shard):
        if rank == 1:
            raise KeyboardInterrupt
    pipeline.after_shard = after


def _count_shards(rank, record):
    from pissa_fast.init import pipeline

    record["shards"] = []
    pipeline.after_shard = record["shards"].append


def test_an_interrupted_run_resumes_on_any_number_of_ranks(llama_dir, reference, tmp_path):
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, *ARGS]
    r0, r1 = run_cli([argv, argv], patch=_interrupt_rank1_after_its_first_shard)
    assert r1["rc"] == 130 and "rerun the same command to resume" in r1["err"]
    assert r0["rc"] == 2 and "rank 1 of 2 failed: KeyboardInterrupt" in r0["err"]
    only_staging_left(out)
    finished = [p.name for p in (out / STAGING / "residual").iterdir()]
    assert 1 <= len(finished) < 4
    r0, r1 = run_cli([argv, argv], patch=_count_shards)  # resumed on 2 ranks: the rest only, split anew
    assert r0["rc"] == 0 and r1["rc"] == 0, r0["err"] + r1["err"]
    assert f"({len(finished)} finished by an earlier, interrupted run)" in r0["out"]
    assert sorted(r0["shards"] + r1["shards"]) == sorted(set(open_checkpoint(str(llama_dir)).shards) - set(finished))
    assert_same_files(out, reference)


def _rank1_sees_another_out(rank, record):
    from pissa_fast.init import outdir

    outdir.VISIBLE_TIMEOUT_S = 0.5


def test_an_out_folder_the_ranks_do_not_share_is_refused(llama_dir, tmp_path):
    out = tmp_path / "out"
    r0, r1 = run_cli([["init", llama_dir, out, *ARGS], ["init", llama_dir, tmp_path / "elsewhere", *ARGS]],
                     patch=_rank1_sees_another_out)
    assert r1["rc"] == 2 and "OUT must be one folder that every rank shares" in r1["err"]
    assert r0["rc"] == 2 and "rank 1 of 2 failed" in r0["err"] and "every rank shares" in r0["err"]
    only_staging_left(out)
    assert not (tmp_path / "elsewhere").exists()


def test_a_bad_target_is_refused_by_every_rank_before_anything_is_written(llama_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["init", llama_dir, out, "--r", 8, "--target-modules", "no_such_proj"]
    r0, r1 = run_cli([argv, argv])
    for r in (r0, r1):
        assert r["rc"] == 2 and "no_such_proj" in r["err"], r
    assert not out.exists() or os.listdir(out) == []
