"""The `pissa-fast bench` run: every sampled weight, every cell of the grid for both methods, the
matched-accuracy headline, the whole model if asked; then the reports and plots."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from ..machine import loadavg
from ..options import progress_enabled
from .config import _resolve
from .environment import _clean, _describe, _dtype_name, _warn_if_busy, environment
from .measure import INF, Runner, sync, truncated, whole_model
from .summary import _markdown_report, _text_report, _time_label, _workload_title
from .workload import materialize

def run_bench(args) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> int:
    cfg = _resolve(args)
    torch.set_num_threads(cfg["threads"])
    cfg.update(repeats=args.repeats, warmup=args.warmup, seed=args.seed, pf_method=args.pf_method,
               residual=args.residual, oversample=args.oversample)
    device, wl, niters, ranks = cfg["device"], cfg["workload"], cfg["niters"], cfg["ranks"]
    env = environment(cfg)
    header = _describe(cfg)
    print("\n".join(header), flush=True)
    busy = _warn_if_busy(cfg["threads"]) if device.type == "cpu" else None
    if busy:
        print(busy, flush=True)

    from tqdm import tqdm

    finite = [n for n in niters if n != INF]
    per_matrix = 2 * len(finite) * len(ranks) + (2 if INF in niters else 0) + 1 + 2 * len(cfg["match"]) * len(ranks)
    whole_cells = 2 * len(finite) * len(ranks) if cfg["whole_model"] else 0
    bar = tqdm(total=per_matrix * len(wl.sampled) + whole_cells, unit="step", desc="bench",
               disable=args.no_progress or not progress_enabled(), file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    runner = Runner(device, repeats=args.repeats, warmup=args.warmup, seed=args.seed, residual=args.residual,
                    method=args.pf_method, oversample=args.oversample)
    t_start = time.perf_counter()
    matrices, measurements, matched = [], [], []
    try:
        for spec in wl.sampled:
            info, recs, match = _measure_matrix(spec, cfg, runner, bar)
            matrices.append(info)
            measurements += recs
            matched += match
        whole = _whole_model(cfg, wl, bar) if cfg["whole_model"] else None
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()
    env["wall_s"] = round(wall, 2)

    results = {"environment": env,
               "config": {"workload": wl.kind, "label": wl.label, "niters": niters, "ranks": ranks,
                          "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                          "dtype": args.dtype, "sample": cfg["sample"] if wl.is_model else None,
                          "spectrum": wl.spectrum if wl.kind != "checkpoint" else None,
                          "decay": wl.decay if wl.kind != "checkpoint" else None,
                          "pf_method": args.pf_method, "oversample": args.oversample, "residual": args.residual,
                          "device": str(device), "threads": cfg["threads"], "whole_model": cfg["whole_model"],
                          "time_aggregate": _time_label(wl), "match": cfg["match"]},
               "matrices": matrices, "measurements": measurements, "matched": matched}
    if whole is not None:
        results["whole_model"] = whole

    text = _text_report(results, niters, ranks, wl)
    print()
    print(text)
    os.makedirs(cfg["out"], exist_ok=True)
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(_clean(results), f, indent=1)
    plots = []
    if not args.no_plots:
        title = f"{_workload_title(wl, matrices)} | {env['device']} ({env.get('gpu', env['cpu'])}), " \
                f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
        from .plots import plot_all

        plots = plot_all(measurements, niters, ranks, cfg["out"], title)
    with open(os.path.join(cfg["out"], "report.md"), "w") as f:
        f.write(_markdown_report(results, niters, ranks, wl, header, plots))
    print(f"wrote {cfg['out']}/: results.json, report.md" +
          "".join(f", {os.path.basename(p)}" for p in plots) + f"  (bench wall time {wall:.1f} s)")
    return 0


def _measure_matrix(spec, cfg, runner, bar):
    """Build one weight, its exact float64 SVD, then every cell of the grid for both methods:
    (the weight's description, its measurement records)."""
    import pissa_fast

    device, wl, niters, ranks = cfg["device"], cfg["workload"], cfg["niters"], cfg["ranks"]
    short = spec.name.split("/")[-1]
    bar.set_postfix_str(f"{short}: building + exact float64 SVD")
    t0 = time.perf_counter()
    W = materialize(spec, wl, cfg["dtype"], device)
    sync(device)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = pissa_fast.exact_factors(W, max(ranks))
    sync(device)
    t_exact = time.perf_counter() - t0
    bar.update(1)
    info = spec.describe()
    info.update(dtype=_dtype_name(W.dtype), build_s=round(t_gen, 4), exact_f64_svd_s=round(t_exact, 4))
    records, matched = [], []

    def record(method, niter, r, t, times, out, once=False, into=records):
        err = pissa_fast.error_vs_exact(W, out, exact)
        rec = dict(matrix=spec.name, shape=list(spec.shape), dtype=_dtype_name(W.dtype), count=spec.count,
                   method=method, niter=niter, r=r, time_s=t, times_s=times, **err.as_dict())
        if once:
            rec["timed_once_at_r"] = max(ranks)
        if method.startswith("pissa_fast") and niter != INF:
            est = getattr(out, "estimate", None)
            if method == "pissa_fast" and cfg["pf_method"] in (None, "krylov"):
                # The estimate beside the true error, made off the clock (it costs two more small
                # Rayleigh-Ritz steps, and gives the same factors).
                est = pissa_fast.decompose(W, r, niter, method=cfg["pf_method"], oversample=cfg["oversample"],
                                           seed=cfg["seed"], estimate=True).estimate
            rec.update(estimate=est, niter_used=getattr(out, "niter_used", niter))
        into.append(rec)

    for niter in (n for n in niters if n != INF):
        for r in ranks:
            for method in ("pissa_fast", "peft"):
                bar.set_postfix_str(f"{short}: {method} niter {niter} r {r}")
                t, times, out = runner.run(method, W, r, niter)
                record(method, niter, r, t, times, out)
                bar.update(1)
    if INF in niters:
        for method in ("pissa_fast", "peft"):
            bar.set_postfix_str(f"{short}: {method} exact SVD")
            t, times, out = runner.run(method, W, max(ranks), None, repeats=1, warmup=0)
            for r in ranks:
                record(method, INF, r, t, times, truncated(out, r), once=True)
            bar.update(1)
    # The headline: peft's pissa_niter_N against the pissa_fast call that promises its accuracy.
    for N in cfg["match"]:
        for r in ranks:
            for method in ("peft", "pissa_fast_matched"):
                bar.set_postfix_str(f"{short}: matched accuracy, {method} N {N} r {r}")
                t, times, out = runner.run(method, W, r, N)
                record(method, N, r, t, times, out, into=matched)
                bar.update(1)
    return info, records, matched


def _whole_model(cfg, wl, bar):
    """Every weight of the model on the device; per (niter, r) one decompose_many in place vs the peft
    path per layer. niter inf is left out (see the per-matrix exact timings)."""
    device, dtype = cfg["device"], cfg["dtype"]
    need = sum(s.shape[0] * s.shape[1] * (dtype or s.dtype or torch.float32).itemsize for s in wl.every)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.85 * free:
            bar.write(f"whole model skipped: its {len(wl.every)} weights need {need / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB free on {device} (try --dtype bfloat16)")
            return None
    bar.set_postfix_str(f"whole model: building {len(wl.every)} weights")
    weights = {s.name: materialize(s, wl, dtype, device) for s in wl.every}
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    keep_on_device = True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        keep_on_device = free > 1.3 * nbytes
    pristine = {k: (w.clone() if keep_on_device else w.to("cpu", copy=True).pin_memory() if device.type == "cuda"
                    else w.clone()) for k, w in weights.items()}
    out = []
    finite = [n for n in cfg["niters"] if n != INF]
    kw = dict(device=device, seed=cfg["seed"], pf_method=cfg["pf_method"], oversample=cfg["oversample"])
    if cfg["warmup"] and finite:  # one untimed pass of each method over the whole model
        for method in ("pissa_fast", "peft"):
            bar.set_postfix_str(f"whole model: {method} warm-up")
            whole_model(weights, pristine, method, cfg["ranks"][0], finite[0], **kw)
    for niter in finite:
        for r in cfg["ranks"]:
            for method in ("pissa_fast", "peft"):
                bar.set_postfix_str(f"whole model: {method} niter {niter} r {r}")
                t = whole_model(weights, pristine, method, r, niter, **kw)
                out.append(dict(method=method, niter=niter, r=r, time_s=t, weights=len(weights), bytes=nbytes))
                bar.update(1)
    del weights, pristine
    return out


