"""GPU benchmark of a whole model's PiSSA initialization: LLaMA-2-7B-shaped bf16 weights (32 layers x
q,k,v,o 4096x4096, gate/up 11008x4096, down 4096x11008), r = 16, niter = 4, with one of the two CUDA
implementations of the passes (--impl aten | kernels). Part of benchmarks/gpu_check.sh (see
/work/shared/GPU.md), which runs it once per implementation, each in its own process.

Measured in one run on one device:
  - pissa_fast.decompose_many(weights, r, niter, inplace=True) on every matrix, after a warm-up;
  - achieved GB/s of the gram, wx, wtx and residual_ passes on each same-shape group, against a
    device-to-device copy (clone of a large bf16 tensor) measured in the same run, and how much the
    fused gram pass saves over wx + wtx (two reads of W);
  - error against the exact SVD (pissa_fast.error_vs_exact) on sample matrices;
  - with --baselines (once per GPU check): the peft path ("pissa_niter_4": per matrix, fp32 copy,
    torch.svd_lowrank(w, q=r, niter), factors, residual cast back; all matrices unless its time budget
    runs out, then extrapolated) and torch.linalg.svd (peft's "pissa") on one matrix of each shape,
    extrapolated to the model, both with the peft path's error on the same samples.
Weights are generated on the device: a decaying low-rank part plus noise (spectra like trained layers'
heads and tails), cheap to build. --json merges this run into the file: out["impls"][impl] and
out["baselines"]; benchmarks/gpu_summary.py turns it into the table. Prints the environment first.

    python benchmarks/gpu_bench.py --device cuda --impl aten --baselines --json bench.json
    python benchmarks/gpu_bench.py --device cuda --impl kernels --json bench.json
    python benchmarks/gpu_bench.py --device cpu --small --impl aten      # the script itself, on a CPU
"""
from __future__ import annotations

import argparse
import json
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pissa_fast as pf  # noqa: E402
from pissa_fast.passes import _aten_passes_on_cpu  # noqa: E402

ops = pf.ops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a region on `device` (CUDA events on a GPU)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def median_time(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


def model_shapes(layers, hidden, inter):
    shapes = {}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"layers.{i}.self_attn.{name}"] = (hidden, hidden)
        shapes[f"layers.{i}.mlp.gate_proj"] = (inter, hidden)
        shapes[f"layers.{i}.mlp.up_proj"] = (inter, hidden)
        shapes[f"layers.{i}.mlp.down_proj"] = (hidden, inter)
    return shapes


def make_weight(m, n, dtype, device, gen, rank=64):
    """0.02-scaled noise plus a rank-`rank` part with singular values decaying from 1 (a trained
    layer's head), built in the weight dtype with one small matmul."""
    w = torch.randn(m, n, device=device, dtype=dtype, generator=gen).mul_(0.02)
    rank = min(rank, m, n)
    s = torch.logspace(0, -1.5, rank, device=device)
    U = torch.randn(m, rank, device=device, generator=gen) / math.sqrt(m)
    V = torch.randn(rank, n, device=device, generator=gen) / math.sqrt(n)
    w.add_(((U * s) @ V).to(dtype))
    return w


def peft_pissa_lowrank(weight, r, niter):
    """peft's LoraLayer.pissa_init for init_lora_weights=f"pissa_niter_{niter}" (scaling 1)."""
    w = weight.to(torch.float32)
    Vr, Sr, Ur = torch.svd_lowrank(w, q=r, niter=niter)
    Uhr = Ur.t()
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    residual = (w - lora_B @ lora_A).to(weight.dtype)
    return SimpleNamespace(A=lora_A, B=lora_B, S=Sr, residual=residual)


def peft_pissa_exact(weight, r):
    """peft's LoraLayer.pissa_init for init_lora_weights="pissa" (full torch.linalg.svd, scaling 1)."""
    w = weight.to(torch.float32)
    V, S, Uh = torch.linalg.svd(w, full_matrices=False)
    Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    residual = (w - lora_B @ lora_A).to(weight.dtype)
    return SimpleNamespace(A=lora_A, B=lora_B, S=Sr, residual=residual)


