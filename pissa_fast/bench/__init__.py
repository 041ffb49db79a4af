"""`pissa-fast bench`: pissa_fast.decompose against peft's PiSSA init path, niter x rank, time and error.

For every sampled weight W and every (niter, r) of the grid it times (median of --repeats runs after
--warmup untimed ones, residual included) pissa_fast.decompose and the peft path side by side, and
measures both against the exact float64 SVD of W (computed once per weight, off the clock) with
pissa_fast.error_vs_exact. niter "inf" is the exact torch.linalg.svd path of each, timed once per
weight at the largest r (its factors at smaller r are the same SVD truncated).

Prints the tables (time, errors, ratios pissa_fast / peft) and writes --out DIR: results.json (the
environment and every measurement), report.md (the tables, the machine, the date, the command) and
PNG plots (time vs niter, error vs niter, error vs time). With --device cuda (and --whole-model) it
also times whole-model initializations: one decompose_many(..., inplace=True) call over every weight
of the model against the peft path layer by layer.

Workloads (pissa_fast.bench.workload): synthetic weights shaped like a named model (llama-2-7b,
mistral-7b, gemma-7b, llama-small, tiny), one shape (--shape 4096x4096), or the projection weights of a
local safetensors checkpoint (--model PATH).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time

import torch

from . import report as rep
from .measure import INF, Runner, sync, truncated, whole_model
from .workload import MODELS, SPECTRA, MatrixSpec, Workload, checkpoint_model, materialize, named_model, \
    parse_dtype

# The default run: one weight of llama-2-7b's most common shape (q/k/v/o, 128 of its 224 weights),
# in float32 on the CPU with one thread: about 3.5 minutes on the project's shared 2-core machine, most
# of it the float64 reference SVD and the two exact float32 SVDs. With 2 threads the same run took
# 10 to 16 minutes there: other jobs' threads make every OpenMP region wait for a descheduled thread.
DEFAULT_SHAPE = (4096, 4096)
DEFAULT_NITERS = (1, 2, 4, 8, INF)
DEFAULT_RANKS = (4, 16, 64)
FULL_NITERS = (1, 2, 4, 8, 16, INF)
FULL_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
PF_METHODS = ("krylov", "subspace", "halko")


# ----------------------------------------------------------------------------------------- arguments

def _niter_list(text: str):
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok in ("inf", "exact", "none", "∞"):
            v = INF
        else:
            try:
                v = int(tok)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{tok!r} is not a niter: give integers >= 0 or 'inf' (exact SVD), e.g. 1,2,4,inf") from None
            if v < 0:
                raise argparse.ArgumentTypeError(f"niter must be >= 0 or 'inf', got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("empty niter list")
    return sorted(out, key=rep.niter_key)


def _rank_list(text: str):
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            v = int(tok)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{tok!r} is not a rank: give integers >= 1, e.g. 16,32") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {v}")
        if v not in out:
            out.append(v)
    return sorted(out)


def _shape(text: str):
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        m, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give OUTxIN, e.g. 4096x4096") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape dimensions must be >= 1, got {text!r}")
    return m, n


def _int_at_least(lo):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def add_arguments_bench(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + (
        f". Default: one {DEFAULT_SHAPE[0]}x{DEFAULT_SHAPE[1]} synthetic float32 weight (llama-2-7b's q/k/v/o "
        f"shape), niter {','.join(map(str, DEFAULT_NITERS))}, r {','.join(map(str, DEFAULT_RANKS))}, on the CPU.")
    w = parser.add_argument_group("workload")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME|PATH",
                     help=f"synthetic weights shaped like a named model ({', '.join(MODELS)}), or a local "
                          "checkpoint: a folder of *.safetensors files (or one file) whose 2-D projection "
                          "weights (*q_proj.weight, ..., *down_proj.weight) are read")
    src.add_argument("--shape", type=_shape, metavar="OUTxIN", help="one synthetic weight of this shape "
                     f"(default without --model: {DEFAULT_SHAPE[0]}x{DEFAULT_SHAPE[1]})")
    w.add_argument("--sample", choices=("shapes", "projections", "all"),
                   help="which weights of a --model to measure one by one: one per distinct shape (default "
                        "for named models), one per projection (default for checkpoints), both from the "
                        "middle layer, or all of them")
    w.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   help="weight dtype (default: float32 for synthetic weights, the stored dtype for a checkpoint)")
    w.add_argument("--spectrum", choices=SPECTRA,
                   help="synthetic singular values: 'llm' = i^-decay with 4 large outliers (default), "
                        "'power' = i^-decay (REFERENCE.md's test matrix)")
    w.add_argument("--decay", type=_positive_float, help="power-law exponent of the synthetic spectrum (default 0.35)")
    w.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seeds the synthetic weights, pissa_fast's sketch and peft's global RNG (default 0)")
    g = parser.add_argument_group("grid")
    g.add_argument("--niter", type=_niter_list, metavar="LIST",
                   help="comma-separated niters, 'inf' = exact SVD "
                        f"(default {','.join(map(str, DEFAULT_NITERS))}; --full: {','.join(map(str, FULL_NITERS))})")
    g.add_argument("--ranks", type=_rank_list, metavar="LIST",
                   help=f"comma-separated ranks (default {','.join(map(str, DEFAULT_RANKS))}; "
                        f"--full: {','.join(map(str, FULL_RANKS))})")
    g.add_argument("--full", action="store_true", help="the whole grid, as in the PiSSA paper's Table 6")
    g.add_argument("--repeats", type=_int_at_least(1), default=3, help="timed runs per cell, the median is reported (default 3)")
    g.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed runs before the timed ones of each cell (default 1)")
    p = parser.add_argument_group("pissa_fast options")
    p.add_argument("--pf-method", choices=PF_METHODS, help="pissa_fast.decompose's method (default: its own)")
    p.add_argument("--oversample", type=_int_at_least(0), help="pissa_fast's oversampling (default: its own)")
    p.add_argument("--residual", choices=("inplace", "copy"), default="inplace",
                   help="pissa_fast's residual: written in place into a fresh copy of W made off the clock, "
                        "or returned as a new tensor, as the peft path does (default inplace)")
    m = parser.add_argument_group("machine and output")
    m.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    m.add_argument("--threads", type=_int_at_least(1),
                   help="torch CPU threads during the run (default: 1 with --device cpu, per-core numbers that "
                        "stay meaningful on a shared machine; torch's own default with cuda)")
    m.add_argument("--whole-model", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the whole model (every weight) per (niter, r): decompose_many in place vs "
                        "the peft path layer by layer (default: on with --device cuda and a --model)")
    m.add_argument("--out", metavar="DIR", help="results folder (default: bench_out/<timestamp>)")
    m.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_bench_parser=parser)


# ------------------------------------------------------------------------------------------- config

def _fail(args, msg):
    parser = getattr(args, "_bench_parser", None)
    if parser is not None:
        parser.error(msg)  # exits with status 2 and the usage line
    raise SystemExit(f"pissa-fast bench: error: {msg}")


def _check_device(args) -> torch.device:
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        _fail(args, f"--device {args.device!r}: not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        _fail(args, f"--device {args.device!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA support" if torch.version.cuda is None
                   else f"torch {torch.__version__} was built with CUDA {torch.version.cuda} but sees no GPU")
            _fail(args, f"--device {args.device}: CUDA is not available ({why}); run on a machine with an "
                        "NVIDIA GPU, or use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            _fail(args, f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
        import pissa_fast

        if not pissa_fast.build_info().startswith("cuda"):
            _fail(args, f"--device {args.device}: pissa_fast's native library was built without CUDA kernels "
                        f"(build_info() = {pissa_fast.build_info()!r}); rebuild it where nvcc is found "
                        "(pip install --no-build-isolation -e .)")
    return device


def _workload(args) -> Workload:
    spectrum = args.spectrum or "llm"
    decay = args.decay or 0.35
    if args.model is None:
        if args.sample is not None:
            _fail(args, "--sample applies to --model only")
        shape = args.shape or DEFAULT_SHAPE
        name = f"{shape[0]}x{shape[1]}"
        from .workload import matrix_seed

        spec = MatrixSpec(f"shape/{name}", shape, 1, seed=matrix_seed(f"shape/{name}", args.seed))
        return Workload("shape", name, [spec], [spec], spectrum, decay)
    if args.model in MODELS:
        sampled, every = named_model(args.model, args.seed, args.sample or "shapes")
        return Workload("model", args.model, sampled, every, spectrum, decay)
    if not os.path.exists(args.model):
        _fail(args, f"--model {args.model!r}: neither a known model ({', '.join(MODELS)}) nor an existing "
                    "path to a safetensors checkpoint")
    if args.spectrum is not None or args.decay is not None:
        _fail(args, "--spectrum and --decay apply to synthetic weights, not to a checkpoint")
    try:
        sampled, every = checkpoint_model(args.model, args.sample or "projections")
    except (ValueError, RuntimeError) as e:
        _fail(args, str(e))
    return Workload("checkpoint", os.path.abspath(args.model), sampled, every, spectrum, decay)


def _command(args, cfg) -> str:
    """The equivalent command line with every effective setting spelled out."""
    parts = ["pissa-fast", "bench"]
    if cfg["workload"].kind == "shape":
        parts += ["--shape", cfg["workload"].label]
    else:
        parts += ["--model", args.model, "--sample", cfg["sample"]]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if cfg["workload"].kind != "checkpoint":
        parts += ["--spectrum", cfg["workload"].spectrum, "--decay", f"{cfg['workload'].decay:g}"]
    parts += ["--niter", ",".join(map(str, cfg["niters"])), "--ranks", ",".join(map(str, cfg["ranks"])),
              "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed),
              "--residual", args.residual, "--device", str(cfg["device"]), "--threads", str(cfg["threads"])]
    if args.pf_method:
        parts += ["--pf-method", args.pf_method]
    if args.oversample is not None:
        parts += ["--oversample", str(args.oversample)]
    parts += ["--whole-model" if cfg["whole_model"] else "--no-whole-model", "--out", cfg["out"]]
    if args.no_plots:
        parts.append("--no-plots")
    return shlex.join(parts)


def _resolve(args) -> dict:
    device = _check_device(args)
    wl = _workload(args)
    niters = args.niter or (FULL_NITERS if args.full else DEFAULT_NITERS)
    ranks = args.ranks or (FULL_RANKS if args.full else DEFAULT_RANKS)
    for spec in wl.every:
        if max(ranks) > min(spec.shape):
            _fail(args, f"r = {max(ranks)} exceeds min(m, n) = {min(spec.shape)} of {spec.name} "
                        f"{spec.shape[0]}x{spec.shape[1]}; pass --ranks up to {min(spec.shape)}")
    whole = args.whole_model
    if whole is None:
        whole = device.type == "cuda" and wl.is_model
    elif whole and not wl.is_model:
        _fail(args, "--whole-model needs a --model (a named model or a checkpoint)")
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    out = args.out
    if out is None:
        base = os.path.join("bench_out", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        out, i = base, 1
        while os.path.exists(out):
            i += 1
            out = f"{base}-{i}"
    if os.path.exists(out) and not os.path.isdir(out):
        _fail(args, f"--out {out!r} exists and is not a folder")
    cfg = dict(device=device, workload=wl, niters=list(niters), ranks=list(ranks), whole_model=whole,
               threads=threads, out=out, dtype=parse_dtype(args.dtype),
               sample=args.sample or ("projections" if wl.kind == "checkpoint" else "shapes"))
    cfg["command"] = _command(args, cfg)
    return cfg


# -------------------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _argv() -> list[str]:
    """sys.argv with the program named as it was run (`pissa-fast`, or `python -m ...`)."""
    argv = list(sys.argv)
    if argv:
        prog = argv[0].replace(os.sep, "/")
        if prog.endswith("pissa_fast/cli.py"):
            argv[:1] = ["python", "-m", "pissa_fast.cli"]
        elif prog.endswith("pissa_fast/bench/__main__.py"):
            argv[:1] = ["python", "-m", "pissa_fast.bench"]
        elif os.path.basename(prog) == "pissa-fast":
            argv[0] = "pissa-fast"
    return argv


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(cfg) -> dict:
    import pissa_fast

    dev = cfg["device"]
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg["command"],
        "argv": _argv(),
        "cwd": os.getcwd(),
        "torch": torch.__version__,
        "pissa_fast": pissa_fast.__version__,
        "pissa_fast_build": pissa_fast.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "loadavg_start": _loadavg(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def _clean(x):
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------------------------- run

def _describe(cfg) -> list[str]:
    wl = cfg["workload"]
    dt = _dtype_name(cfg["dtype"]) if cfg["dtype"] else None
    if wl.kind == "shape":
        what = f"one synthetic {wl.label} {dt or 'float32'} weight"
        if wl.label == f"{DEFAULT_SHAPE[0]}x{DEFAULT_SHAPE[1]}":
            what += " (the shape of llama-2-7b's q/k/v/o projections, 128 of its 224 weights)"
    elif wl.kind == "model":
        layers, projs = MODELS[wl.label]
        what = (f"synthetic {wl.label} weights ({layers} layers x {len(projs)} projections = {len(wl.every)} "
                f"weights, {dt or 'float32'}); measuring {len(wl.sampled)} of them (--sample {cfg['sample']})")
    else:
        what = (f"checkpoint {wl.label}: {len(wl.every)} projection weights ({dt or 'stored dtype'}); "
                f"measuring {len(wl.sampled)} of them (--sample {cfg['sample']})")
    lines = [f"workload: {what}"]
    if wl.kind != "checkpoint":
        sp = ("i^-%g with outliers x%s on s_1..s_4" % (wl.decay, "/".join(f"{o:g}" for o in (4, 2.5, 1.75, 1.25)))
              if wl.spectrum == "llm" else "i^-%g" % wl.decay)
        lines.append(f"  spectrum s_i = {sp}, random orthogonal singular vectors (seed {cfg['seed']})")
    for s in wl.sampled:
        extra = f" (stands for {s.count} weights: {', '.join(s.stands_for)})" if wl.is_model else ""
        lines.append(f"  {s.name}: {s.shape[0]}x{s.shape[1]}{extra}")
    lines.append(f"grid: niter {', '.join(map(str, cfg['niters']))} x r {', '.join(map(str, cfg['ranks']))}; "
                 f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up; niter inf = exact SVD, timed once")
    lines.append(f"methods: pissa_fast.decompose (method {cfg['pf_method'] or 'default'}, residual "
                 f"{cfg['residual']}) vs the peft path (torch.svd_lowrank q=r + W - B A)")
    lines.append(f"device: {cfg['device']}, {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}, {_cpu_model()}")
    return lines


def _warn_if_busy(threads: int) -> str | None:
    la = _loadavg()
    if la and la[0] > (os.cpu_count() or 1) * 0.5 + 0.25:
        msg = (f"note: load average {la[0]} on {os.cpu_count()} CPUs before starting: other work is running, so "
               "CPU timings will be noisy")
        if threads > 1:
            msg += (" (with several threads every parallel region can wait for a descheduled thread; "
                    "--threads 1 is far less affected)")
        return msg
    return None


def run_bench(args) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> int:
    cfg = _resolve(args)
    torch.set_num_threads(cfg["threads"])
    cfg.update(repeats=args.repeats, warmup=args.warmup, seed=args.seed, pf_method=args.pf_method,
               residual=args.residual, oversample=args.oversample)
    device, wl, niters, ranks = cfg["device"], cfg["workload"], cfg["niters"], cfg["ranks"]
    env = environment(cfg)
    header = _describe(cfg)
    print("\n".join(header), flush=True)
    busy = _warn_if_busy(cfg["threads"]) if device.type == "cpu" else None
    if busy:
        print(busy, flush=True)

    from tqdm import tqdm

    finite = [n for n in niters if n != INF]
    per_matrix = 2 * len(finite) * len(ranks) + (2 if INF in niters else 0) + 1
    whole_cells = 2 * len(finite) * len(ranks) if cfg["whole_model"] else 0
    bar = tqdm(total=per_matrix * len(wl.sampled) + whole_cells, unit="step", desc="bench",
               disable=args.no_progress, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    runner = Runner(device, repeats=args.repeats, warmup=args.warmup, seed=args.seed, residual=args.residual,
                    method=args.pf_method, oversample=args.oversample)
    t_start = time.perf_counter()
    matrices, measurements = [], []
    try:
        for spec in wl.sampled:
            info, recs = _measure_matrix(spec, cfg, runner, bar)
            matrices.append(info)
            measurements += recs
        whole = _whole_model(cfg, wl, bar) if cfg["whole_model"] else None
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    env["loadavg_end"] = _loadavg()
    env["wall_s"] = round(wall, 2)

    results = {"environment": env,
               "config": {"workload": wl.kind, "label": wl.label, "niters": niters, "ranks": ranks,
                          "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                          "dtype": args.dtype, "sample": cfg["sample"] if wl.is_model else None,
                          "spectrum": wl.spectrum if wl.kind != "checkpoint" else None,
                          "decay": wl.decay if wl.kind != "checkpoint" else None,
                          "pf_method": args.pf_method, "oversample": args.oversample, "residual": args.residual,
                          "device": str(device), "threads": cfg["threads"], "whole_model": cfg["whole_model"],
                          "time_aggregate": _time_label(wl)},
               "matrices": matrices, "measurements": measurements}
    if whole is not None:
        results["whole_model"] = whole

    text = _text_report(results, niters, ranks, wl)
    print()
    print(text)
    os.makedirs(cfg["out"], exist_ok=True)
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(_clean(results), f, indent=1)
    plots = []
    if not args.no_plots:
        title = f"{_workload_title(wl, matrices)} | {env['device']} ({env.get('gpu', env['cpu'])}), " \
                f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
        from .plots import plot_all

        plots = plot_all(measurements, niters, ranks, cfg["out"], title)
    with open(os.path.join(cfg["out"], "report.md"), "w") as f:
        f.write(_markdown_report(results, niters, ranks, wl, header, plots))
    print(f"wrote {cfg['out']}/: results.json, report.md" +
          "".join(f", {os.path.basename(p)}" for p in plots) + f"  (bench wall time {wall:.1f} s)")
    return 0


def _measure_matrix(spec, cfg, runner, bar):
    """Build one weight, its exact float64 SVD, then every cell of the grid for both methods:
    (the weight's description, its measurement records)."""
    import pissa_fast

    device, wl, niters, ranks = cfg["device"], cfg["workload"], cfg["niters"], cfg["ranks"]
    short = spec.name.split("/")[-1]
    bar.set_postfix_str(f"{short}: building + exact float64 SVD")
    t0 = time.perf_counter()
    W = materialize(spec, wl, cfg["dtype"], device)
    sync(device)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = pissa_fast.exact_factors(W, max(ranks))
    sync(device)
    t_exact = time.perf_counter() - t0
    bar.update(1)
    info = spec.describe()
    info.update(dtype=_dtype_name(W.dtype), build_s=round(t_gen, 4), exact_f64_svd_s=round(t_exact, 4))
    records = []

    def record(method, niter, r, t, times, out, once=False):
        err = pissa_fast.error_vs_exact(W, out, exact)
        rec = dict(matrix=spec.name, shape=list(spec.shape), dtype=_dtype_name(W.dtype), count=spec.count,
                   method=method, niter=niter, r=r, time_s=t, times_s=times, **err.as_dict())
        if once:
            rec["timed_once_at_r"] = max(ranks)
        records.append(rec)

    for niter in (n for n in niters if n != INF):
        for r in ranks:
            for method in ("pissa_fast", "peft"):
                bar.set_postfix_str(f"{short}: {method} niter {niter} r {r}")
                t, times, out = runner.run(method, W, r, niter)
                record(method, niter, r, t, times, out)
                bar.update(1)
    if INF in niters:
        for method in ("pissa_fast", "peft"):
            bar.set_postfix_str(f"{short}: {method} exact SVD")
            t, times, out = runner.run(method, W, max(ranks), None, repeats=1, warmup=0)
            for r in ranks:
                record(method, INF, r, t, times, truncated(out, r), once=True)
            bar.update(1)
    return info, records


def _whole_model(cfg, wl, bar):
    """Every weight of the model on the device; per (niter, r) one decompose_many in place vs the peft
    path per layer. niter inf is left out (see the per-matrix exact timings)."""
    device, dtype = cfg["device"], cfg["dtype"]
    need = sum(s.shape[0] * s.shape[1] * (dtype or s.dtype or torch.float32).itemsize for s in wl.every)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.85 * free:
            bar.write(f"whole model skipped: its {len(wl.every)} weights need {need / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB free on {device} (try --dtype bfloat16)")
            return None
    bar.set_postfix_str(f"whole model: building {len(wl.every)} weights")
    weights = {s.name: materialize(s, wl, dtype, device) for s in wl.every}
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    keep_on_device = True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        keep_on_device = free > 1.3 * nbytes
    pristine = {k: (w.clone() if keep_on_device else w.to("cpu", copy=True).pin_memory() if device.type == "cuda"
                    else w.clone()) for k, w in weights.items()}
    out = []
    finite = [n for n in cfg["niters"] if n != INF]
    kw = dict(device=device, seed=cfg["seed"], pf_method=cfg["pf_method"], oversample=cfg["oversample"])
    if cfg["warmup"] and finite:  # one untimed pass of each method over the whole model
        for method in ("pissa_fast", "peft"):
            bar.set_postfix_str(f"whole model: {method} warm-up")
            whole_model(weights, pristine, method, cfg["ranks"][0], finite[0], **kw)
    for niter in finite:
        for r in cfg["ranks"]:
            for method in ("pissa_fast", "peft"):
                bar.set_postfix_str(f"whole model: {method} niter {niter} r {r}")
                t = whole_model(weights, pristine, method, r, niter, **kw)
                out.append(dict(method=method, niter=niter, r=r, time_s=t, weights=len(weights), bytes=nbytes))
                bar.update(1)
    del weights, pristine
    return out


def _time_label(wl) -> str:
    if wl.kind == "shape":
        return "time per matrix"
    return (f"estimated whole-model time: the sum over the model's {len(wl.every)} weights of the median time "
            f"of the sampled weight standing for each")


def _workload_title(wl, matrices) -> str:
    dt = matrices[0]["dtype"] if matrices else ""
    if wl.kind == "shape":
        return f"{wl.label} {dt}"
    if wl.kind == "model":
        return f"{wl.label} (synthetic, {dt}), {len(wl.sampled)} sampled weights"
    return f"{os.path.basename(wl.label.rstrip('/'))}, {len(wl.sampled)} sampled weights"


def _whole_tables(whole, niters, ranks, markdown) -> list[str]:
    vals = {m: {(w["niter"], w["r"]): w["time_s"] for w in whole if w["method"] == m} for m in rep.METHODS}
    fin = [n for n in niters if n != INF]
    n = whole[0]["weights"] if whole else 0
    return [
        rep.table(f"whole model ({n} weights, measured, one run per cell after a warm-up), pissa_fast decompose_many in place, s", fin, ranks,
                  vals["pissa_fast"], rep.fmt_time, markdown=markdown),
        rep.table("whole model, peft path layer by layer, s", fin, ranks, vals["peft"], rep.fmt_time,
                  markdown=markdown),
        rep.table("whole model time ratio pissa_fast / peft", fin, ranks, rep.ratio(vals["pissa_fast"], vals["peft"]),
                  rep.fmt_ratio, markdown=markdown),
    ]


def _text_report(results, niters, ranks, wl) -> str:
    ms = results["measurements"]
    label = "time" if wl.kind == "shape" else "estimated whole-model time"
    parts = rep.time_tables(ms, niters, ranks, label=label) + rep.error_tables(ms, niters, ranks)
    if wl.is_model:
        parts.insert(0, f"({_time_label(wl)}; errors: means over the sampled weights weighted by the number "
                        "of weights each stands for)\n")
    if results.get("whole_model"):
        parts += _whole_tables(results["whole_model"], niters, ranks, False)
    head = rep.headline(ms, niters, ranks)
    if head:
        parts.append("summary:\n" + "\n".join("  " + h for h in head) + "\n")
    return "\n".join(parts)


def _markdown_report(results, niters, ranks, wl, header, plots) -> str:
    env, ms = results["environment"], results["measurements"]
    machine = f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch threads"
    if "gpu" in env:
        machine = f"{env['gpu']} ({env['gpu_memory_gib']} GiB, CUDA {env['cuda']}); host: {machine}"
    out = ["# pissa-fast bench", "",
           f"- date: {env['date']}",
           f"- machine: {machine}; device `{env['device']}`",
           f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
           f"- software: torch {env['torch']}, pissa_fast {env['pissa_fast']} ({env['pissa_fast_build']}), "
           f"Python {env['python']}, {env['platform']}",
           f"- command (every effective setting): `{env['command']}`",
           f"- as invoked: `{shlex.join(env['argv'])}`",
           f"- bench wall time: {env['wall_s']} s", "", "```", *header, "```", ""]
    out.append("Time covers the whole initialization, residual included (pissa_fast: " +
               ("in place into a fresh copy of W made off the clock" if results["config"]["residual"] == "inplace"
                else "a new residual tensor") +
               "; peft: `w = W.float()`, `torch.svd_lowrank(w, q=r, niter)`, `(w - B @ A).to(W.dtype)`). "
               "Errors are against the exact float64 SVD of each weight (`pissa_fast.error_vs_exact`).")
    out.append("")
    if wl.is_model:
        out += [f"Times: {_time_label(wl)}. Errors: means over the sampled weights, weighted by the number of "
                "weights each stands for.", ""]
    head = rep.headline(ms, niters, ranks)
    if head:
        out += ["## Summary", ""] + [f"- {h}" for h in head] + [""]
    out += ["## Time", ""]
    out += rep.time_tables(ms, niters, ranks, label="time" if wl.kind == "shape" else "estimated whole-model time",
                           markdown=True)
    out += ["## Errors", ""] + rep.error_tables(ms, niters, ranks, markdown=True, errors=rep.ERRORS + ("sv_rel",))
    if results.get("whole_model"):
        out += ["## Whole model (measured)", ""] + _whole_tables(results["whole_model"], niters, ranks, True)
    if len(results["matrices"]) > 1:
        out += ["## Per weight", ""]
        for mat in results["matrices"]:
            out += [f"### {mat['name']} ({mat['shape'][0]}x{mat['shape'][1]}, stands for {mat['count']})", ""]
            out += rep.time_tables(ms, niters, ranks, label="time", markdown=True, matrix=mat["name"])
            out += rep.error_tables(ms, niters, ranks, markdown=True, matrix=mat["name"], errors=("l1",))
    out += ["## Reference computations (not timed in the tables)", "",
            "| weight | shape | dtype | build s | exact float64 SVD s |", "|---|---|---|---|---|"]
    out += [f"| {m['name']} | {m['shape'][0]}x{m['shape'][1]} | {m['dtype']} | {m['build_s']:.3g} | "
            f"{m['exact_f64_svd_s']:.3g} |" for m in results["matrices"]]
    out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    return "\n".join(out)
