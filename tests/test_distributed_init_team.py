"""pissa_fast.distributed.team: the steps `torchrun -m pissa_fast init` runs on. 2 CPU ranks (gloo),
forked by tests/distributed_harness.py: a failure on one rank fails every rank with that rank's
message, the others stop early when their work polls `cancelled`, a rank that dies makes the others
fail instead of hang, and a long step is not cut short by the collective timeout."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from distributed_harness import RankError, run_ranks

from pissa_fast.distributed.team import Team, join, timeout_from_env
from pissa_fast.errors import Cancelled

ENV = {"PISSA_FAST_DIST_TIMEOUT": "20"}


def test_one_process_is_a_team_of_one():
    with join(env={}) as team:
        assert (team.rank, team.world_size, team.distributed) == (0, 1, False)
        assert team.step("x", lambda: 7) == [7]
        assert team.step("x", lambda: 7, on=[1]) == [None]
        with pytest.raises(ZeroDivisionError):
            team.step("x", lambda: 1 / 0)


def test_timeout_from_env():
    assert timeout_from_env({}) == timedelta(minutes=10)
    assert timeout_from_env({"PISSA_FAST_DIST_TIMEOUT": "2.5"}) == timedelta(seconds=2.5)
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="PISSA_FAST_DIST_TIMEOUT"):
            timeout_from_env({"PISSA_FAST_DIST_TIMEOUT": bad})


def _steps(rank, world):
    out = {}
    with join() as team:
        assert (team.rank, team.world_size) == (rank, world)
        out["all"] = team.step("collect", lambda: rank * 10)
        out["on0"] = team.step("rank 0 alone", lambda: "zero", on=[0])
        try:
            team.step("failing", lambda: (_ for _ in ()).throw(ValueError(f"bad input on rank {rank}"))
                      if rank == 1 else "fine")
        except Exception as e:  # noqa: BLE001
            out["failing"] = RankError(e)

        def work():  # rank 0's long work polls cancelled; rank 1 fails at once
            if rank == 1:
                raise KeyError("shard 7 missing")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                if team.cancelled.is_set():
                    out["stopped_after"] = time.monotonic() - t0
                    raise Cancelled("another rank failed")
                time.sleep(0.01)
            return "finished"
        try:
            team.step("working", work)
        except Exception as e:  # noqa: BLE001
            out["working"] = RankError(e)
        out["after"] = team.step("a later step still works", lambda: rank)
    return out


def test_steps_agree_on_results_and_failures():
    r0, r1 = run_ranks(_steps, world=2, timeout=120, env=ENV)
    for r in (r0, r1):
        assert r["all"] == [0, 10] and r["on0"] == ["zero", None] and r["after"] == [0, 1]
    assert (r1["failing"].type, r1["failing"].message) == ("ValueError", "bad input on rank 1")
    assert r0["failing"].type == "RankFailedError"
    assert r0["failing"].message == "failing: rank 1 of 2 failed: ValueError: bad input on rank 1"
    assert r1["working"].type == "KeyError"
    assert r0["working"].type == "RankFailedError" and "rank 1 of 2 failed: KeyError" in r0["working"].message
    assert "stopped_after" in r0  # rank 0 saw the cancellation instead of working its full minute


def _rank1_dies(rank, world):
    with join() as team:
        team.step("warm-up", lambda: None)
        if rank == 1:
            return "left"  # the harness ends this process: its sockets close mid-step for rank 0
        t0 = time.monotonic()
        try:
            team.step("working", lambda: time.sleep(2))
        except Exception as e:  # noqa: BLE001
            return {"error": RankError(e), "seconds": time.monotonic() - t0}
        return {"error": None}


def test_a_rank_that_dies_fails_the_others_instead_of_hanging():
    r0, r1 = run_ranks(_rank1_dies, world=2, timeout=120, env=ENV)
    assert r1 == "left"
    assert r0["error"] is not None and "lost contact" in r0["error"].message
    assert r0["seconds"] < 60  # the closed connection or the 20 s timeout, not the harness's 120 s


def _long_step(rank, world):
    with join(timeout=timedelta(seconds=2)) as team:  # a step may last far longer than the timeout
        return team.step("long", lambda: time.sleep(5 if rank == 0 else 0) or os.getpid(), on=None)


def test_a_step_may_outlast_the_collective_timeout():
    r0, r1 = run_ranks(_long_step, world=2, timeout=120)
    assert r0 == r1 and len(r0) == 2
