"""Every native op on a device against its CPU twin and float64 math, on fresh random inputs, with the
device outputs poisoned (NaN-filled caching-allocator blocks) before each call. Part of
benchmarks/gpu_check.sh (see /work/shared/GPU.md); runs anywhere:

    python benchmarks/gpu_ops_check.py --device cuda --json out.json
    python benchmarks/gpu_ops_check.py --device cpu --small          # the script itself, on a CPU
    python benchmarks/gpu_ops_check.py --device cuda --sanitize      # one small call of each op, for
                                                                     # compute-sanitizer
Each comparison is held to a rounding bound derived from the dtype and the problem (n u |W| |V| for a
length-n dot product in the accumulation precision u; one rounding to the weight dtype for the
residual), not a tuned tolerance. Exit status 1 if any case fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402

ops = pf.ops
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (b, m, n, k, layout): odd sizes, single rows/columns, row-strided views, lists, LLaMA rows (column
# slices joined as clusters on sm_90), rows too long for shared memory (streamed column chunks).
PASS_CASES = [
    (1, 1, 40, 5, "contiguous"), (1, 37, 1, 3, "contiguous"), (3, 37, 53, 16, "cols"),
    (2, 70, 300, 33, "cols"), (2, 256, 4096, 16, "contiguous"), (1, 512, 11008, 32, "cols"),
    (2, 1024, 4096, 16, "contiguous"), (1, 5, 300001, 16, "contiguous"),
]
PASS_SMALL = [(1, 1, 40, 5, "contiguous"), (1, 37, 1, 3, "contiguous"), (3, 37, 53, 16, "cols"),
              (2, 70, 300, 33, "cols")]
PASS_SANITIZE = [(2, 37, 53, 20, "cols"), (1, 64, 4096, 16, "contiguous"), (1, 3, 300001, 4, "contiguous")]

# (b, m, n, r, layout)
RES_CASES = [(1, 1, 7, 3, "contiguous"), (1, 5, 1, 1, "contiguous"), (3, 67, 131, 16, "cols"),
             (2, 1024, 4096, 16, "contiguous"), (1, 300, 11008, 40, "cols"), (1, 129, 257, 300, "contiguous")]
RES_SMALL = [(1, 1, 7, 3, "contiguous"), (1, 5, 1, 1, "contiguous"), (3, 67, 131, 16, "cols")]
RES_SANITIZE = [(2, 67, 131, 16, "cols"), (1, 64, 200, 40, "contiguous")]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit(dtype):
    """Unit roundoff of the accumulation."""
    return torch.finfo(acc(dtype)).eps / 2


def gamma(n, u):
    """gamma_n = n u / (1 - n u): |fl(x . y) - x . y| <= gamma_n |x| . |y| for a length-n dot product
    in any summation order (Higham, Accuracy and Stability, 3.1)."""
    return n * u / (1 - n * u)


def weights(b, m, n, dtype, layout, gen, device):
    """The same values on the CPU and on `device`, both with the requested layout."""
    cpu, dev = [], []
    for _ in range(b):
        extra = 3 if layout == "cols" else 0
        base = torch.randn(m, n + extra, generator=gen).to(dtype)
        cpu.append(base[:, :n])
        dev.append(base.to(device)[:, :n] if device != "cpu" else base.clone()[:, :n])
    return cpu, dev


def poison(device, *specs):
    """NaN-filled blocks of the output sizes, freed into the caching allocator just before an op
    allocates its outputs there: an entry a kernel does not write stays NaN."""
    if device == "cpu":
        return
    blocks = [torch.full(s, float("nan"), dtype=d, device=device) for s, d in specs]
    del blocks


def judge(got, ref, bound):
    got = got.detach().double().cpu()
    finite = bool(torch.isfinite(got).all())
    ratio = float(((got - ref).abs() / (bound + 1e-300)).max()) if got.numel() else 0.0
    return {"finite": finite, "err_over_bound": ratio, "ok": finite and ratio <= 1.0}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_pass(case, dtype, device, gen):
    b, m, n, k, layout = case
    Wc, Wd = weights(b, m, n, dtype, layout, gen, device)
    a = acc(dtype)
    V = torch.randn(b, n, k, generator=gen, dtype=a)
    Yin = torch.randn(b, m, k, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    aW = W64.abs()
    u = unit(dtype)
    Yref = W64 @ V.double()
    Yb = gamma(n, u) * (aW @ V.double().abs())
    Zref = W64.mT @ Yref
    Zb = gamma(n + m, u) * (aW.mT @ (aW @ V.double().abs()))
    Tref = W64.mT @ Yin.double()
    Tb = gamma(m, u) * (aW.mT @ Yin.double().abs())
    Vd, Yd = V.to(device), Yin.to(device)
    res = {}
    poison(device, ((b, m, k), a))
    res["wx"] = judge(ops.wx(Wd, Vd), Yref, Yb)
    poison(device, ((b, n, k), a))
    res["wtx"] = judge(ops.wtx(Wd, Yd), Tref, Tb)
    poison(device, ((b, m, k), a), ((b, n, k), a))
    Y, Z = ops.gram(Wd, Vd)
    res["gram.Y"] = judge(Y, Yref, Yb)
    res["gram.Z"] = judge(Z, Zref, Zb)
    # Against the CPU twin: both within their bound of float64, so within twice of each other.
    Yc, Zc = ops.gram(Wc, V)
    res["gram.Y~cpu"] = judge(Y, Yc.double(), 2 * Yb)
    res["gram.Z~cpu"] = judge(Z, Zc.double(), 2 * Zb)
    sync(device)
    return res


def check_residual(case, dtype, device, gen):
    b, m, n, r, layout = case
    Wc, Wd = weights(b, m, n, dtype, layout, gen, device)
    a = acc(dtype)
    B = torch.randn(b, m, r, generator=gen, dtype=a)
    A = torch.randn(b, r, n, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    ref = W64 - B.double() @ A.double()
    bound = (torch.finfo(dtype).eps * ref.abs()
             + gamma(r + 2, unit(dtype)) * (B.double().abs() @ A.double().abs() + W64.abs()))
    Bd, Ad = B.to(device), A.to(device)
    cpu = torch.stack(ops.residual(Wc, B, A)).double()
    res = {}
    poison(device, *[((m, n), dtype)] * b)
    out = ops.residual(Wd, Bd, Ad)
    got = torch.stack([o.cpu() for o in out])
    res["residual"] = judge(got, ref, bound)
    res["residual~cpu"] = judge(got, cpu, 2 * bound)
    res["residual.contiguous"] = {"ok": all(o.is_contiguous() for o in out)}
    bases = [w._base.clone() if w._base is not None else None for w in Wd]
    ops.residual_(Wd, Bd, Ad)
    got = torch.stack([w.cpu() for w in Wd])
    res["residual_"] = judge(got, ref, bound)
    untouched = all(bs is None or torch.equal(w._base[:, n:], bs[:, n:]) for w, bs in zip(Wd, bases))
    res["residual_.outside_view_untouched"] = {"ok": untouched}
    sync(device)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes only (CPU smoke test)")
    p.add_argument("--sanitize", action="store_true", help="one small call of each op (compute-sanitizer)")
    p.add_argument("--dtypes", default=None, help="comma-separated (default fp32,bf16,fp16; fp32,bf16 with --sanitize)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the per-case results here")
    args = p.parse_args(argv)

    device = args.device
    print(f"# gpu_ops_check  torch {torch.__version__}  build {pf.build_info()}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else "")
          + f"  python {platform.python_version()}  threads {torch.get_num_threads()}", flush=True)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", flush=True)
        return 2
    if args.sanitize:
        pass_cases, res_cases = PASS_SANITIZE, RES_SANITIZE
    elif args.small:
        pass_cases, res_cases = PASS_SMALL, RES_SMALL
    else:
        pass_cases, res_cases = PASS_CASES, RES_CASES
    dtypes = (args.dtypes or ("fp32,bf16" if args.sanitize else "fp32,bf16,fp16")).split(",")

    gen = torch.Generator().manual_seed(args.seed)
    results, failures = [], 0
    t_start = time.time()
    for kind, cases, fn in (("pass", pass_cases, check_pass), ("residual", res_cases, check_residual)):
        for dname in dtypes:
            for case in cases:
                t0 = time.time()
                entry = {"kind": kind, "dtype": dname, "case": list(case)}
                try:
                    entry["checks"] = fn(case, DTYPES[dname], device, gen)
                    entry["ok"] = all(c["ok"] for c in entry["checks"].values())
                except Exception as e:  # a crash is a failed case, reported with its traceback
                    entry["ok"] = False
                    entry["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                entry["seconds"] = round(time.time() - t0, 3)
                failures += not entry["ok"]
                worst = max((c.get("err_over_bound", 0.0) for c in entry.get("checks", {}).values()), default=0.0)
                bad = [n for n, c in entry.get("checks", {}).items() if not c["ok"]]
                print(f"{'ok  ' if entry['ok'] else 'FAIL'} {kind:8s} {dname:4s} {str(case):32s} "
                      f"worst err/bound {worst:.3f}  {entry['seconds']:.2f}s"
                      + (f"  failed: {bad}" if bad else "") + (f"  {entry['error']}" if "error" in entry else ""),
                      flush=True)
                results.append(entry)
    summary = {"device": device, "build": pf.build_info(), "torch": torch.__version__, "cases": len(results),
               "failures": failures, "seconds": round(time.time() - t_start, 2), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"# ops check: {len(results) - failures}/{len(results)} cases passed on {device}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
