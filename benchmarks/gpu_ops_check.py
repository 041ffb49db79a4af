"""Every native op on a device against its CPU twin and float64 math, for each CUDA implementation of the
passes (the ATen/cuBLAS passes and the hand-written kernels), on fresh random inputs, with the device
outputs poisoned before each call. Part of benchmarks/gpu_check.sh (see /work/shared/GPU.md); runs
anywhere:

    python benchmarks/gpu_ops_check.py --device cuda --impls aten --json out.json
    python benchmarks/gpu_ops_check.py --device cpu --small          # the script itself, on a CPU
                                                                     # (aten: the ATen passes in place
                                                                     # of the CPU kernels)
    python benchmarks/gpu_ops_check.py --device cuda --impls kernels --sanitize   # one small call of
                                                                     # each op, for compute-sanitizer
Each comparison is held to a rounding bound derived from the dtype and the problem (pissa_fast._bounds:
n u |W| |V| for a length-n dot product in the accumulation precision u, plus the split error of the
ATen passes' bf16/fp16 parts; one rounding to the weight dtype for the residual), not a tuned
tolerance. Poisoning: every fresh allocation is NaN-filled (torch's deterministic mode), and NaN blocks
are left in the caching allocator. The ATen passes run their float32 cases with TF32 enabled globally
(they must not use it) and must give the same bits twice. --json merges this run's implementations into
the file, so gpu_check.sh can check each in its own process. Exit status 1 if any case fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic mode needs it for cuBLAS

import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402
from pissa_fast._bounds import acc_dtype, gram_bounds, pass_bound, residual_bound  # noqa: E402
from pissa_fast.passes import _aten_passes_on_cpu  # noqa: E402

ops = pf.ops
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (b, m, n, k, layout): odd sizes, single rows/columns, row-strided views, lists, LLaMA rows (column
# slices joined as clusters on sm_90), rows too long for shared memory (streamed column chunks), a
# 4096^2 weight (more than one L2-sized row block of the ATen gram).
PASS_CASES = [
    (1, 1, 40, 5, "contiguous"), (1, 37, 1, 3, "contiguous"), (3, 37, 53, 16, "cols"),
    (2, 70, 300, 33, "cols"), (2, 256, 4096, 16, "contiguous"), (1, 512, 11008, 32, "cols"),
    (2, 1024, 4096, 16, "contiguous"), (1, 5, 300001, 16, "contiguous"), (1, 4096, 4096, 16, "contiguous"),
]
PASS_SMALL = [(1, 1, 40, 5, "contiguous"), (1, 37, 1, 3, "contiguous"), (3, 37, 53, 16, "cols"),
              (2, 70, 300, 33, "cols")]
PASS_SANITIZE = [(2, 37, 53, 20, "cols"), (1, 64, 4096, 16, "contiguous"), (1, 3, 300001, 4, "contiguous")]

# (b, m, n, r, layout)
RES_CASES = [(1, 1, 7, 3, "contiguous"), (1, 5, 1, 1, "contiguous"), (3, 67, 131, 16, "cols"),
             (2, 1024, 4096, 16, "contiguous"), (1, 300, 11008, 40, "cols"), (1, 129, 257, 300, "contiguous")]
RES_SMALL = [(1, 1, 7, 3, "contiguous"), (1, 5, 1, 1, "contiguous"), (3, 67, 131, 16, "cols")]
RES_SANITIZE = [(2, 67, 131, 16, "cols"), (1, 64, 200, 40, "contiguous")]


def weights(b, m, n, dtype, layout, gen, device):
    """The same values on the CPU and on `device`, both with the requested layout."""
    cpu, dev = [], []
    for _ in range(b):
        extra = 3 if layout == "cols" else 0
        base = torch.randn(m, n + extra, generator=gen).to(dtype)
        cpu.append(base[:, :n])
        dev.append(base.to(device)[:, :n] if device != "cpu" else base.clone()[:, :n])
    return cpu, dev


@contextlib.contextmanager
def poisoned(device):
    """Fresh allocations NaN-filled (deterministic mode, warn-only), and NaN blocks freed into the
    caching allocator where the outputs are likely to land."""
    det = torch.utils.deterministic
    old, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    if device != "cpu":
        blocks = [torch.full((1 << 20,), float("nan"), device=device) for _ in range(4)]
        del blocks
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)
        det.fill_uninitialized_memory = old_fill


@contextlib.contextmanager
def tf32_enabled(on):
    """TF32 allowed for float32 matmuls (the ATen passes must not use it)."""
    old = torch.get_float32_matmul_precision()
    if on:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def judge(got, ref, bound):
    got = got.detach().double().cpu()
    finite = bool(torch.isfinite(got).all())
    ratio = float(((got - ref).abs() / bound).max()) if got.numel() else 0.0
    return {"finite": finite, "err_over_bound": ratio, "ok": finite and ratio <= 1.0}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_pass(case, dtype, device, gen, split, aten):
    b, m, n, k, layout = case
    Wc, Wd = weights(b, m, n, dtype, layout, gen, device)
    a = acc_dtype(dtype)
    V = torch.randn(b, n, k, generator=gen, dtype=a)
    Yin = torch.randn(b, m, k, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    aW = W64.abs()
    Yref = W64 @ V.double()
    Zref = W64.mT @ Yref
    Tref = W64.mT @ Yin.double()
    Yb, Zb = gram_bounds(aW, V.double(), dtype, split)
    Tb = pass_bound(aW.mT, Yin.double(), dtype, split)
    Ycb, Zcb = gram_bounds(aW, V.double(), dtype, False)  # the CPU twin's
    Vd, Yd = V.to(device), Yin.to(device)
    res = {}
    with poisoned(device), tf32_enabled(aten and dtype == torch.float32):
        res["wx"] = judge(ops.wx(Wd, Vd), Yref, Yb)
        res["wtx"] = judge(ops.wtx(Wd, Yd), Tref, Tb)
        Y, Z = ops.gram(Wd, Vd)
        res["gram.Y"] = judge(Y, Yref, Yb)
        res["gram.Z"] = judge(Z, Zref, Zb)
        Y2, Z2 = ops.gram(Wd, Vd)
        same = bool(torch.equal(Y, Y2) and torch.equal(Z, Z2))
        # Only the ATen passes promise the same bits (the kernels reduce Z with atomics).
        res["gram.deterministic"] = {"ok": same or not aten, "same_bits": same}
    # Against the CPU twin: each within its bound of float64, so within their sum of each other.
    Yc, Zc = ops.gram(Wc, V)
    res["gram.Y~cpu"] = judge(Y, Yc.double(), Yb + Ycb)
    res["gram.Z~cpu"] = judge(Z, Zc.double(), Zb + Zcb)
    sync(device)
    return res


def check_residual(case, dtype, device, gen, split):
    b, m, n, r, layout = case
    Wc, Wd = weights(b, m, n, dtype, layout, gen, device)
    a = acc_dtype(dtype)
    B = torch.randn(b, m, r, generator=gen, dtype=a)
    A = torch.randn(b, r, n, generator=gen, dtype=a)
    W64 = torch.stack([w.double() for w in Wc])
    ref = W64 - B.double() @ A.double()
    bound = residual_bound(W64, B.double(), A.double(), dtype, split)
    cpu_bound = residual_bound(W64, B.double(), A.double(), dtype, False)
    Bd, Ad = B.to(device), A.to(device)
    cpu = torch.stack(ops.residual(Wc, B, A)).double()
    res = {}
    with poisoned(device):
        out = ops.residual(Wd, Bd, Ad)
    got = torch.stack([o.cpu() for o in out])
    res["residual"] = judge(got, ref, bound)
    res["residual~cpu"] = judge(got, cpu, bound + cpu_bound)
    res["residual.contiguous"] = {"ok": all(o.is_contiguous() for o in out)}
    bases = [w._base.clone() if w._base is not None else None for w in Wd]
    with poisoned(device):
        ops.residual_(Wd, Bd, Ad)
    got = torch.stack([w.cpu() for w in Wd])
    res["residual_"] = judge(got, ref, bound)
    untouched = all(bs is None or torch.equal(w._base[:, n:], bs[:, n:]) for w, bs in zip(Wd, bases))
    res["residual_.outside_view_untouched"] = {"ok": untouched}
    sync(device)
    return res


@contextlib.contextmanager
def implementation(impl, device):
    """The passes of `device` run `impl`: the CUDA switch, or on a CPU the ATen passes in place of the
    CPU kernels ("kernels" there means the CPU kernels themselves: the script's own smoke test)."""
    if device.startswith("cuda"):
        with pf.use_cuda_passes(impl):
            yield
    elif impl == "aten":
        with _aten_passes_on_cpu():
            yield
    else:
        yield


def run_impl(impl, pass_cases, res_cases, dtypes, device, seed):
    gen = torch.Generator().manual_seed(seed)
    results, failures = [], 0
    aten = impl == "aten"
    with implementation(impl, device):
        for kind, cases in (("pass", pass_cases), ("residual", res_cases)):
            for dname in dtypes:
                dtype = DTYPES[dname]
                split = aten and dtype in (torch.bfloat16, torch.float16)
                for case in cases:
                    t0 = time.time()
                    entry = {"impl": impl, "kind": kind, "dtype": dname, "case": list(case)}
                    try:
                        if kind == "pass":
                            entry["checks"] = check_pass(case, dtype, device, gen, split, aten)
                        else:
                            entry["checks"] = check_residual(case, dtype, device, gen, split)
                        entry["ok"] = all(c["ok"] for c in entry["checks"].values())
                    except Exception as e:  # a crash is a failed case, reported with its traceback
                        entry["ok"] = False
                        entry["error"] = f"{type(e).__name__}: {e}"
                        traceback.print_exc()
                    entry["seconds"] = round(time.time() - t0, 3)
                    failures += not entry["ok"]
                    checks = entry.get("checks", {}).values()
                    worst = max((c.get("err_over_bound", 0.0) for c in checks), default=0.0)
                    bad = [n for n, c in entry.get("checks", {}).items() if not c["ok"]]
                    print(f"{'ok  ' if entry['ok'] else 'FAIL'} {impl:7s} {kind:8s} {dname:4s} {str(case):32s} "
                          f"worst err/bound {worst:.3f}  {entry['seconds']:.2f}s"
                          + (f"  failed: {bad}" if bad else "") + (f"  {entry['error']}" if "error" in entry else ""),
                          flush=True)
                    results.append(entry)
    return results, failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--impls", default="aten,kernels", help="comma-separated: aten, kernels")
    p.add_argument("--small", action="store_true", help="tiny shapes only (CPU smoke test)")
    p.add_argument("--sanitize", action="store_true", help="one small call of each op (compute-sanitizer)")
    p.add_argument("--dtypes", default=None, help="comma-separated (default fp32,bf16,fp16; fp32,bf16 with --sanitize)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="merge the per-case results of these implementations into this file")
    args = p.parse_args(argv)

    device = args.device
    print(f"# gpu_ops_check  torch {torch.__version__}  build {pf.build_info()}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") and torch.cuda.is_available() else "")
          + f"  impls {args.impls}  python {platform.python_version()}  threads {torch.get_num_threads()}", flush=True)
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

    summary = {"device": device, "build": pf.build_info(), "torch": torch.__version__, "impls": {}}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            summary = json.load(f)
    total_failures = 0
    for impl in args.impls.split(","):
        t_start = time.time()
        results, failures = run_impl(impl, pass_cases, res_cases, dtypes, device, args.seed)
        total_failures += failures
        summary["impls"][impl] = {"cases": len(results), "failures": failures,
                                  "seconds": round(time.time() - t_start, 2), "results": results}
        print(f"# ops check ({impl}): {len(results) - failures}/{len(results)} cases passed on {device}", flush=True)
        if args.json:  # after each implementation, so a crash in the next one keeps these
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
