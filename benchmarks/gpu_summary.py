"""The last lines of benchmarks/gpu_check.sh: one table comparing the two CUDA implementations of the
passes (aten, kernels) from the JSON that gpu_ops_check.py and gpu_bench.py wrote, against issue 8's
targets (whole model <= 0.15 s, each pass >= 70 % of copy bandwidth, >= 20x the peft path), and which
implementation should be the default on this GPU.

    python benchmarks/gpu_summary.py --ops ops_check.json --bench bench.json [--stages memcheck=ok,...]

The rule: an implementation qualifies when its ops check ran every case without a failure and its
benchmark timed the whole model; the kernels must also have passed compute-sanitizer. The kernels are
recommended only if they qualify and are at least 5 % faster on the whole model than the ATen passes,
which are deterministic and the default until a GPU proves otherwise (csrc/cuda/passes_cuda.cpp).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

IMPLS = ("aten", "kernels")
TARGET_SECONDS, TARGET_OF_COPY, TARGET_VS_PEFT = 0.15, 0.70, 20.0


def load(path):
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError:
            return {}
    return {}


def fmt(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def table(ops, bench, stages):
    lines = []
    env = bench.get("env", {})
    cfg = bench.get("config", {})
    gpu = env.get("gpu", env.get("device", "?"))
    cap = env.get("capability", "?")
    lines.append(f"== CUDA passes on {gpu} (sm_{cap.replace('.', '')}), {cfg.get('layers', '?')}-layer "
                 f"LLaMA-2-7B-shaped {cfg.get('dtype', 'bf16').replace('torch.', '')}, r {cfg.get('r', '?')}, "
                 f"niter {cfg.get('niter', '?')}, in place")
    base = bench.get("baselines", {})
    peft_s = base.get("peft_lowrank", {}).get("seconds")
    rows = []

    def row(label, fn):
        rows.append((label, [fn(i) for i in IMPLS]))

    def op(i):
        return ops.get("impls", {}).get(i)

    def b(i):
        return bench.get("impls", {}).get(i)

    def worst(i):
        o = op(i)
        if not o:
            return None
        return max((c.get("err_over_bound", 0.0) for r in o["results"] for c in r.get("checks", {}).values()),
                   default=0.0)

    def deterministic(i):
        o = op(i)
        if not o:
            return "-"
        flags = [r["checks"]["gram.deterministic"]["same_bits"] for r in o["results"]
                 if "gram.deterministic" in r.get("checks", {})]
        return "yes" if flags and all(flags) else "no"

    row("ops vs CPU twin (cases ok)", lambda i: f"{op(i)['cases'] - op(i)['failures']}/{op(i)['cases']}" if op(i) else "not run")
    row("  worst error / bound", lambda i: fmt(worst(i), ".3f"))
    row("  gram same bits twice", deterministic)
    row("whole model, s (<= 0.15)", lambda i: fmt((b(i) or {}).get("pissa_fast", {}).get("seconds"), ".3f"))
    row("  x peft path (>= 20)", lambda i: fmt(peft_s / b(i)["pissa_fast"]["seconds"], ".1f", "x")
        if peft_s and b(i) and "pissa_fast" in b(i) else "-")
    for kn in ("gram", "wx", "wtx", "residual_"):
        row(f"{kn} GB/s (% of copy)", lambda i, kn=kn: (f"{b(i)[kn + '_model_gbs']:.0f} ({100 * b(i)[kn + '_of_copy']:.0f}%)"
                                                       if b(i) and kn + "_model_gbs" in b(i) else "-"))
    row("  gram vs wx + wtx", lambda i: fmt(min((v["gram_vs_wx_wtx"] for v in b(i)["kernels"].values()), default=None),
                                            ".2f", "x (worst group)") if b(i) and "kernels" in b(i) else "-")
    for key in ("square", "tall"):
        row(f"L1 vs exact, {key}", lambda i, key=key: fmt((b(i) or {}).get("errors", {}).get(key, {})
                                                          .get("pissa_fast", {}).get("l1"), ".2e"))
    row("copy GB/s", lambda i: fmt((b(i) or {}).get("copy_gbs"), ".0f"))
    width = max(len(r[0]) for r in rows) + 2
    lines.append(f"{'':{width}s}{'aten':>22s}{'kernels':>22s}")
    for label, vals in rows:
        lines.append(f"{label:{width}s}" + "".join(f"{v:>22s}" for v in vals))
    for key, e in base.get("errors", {}).items():
        lines.append(f"peft path L1 vs exact, {key}: {e['peft_lowrank']['l1']:.2e}")
    if peft_s:
        lines.append(f"peft path {peft_s:.2f} s; torch.linalg.svd {base.get('linalg_svd', {}).get('model_seconds_extrapolated', 0):.0f} s (extrapolated)")

    # The recommendation.
    def qualifies(i):
        o, bb = op(i), b(i)
        ok = bool(o) and o["failures"] == 0 and bool(bb) and "pissa_fast" in bb
        if i == "kernels":
            ok = ok and stages.get("memcheck") == "ok"
        return ok

    t = {i: b(i)["pissa_fast"]["seconds"] for i in IMPLS if qualifies(i)}
    if "kernels" in t and ("aten" not in t or t["kernels"] < 0.95 * t["aten"]):
        choice, why = "kernels", ("passed and are " + (f"{t['aten'] / t['kernels']:.2f}x as fast as the ATen passes"
                                                        if "aten" in t else "the only implementation that passed"))
    elif "aten" in t:
        choice, why = "aten", ("passed" + ("; the kernels did not qualify (ops check, memcheck or benchmark)"
                                           if "kernels" not in t else "; the kernels are not >= 5% faster"))
    else:
        choice, why = "aten", "neither implementation passed: keep the code default and investigate"
    lines.append(f"recommended default on this GPU (sm_{cap.replace('.', '')}): {choice} ({why})")
    if choice == "kernels" and cap != "?":
        major, minor = cap.split(".")
        date = datetime.date.today().isoformat()
        lines.append(f"  to make it so, add to kKernelsProven in csrc/cuda/passes_cuda.cpp: "
                     f"{{{major}, {minor}, \"{date}, {gpu}, RESULTS.md\"}}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=None)
    p.add_argument("--bench", default=None)
    p.add_argument("--stages", default="", help="name=status,... of gpu_check.sh's stages (memcheck=ok)")
    args = p.parse_args(argv)
    stages = dict(kv.split("=", 1) for kv in args.stages.split(",") if "=" in kv)
    print("\n".join(table(load(args.ops), load(args.bench), stages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