def environment(device):
    env = {"torch": torch.__version__, "pissa_fast_build": pf.build_info(), "python": platform.python_version(),
           "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def implementation(impl, device):
    """The passes run `impl`: the CUDA switch; on a CPU (smoke test) "aten" puts the ATen passes in
    place of the CPU kernels and "kernels" means the CPU kernels."""
    if device.type == "cuda":
        return pf.use_cuda_passes(impl)
    return _aten_passes_on_cpu() if impl == "aten" else contextlib.nullcontext()


def load_json(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--impl", default="aten", choices=("aten", "kernels"))
    p.add_argument("--baselines", action="store_true", help="also time the peft path and torch.linalg.svd")
    p.add_argument("--small", action="store_true", help="a tiny model (CPU smoke test)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="repetitions of each kernel timing (median)")
    p.add_argument("--peft-budget-s", type=float, default=60.0,
                   help="time the peft path on whole layers until this (or a quarter of --budget-s) is "
                        "spent, then extrapolate")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="total time to stay within: the peft timing shrinks and the exact-SVD error samples "
                        "are skipped when they would not fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="merge this run into this file")
    args = p.parse_args(argv)
    t_begin = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", flush=True)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16
    if args.small:
        layers, hidden, inter = args.layers or 2, 64, 172
    else:
        layers, hidden, inter = args.layers or 32, 4096, 11008
    r, niter, impl = args.r, args.niter, args.impl
    env = environment(device)
    print("# gpu_bench " + "  ".join(f"{k}={v}" for k, v in env.items()) + f"  impl={impl}", flush=True)
    print(f"# model: {layers} layers, hidden {hidden}, intermediate {inter}, {dtype}, r={r}, niter={niter}",
          flush=True)
    doc = load_json(args.json)
    doc.update(env=env, config=dict(layers=layers, hidden=hidden, inter=inter, dtype=str(dtype), r=r,
                                    niter=niter, small=args.small))
    out = doc.setdefault("impls", {})[impl] = {}

    def save():  # after every section, so a run cut short by a time limit still leaves its numbers
        if args.json:
            out["seconds_total"] = time.time() - t_begin
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    # ---- weights
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shapes = model_shapes(layers, hidden, inter)
    t0 = time.time()
    weights = {name: make_weight(m, n, dtype, device, gen) for name, (m, n) in shapes.items()}
    sync(device)
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    print(f"weights: {len(weights)} matrices, {nbytes / 1e9:.2f} GB, generated in {time.time() - t0:.1f}s", flush=True)
    doc["weights"] = {"matrices": len(weights), "gb": nbytes / 1e9}
    save()
    samples = {"square": "layers.0.self_attn.q_proj", "tall": "layers.0.mlp.gate_proj"}
    originals = {k: weights[name].clone() for k, name in samples.items()}

    # ---- bandwidth roofline: device-to-device copy
    big = torch.empty(int(min(2 << 30, nbytes // 4)) // 2, dtype=dtype, device=device)
    big.normal_()
    copy_s = median_time(lambda: big.clone(), device, args.reps)
    copy_gbs = 2 * big.numel() * big.element_size() / copy_s / 1e9
    del big
    print(f"copy (clone, read+write): {copy_gbs:.0f} GB/s", flush=True)
    out["copy_gbs"] = copy_gbs
    save()

    with implementation(impl, device):
        # ---- pissa_fast, whole model, in place (warm-up on copies of one layer first)
        warm = {k: v.clone() for k, v in list(weights.items())[:7]}
        pf.decompose_many(warm, r=r, niter=niter, inplace=True)
        del warm
        sync(device)
        with Timer(device) as t:
            decs = pf.decompose_many(weights, r=r, niter=niter, inplace=True)
        pf_s = t.seconds
        passes = niter + 1
        print(f"pissa_fast.decompose_many ({impl}, in place, {len(weights)} matrices): {pf_s:.3f}s", flush=True)
        out["pissa_fast"] = {"seconds": pf_s, "passes_over_W": passes, "residual_passes": 1,
                             "effective_gbs": (passes + 2) * nbytes / pf_s / 1e9}
        save()

        # ---- pass bandwidth on each same-shape group (weights now hold residuals; values do not matter)
        groups = {}
        for name, w in weights.items():
            groups.setdefault(tuple(w.shape), []).append(w)
        kernels = {}
        for shape, ws in groups.items():
            b, (m, n) = len(ws), shape
            wbytes = b * m * n * ws[0].element_size()
            k = r  # the width Krylov passes use at niter >= 3 (no oversampling)
            V = torch.randn(b, n, k, device=device, dtype=torch.float32)
            Y = torch.randn(b, m, k, device=device, dtype=torch.float32)
            Bf = torch.randn(b, m, r, device=device, dtype=torch.float32) * 1e-4
            Af = torch.randn(b, r, n, device=device, dtype=torch.float32) * 1e-4
            row = {"matrices": b, "shape": list(shape), "w_gb": wbytes / 1e9}
            for kname, fn, moved in (("gram", lambda: ops.gram(ws, V), wbytes),
                                     ("wx", lambda: ops.wx(ws, V), wbytes),
                                     ("wtx", lambda: ops.wtx(ws, Y), wbytes),
                                     ("residual_", lambda: ops.residual_(ws, Bf, Af), 2 * wbytes)):
                sec = median_time(fn, device, args.reps)
                row[kname] = {"seconds": sec, "gbs": moved / sec / 1e9, "of_copy": moved / sec / 1e9 / copy_gbs}
            row["gram_vs_wx_wtx"] = (row["wx"]["seconds"] + row["wtx"]["seconds"]) / row["gram"]["seconds"]
            kernels["x".join(map(str, shape))] = row
            print(f"group {b:3d} x {m}x{n}: " + "  ".join(
                f"{kn} {row[kn]['gbs']:.0f} GB/s ({100 * row[kn]['of_copy']:.0f}% of copy)"
                for kn in ("gram", "wx", "wtx", "residual_"))
                + f"  gram saves {row['gram_vs_wx_wtx']:.2f}x over wx+wtx", flush=True)
            del V, Y, Bf, Af
        out["kernels"] = kernels
        total_w = sum(v["w_gb"] for v in kernels.values())
        for kn in ("gram", "wx", "wtx", "residual_"):
            secs = sum(v[kn]["seconds"] for v in kernels.values())
            moved = total_w * (2 if kn == "residual_" else 1)
            out[f"{kn}_model_gbs"] = moved / secs
            out[f"{kn}_of_copy"] = moved / secs / copy_gbs
        save()
        del weights, decs, groups
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # ---- error against the exact SVD on samples (originals kept before the in-place run)
        errors, exacts = {}, {}
        keys = ["square", "tall"] if args.baselines else ["square"]
        for key in keys:
            elapsed = time.time() - t_begin
            if elapsed > args.budget_s * (0.45 if key == "tall" else 0.6):  # a float64 SVD of the sample
                print(f"error sample {key}: skipped ({elapsed:.0f}s spent of {args.budget_s:.0f}s)", flush=True)
                continue
            w = originals[key]
            exacts[key] = pf.exact_factors(w)
            mine = pf.decompose(w.clone(), r=r, niter=niter)
            e = pf.error_vs_exact(w, mine, exact=exacts[key]).as_dict()
            errors[key] = {"matrix": samples[key], "shape": list(w.shape), "pissa_fast": e}
            print(f"error vs exact SVD, {samples[key]} {tuple(w.shape)}: pissa_fast ({impl}) L1 {e['l1']:.3e} "
                  f"(excess {e['excess']:.2e})", flush=True)
            out["errors"] = errors
            save()
    if args.baselines:
        doc["baselines"] = baselines(args, device, dtype, layers, hidden, inter, shapes, originals, exacts,
                                     samples, t_begin, save)
        save()
    print(f"gpu_bench ({impl}) done in {time.time() - t_begin:.0f}s", flush=True)
    return 0


def baselines(args, device, dtype, layers, hidden, inter, shapes, originals, exacts, samples, t_begin, save):
    """The peft path and torch.linalg.svd on the same GPU, and the peft path's error on the samples."""
    r, niter = args.r, args.niter
    res = {}
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    layer_shapes = [(m, n) for name, (m, n) in shapes.items() if name.startswith("layers.0.")]
    w0 = {s: make_weight(*s, dtype, device, gen) for s in set(layer_shapes)}
    peft_pissa_lowrank(w0[layer_shapes[0]], r, niter)  # warm-up (cuSOLVER / cuBLAS handles)
    del w0
    sync(device)
    done, spent = 0, 0.0
    peft_budget = min(args.peft_budget_s, 0.25 * args.budget_s)
    while done < layers and (done == 0 or spent < peft_budget):
        ws = [make_weight(m, n, dtype, device, gen) for m, n in layer_shapes]
        sync(device)
        with Timer(device) as t:
            for w in ws:
                out = peft_pissa_lowrank(w, r, niter)
                w.copy_(out.residual)
        spent += t.seconds
        done += 1
        del ws, out
    peft_s = spent * layers / done
    print(f"peft svd_lowrank path: {peft_s:.2f}s for {layers} layers"
          + ("" if done == layers else f" (extrapolated from {done})"), flush=True)
    res["peft_lowrank"] = {"seconds": peft_s, "layers_timed": done}

    per_shape = {}
    peft_pissa_exact(make_weight(256, 256, dtype, device, gen), r)  # warm-up
    for key, (m, n) in (("square", (hidden, hidden)), ("tall", (inter, hidden))):
        w = make_weight(m, n, dtype, device, gen)
        sync(device)
        with Timer(device) as t:
            peft_pissa_exact(w, r)
        per_shape[key] = t.seconds
        del w
    counts = {"square": 0, "tall": 0}
    for m, n in shapes.values():
        counts["square" if m == n else "tall"] += 1  # down_proj (n > m) costs about what its transpose does
    exact_s = sum(per_shape[k] * counts[k] for k in counts)
    print(f"torch.linalg.svd path: {per_shape['square']:.2f}s per {hidden}x{hidden}, "
          f"{per_shape['tall']:.2f}s per {inter}x{hidden} -> {exact_s:.1f}s for the model (extrapolated)", flush=True)
    res["linalg_svd"] = {"seconds_per_matrix": per_shape, "model_seconds_extrapolated": exact_s}

    errors = {}
    for key, exact in exacts.items():
        w = originals[key]
        e = pf.error_vs_exact(w, peft_pissa_lowrank(w, r, niter), exact=exact).as_dict()
        errors[key] = {"matrix": samples[key], "shape": list(w.shape), "peft_lowrank": e}
        print(f"error vs exact SVD, {samples[key]}: peft svd_lowrank L1 {e['l1']:.3e} (excess {e['excess']:.2e})",
              flush=True)
    res["errors"] = errors
    return res


if __name__ == "__main__":
    sys.exit(main())
