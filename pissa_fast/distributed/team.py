"""Steps of a multi-rank job that agree on failure and never hang (used by `torchrun -m pissa_fast init`).

A job is a sequence of steps. In each step some ranks work (all of them, or rank 0 alone) while every
rank keeps in contact: a heartbeat thread all-reduces two flags (failed, done) a few times a second
on a gloo group. So
  - a rank that fails makes the others stop at their next safe point (`team.cancelled` is set; long
    work polls it and raises pissa_fast.errors.Cancelled), not after their whole share;
  - a step may last as long as its work does (hours of decomposition, a rank-0 copy of many GB) and
    the collective timeout still only has to cover a heartbeat: it bounds how long a dead or
    unreachable rank goes unnoticed, not how long the work takes;
  - when every rank is done, one exchange says whether anyone failed: the failing rank raises its own
    error, the others RankFailedError quoting it, and otherwise every rank gets every rank's payload.
A rank that dies outright (killed, out of memory) breaks the heartbeat: gloo sees the connection close
(or the timeout passes), and the others raise RankFailedError saying they lost contact.

The job's own process group (NCCL on GPUs) carries no traffic here; the heartbeat and the exchanges
are small CPU messages on a gloo group of their own, so they never wait behind GPU work.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import Cancelled
from .consensus import RankFailedError, raise_if_any_failed
from .launch import device_and_backend, from_env, init

DEFAULT_TIMEOUT = timedelta(minutes=10)
TIMEOUT_ENV = "PISSA_FAST_DIST_TIMEOUT"  # seconds; how long an unresponsive rank goes unnoticed
HEARTBEAT_S = 0.2


def timeout_from_env(env=None) -> timedelta:
    env = os.environ if env is None else env
    text = env.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"environment variable {TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


class _Heartbeat(threading.Thread):
    """All-reduces (failed, done) until every rank is done; sets `cancelled` once any rank failed."""

    def __init__(self, group, world: int, cancelled: threading.Event):
        super().__init__(name="pissa-fast-heartbeat", daemon=True)
        self.group, self.world, self.cancelled = group, world, cancelled
        self.failed = self.done = 0
        self.error: BaseException | None = None
        self._wake = threading.Event()

    def run(self) -> None:
        try:
            while True:
                flags = torch.tensor([self.failed, self.done], dtype=torch.int64)
                dist.all_reduce(flags, group=self.group)
                failed, done = flags.tolist()
                if failed:
                    self.cancelled.set()
                if done == self.world:
                    return
                self._wake.wait(HEARTBEAT_S)
                self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - a lost peer; reported by finish()'s caller
            self.error = e
            self.cancelled.set()

    def finish(self, failed: bool) -> None:
        self.failed = int(failed)
        self.done = 1
        self._wake.set()
        self.join()


def _record_for_torchrun(exc: BaseException) -> None:
    """Write this rank's own error where torchrun looks for it (TORCHELASTIC_ERROR_FILE), so the
    job's summary names it as the root cause. Call inside an `except` block (it records the traceback)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)
    except Exception:  # noqa: BLE001 - reporting must not replace the error itself
        pass


@dataclass
class Team:
    """The ranks of a job, or one process alone (world_size 1: steps just run, nothing is exchanged)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    group: object = None  # the gloo group of the heartbeat and the exchanges
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's (launch.from_env)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def step(self, what: str, fn: Callable[[], object], on: Iterable[int] | None = None) -> list:
        """Run fn() on the ranks `on` (default: every rank) while every rank keeps in contact; return
        each rank's result in rank order (None where fn did not run). If fn raised on any rank, raise
        on every rank: there its own exception, elsewhere RankFailedError("{what}: rank k of N
        failed: ..."). fn may poll self.cancelled and raise pissa_fast.errors.Cancelled to stop early."""
        here = on is None or self.rank in set(on)
        if not self.distributed:
            return [fn() if here else None]
        self.cancelled.clear()
        beat = _Heartbeat(self.group, self.world_size, self.cancelled)
        beat.start()
        error = payload = None
        try:
            if here:
                payload = fn()
        except Cancelled:
            pass  # the failing rank's error is the one to report
        except BaseException as e:  # noqa: BLE001 - exchanged below, then raised
            error = e
        finally:
            beat.finish(failed=error is not None)
        if beat.error is not None:  # a rank left: no exchange is possible any more
            if error is not None:
                raise error
            raise RankFailedError(f"{what}: rank {self.rank} of {self.world_size} lost contact with the other ranks "
                                  f"(a rank died, or the network failed): {type(beat.error).__name__}: {beat.error}",
                                  -1) from beat.error
        try:
            return raise_if_any_failed(error, what, group=self.group, payload=payload)
        except BaseException as e:
            if e is error:
                _record_for_torchrun(e)
            raise


def _env_world(env: Mapping[str, str]) -> int:
    text = env.get("WORLD_SIZE", "").strip()
    try:
        return int(text) if text else 1
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an int, got {text!r}") from None


@contextmanager
def join(cpu: bool = False, timeout: timedelta | None = None, env: Mapping[str, str] | None = None):
    """The Team of this process. Alone (Team()) when WORLD_SIZE is unset or 1; under torchrun, this
    rank of the job: its device is cuda:LOCAL_RANK where the host has CUDA (NCCL for the job's
    default group), else the CPU (gloo); `cpu=True` keeps it on the CPU whatever the host has.
    Joins the default process group unless the caller already did (and then leaves it on exit);
    the Team's own gloo group is always created here and destroyed on exit.
    timeout: how long a collective waits for an unresponsive rank (default: $PISSA_FAST_DIST_TIMEOUT
    seconds, else 10 minutes)."""
    env = os.environ if env is None else env
    owns = not (dist.is_available() and dist.is_initialized())
    if owns and _env_world(env) <= 1:
        yield Team()
        return
    timeout = timeout_from_env(env) if timeout is None else timeout
    if owns:
        launch = from_env(env, cuda_count=0 if cpu else None)
        init(launch, timeout=timeout)
        local, device = launch.local_rank, launch.device
    else:  # the caller's job (a training script that calls us): its ranks, this host's devices
        local = int(env.get("LOCAL_RANK", "").strip() or 0)
        device, _ = device_and_backend(local, 0 if cpu else None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        yield Team()
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        local_world = int(env.get("LOCAL_WORLD_SIZE", "").strip() or world)
        yield Team(rank, world, local, local_world, group, device=device)
    finally:
        dist.destroy_process_group(group)
        if owns:
            dist.destroy_process_group()
