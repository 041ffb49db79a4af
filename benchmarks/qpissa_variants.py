"""QPiSSA's start/scales options against LoftQ, per matrix, on a local safetensors checkpoint.

    python benchmarks/qpissa_variants.py CHECKPOINT [--include REGEX] [--max-matrices N] [-r 16] [--iters 5]

For every projection weight: peft's LoftQ loop (loftq_reference, full SVDs) once, then qpissa with each
(start, scales) variant, interleaved on the same matrix so the time ratios share the machine's load.
Prints, per variant and round t, the mean error ||W - (Q + B A)||_F / ||W||_F, how many matrices end
below LoftQ at the same t, and the median time of a T-round call relative to the paper's loop
(start pissa, scales absmax) and to LoftQ's T rounds. `pissa-fast bench-qpissa` gives one variant's
full report; this script answers which variant to default to.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pissa_fast.quant.bench import checkpoint_weights, environment
from pissa_fast.quant.error import quant_error
from pissa_fast.quant.loftq import loftq_reference
from pissa_fast.quant.qpissa import qpissa

VARIANTS = [("pissa", "absmax"), ("pissa", "search"), ("best", "absmax"), ("best", "search")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--include")
    ap.add_argument("--max-matrices", type=int)
    ap.add_argument("-r", "--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", help="write the per-matrix records here")
    args = ap.parse_args()
    T, recs = args.iters, []
    for name, W in checkpoint_weights(args.model, None, args.include, args.max_matrices):
        rec = {"name": name, "shape": list(W.shape)}
        loftq_err, t0 = [], time.perf_counter()
        spent = [0.0]

        def seen(i, Q, A, B):
            t = time.perf_counter()
            loftq_err.append(quant_error(W, Q, A, B))
            spent[0] += time.perf_counter() - t

        loftq_reference(W, args.rank, T, on_round=seen)
        rec["loftq"] = {"errors": loftq_err, "time": time.perf_counter() - t0 - spent[0]}
        for start, scales in VARIANTS:
            t0 = time.perf_counter()
            out = qpissa(W, args.rank, 4, iters=T, start=start, scales=scales)
            dt = time.perf_counter() - t0
            # what qpissa(iters=t) returns: the best round up to t of every start it ran
            best = [min(min(e[:t]) for e in out.start_errors.values()) for t in range(1, T + 1)]
            rec[f"{start}/{scales}"] = {"errors": best, "time": dt, "kept": out.start,
                                        "final_float64": quant_error(W, out.residual, out.A, out.B)}
        recs.append(rec)
        print(name, "x".join(map(str, W.shape)), "LoftQ@T %.4e" % loftq_err[-1],
              " ".join(f"{s}/{c} %.4e" % rec[f"{s}/{c}"]["errors"][-1] for s, c in VARIANTS), flush=True)
    n = len(recs)
    print(f"\n{n} matrices, r {args.rank}, T {T}; env {json.dumps(environment())}")
    print("| variant | " + " | ".join(f"error@{t} (< LoftQ)" for t in range(1, T + 1))
          + " | median time / paper's loop | median time / LoftQ |")
    print("|---" * (T + 3) + "|")
    print("| LoftQ | " + " | ".join("%.4e" % statistics.mean(r["loftq"]["errors"][t] for r in recs)
                                   for t in range(T)) + " | | |")
    for s, c in VARIANTS:
        k = f"{s}/{c}"
        cells = []
        for t in range(T):
            mean = statistics.mean(r[k]["errors"][t] for r in recs)
            below = sum(r[k]["errors"][t] < r["loftq"]["errors"][t] for r in recs)
            cells.append(f"{mean:.4e} ({below}/{n})")
        vs_paper = statistics.median(r[k]["time"] / r["pissa/absmax"]["time"] for r in recs)
        vs_loftq = statistics.median(r[k]["time"] / r["loftq"]["time"] for r in recs)
        print(f"| start {s}, scales {c} | " + " | ".join(cells) + f" | {vs_paper:.2f} | {vs_loftq:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
