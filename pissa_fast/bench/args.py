"""The arguments of `pissa-fast bench`: the workload, the grid, pissa_fast's options, the machine and
the output, each parsed and checked where it is read (argparse types name the bad value)."""
from __future__ import annotations

import argparse
import math

from ..options import parse_niter
from . import report as rep
from .measure import INF
from .workload import MODELS, SPECTRA

DEFAULT_SHAPE = (4096, 4096)
DEFAULT_NITERS = (1, 2, 4, 8, INF)
DEFAULT_RANKS = (4, 16, 64)
FULL_NITERS = (1, 2, 4, 8, 16, INF)
FULL_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
PF_METHODS = ("krylov", "subspace", "halko")
DEFAULT_MATCH = (4, 16)  # peft's pissa_niter_4 and LLaMA-Factory's default pissa_iter 16


# ----------------------------------------------------------------------------------------- arguments

def _niter_list(text: str):
    out = []
    for tok in text.split(","):
        try:
            v = parse_niter(tok)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{tok.strip()!r} is not a niter: {e}") from None
        v = INF if v is None else v
        if v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("empty niter list")
    return sorted(out, key=rep.niter_key)


def _match_list(text: str):
    if text.strip().lower() in ("none", ""):
        return []
    out = []
    for tok in text.split(","):
        try:
            v = parse_niter(tok)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{tok.strip()!r} is not a peft niter: {e}") from None
        if v is None:
            raise argparse.ArgumentTypeError("--match takes finite niters (peft's pissa_niter_N), not 'exact'")
        if v not in out:
            out.append(v)
    return sorted(out)


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
    g.add_argument("--match", type=_match_list, default=list(DEFAULT_MATCH), metavar="LIST",
                   help="the headline: for each peft niter N here, peft's pissa_niter_N against "
                        "pissa_fast.svd_lowrank_equivalent(N, r) (at least as accurate, least work), timed "
                        f"side by side (default {','.join(map(str, DEFAULT_MATCH))}; 'none' to skip)")
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


