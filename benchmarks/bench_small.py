#!/usr/bin/env python
"""Small weights (issue 13): pissa_fast.decompose in place against peft's path (torch.svd_lowrank on
a float32 copy, residual rounded back) at equal niter, interleaved call by call, medians of many
repeats, with the ATen calls each makes (torch.profiler, deterministic).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_small.py [--shapes 576x576,1536x576] [--rank 16]
        [--niter 4] [--repeats 200] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402


def peft_path(W, r, niter):
    w = W.float()
    U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    return (w - (U * S.sqrt()) @ (S.sqrt()[:, None] * V.T)).to(W.dtype)


def aten_calls(fn) -> int:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x576,1536x576")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# small weights, bf16, r={args.rank}, niter={args.niter}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"torch {torch.__version__}, pissa_fast build {pf.build_info()} (CPU passes: {pf.cpu_passes()}), {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at start {os.getloadavg()}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| shape | peft path | pissa_fast | ratio (pissa_fast / peft) | ATen calls peft / pissa_fast |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        W = (torch.randn(m, n, generator=g) * 0.02).bfloat16()
        work = W.clone()
        fns = {"peft": lambda: peft_path(W, args.rank, args.niter),
               "pf": lambda: pf.decompose(work.copy_(W), args.rank, args.niter, inplace=True)}
        calls = {k: aten_calls(f) for k, f in fns.items()}
        ts = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in ts.items()}
        print(f"| {m}x{n} | {1e3 * med['peft']:.2f} ms | {1e3 * med['pf']:.2f} ms | {med['pf'] / med['peft']:.2f} | "
              f"{calls['peft']} / {calls['pf']} |")
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
