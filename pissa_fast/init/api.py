"""`pissa_fast.init_checkpoint`: PiSSA-initialize a transformers checkpoint on disk, streaming.

    plan    source folder (or Hub snapshot), headers, model skeleton, targets (peft's matching)
    run     ShardJobs through the pipeline: read -> transform -> write, overlapped (pipeline.py)
    finish  adapter + residual extras in staging, then the pairing-safe moves into OUT (outdir.py)

Nothing is written before every input and argument is validated, the input is only read, and an
interrupted run resumes from its finished shards when the same call is made again.

Under torchrun (WORLD_SIZE > 1) every rank makes the same plan (it is cheap and deterministic), runs
`run_jobs` on its share of the shards (split by bytes) on its own device into the shared staging
folder (one writer per shard file), and rank 0 runs the finish step once every rank is done; the
steps run on a pissa_fast.distributed.team.Team, which makes a failure on any rank fail them all
(see _Run). Another per-group computation (QPiSSA) is another `transform`.
"""
from __future__ import annotations

import math
import numbers
import os
import resource
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..hf.checkpoint import Checkpoint, open_checkpoint, resolve_source
from ..io.staging import inside, write_text
from ..options import format_bytes, parse_niter, parse_size, progress_enabled
from ..pairing import ADAPTER_DIR, STAGING
from . import outdir
from .pipeline import RESIDUAL, run_jobs, shard_done
from .plan import make_plan, split_shards
from .speculate import Speculator, guess_targets, usable
from .transform import PissaTransform, QPissaTransform

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
    early_layers: int = 0  # decomposed while the plan was made (on this rank)
    rank: int = 0  # under torchrun: this rank (rank 0 reports the run), and the number of ranks
    world_size: int = 1
    per_rank: list = field(default_factory=list)  # under torchrun: {shards, bytes, layers, decompose, seconds, host}
    quantization: dict | None = None  # QPiSSA: pissa_fast.quant.settings (BitsAndBytesConfig arguments, dtype)
    quant_errors: dict = field(default_factory=dict)  # QPiSSA: module -> ||W - (R + B A)||_F / ||W||_F

    @property
    def adapter(self) -> str:
        return os.path.join(self.out, ADAPTER_DIR)

    def load_code(self, trainable: bool = True) -> str:
        """The exact code that loads the residual with its adapter (QPiSSA: the residual in 4-bit, with
        the BitsAndBytesConfig and dtype it was quantized for; any other loads different weights)."""
        trc = ", trust_remote_code=True" if self.trust_remote_code else ""
        tr = ", is_trainable=True" if trainable else ""
        peft_line = f"model = PeftModel.from_pretrained(model, {self.out!r}, subfolder={ADAPTER_DIR!r}{tr})"
        if self.quantization is None:
            return (f"from transformers import {self.loader}\n"
                    f"from peft import PeftModel\n"
                    f"model = {self.loader}.from_pretrained({self.out!r}{trc})\n" + peft_line)
        from ..quant.nf4 import QuantSpec

        q = self.quantization
        spec = QuantSpec(q["bnb_config"]["bnb_4bit_quant_type"], q["blocksize"],
                         q["bnb_config"]["bnb_4bit_use_double_quant"])
        return (f"import torch\n"
                f"from transformers import {self.loader}, BitsAndBytesConfig\n"
                f"from peft import PeftModel\n"
                f"bnb = {spec.bnb_config_code()}\n"
                f"model = {self.loader}.from_pretrained({self.out!r}, quantization_config=bnb, "
                f"dtype=torch.{q['dtype']}{trc})\n" + peft_line)

    def __str__(self) -> str:
        s = self.seconds
        if self.rank != 0:
            return (f"pissa-fast init: rank {self.rank} of {self.world_size} done ({s['total']:.1f} s, decomposition "
                    f"{s['decompose']:.1f} s); rank 0 reports the run")
        lines = [f"pissa-fast init: {self.layers} layers of {self.model_class} in {self.shards} shard(s)"
                 + (f" ({self.shards_resumed} finished by an earlier, interrupted run)" if self.shards_resumed else ""),
                 f"  {self.settings}",
                 f"  time {s['total']:.1f} s: planning {s['plan']:.1f} s (model skeleton, targets), decomposition "
                 f"{s['decompose']:.1f} s ({self.early_layers} layers during planning), waiting for reads "
                 f"{s['read_wait']:.1f} s, for writes "
                 f"{s['write_drain']:.1f} s, finishing {s['finish']:.1f} s",
                 f"  peak memory: {format_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} RSS, "
                 f"weights in memory at once {format_bytes(self.max_loaded)} (bound {format_bytes(self.max_memory)})"]
        if self.per_rank:
            def span(vals, fmt):
                lo, hi = fmt(min(vals)), fmt(max(vals))
                return lo if lo == hi else f"{lo} to {hi}"
            ranks = self.per_rank
            hosts = len({x["host"] for x in ranks})
            lines.append(f"  {self.world_size} ranks on {hosts} host(s) (rank 0's numbers above), per rank: "
                         f"{span([len(x['shards']) for x in ranks], str)} shard(s), "
                         f"{span([x['bytes'] for x in ranks], format_bytes)}, decomposition "
                         f"{span([x['decompose'] for x in ranks], lambda v: f'{v:.1f} s')}, done after "
                         f"{span([x['seconds'] for x in ranks], lambda v: f'{v:.1f} s')}")
        if self.errors:
            lines.append(f"  error vs exact SVD on {len(self.errors)} sampled layer(s) (l1 = mean |A-A*|,|B-B*| after "
                         f"sign alignment; rel_recon = |BA - W_r|/|W_r|; excess = |W - BA|/|W - W_r| - 1):")
            for name, e in self.errors:
                lines.append(f"    {name}: l1 {e.l1:.3e}  rel_recon {e.rel_recon:.3e}  excess {e.excess:.3e}  "
                             f"sv_rel {e.sv_rel:.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.quantization is None:
            lines += [f"  wrote {self.out}/ (the residual model) and {self.adapter}/ (the PiSSA adapter); to train:"]
        else:
            from ..quant.settings import SETTINGS_FILE

            lines += [f"  wrote {self.out}/ (the residual model, bf16 and exactly 4-bit representable) and "
                      f"{self.adapter}/ (the QPiSSA adapter, with the quantization settings in "
                      f"{SETTINGS_FILE}); load the residual in 4-bit with exactly this config, then train:"]
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


def _spare_core(device: torch.device, processes: int = 1) -> bool:
    """Is there a core for the planning thread while the decomposition runs? Always on a GPU; on the
    CPU only when torch uses fewer threads than there are cores (counting the `processes` ranks on
    this host): otherwise the two would take turns on the same cores (and OpenMP's barriers wait on a
    descheduled thread), which costs more than the overlap gains. The thread count itself is never
    changed for this: results depend on it."""
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads() * processes


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


QUANTIZE_CHOICES = ("nf4", "fp4")
DEFAULT_QPISSA_ITERS = 5


def _make_transform(*, r, lora_alpha, niter, use_rslora, seed, device, report_error, quantize, qpissa_iters,
                    quant_blocksize, double_quant, qpissa_start=None, qpissa_scales=None):
    """PiSSA, or QPiSSA when `quantize` is given; every QPiSSA argument is checked here, before anything
    is written (a QPiSSA-only argument without quantize is an error, not silently ignored)."""
    if quantize is None:
        given = [n for n, v, default in (("qpissa_iters", qpissa_iters, None), ("double_quant", double_quant, False),
                                         ("quant_blocksize", quant_blocksize, None), ("qpissa_start", qpissa_start, None),
                                         ("qpissa_scales", qpissa_scales, None)) if v != default]
        if given:
            raise CheckpointError(f"{', '.join(given)} only apply with quantize='nf4' (or 'fp4'): QPiSSA")
        return PissaTransform(r=r, lora_alpha=lora_alpha, niter=niter, use_rslora=use_rslora, seed=seed,
                              device=device)
    if quantize not in QUANTIZE_CHOICES:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (bitsandbytes' 4-bit "
                              f"formats), got {quantize!r}")
    iters = _int("qpissa_iters", DEFAULT_QPISSA_ITERS if qpissa_iters is None else qpissa_iters, 1)
    if not isinstance(double_quant, bool):
        raise CheckpointError(f"double_quant must be a bool, got {double_quant!r}")
    if quant_blocksize is not None and quant_blocksize != 64:
        raise CheckpointError(f"quant_blocksize {quant_blocksize!r}: transformers' BitsAndBytesConfig has no "
                              f"blocksize option and always quantizes with 64, so a residual fitted to another "
                              f"blocksize would not load as fitted; use 64 (pissa_fast.qpissa_many(..., "
                              f"blocksize=N) serves other loaders)")
    if report_error:
        raise CheckpointError("report_error measures the factors against the exact SVD of W, which QPiSSA's "
                              "factors (fitted to W - R) are not: leave it out with quantize (init reports "
                              "QPiSSA's quantization error of every layer instead)")
    from ..quant import QuantSpec
    from ..quant.nf4 import bnb_functional
    from ..quant.qpissa import SCALES, STARTS

    if qpissa_start is not None and qpissa_start not in STARTS:
        raise CheckpointError(f"qpissa_start must be one of {', '.join(sorted(STARTS))}, got {qpissa_start!r}")
    if qpissa_scales is not None and qpissa_scales not in SCALES:
        raise CheckpointError(f"qpissa_scales must be one of {', '.join(SCALES)}, got {qpissa_scales!r}")

    try:
        bnb_functional()
    except ImportError as e:
        raise CheckpointError(str(e)) from None
    return QPissaTransform(r=r, lora_alpha=lora_alpha, iters=iters, niter=niter, use_rslora=use_rslora, seed=seed,
                           spec=QuantSpec(quantize, 64, double_quant), start=qpissa_start, scales=qpissa_scales,
                           device=device)


def _quant_errors(transform, targets) -> dict:
    """QPiSSA's error of every target this process computed (not guesses the plan dropped)."""
    if not isinstance(transform, QPissaTransform):
        return {}
    return {t.module: transform.errors[t.module] for t in targets if t.module in transform.errors}


def _quant_settings(transform) -> str:
    if not isinstance(transform, QPissaTransform):
        return ""
    spec = transform.spec
    return (f" quantize={spec.quant_type}{' double_quant' if spec.double_quant else ''} qpissa_iters={transform.iters} "
            f"start={transform.start} scales={transform.scales}")


def _quant_notes(transform, errs: dict) -> list:
    if not errs:
        return []
    worst = max(errs, key=errs.get)
    spec = transform.spec
    notes = [f"QPiSSA error ||W - (R + B A)||_F / ||W||_F over {len(errs)} layer(s): mean "
             f"{sum(errs.values()) / len(errs):.4g}, largest {errs[worst]:.4g} ({worst}); R is "
             f"{spec.quant_type}{' with double quantization' if spec.double_quant else ''}, blocksize "
             f"{spec.blocksize}, after {transform.iters} round(s)"]
    inexact = sorted(m for m in transform.inexact if m in errs)
    if inexact:
        notes.append(f"{len(inexact)} residual(s) would move by ~1e-4 of their norm when loaded (double quantization's "
                     f"statistics did not settle): {', '.join(inexact[:4])}{', ...' if len(inexact) > 4 else ''}")
    return notes


def run_key(ckpt: Checkpoint, spec, transform) -> dict:
    """What makes two runs the same run (then the second resumes the first)."""
    files = []
    for s in ckpt.shards:
        st = os.stat(os.path.join(ckpt.root, s))
        files.append([s, st.st_size, st.st_mtime_ns])
    return {"tool": "pissa_fast init", "version": RUN_KEY_VERSION, "source": ckpt.name,
            "root": os.path.realpath(ckpt.root), "files": files, "target_modules": spec,
            "transform": transform.run_key()}


class _Run:
    """One rank's part of init_checkpoint, as the steps of a Team (one process: a team of one):

        read    every rank: arguments, MODEL's headers, the transform; rank 0 also checks OUT
        plan    every rank: model skeleton and targets (cheap, deterministic: the same plan everywhere),
                while this rank's own likely targets already decompose
        stage   rank 0: the staging folder (new, or the interrupted run's, cleaned)
        work    every rank: its shards (split by bytes) through the pipeline into staging
        finish  rank 0: adapter (every rank's staged factors merged), index, config, the final moves

    Each step ends with every rank knowing whether any rank failed; ranks compare what they read
    (MODEL's shards, the settings, the plan) and refuse to go on when they differ.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.seconds = dict(plan=0.0, decompose=0.0, read_wait=0.0, write_drain=0.0, finish=0.0)
        self.skipped: list = []

    # -- the steps ---------------------------------------------------------------------------------
    def go(self, team) -> InitResult:
        self.team = team
        read = team.step("reading MODEL and checking OUT", self.read)
        _agree(team, "MODEL's files and the settings", [x["agree"] for x in read])
        self.state, self.done = read[0]["state"], read[0]["done"]
        self.staging = os.path.join(self.out, STAGING)
        if self.state == outdir.MOVING:  # both outputs were complete: only the final renames are left
            summary = team.step("moving the finished outputs into place", self.only_moves, on=[0])[0]
            return self.result_moved(summary)
        todo = [s for s in self.ckpt.shards if s not in self.done]
        self.mine = set(split_shards([(s, self.ckpt.header(s).data_bytes) for s in todo], team.world_size)[team.rank])
        _agree(team, "the plan (the targets of the model class)", team.step("planning", self.plan))
        token = team.step("preparing OUT", self.stage, on=[0])[0]
        ranks = team.step("decomposing", lambda: self.work(token))
        t_finish = time.perf_counter()
        team.step("writing the adapter and the rest of the residual model", lambda: self.finish(ranks), on=[0])
        self.seconds["finish"] = time.perf_counter() - t_finish
        return self.result(ranks)

    def read(self) -> dict:
        self.dev = _device(self.device_spec())
        root = resolve_source(self.model, revision=self.revision, cache_dir=self.cache_dir, token=self.token)
        if inside(self.out, root) or inside(root, self.out):
            raise CheckpointError(f"OUT {self.out} and MODEL {root} must not contain each other (the input is only "
                                  f"read)")
        self.ckpt = open_checkpoint(root, self.model)
        self.transform = self.make_transform(self.dev)
        self.key = run_key(self.ckpt, self.spec, self.transform)
        state = done = None
        if self.team.rank == 0:
            state = outdir.check_out_dir(self.out, self.key, self.overwrite)
            staging = os.path.join(self.out, STAGING)
            done = [s for s in self.ckpt.shards if state == "resume" and shard_done(staging, s)]
        files = [[s, self.ckpt.header(s).data_bytes,
                  [[i.name, i.dtype, list(i.shape)] for i in self.ckpt.header(s).tensors.values()]]
                 for s in self.ckpt.shards]
        return {"agree": {"files": files, "target_modules": self.spec, "transform": self.transform.run_key()},
                "state": state, "done": done}

    def plan(self) -> list:
        from ..hf.skeleton import build_skeleton
        from ..hf.targets import plan_targets

        # this rank's likely targets decompose in a second thread while transformers and peft load
        # ranks on this host each run torch's threads; one process keeps the one-argument call, which
        # tests replace with a one-argument stand-in
        sharing = self.team.local_world_size
        spare = not self.report_error and (_spare_core(self.dev, sharing) if sharing > 1 else _spare_core(self.dev))
        others = set(self.ckpt.shards) - self.mine
        guesses = guess_targets(self.ckpt, self.spec, self.r, skip_shards=others) if spare else []
        early_run = Speculator(self.ckpt, guesses, self.transform, max_bytes=self.max_memory // 2).start()
        try:
            self.skel = build_skeleton(self.ckpt.root, trust_remote_code=self.trust_remote_code)
            self.tplan = tplan = plan_targets(self.ckpt, self.skel, self.spec, r=self.r, lora_alpha=self.lora_alpha,
                                              use_rslora=self.use_rslora)
        finally:
            self.early = early_run.finish()
        self.plan_ = make_plan(self.ckpt, tplan, self.transform.residual_code, max(1, self.max_memory // 2))
        if self.report_error:
            n = len(tplan.targets)
            k = min(n, self.report_error)
            self.transform.report_error = frozenset(tplan.targets[round(i * (n - 1) / max(1, k - 1))].key
                                                    for i in range(k))
        self.seconds["plan"] = time.perf_counter() - self.t_start
        return [[t.key, t.module, t.transposed, list(t.adapter_keys)] for t in tplan.targets]

    def stage(self):
        staging = outdir.prepare(self.out, self.key, self.state)
        return outdir.write_team(staging, self.team.world_size) if self.team.distributed else None

    def work(self, token) -> dict:
        team = self.team
        if team.distributed and team.rank != 0:
            outdir.check_team(self.staging, token, team.rank)
        jobs = [j for j in self.plan_.jobs if j.shard in self.mine]
        early = usable(self.early, [t for j in jobs for t in j.targets])
        self.early = {}
        self.n_early = len(early)
        desc = f"pissa-fast init (rank 0's share of {team.world_size})" if team.distributed else "pissa-fast init"
        self.stats = stats = run_jobs(jobs, self.transform, self.staging, max_memory=self.max_memory,
                                      progress=self.progress and team.rank == 0, early=early,
                                      cancel=team.cancelled if team.distributed else None, desc=desc)
        self.seconds.update(decompose=self.transform.seconds, read_wait=stats.wait_s, write_drain=stats.drain_s)
        return {"shards": [j.shard for j in jobs], "bytes": sum(j.nbytes for j in jobs), "layers": stats.layers,
                "decompose": self.transform.seconds, "seconds": time.perf_counter() - self.t_start,
                "host": socket.gethostname(), "errors": self.transform.errors,
                "quant_errors": _quant_errors(self.transform, self.tplan.targets),
                "inexact": sorted(getattr(self.transform, "inexact", ()))}

    def finish(self, ranks: list) -> None:
        from .finalize import write_adapter, write_residual_extras

        if self.team.distributed:  # other hosts' files may take a moment to show on a network filesystem
            outdir.wait_visible(self.staging, [s for x in ranks for s in x["shards"]],
                                lambda s: shard_done(self.staging, s))
        write_adapter(self.plan_, self.staging, self.key, self.revision)
        for name, text in self.transform.adapter_files().items():  # QPiSSA: the quantization settings
            write_text(os.path.join(self.staging, outdir.STAGED_ADAPTER, name), text)
        self.skipped = write_residual_extras(self.plan_, self.staging)
        residual_dir = os.path.join(self.staging, RESIDUAL)
        outdir.mark_moving(self.staging, residual_dir, {"model_class": self.skel.class_name,
                                                        "loader": self.skel.loader, "layers": len(self.tplan.targets)})
        outdir.move_into_place(self.staging, self.out, residual_dir)

    def only_moves(self) -> dict:
        staging = outdir.prepare(self.out, self.key, self.state)
        summary = outdir.staged_summary(staging)
        outdir.move_into_place(staging, self.out, os.path.join(staging, RESIDUAL))
        return summary

    # -- helpers -----------------------------------------------------------------------------------
    def quantization(self) -> dict | None:
        return self.transform.settings() if isinstance(self.transform, QPissaTransform) else None

    def device_spec(self) -> str:
        """The device of this rank: as given; under torchrun "cuda" means cuda:LOCAL_RANK, the
        default is the rank's own (cuda:LOCAL_RANK where its host has CUDA, else the CPU)."""
        team = self.team
        if self.device is None:
            return str(team.device) if team.distributed else "cpu"
        spec = str(self.device).strip()
        if team.distributed and spec.lower().startswith("cuda"):
            if spec.lower() not in ("cuda", f"cuda:{team.local_rank}"):
                raise CheckpointError(f"device {spec}: under torchrun each rank decomposes on its own GPU, "
                                      f"cuda:LOCAL_RANK; pass --device cuda (or leave it out)")
            return f"cuda:{team.local_rank}"
        return spec

    def settings(self) -> str:
        return (f"r={self.r} lora_alpha={self.lora_alpha:g} scaling={self.transform.scaling:g}"
                f"{' (rslora)' if self.use_rslora else ''} niter={'exact' if self.niter is None else self.niter} "
                f"seed={self.seed} device={self.dev}"
                + (f" ({self.team.world_size} ranks)" if self.team.distributed else "") + _quant_settings(self.transform))

    def result_moved(self, summary) -> InitResult:
        self.seconds["total"] = time.perf_counter() - self.t_start
        summary = summary or {"model_class": "?", "loader": "?", "layers": 0}
        n = len(self.ckpt.shards)
        return InitResult(self.out, summary["model_class"], summary["loader"], summary["layers"], n, n, self.seconds,
                          0, self.max_memory, self.transform.scaling, self.settings(),
                          notes=["an interrupted run had finished everything but the final moves: done now"],
                          trust_remote_code=self.trust_remote_code, rank=self.team.rank,
                          world_size=self.team.world_size, quantization=self.quantization())

    def result(self, ranks: list) -> InitResult:
        self.seconds["total"] = time.perf_counter() - self.t_start
        notes = self.tplan.notes + [f"left out {name}: {why}" for name, why in self.skipped]
        quant_errors = {m: e for x in ranks for m, e in x["quant_errors"].items()}
        if isinstance(self.transform, QPissaTransform):  # every rank's, for the notes
            self.transform.inexact.update(m for x in ranks for m in x["inexact"])
            notes += _quant_notes(self.transform, quant_errors)
        errors = [] if self.quantization() else [e for x in ranks for e in x["errors"]]
        per_rank = [{k: v for k, v in x.items() if k != "errors"} for x in ranks] if self.team.distributed else []
        jobs = len(self.plan_.jobs)
        return InitResult(self.out, self.skel.class_name, self.skel.loader, len(self.tplan.targets), jobs,
                          len(self.done), self.seconds, self.stats.max_loaded, self.max_memory,
                          self.transform.scaling, self.settings(), errors=errors, notes=notes,
                          trust_remote_code=self.trust_remote_code, early_layers=self.n_early, rank=self.team.rank,
                          world_size=self.team.world_size, per_rank=per_rank, quantization=self.quantization(),
                          quant_errors=quant_errors)


def _agree(team, what: str, values: list) -> None:
    """Every rank must have read the same thing; otherwise every rank raises the same error."""
    for rank, v in enumerate(values[1:], 1):
        if v != values[0]:
            detail = ""
            if isinstance(v, dict):
                key = next(k for k in v if v[k] != values[0].get(k))
                detail = f" (they differ in {key})"
            raise CheckpointError(f"rank {rank} and rank 0 of {team.world_size} disagree on {what}{detail}: every rank "
                                  f"must run the same command on the same MODEL (same files on every host, same "
                                  f"pissa_fast, transformers and peft)")


def init_checkpoint(model: str, out: str, *, target_modules, r: int = 16, lora_alpha: float | None = None,
                    niter: int | None = 4, use_rslora: bool = False, seed: int = 0, device=None,
                    max_memory=DEFAULT_MAX_MEMORY, overwrite: bool = False, trust_remote_code: bool = False,
                    revision: str | None = None, cache_dir: str | None = None, token=None, report_error: int = 0,
                    threads: int | None = None, progress: bool | None = None, quantize: str | None = None,
                    qpissa_iters: int | None = None, quant_blocksize: int | None = None,
                    double_quant: bool = False, qpissa_start: str | None = None,
                    qpissa_scales: str | None = None) -> InitResult:
    """PiSSA-initialize the checkpoint `model` (a folder, or a Hugging Face Hub id resolved through the
    local cache, which works offline) into `out`: the residual model at `out` (every file and folder of
    the source, the weights replaced by W - B A in their own dtype, same shards and index) and the
    adapter at `out`/pissa_init (peft's format; init_lora_weights=True, so loading it runs no SVD).

    target_modules: as peft's LoraConfig takes it: a list of module-name suffixes, a regex string
        (full match), or "all-linear"; matched by peft on the class config.json names.
    r, lora_alpha (default r), use_rslora: the adapter's; scaling = lora_alpha / r (/ sqrt(r) with rslora).
    niter: applications of W^T W (an int, or None / "exact" for the exact SVD); seed: the test matrices'
        (each weight's from distributed.weight_seed(seed, its name)).
    device: where to decompose ("cpu", "cuda", "cuda:N"); default the CPU, and under torchrun each
        rank's own device (cuda:LOCAL_RANK where its host has CUDA). max_memory: bytes of weights in
        memory at once, per rank (int or text like "2GiB"). threads: torch threads while decomposing
        (default: torch's).
    overwrite: write into a non-empty `out` (same-named files replaced, old weight files removed).
    report_error: measure the error against the exact SVD on this many layers (slow: full SVDs).
    quantize ("nf4" or "fp4"): QPiSSA (needs bitsandbytes: pip install 'pissa_fast[quant]'). The residual
        is written in bf16 and is exactly representable in that bitsandbytes 4-bit format: loaded with
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=
        double_quant) and dtype=torch.bfloat16 it gives back bit for bit the R the adapter was fitted to
        (result.load_code() has the code; the settings are in OUT/pissa_init/pissa_fast_quantization.json,
        pissa_fast.quant.bnb_config(OUT) rebuilds the config). qpissa_iters: QPiSSA's rounds (default 5).
        quant_blocksize: only 64, the blocksize transformers loads with. double_quant: bnb's nested
        quantization of the block scales. qpissa_start ("pissa", "quantized" or "best") and
        qpissa_scales ("search" or "absmax"): pissa_fast.qpissa's start and scales (default: its own,
        pissa_fast.quant.qpissa.DEFAULT_START / DEFAULT_SCALES).
    Raises CheckpointError (before writing anything) for bad inputs or arguments.

    Under torchrun (WORLD_SIZE > 1) every rank makes this same call and `out` must be on a filesystem
    every rank shares: each output shard is written by one rank (shards balanced by bytes), rank 0
    writes the rest. The files are bit for bit those of one process with the same threads per rank.
    A failure on any rank fails every rank (RankFailedError quoting it, as a CheckpointError).
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
    from ..core import decompose_many  # noqa: F401  (fails here, not mid-run, without the compiled library)
    from ..distributed import RankFailedError
    from ..distributed.launch import from_env
    from ..distributed.team import join, timeout_from_env

    cpu = device is not None and str(device).strip().lower() == "cpu"
    try:
        from_env(cuda_count=0 if cpu else None)  # torchrun's variables, checked before joining the job
        timeout_from_env()
    except ValueError as e:
        raise CheckpointError(f"pissa-fast init under torchrun: {e}") from None

    def make_transform(dev: torch.device):
        return _make_transform(r=r, lora_alpha=lora_alpha, niter=niter, use_rslora=use_rslora, seed=seed, device=dev,
                               report_error=report_error, quantize=quantize, qpissa_iters=qpissa_iters,
                               quant_blocksize=quant_blocksize, double_quant=double_quant,
                               qpissa_start=qpissa_start, qpissa_scales=qpissa_scales)

    make_transform(torch.device("cpu"))  # every (Q)PiSSA argument checked here, before any rank starts

    run = _Run(model=os.fspath(model), out=os.fspath(out), spec=spec, r=r, lora_alpha=lora_alpha, niter=niter,
               use_rslora=use_rslora, seed=seed, device=device,
               make_transform=make_transform, max_memory=max_memory, overwrite=overwrite,
               trust_remote_code=trust_remote_code, revision=revision, cache_dir=cache_dir, token=token,
               report_error=report_error, progress=progress_enabled() if progress is None else progress,
               t_start=t_start)
    try:
        with join(cpu=cpu) as team, _sigterm_as_exit(), _threads(threads):
            return run.go(team)
    except RankFailedError as e:  # another rank's error, quoted; the CLI reports it as one line
        raise CheckpointError(str(e)) from e
