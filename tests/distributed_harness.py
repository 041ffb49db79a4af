"""Run a function on N ranks (processes, gloo on CPU, one thread each) and collect what each
returned or raised. Used by tests/test_distributed*.py. A rank that hangs or dies fails the test within
`timeout` seconds instead of blocking the suite; every collective also times out (COLLECTIVE_TIMEOUT_S).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

COLLECTIVE_TIMEOUT_S = 60


class RankError:
    """What a rank raised: the exception's type name, message and traceback (as text)."""

    def __init__(self, exc: BaseException):
        self.type = type(exc).__name__
        self.message = str(exc)
        self.traceback = traceback.format_exc()

    def __repr__(self):
        return f"{self.type}: {self.message}"


def _entry(fn, rank, world, init_file, results, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        status = ("ok", fn(rank, world))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        status = ("error", RankError(e))
    buf = io.BytesIO()
    torch.save(status, buf)
    results.put((rank, buf.getvalue()))
    results.close()
    results.join_thread()
    os._exit(0)  # skip interpreter teardown: gloo / deepspeed threads can hold it for tens of seconds


def run_ranks(fn, world: int = 2, timeout: float = 180, env: dict | None = None, preload: tuple = (),
              may_die: tuple = ()) -> list:
    """fn(rank, world) on `world` ranks; returns each rank's return value in rank order.
    Raises AssertionError when a rank raised outside fn's own handling, hung, or died; a rank in
    `may_die` that dies (e.g. os._exit in a test's hook) returns {"died": its exit code} instead.

    Ranks are forked from this process after importing `preload` here (torch, peft, ... take seconds
    to import on a 2-core machine, once instead of once per rank), as torch's DataLoader forks its
    workers; each rank uses one thread. Where fork is unavailable they are spawned.
    """
    import importlib

    import torch

    for module in preload:
        importlib.import_module(module)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    results = ctx.Queue()
    got: dict[int, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, rank, world, os.path.join(tmp, "pg"), results, env or {}),
                             daemon=True) for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(got) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(world)) - set(got))
                    raise AssertionError(f"rank(s) {missing} did not finish within {timeout} s (hang?); "
                                         f"others reported {got}")
                try:
                    rank, blob = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                    for r in [r for r in dead if r in may_die]:
                        got[r] = ("ok", {"died": procs[r].exitcode})
                        dead.remove(r)
                    if dead:
                        raise AssertionError(f"rank(s) {dead} died (exit codes "
                                             f"{[procs[r].exitcode for r in dead]}) without reporting") from None
                    continue
                got[rank] = torch.load(io.BytesIO(blob), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    out = []
    for rank in range(world):
        status, value = got[rank]
        if status != "ok":
            raise AssertionError(f"rank {rank} failed: {value}\n{value.traceback}")
        out.append(value)
    return out
