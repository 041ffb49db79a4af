"""`pissa-fast bench` settings resolved from the arguments: the device (checked), the workload, the
grid, and the equivalent command line with every effective setting spelled out."""
from __future__ import annotations

import datetime
import os
import shlex

import torch

from ..options import parse_dtype
from .args import DEFAULT_NITERS, DEFAULT_RANKS, DEFAULT_SHAPE, FULL_NITERS, FULL_RANKS
from .workload import MODELS, MatrixSpec, Workload, checkpoint_model, named_model

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
              "--match", ",".join(map(str, cfg["match"])) or "none",
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
               match=list(args.match),
               threads=threads, out=out, dtype=None if args.dtype is None else parse_dtype(args.dtype),
               sample=args.sample or ("projections" if wl.kind == "checkpoint" else "shapes"))
    cfg["command"] = _command(args, cfg)
    return cfg


