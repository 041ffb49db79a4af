"""`pissa_fast.init_checkpoint`: PiSSA-initialize a transformers checkpoint on disk, streaming.

    plan    source folder (or Hub snapshot), headers, model skeleton, targets (peft's matching)
    run     ShardJobs through the pipeline: read -> transform -> write, overlapped (pipeline.py)
    finish  adapter + residual extras in staging, then the pairing-safe moves into OUT (outdir.py)

Nothing is written before every input and argument is validated, the input is only read, and an
interrupted run resumes from its finished shards when the same call is made again.

Where the next steps plug in: several processes (torchrun) make the same plan (it is cheap and
deterministic), each runs `run_jobs` on its `split_by_bytes(plan.jobs, world_size)[rank]` with its
own device into the shared staging folder (one writer per shard file), and after a barrier rank 0
runs the finish step. Another per-group computation (QPiSSA) is another `transform`.
"""
from __future__ import annotations

import math
import numbers
import os
import resource
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..hf.checkpoint import Checkpoint, open_checkpoint, resolve_source
from ..io.staging import inside
from ..options import format_bytes, parse_niter, parse_size, progress_enabled
from ..pairing import ADAPTER_DIR, STAGING
from . import outdir
from .pipeline import RESIDUAL, run_jobs, shard_done
from .plan import make_plan
from .speculate import Speculator, guess_targets, usable
from .transform import PissaTransform

DEFAULT_MAX_MEMORY = 2 << 30
RUN_KEY_VERSION = 2


@dataclass
class InitResult:
    """What init_checkpoint did. str(result) is the report the CLI prints."""
    out: str
    model_class: str
    loader: str  # the class whose from_pretrained(out) builds model_class (an Auto class when one does)
    layers: int
    shards: int
    shards_resumed: int
    seconds: dict  # total, plan, decompose, read_wait, write_drain, finish
    max_loaded: int
    max_memory: int
    scaling: float
    settings: str
    errors: list = field(default_factory=list)  # (module, ErrorReport) for the sampled layers
    notes: list = field(default_factory=list)
    trust_remote_code: bool = False
    early_layers: int = 0  # decomposed while the plan was made

    @property
    def adapter(self) -> str:
        return os.path.join(self.out, ADAPTER_DIR)

    def load_code(self, trainable: bool = True) -> str:
        """The exact code that loads the residual with its adapter."""
        trc = ", trust_remote_code=True" if self.trust_remote_code else ""
        tr = ", is_trainable=True" if trainable else ""
        return (f"from transformers import {self.loader}\n"
                f"from peft import PeftModel\n"
                f"model = {self.loader}.from_pretrained({self.out!r}{trc})\n"
                f"model = PeftModel.from_pretrained(model, {self.out!r}, subfolder={ADAPTER_DIR!r}{tr})")

    def __str__(self) -> str:
        s = self.seconds
        lines = [f"pissa-fast init: {self.layers} layers of {self.model_class} in {self.shards} shard(s)"
                 + (f" ({self.shards_resumed} finished by an earlier, interrupted run)" if self.shards_resumed else ""),
                 f"  {self.settings}",
                 f"  time {s['total']:.1f} s: planning {s['plan']:.1f} s (model skeleton, targets), decomposition "
                 f"{s['decompose']:.1f} s ({self.early_layers} layers during planning), waiting for reads "
                 f"{s['read_wait']:.1f} s, for writes "
                 f"{s['write_drain']:.1f} s, finishing {s['finish']:.1f} s",
                 f"  peak memory: {format_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} RSS, "
                 f"weights in memory at once {format_bytes(self.max_loaded)} (bound {format_bytes(self.max_memory)})"]
        if self.errors:
            lines.append(f"  error vs exact SVD on {len(self.errors)} sampled layer(s) (l1 = mean |A-A*|,|B-B*| after "
                         f"sign alignment; rel_recon = |BA - W_r|/|W_r|; excess = |W - BA|/|W - W_r| - 1):")
            for name, e in self.errors:
                lines.append(f"    {name}: l1 {e.l1:.3e}  rel_recon {e.rel_recon:.3e}  excess {e.excess:.3e}  "
                             f"sv_rel {e.sv_rel:.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  wrote {self.out}/ (the residual model) and {self.adapter}/ (the PiSSA adapter); to train:"]
        lines += ["      " + ln for ln in self.load_code().splitlines()]
        lines.append(f"  check that an adapter sits on its residual: pissa-fast verify {self.out}")
        return "\n".join(lines)


@contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit in the main thread, so unfinished files are removed on the way out."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _threads(n):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _spare_core(device: torch.device) -> bool:
    """Is there a core for the planning thread while the decomposition runs? Always on a GPU; on the
    CPU only when torch uses fewer threads than there are cores: otherwise the two would take turns
    on the same cores (and OpenMP's barriers wait on a descheduled thread), which costs more than the
    overlap gains. The thread count itself is never changed for this: results depend on it."""
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise CheckpointError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _device(spec) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device {spec!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        from .. import build_info

        if not torch.cuda.is_available():
            raise CheckpointError(f"device {spec}: CUDA is not available")
        if not build_info().startswith("cuda"):
            raise CheckpointError(f"device {spec}: pissa_fast was built without CUDA ({build_info()})")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cpu":
        raise CheckpointError(f"device {spec}: only cpu and cuda are supported")
    return device


def _target_spec(target_modules):
    if isinstance(target_modules, str):
        if not target_modules.strip():
            raise CheckpointError("target_modules is empty")
        return target_modules.strip()
    if isinstance(target_modules, (list, tuple, set)) and target_modules \
            and all(isinstance(t, str) and t.strip() for t in target_modules):
        return sorted({t.strip() for t in target_modules}) if isinstance(target_modules, set) \
            else [t.strip() for t in target_modules]
    raise CheckpointError(f"target_modules must be a list of module-name suffixes, a regex string or 'all-linear' "
                          f"(as in peft's LoraConfig), got {target_modules!r}")


def run_key(ckpt: Checkpoint, spec, transform) -> dict:
    """What makes two runs the same run (then the second resumes the first)."""
    files = []
    for s in ckpt.shards:
        st = os.stat(os.path.join(ckpt.root, s))
        files.append([s, st.st_size, st.st_mtime_ns])
    return {"tool": "pissa_fast init", "version": RUN_KEY_VERSION, "source": ckpt.name,
            "root": os.path.realpath(ckpt.root), "files": files, "target_modules": spec,
            "transform": transform.run_key()}


def init_checkpoint(model: str, out: str, *, target_modules, r: int = 16, lora_alpha: float | None = None,
                    niter: int | None = 4, use_rslora: bool = False, seed: int = 0, device="cpu",
                    max_memory=DEFAULT_MAX_MEMORY, overwrite: bool = False, trust_remote_code: bool = False,
                    revision: str | None = None, cache_dir: str | None = None, token=None, report_error: int = 0,
                    threads: int | None = None, progress: bool | None = None) -> InitResult:
    """PiSSA-initialize the checkpoint `model` (a folder, or a Hugging Face Hub id resolved through the
    local cache, which works offline) into `out`: the residual model at `out` (every file and folder of
    the source, the weights replaced by W - B A in their own dtype, same shards and index) and the
    adapter at `out`/pissa_init (peft's format; init_lora_weights=True, so loading it runs no SVD).

    target_modules: as peft's LoraConfig takes it: a list of module-name suffixes, a regex string
        (full match), or "all-linear"; matched by peft on the class config.json names.
    r, lora_alpha (default r), use_rslora: the adapter's; scaling = lora_alpha / r (/ sqrt(r) with rslora).
    niter: applications of W^T W (an int, or None / "exact" for the exact SVD); seed: the test matrices'.
    device: where to decompose ("cpu", "cuda", "cuda:N"). max_memory: bytes of weights in memory at
        once (int or text like "2GiB"). threads: torch threads while decomposing (default: torch's).
    overwrite: write into a non-empty `out` (same-named files replaced, old weight files removed).
    report_error: measure the error against the exact SVD on this many layers (slow: full SVDs).
    Raises CheckpointError (before writing anything) for bad inputs or arguments.
    """
    t_start = time.perf_counter()
    r = _int("r", r, 1)
    alpha = r if lora_alpha is None else lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"lora_alpha must be a number > 0, got {lora_alpha!r}")
    lora_alpha = float(alpha)
    try:
        niter = parse_niter(niter)
        max_memory = parse_size(max_memory)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    seed = _int("seed", seed, 0)
    report_error = _int("report_error", report_error, 0)
    if threads is not None:
        threads = _int("threads", threads, 1)
    spec = _target_spec(target_modules)
    dev = _device(device)
    from ..core import decompose_many  # noqa: F401  (fails here, not mid-run, without the compiled library)

    root = resolve_source(os.fspath(model), revision=revision, cache_dir=cache_dir, token=token)
    out = os.fspath(out)
    if inside(out, root) or inside(root, out):
        raise CheckpointError(f"OUT {out} and MODEL {root} must not contain each other (the input is only read)")
    ckpt = open_checkpoint(root, os.fspath(model))
    transform = PissaTransform(r=r, lora_alpha=lora_alpha, niter=niter, use_rslora=use_rslora, seed=seed, device=dev)
    key = run_key(ckpt, spec, transform)
    state = outdir.check_out_dir(out, key, overwrite)
    progress = progress_enabled() if progress is None else progress
    settings = (f"r={r} lora_alpha={lora_alpha:g} scaling={transform.scaling:g}{' (rslora)' if use_rslora else ''} "
                f"niter={'exact' if niter is None else niter} seed={seed} device={dev}")
    seconds = dict(plan=0.0, decompose=0.0, read_wait=0.0, write_drain=0.0, finish=0.0)

    if state == outdir.MOVING:  # both outputs were complete: only the final renames are left
        staging = outdir.prepare(out, key, state)
        done = outdir.staged_summary(staging)
        outdir.move_into_place(staging, out, os.path.join(staging, RESIDUAL))
        seconds["total"] = time.perf_counter() - t_start
        return InitResult(out, done["model_class"], done["loader"], done["layers"], len(ckpt.shards),
                          len(ckpt.shards), seconds, 0, max_memory, transform.scaling, settings,
                          notes=["an interrupted run had finished everything but the final moves: done now"],
                          trust_remote_code=trust_remote_code)

    from ..hf.skeleton import build_skeleton
    from ..hf.targets import plan_targets

    staging = os.path.join(out, STAGING)
    done = {s for s in ckpt.shards if state == "resume" and shard_done(staging, s)}
    with _sigterm_as_exit(), _threads(threads):
        # the likely targets decompose in a second thread while transformers and peft load
        guesses = [] if report_error or not _spare_core(dev) else guess_targets(ckpt, spec, r, skip_shards=done)
        early_run = Speculator(ckpt, guesses, transform, max_bytes=max_memory // 2).start()
        try:
            skel = build_skeleton(root, trust_remote_code=trust_remote_code)
            tplan = plan_targets(ckpt, skel, spec, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
        finally:
            early = early_run.finish()
        plan = make_plan(ckpt, tplan, transform.residual_code, max(1, max_memory // 2))
        if report_error:
            n = len(tplan.targets)
            k = min(n, report_error)
            transform.report_error = frozenset(tplan.targets[round(i * (n - 1) / max(1, k - 1))].key
                                               for i in range(k))
        seconds["plan"] = time.perf_counter() - t_start

        staging = outdir.prepare(out, key, state)
        todo = [j for j in plan.jobs if j.shard not in done]
        early = usable(early, [t for j in todo for t in j.targets])
        n_early = len(early)
        stats = run_jobs(todo, transform, staging, max_memory=max_memory, progress=progress, early=early)
        t_finish = time.perf_counter()
        from .finalize import write_adapter, write_residual_extras

        write_adapter(plan, staging, key, revision)
        skipped = write_residual_extras(plan, staging)
        residual_dir = os.path.join(staging, RESIDUAL)
        outdir.mark_moving(staging, residual_dir, {"model_class": skel.class_name, "loader": skel.loader,
                                                   "layers": len(tplan.targets)})
        outdir.move_into_place(staging, out, residual_dir)
    seconds.update(decompose=transform.seconds, read_wait=stats.wait_s, write_drain=stats.drain_s,
                   finish=time.perf_counter() - t_finish, total=time.perf_counter() - t_start)
    notes = tplan.notes + [f"left out {name}: {why}" for name, why in skipped]
    return InitResult(out, skel.class_name, skel.loader, len(tplan.targets), len(plan.jobs),
                      len(plan.jobs) - len(todo), seconds, stats.max_loaded, max_memory, transform.scaling, settings,
                      errors=transform.errors, notes=notes, trust_remote_code=trust_remote_code,
                      early_layers=n_early)
