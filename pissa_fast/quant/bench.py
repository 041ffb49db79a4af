"""`pissa-fast bench-qpissa`: the PiSSA paper's quantization-error comparison (Sec. 4.3, Table 4 and
Fig. 5), per layer and on average, on synthetic weights or a local safetensors checkpoint:

- QLoRA: ||W - nf4(W)||_F / ||W||_F, no adapter;
- LoftQ at rank r after 1..T rounds (peft's loftq_init on a GPU, its step-for-step reference on CPU);
- QPiSSA at rank r after 1..T rounds (pissa_fast.qpissa);

with the time each takes. All errors are ||W - (Q + B A)||_F / ||W||_F of the state each method
returns, measured in float64 (`quant_error`), except QPiSSA's intermediate rounds, which are the
errors qpissa reports (see qpissa.py; the report gives their largest gap to the float64 measure at T).
Times: LoftQ's exclude the error measurement done between its rounds; QPiSSA's at t rounds are the
time to the end of round t plus the final load check of a T-round run.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import sys
import time

import torch

from ..bench.report import fmt_err, fmt_time
from ..bench.workload import MODELS, PROJECTIONS, synthetic_weight
from ..machine import cpu_model
from ..options import DTYPE_NAMES, parse_dtype, parse_niter, progress_enabled
from .error import quant_error
from .loftq import loftq, loftq_reference, qlora
from .fit import fit_blocks_
from .nf4 import BLOCKSIZES, QUANT_TYPES, QuantSpec, fake_quantize
from .qpissa import DEFAULT_SCALES, DEFAULT_START, SCALES, STARTS, qpissa

_PROJ_RE = re.compile(r"(?:^|\.)(" + "|".join(map(re.escape, PROJECTIONS)) + r")\.weight$")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ------------------------------------------------------------------------------------------- workloads

def synthetic_weights(name: str, layers: int | None, dtype: torch.dtype, seed: int, device="cpu"):
    """(name, W) for the projections of `layers` decoder layers of a model shape in
    pissa_fast.bench.workload.MODELS, with the bench's LLM-like spectrum."""
    n_layers, shapes = MODELS[name]
    for layer in range(min(n_layers, layers or n_layers)):
        for k, (proj, (m, n)) in enumerate(shapes.items()):
            W = synthetic_weight(m, n, seed + 1000 * layer + k)
            yield f"layers.{layer}.{proj}", W.to(device=device, dtype=dtype)


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def checkpoint_weights(path: str, dtype: torch.dtype | None, include: str | None = None,
                       limit: int | None = None, device="cpu"):
    """(name, W) for the 2-D floating-point projection weights of a safetensors checkpoint (a file or a
    directory of shards), read one at a time, in layer order."""
    from safetensors import safe_open

    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"--model {path}: no .safetensors file there")
    where = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                if _PROJ_RE.search(key) and (include is None or re.search(include, key)):
                    where[key] = f
    keys = sorted(where, key=_natural)[:limit]
    if not keys:
        raise ValueError(f"--model {path}: no projection weights (names ending in one of "
                         f"{', '.join(PROJECTIONS[:7])}, ... '.weight') matched")
    for key in keys:
        with safe_open(where[key], framework="pt") as h:
            W = h.get_tensor(key)
        if W.dim() != 2 or W.dtype not in FLOAT_DTYPES:
            continue
        yield key, W.to(device=device, dtype=dtype or W.dtype)


