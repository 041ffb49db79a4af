"""Runs ShardJobs with reading and writing overlapped with the transform.

Three threads, connected by queues:

    reader  loads the next group of targeted weights (safetensors safe_open), within a byte budget
    caller  runs the transform on the current group (the native ops release the GIL)
    writer  opens each output shard as soon as its job starts, copies the untouched tensors disk to
            disk, writes residuals as they come, then the shard's factors, and commits the shard

so while one group decomposes, the next is read and the previous one written. The budget bounds
the weights in memory at once (loaded, being transformed, waiting to be written) to max_memory, or
to one tensor when a single tensor is larger. Each shard is staged under a temporary name and
renamed when complete, with its factors (and their pairing fingerprints) beside it: a rerun skips
finished shards. An error in any thread stops the others and is raised in the caller's thread;
Ctrl-C or SIGTERM there stops the workers, which remove their unfinished files, and so does `cancel`
(another rank of a torchrun job failed): checked before each group, it raises errors.Cancelled.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from .. import pairing
from ..errors import Cancelled, CheckpointError
from ..io.safetensors import ShardWriter, load_tensor, read_header, save_small

RESIDUAL = "residual"  # staging subfolders
FACTORS = "factors"
PAIRING_PART_KEY = "pissa_fast_pairing_layers"
_POLL = 0.1


def after_shard(shard: str) -> None:
    """Called (in the writer thread) after each shard is complete on disk; a hook for tests."""


def staged(staging: str, shard: str) -> tuple[str, str]:
    return os.path.join(staging, RESIDUAL, shard), os.path.join(staging, FACTORS, shard)


def shard_done(staging: str, shard: str) -> bool:
    """Both the residual shard and its factors are in staging, complete (renamed, readable)."""
    res, fac = staged(staging, shard)
    if not (os.path.isfile(res) and os.path.isfile(fac)):
        return False
    try:
        read_header(res)
        read_header(fac)
    except CheckpointError:
        return False
    return True


@dataclass
class RunStats:
    layers: int = 0
    shards: int = 0
    wait_s: float = 0.0  # the caller waiting for reads (what prefetching did not hide)
    drain_s: float = 0.0  # after the last transform, waiting for the writer to finish
    max_loaded: int = 0  # most bytes of weights in memory at once
    notes: list = field(default_factory=list)


def _take(early):
    return early.factors, early.before


class _Stop(Exception):
    """Unwinds a worker thread because another thread failed or the run was interrupted."""


class _Budget:
    """Bytes of weights in memory at once: acquire before loading, release after writing."""

    def __init__(self, cap: int, stop: threading.Event):
        self.cap, self.stop = cap, stop
        self.used = self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            while self.used and self.used + n > self.cap:
                if self.stop.is_set():
                    raise _Stop
                self._cv.wait(_POLL)
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def run_jobs(jobs: list, transform, staging: str, *, max_memory: int, progress: bool = False,
             early: dict | None = None, cancel: threading.Event | None = None, desc: str = "pissa-fast init") -> RunStats:
    """Transform and write every job into staging/residual and staging/factors. See the module doc.
    early: {key: speculate.Early} of targets already transformed (they count against max_memory
    until written); consumed: each entry is removed as it is used, so its memory goes with it.
    cancel: when set (by another thread), the run stops before its next group and raises Cancelled;
    the shards finished so far stay in staging."""
    early = early if early is not None else {}
    early_keys = frozenset(early)  # the reader's view; the caller's thread pops results as it uses them
    os.makedirs(os.path.join(staging, RESIDUAL), exist_ok=True)
    os.makedirs(os.path.join(staging, FACTORS), exist_ok=True)
    stats = RunStats()
    stop = threading.Event()
    failures: list[BaseException] = []
    lock = threading.Lock()
    budget = _Budget(max_memory, stop)
    budget.used = budget.peak = sum(e.nbytes for e in early.values())
    loaded: queue.Queue = queue.Queue(maxsize=2)
    to_write: queue.Queue = queue.Queue()

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, unit_divisor=1024,
               desc=desc, disable=not progress)

    def put(q, item):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                pass

    def get(q, cancellable=False):
        while True:
            if stop.is_set():
                raise _Stop
            if cancellable and cancel is not None and cancel.is_set():
                raise Cancelled("another rank failed")
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                pass

    def guarded(fn):
        def body():
            try:
                fn()
            except (_Stop, InterruptedError):
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    failures.append(e)
                stop.set()
        return body

    def reader():
        from safetensors import safe_open

        for job in jobs:
            put(loaded, ("start", job))
            if job.groups:
                with safe_open(job.source, framework="pt") as f:
                    for group in job.groups:
                        todo = [t for t in group if t.key not in early_keys]
                        n = sum(job.header.tensors[t.key].nbytes for t in todo)
                        if todo:
                            budget.acquire(n)
                        n_early = sum(job.header.tensors[t.key].nbytes for t in group) - n
                        put(loaded, ("group", job, group, {t.key: load_tensor(f, t.key) for t in todo}, n + n_early))
            put(loaded, ("end", job))
        put(loaded, None)

    def writer():
        job = out = fd = None
        lora: dict = {}
        fps: dict = {}
        try:
            while True:
                item = get(to_write)
                if item is None:
                    return
                kind, job = item[0], item[1]
                if kind == "start":
                    lora, fps = {}, {}
                    fd = os.open(job.source, os.O_RDONLY)
                    out = ShardWriter(staged(staging, job.shard)[0], job.layout, job.header.metadata)
                    for run in job.copies():
                        out.copy(fd, run, cancel=stop)
                        bar.update(sum(i.nbytes for i in run))
                    out.flush()
                elif kind == "group":
                    _, _, group, factors, entries, n = item
                    for t in group:
                        f = factors[t.key]
                        out.write(t.key, f.residual)
                        ka, kb = t.adapter_keys
                        lora[ka], lora[kb] = f.lora_A, f.lora_B
                    fps.update(entries)
                    del factors, item, f  # drop every reference before the bytes count as free
                    budget.release(n)
                    bar.update(n)
                    out.flush()  # to disk while the next group decomposes, not all at the shard's end
                else:
                    save_small(staged(staging, job.shard)[1], lora,
                               {"format": "pt", PAIRING_PART_KEY: json.dumps(fps, separators=(",", ":"))})
                    out.commit()
                    os.close(fd)
                    out = fd = None
                    stats.shards += 1
                    after_shard(job.shard)
        finally:
            if out is not None:
                out.abort()
            if fd is not None:
                os.close(fd)

    def consume():
        while True:
            t0 = time.perf_counter()
            item = get(loaded, cancellable=True)
            stats.wait_s += time.perf_counter() - t0
            if item is None:
                put(to_write, None)
                return
            if item[0] != "group":
                put(to_write, item)
                continue
            _, job, group, weights, n = item
            targets = {t.key: t for t in group}
            rows = {k: pairing.sample_rows(t.shape[0]) for k, t in targets.items()}
            before = {k: w[rows[k]].clone() for k, w in weights.items()}
            factors = {}
            if weights:
                factors = transform(weights, {k: targets[k] for k in weights})
            for k in targets.keys() - weights.keys():
                factors[k], before[k] = _take(early.pop(k))
            entries = {t.module: pairing.entry(k, factors[k].residual.shape, transform.residual_code(t), before[k],
                                               factors[k].residual[rows[k]]) for k, t in targets.items()}
            stats.layers += len(group)
            bar.set_postfix(layers=stats.layers, refresh=False)
            del weights, item
            put(to_write, ("group", job, group, factors, entries, n))
            del factors

    threads = [threading.Thread(target=guarded(reader), name="pissa-fast-reader", daemon=True),
               threading.Thread(target=guarded(writer), name="pissa-fast-writer", daemon=True)]
    for th in threads:
        th.start()
    try:
        try:
            consume()
            t2 = time.perf_counter()
            while threads[1].is_alive() and not stop.is_set():
                threads[1].join(_POLL)
            stats.drain_s = time.perf_counter() - t2
        except _Stop:  # a worker failed: its error is raised below
            pass
    except BaseException:
        stop.set()
        raise
    finally:
        if failures or any(th.is_alive() for th in threads):
            stop.set()
        for th in threads:
            th.join()
        bar.close()
    if failures:
        raise failures[0]
    stats.max_loaded = budget.peak
    return stats
