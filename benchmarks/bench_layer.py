#!/usr/bin/env python
"""Issue-3 CPU benchmark: decompose_many over one LLaMA-2-7B decoder layer (q, k, v, o 4096x4096;
gate, up 11008x4096; down 4096x11008; bf16, in place) against the peft path layer by layer, in one
run, with the peak extra memory of each (peak RSS growth in a fresh subprocess, weights excluded).

    python benchmarks/bench_layer.py [--rank 16] [--niter 4] [--repeats 3] [--scale 1.0]

--scale shrinks every dimension (e.g. 0.25 for a quick run).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}


def make_layer(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in SHAPES.items():
        m, n = max(8, int(m * scale)), max(8, int(n * scale))
        w = torch.empty(m, n, dtype=torch.bfloat16)
        for i in range(0, m, 256):  # no full-size float32 temporary
            w[i:i + 256] = torch.randn(min(256, m - i), n, generator=g) * 0.02
        out[name] = w
    return out


def peft_layer(weights, r, niter):
    for w in weights.values():
        f = w.float()
        V, S, U = torch.svd_lowrank(f, q=r, niter=niter)
        B, A = V * S.sqrt(), S.sqrt()[:, None] * U.T
        w.copy_((f - B @ A).to(w.dtype))  # peft assigns the new buffer to the weight


MEM = r"""
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
import pissa_fast as pf, bench_layer as bl
torch.set_num_threads({threads})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
ws = bl.make_layer({scale})
pf.decompose(torch.randn(64, 64), 4, 1); bl.peft_layer({{"x": torch.randn(64, 64).bfloat16()}}, 4, 1)
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back: RSS = live data
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
if {which!r} == "pissa_fast":
    pf.decompose_many(ws, {r}, {niter}, inplace=True)
else:
    bl.peft_layer(ws, {r}, {niter})
print(status("VmHWM") - base)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# one LLaMA-2-7B layer, bf16, r={args.rank}, niter={args.niter}, scale={args.scale}  "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"torch {torch.__version__}, pissa_fast build {pf.build_info()} (CPU passes: {pf.cpu_passes()}), {args.threads} threads")
    print(f"command: python {' '.join(sys.argv)}\n")
    src = make_layer(args.scale)
    nbytes = sum(w.numel() * w.element_size() for w in src.values())
    work = {k: w.clone() for k, w in src.items()}

    def reset():
        for k in work:
            work[k].copy_(src[k])

    fns = {"pissa_fast": lambda: pf.decompose_many(work, args.rank, args.niter, inplace=True),
           "peft": lambda: peft_layer(work, args.rank, args.niter)}
    ts = {k: [] for k in fns}
    for rep in range(args.repeats + 1):
        for k, f in fns.items():
            reset()
            t = time.perf_counter()
            f()
            if rep:
                ts[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in ts.items()}
    here = os.path.dirname(os.path.abspath(__file__))
    mem = {}
    for which in fns:
        code = MEM.format(root=os.path.dirname(here), here=here, threads=args.threads, scale=args.scale,
                          which=which, r=args.rank, niter=args.niter)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        mem[which] = int(out.stdout.strip().splitlines()[-1])
    print(f"| method | time (median of {args.repeats}) | ratio to peft | peak extra memory | % of the layer's {nbytes / 2**20:.0f} MiB |")
    print("|---|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k]:.2f} s | {med[k] / med['peft']:.2f} | {mem[k] / 2**20:.1f} MiB | {100 * mem[k] / nbytes:.1f}% |")


if __name__ == "__main__":
    main()
