#!/usr/bin/env python
"""The CPU passes over a bf16 weight, AMX tiles against the float32 path (PISSA_FAST_CPU_AMX's two
settings, switched in-process), interleaved in one run: the gram pass (W V and W^T W V, k columns) and
the in-place residual (W -= B A, depth r), with each one's largest error against float64 math relative
to the float32 path's.

    python benchmarks/bench_cpu_passes.py [--shapes 4096x4096,11008x4096,4096x11008] [--ks 16,24,48,72]
                                           [--ranks 4,16,64] [--repeats 9] [--threads 2]

Times are medians of --repeats interleaved calls after a warm-up. Needs a CPU with AMX-BF16.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402
from bench_core import time_interleaved  # noqa: E402
from pissa_fast.machine import cpu_model, loadavg  # noqa: E402

amx = torch.ops.pissa_fast._cpu_amx


def timed(fns, repeats):
    """Medians in ms of interleaved calls (bench_core's timing)."""
    return {k: v * 1e3 for k, v in time_interleaved(fns, repeats).items()}


def switched(mode, fn):
    def run():
        amx(mode)
        return fn()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--ks", default="16,24,48,72")
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not amx(1):
        sys.exit("bench_cpu_passes: this CPU (or OS) has no AMX-BF16; nothing to compare")
    print(f"# CPU passes over bf16 weights: AMX tiles vs the float32 path  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"torch {torch.__version__}, pissa_fast build {pf.build_info()}, {args.threads} threads, CPU {cpu_model()}, "
          f"load average at start {loadavg()}")
    print(f"command: python benchmarks/bench_cpu_passes.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| pass | shape | k or r | float32 path | AMX | speed-up | max error AMX / float32 path |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        W = (torch.randn(m, n, generator=g) / n ** 0.5).to(torch.bfloat16)
        Wd = W.double()
        for k in (int(x) for x in args.ks.split(",")):
            V = torch.randn(1, n, k, generator=g) / n ** 0.5
            t = timed({0: switched(0, lambda: pf.ops.gram([W], V)), 1: switched(1, lambda: pf.ops.gram([W], V))},
                      args.repeats)
            ref = Wd.T @ (Wd @ V[0].double())
            err = {mode: float((switched(mode, lambda: pf.ops.gram([W], V))()[1][0].double() - ref).abs().max())
                   for mode in (0, 1)}
            print(f"| gram | {m}x{n} | {k} | {t[0]:.2f} ms | {t[1]:.2f} ms | {t[0] / t[1]:.2f}x | "
                  f"{err[1] / err[0]:.2f} |", flush=True)
        for r in (int(x) for x in args.ranks.split(",")):
            B = torch.randn(1, m, r, generator=g) * 0.05
            A = torch.randn(1, r, n, generator=g) * 0.05
            W0, W1 = W.clone(), W.clone()
            t = timed({0: switched(0, lambda: pf.ops.residual_([W0], B, A)),
                       1: switched(1, lambda: pf.ops.residual_([W1], B, A))}, args.repeats)
            ref = Wd - B[0].double() @ A[0].double()
            err = {mode: float((switched(mode, lambda: pf.ops.residual([W], B, A))()[0].double() - ref).abs().max())
                   for mode in (0, 1)}
            print(f"| residual_ | {m}x{n} | {r} | {t[0]:.2f} ms | {t[1]:.2f} ms | {t[0] / t[1]:.2f}x | "
                  f"{err[1] / err[0]:.2f} |", flush=True)
    amx(1)


if __name__ == "__main__":
    main()