# ------------------------------------------------------------------------------------------ measuring

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(W: torch.Tensor, *, r: int, iters: int, niter, spec: QuantSpec, with_loftq: bool = True,
            seed: int = 0, start: str = DEFAULT_START, scales: str = DEFAULT_SCALES) -> dict:
    """One layer: errors and times of QLoRA, LoftQ (1..iters rounds), QPiSSA (1..iters rounds)."""
    dev = W.device
    rec: dict = {"shape": list(W.shape), "dtype": str(W.dtype).removeprefix("torch.")}
    _sync(dev)
    t0 = time.perf_counter()
    Q = qlora(W, spec)
    _sync(dev)
    rec["qlora_time"] = time.perf_counter() - t0
    rec["qlora_error"] = quant_error(W, Q)
    del Q
    if scales == "search":  # the same quantizer without an adapter: what the searched scales alone give
        fitted = fit_blocks_(W.clone(memory_format=torch.contiguous_format), spec)
        rec["qlora_search_error"] = quant_error(W, fake_quantize(fitted, spec))
        del fitted

    if with_loftq:
        if dev.type == "cuda":  # peft's own loftq_init; no hook into its rounds, so one call per t
            errs, times = [], []
            for t in range(1, iters + 1):
                _sync(dev)
                t0 = time.perf_counter()
                Q, A, B = loftq(W, r, t)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                errs.append(quant_error(W, Q, A, B))
            rec["loftq_impl"] = "peft.utils.loftq_utils.loftq_init"
        else:
            errs, times, skipped = [], [], [0.0]

            def seen(i, Q, A, B):
                t = time.perf_counter()
                times.append(t - t0 - skipped[0])
                errs.append(quant_error(W, Q, A, B))
                skipped[0] += time.perf_counter() - t

            t0 = time.perf_counter()
            loftq_reference(W, r, iters, on_round=seen)
            rec["loftq_impl"] = "pissa_fast.quant.loftq_reference (peft's loop on CPU)"
        rec["loftq_errors"], rec["loftq_times"] = errs, times

    marks = []
    _sync(dev)
    t0 = time.perf_counter()
    out = qpissa(W, r, niter, iters=iters, quant=spec.quant_type, blocksize=spec.blocksize,
                 double_quant=spec.double_quant, start=start, scales=scales, seed=seed,
                 on_round=lambda t: (_sync(dev), marks.append(time.perf_counter() - t0)))
    _sync(dev)
    total = time.perf_counter() - t0
    check = total - marks[-1]
    # what qpissa(iters=t) returns: the best of rounds 1..t (of every start it runs, in lockstep)
    running = [min(min(errs[:t]) for errs in out.start_errors.values()) for t in range(1, iters + 1)]
    rec["qpissa_errors"] = running
    rec["qpissa_round_errors"] = list(out.errors)
    rec["qpissa_start"] = out.start
    rec["qpissa_start_errors"] = dict(out.start_errors)
    rec["qpissa_times"] = [m + check for m in marks]
    rec["qpissa_check_time"] = check
    rec["qpissa_exact"] = out.exact
    rec["qpissa_error_float64"] = quant_error(W, out.residual, out.A, out.B)
    rec["qpissa_error_reported"] = out.error
    return rec


