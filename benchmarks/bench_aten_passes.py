#!/usr/bin/env python
"""The ATen implementation of the passes (the CUDA default) measured on the CPU, where it can be:

  1. time of each pass (gram, wx, wtx, residual_) against the CPU kernels, interleaved, medians;
  2. accuracy of the whole decomposition through the ATen passes (split-precision bf16 arithmetic
     included) on REFERENCE.md's matrix (n x n, s_i = i^-0.35, Haar-random singular vectors), r 16,
     niter 4: L1 against the exact SVD next to the CPU path's, for float32 and bfloat16 weights, in
     both code paths (the widened CPU blocks, and the native path that CUDA runs, with out_dtype GEMMs
     emulated by float32 GEMMs of widened copies).

    python benchmarks/bench_aten_passes.py [--size 4096] [--repeats 5] [--what passes,accuracy] [--json out.json]

The ATen passes are not meant to be fast on a CPU (they split bf16 test vectors into two parts, so
their GEMMs are twice as wide as the CPU kernels'); the times say what the CPU pays when they are
forced on it, and the accuracy rows are the check that the split precision matches the float32 path.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402
from pissa_fast.passes import _aten_cpu_config, _aten_passes_on_cpu  # noqa: E402

ops = pf.ops


def reference_matrix(n, seed=0):
    """REFERENCE.md's test matrix: U diag(i^-0.35) V^T, U and V from float64 QR of Gaussian matrices."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.35
    return (U * s) @ V.T


def interleaved(fns, repeats):
    """Median seconds of each fn, run in turns after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def pass_times(n, dtype, k, repeats):
    gen = torch.Generator().manual_seed(1)
    W = [torch.randn(n, n, generator=gen).to(dtype)]
    V = torch.randn(1, n, k, generator=gen)
    B = torch.randn(1, n, k, generator=gen) * 1e-3
    A = torch.randn(1, k, n, generator=gen) * 1e-3
    rows = {}
    for name, kern, aten in (("gram", lambda: ops.gram(W, V), lambda: ops.gram_aten(W, V)),
                             ("wx", lambda: ops.wx(W, V), lambda: ops.wx_aten(W, V)),
                             ("wtx", lambda: ops.wtx(W, V), lambda: ops.wtx_aten(W, V)),
                             ("residual_", lambda: ops.residual_(W, B, A), lambda: ops.residual_aten_(W, B, A))):
        t = interleaved({"kernels": kern, "aten": aten}, repeats)
        rows[name] = {"cpu_kernels_ms": 1e3 * t["kernels"], "aten_ms": 1e3 * t["aten"],
                      "aten_over_kernels": t["aten"] / t["kernels"]}
        print(f"  {name:10s} {str(dtype)[6:]:9s} CPU kernels {1e3 * t['kernels']:8.1f} ms   ATen passes "
              f"{1e3 * t['aten']:8.1f} ms   ({t['aten'] / t['kernels']:.2f}x)", flush=True)
    return rows


def accuracy(W64, r, niter, dtype, repeats):
    W = W64.to(dtype)
    exact = pf.exact_factors(W)
    res = {}

    def run(label, ctx):
        with ctx():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = pf.decompose(W, r, niter=niter)
                times.append(time.perf_counter() - t0)
        e = pf.error_vs_exact(W, out, exact=exact)
        res[label] = {"l1": e.l1, "sv_rel": e.sv_rel, "excess": e.excess, "seconds": statistics.median(times)}

    import contextlib

    run("cpu_kernels", contextlib.nullcontext)
    run("aten_widened", _aten_passes_on_cpu)

    @contextlib.contextmanager
    def native():
        with _aten_cpu_config(native=True), _aten_passes_on_cpu():
            yield

    run("aten_native", native)
    base = res["cpu_kernels"]["l1"]
    for label, v in res.items():
        v["l1_over_cpu"] = v["l1"] / base
        print(f"  {str(dtype)[6:]:9s} {label:13s} L1 {v['l1']:.3e} ({v['l1_over_cpu']:.3f}x CPU path)  "
              f"sv_rel {v['sv_rel']:.2e}  excess {v['excess']:.2e}  {v['seconds']:.3f} s", flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--what", default="passes,accuracy", help="comma-separated: passes, accuracy")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    what = args.what.split(",")
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "build": pf.build_info(), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print("# bench_aten_passes " + "  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    out = {"env": env, "args": vars(args), "passes": {}, "accuracy": {}}
    if "passes" in what:
        print(f"passes over one {args.size} x {args.size} weight, k = r = {args.rank} (niter >= 3 Krylov width):")
        for dtype in (torch.bfloat16, torch.float32):
            out["passes"][str(dtype)] = pass_times(args.size, dtype, args.rank, args.repeats)
    if "accuracy" in what:
        print(f"decomposition, REFERENCE.md matrix {args.size}^2, r {args.rank}, niter {args.niter}:", flush=True)
        W64 = reference_matrix(args.size)
        for dtype in (torch.float32, torch.bfloat16):
            out["accuracy"][str(dtype)] = accuracy(W64, args.rank, args.niter, dtype, max(1, args.repeats // 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