def bench_qpissa(weights, *, r: int = 16, iters: int = 5, niter=4, spec: QuantSpec | None = None,
                 with_loftq: bool = True, seed: int = 0, start: str = DEFAULT_START, scales: str = DEFAULT_SCALES,
                 progress: bool = False) -> list[dict]:
    """Measure every (name, W) of `weights`; returns one record per layer (see `measure`)."""
    spec = spec or QuantSpec()
    records = []
    bar = None
    if progress and progress_enabled():
        from tqdm.auto import tqdm
        bar = tqdm(desc="bench-qpissa", unit="layer")
    for name, W in weights:
        if not records:  # first calls pay one-time costs (imports, bnb/peft set-up): keep them out
            measure(W, r=min(r, min(W.shape)), iters=1, niter=niter, spec=spec, with_loftq=with_loftq,
                    seed=seed, start=start, scales=scales)
        rec = measure(W, r=min(r, min(W.shape)), iters=iters, niter=niter, spec=spec,
                      with_loftq=with_loftq, seed=seed, start=start, scales=scales)
        rec["name"] = name
        records.append(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return records


def summarize(records: list[dict], iters: int) -> dict:
    """Means over layers (each layer counts once, as in the paper's per-model averages) and counts."""
    n = len(records)
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    out = {"layers": n, "qlora_error": mean([r["qlora_error"] for r in records]),
           "qlora_search_error": mean([r["qlora_search_error"] for r in records if "qlora_search_error" in r]),
           "qlora_time": sum(r["qlora_time"] for r in records), "rounds": []}
    has_loftq = all("loftq_errors" in r for r in records)
    for t in range(iters):
        row = {"t": t + 1, "qpissa_error": mean([r["qpissa_errors"][t] for r in records]),
               "qpissa_time": sum(r["qpissa_times"][t] for r in records),
               "qpissa_below_qlora": sum(r["qpissa_errors"][t] < r["qlora_error"] for r in records)}
        if has_loftq:
            row.update(loftq_error=mean([r["loftq_errors"][t] for r in records]),
                       loftq_time=sum(r["loftq_times"][t] for r in records),
                       qpissa_below_loftq=sum(r["qpissa_errors"][t] < r["loftq_errors"][t] for r in records))
            row["time_ratio"] = row["qpissa_time"] / row["loftq_time"] if row["loftq_time"] > 0 else None
        out["rounds"].append(row)
    out["qpissa_exact"] = sum(bool(r["qpissa_exact"]) for r in records)
    out["qpissa_starts"] = {s: sum(r["qpissa_start"] == s for r in records)
                            for s in sorted({r["qpissa_start"] for r in records})}
    out["float64_gap"] = max((abs(r["qpissa_error_float64"] - r["qpissa_error_reported"])
                              / max(r["qpissa_error_float64"], 1e-300) for r in records), default=None)
    return out


# ------------------------------------------------------------------------------------------- reports

def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def _text_table(header, rows) -> list[str]:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def report(records, summary, cfg, *, markdown: bool) -> str:
    T, table = cfg["iters"], (_md_table if markdown else _text_table)
    loftq_on = summary["rounds"] and "loftq_error" in summary["rounds"][0]
    lines = []
    head = (f"Quantization error ||W - (Q + B A)||_F / ||W||_F, r = {cfg['r']}, {cfg['quant']} blocksize "
            f"{cfg['blocksize']}{', double quant' if cfg['double_quant'] else ''}, QPiSSA niter "
            f"{cfg['niter']}, start {cfg.get('start', 'pissa')}, scales {cfg.get('scales', 'absmax')}, workload "
            f"{cfg['workload']} ({summary['layers']} matrices, {cfg['dtype']})")
    lines += [("**" + head + "**") if markdown else head, ""]
    hdr = ["rounds", "QPiSSA error", "QPiSSA time (s)"]
    if loftq_on:
        hdr += ["LoftQ error", "LoftQ time (s)", "QPiSSA < LoftQ", "time QPiSSA / LoftQ"]
    hdr += ["QPiSSA < QLoRA"]
    rows = []
    for row in summary["rounds"]:
        cells = [row["t"], fmt_err(row["qpissa_error"]), fmt_time(row["qpissa_time"])]
        if loftq_on:
            cells += [fmt_err(row["loftq_error"]), fmt_time(row["loftq_time"]),
                      f"{row['qpissa_below_loftq']}/{summary['layers']}",
                      "-" if row["time_ratio"] is None else f"{row['time_ratio']:.3g}"]
        cells += [f"{row['qpissa_below_qlora']}/{summary['layers']}"]
        rows.append(cells)
    lines += table(hdr, rows)
    searched = summary.get("qlora_search_error")
    lines += ["", f"QLoRA (nf4(W), no adapter): mean error {fmt_err(summary['qlora_error'])}, "
              f"{fmt_time(summary['qlora_time'])} s"
              + (f"; with QPiSSA's searched scales: {fmt_err(searched)}" if searched is not None else "")
              + f". QPiSSA residuals that a bnb 4-bit load reproduces "
              f"bit for bit: {summary['qpissa_exact']}/{summary['layers']}. Largest relative gap between "
              f"QPiSSA's reported error and the float64 measure: {fmt_err(summary['float64_gap'])}. Start kept: "
              + ", ".join(f"{k} on {v}" for k, v in summary["qpissa_starts"].items()) + ".", ""]
    hdr = ["matrix", "shape", "QLoRA"] + ([f"LoftQ@{T}"] if loftq_on else []) + \
          ["QPiSSA@1", f"QPiSSA@{T}"] + ([f"LoftQ@{T} s"] if loftq_on else []) + [f"QPiSSA@{T} s"]
    rows = []
    for r in records:
        cells = [r["name"], "x".join(map(str, r["shape"])), fmt_err(r["qlora_error"])]
        cells += [fmt_err(r["loftq_errors"][-1])] if loftq_on else []
        cells += [fmt_err(r["qpissa_errors"][0]), fmt_err(r["qpissa_errors"][-1])]
        cells += [fmt_time(r["loftq_times"][-1])] if loftq_on else []
        cells += [fmt_time(r["qpissa_times"][-1])]
        rows.append(cells)
    lines += (["**Per matrix**", ""] if markdown else ["Per matrix"]) + table(hdr, rows)
    return "\n".join(lines) + "\n"


def plot(records, summary, cfg, out_dir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = cfg["iters"]
    loftq_on = "loftq_error" in summary["rounds"][0]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = list(range(1, T + 1))
    ax.plot(ts, [row["qpissa_error"] for row in summary["rounds"]], "o-", label="QPiSSA")
    if loftq_on:
        ax.plot(ts, [row["loftq_error"] for row in summary["rounds"]], "s-", label="LoftQ")
    ax.axhline(summary["qlora_error"], color="gray", ls="--", label="QLoRA (no adapter)")
    ax.set_xlabel("rounds T")
    ax.set_ylabel("mean ||W - (Q + BA)||_F / ||W||_F")
    ax.set_xticks(ts)
    ax.set_title(f"{cfg['workload']}, r = {cfg['r']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "error_vs_rounds.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.08 * len(records) + 3), 4))
    xs = list(range(len(records)))
    ax.plot(xs, [r["qlora_error"] for r in records], ".", color="gray", label="QLoRA")
    if loftq_on:
        ax.plot(xs, [r["loftq_errors"][-1] for r in records], "s", ms=3, label=f"LoftQ, T = {T}")
    ax.plot(xs, [r["qpissa_errors"][0] for r in records], "^", ms=3, label="QPiSSA, T = 1")
    ax.plot(xs, [r["qpissa_errors"][-1] for r in records], "o", ms=3, label=f"QPiSSA, T = {T}")
    ax.set_xlabel("matrix (checkpoint order)")
    ax.set_ylabel("||W - (Q + BA)||_F / ||W||_F")
    ax.set_title(f"per matrix, {cfg['workload']}, r = {cfg['r']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "error_per_matrix.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def environment() -> dict:
    import bitsandbytes
    import peft
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": ["pissa-fast"] + sys.argv[1:] if sys.argv[0].endswith(("pissa-fast", "cli.py")) else sys.argv,
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------------- CLI

def _positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a local safetensors checkpoint (directory or file); default: "
                        "synthetic weights shaped like --synthetic")
    parser.add_argument("--synthetic", default="tiny", choices=sorted(MODELS),
                        help="model shape of the synthetic workload (default: tiny)")
    parser.add_argument("--layers", type=_positive, default=1,
                        help="decoder layers of the synthetic workload (default: 1)")
    parser.add_argument("--include", help="regex: only checkpoint weights whose name matches")
    parser.add_argument("--max-matrices", type=_positive, help="at most this many checkpoint weights")
    parser.add_argument("-r", "--rank", type=_positive, default=16, help="adapter rank r (default: 16)")
    parser.add_argument("--iters", type=_positive, default=5,
                        help="rounds T of LoftQ and QPiSSA; both are reported after 1..T (default: 5)")
    parser.add_argument("--niter", type=parse_niter, default=4,
                        help="QPiSSA's top-r step: niter of pissa_fast.decompose, or 'exact' (default: 4)")
    parser.add_argument("--start", default=DEFAULT_START, choices=sorted(STARTS),
                        help="QPiSSA's start: pissa (the paper's), quantized (LoftQ's) or best (both, the lower "
                        "kept per matrix; default: pissa)")
    parser.add_argument("--scales", default=DEFAULT_SCALES, choices=SCALES,
                        help="QPiSSA's block scales: search (error-minimizing, still exact under bnb; the "
                        "default) or absmax (bnb's own rounding, as the paper)")
    parser.add_argument("--quant", default="nf4", choices=QUANT_TYPES)
    parser.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    parser.add_argument("--double-quant", action="store_true", help="bnb double quantization")
    parser.add_argument("--dtype", type=parse_dtype, default=None,
                        help=f"weights' dtype ({', '.join(sorted(DTYPE_NAMES))}); default: the "
                        "checkpoint's, bfloat16 for synthetic weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--no-loftq", action="store_true", help="skip LoftQ (full SVDs: the slow part)")
    parser.add_argument("--threads", type=_positive, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for report.md, results.json and the plots")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench-qpissa: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    spec = QuantSpec(args.quant, args.blocksize, args.double_quant)
    if args.quant == "fp4" and not args.no_loftq:
        print("bench-qpissa: LoftQ is NF4 only (peft's loftq_init); pass --no-loftq with --quant fp4",
              file=sys.stderr)
        return 2
    if args.model:
        weights = checkpoint_weights(args.model, args.dtype, args.include, args.max_matrices, device)
        workload = os.path.basename(os.path.normpath(args.model))
    else:
        weights = synthetic_weights(args.synthetic, args.layers, args.dtype or torch.bfloat16, args.seed, device)
        workload = f"synthetic {args.synthetic} x {args.layers} layer(s)"
    records = bench_qpissa(weights, r=args.rank, iters=args.iters, niter=args.niter, spec=spec,
                           with_loftq=not args.no_loftq, seed=args.seed, start=args.start, scales=args.scales,
                           progress=True)
    dtypes = sorted({r["dtype"] for r in records})
    cfg = {"r": args.rank, "iters": args.iters, "niter": "exact" if args.niter is None else args.niter,
           "quant": args.quant, "blocksize": args.blocksize, "double_quant": args.double_quant,
           "start": args.start, "scales": args.scales,
           "workload": workload, "dtype": ", ".join(dtypes), "device": str(device)}
    summary = summarize(records, args.iters)
    env = environment()
    print(report(records, summary, cfg, markdown=False))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plots = plot(records, summary, cfg, args.out)
        md = [f"# bench-qpissa: {workload}", "",
              f"{env['date']}, {env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, "
              f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}; command: `{' '.join(env['argv'])}`", "",
              report(records, summary, cfg, markdown=True)]
        md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"environment": env, "config": cfg, "summary": summary, "layers": records}, f, indent=1)
        print(f"wrote {args.out}/report.md, results.json, " + ", ".join(map(os.path.basename, plots)))
    return 0
