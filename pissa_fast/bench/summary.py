"""The text (terminal) and markdown (report.md) reports of a `pissa-fast bench` run."""
from __future__ import annotations

import os
import shlex

from . import report as rep
from .measure import INF

def _time_label(wl) -> str:
    if wl.kind == "shape":
        return "time per matrix"
    return (f"estimated whole-model time: the sum over the model's {len(wl.every)} weights of the median time "
            f"of the sampled weight standing for each")


def _workload_title(wl, matrices) -> str:
    dt = matrices[0]["dtype"] if matrices else ""
    if wl.kind == "shape":
        return f"{wl.label} {dt}"
    if wl.kind == "model":
        return f"{wl.label} (synthetic, {dt}), {len(wl.sampled)} sampled weights"
    return f"{os.path.basename(wl.label.rstrip('/'))}, {len(wl.sampled)} sampled weights"


def _whole_tables(whole, niters, ranks, markdown) -> list[str]:
    vals = {m: {(w["niter"], w["r"]): w["time_s"] for w in whole if w["method"] == m} for m in rep.METHODS}
    fin = [n for n in niters if n != INF]
    n = whole[0]["weights"] if whole else 0
    return [
        rep.table(f"whole model ({n} weights, measured, one run per cell after a warm-up), pissa_fast decompose_many in place, s", fin, ranks,
                  vals["pissa_fast"], rep.fmt_time, markdown=markdown),
        rep.table("whole model, peft path layer by layer, s", fin, ranks, vals["peft"], rep.fmt_time,
                  markdown=markdown),
        rep.table("whole model time ratio pissa_fast / peft", fin, ranks, rep.ratio(vals["pissa_fast"], vals["peft"]),
                  rep.fmt_ratio, markdown=markdown),
    ]


def _text_report(results, niters, ranks, wl) -> str:
    ms = results["measurements"]
    label = "time" if wl.kind == "shape" else "estimated whole-model time"
    parts = rep.time_tables(ms, niters, ranks, label=label) + rep.error_tables(ms, niters, ranks)
    if wl.is_model:
        parts.insert(0, f"({_time_label(wl)}; errors: means over the sampled weights weighted by the number "
                        "of weights each stands for)\n")
    parts.append(rep.estimate_table(ms, niters, ranks))
    if results.get("whole_model"):
        parts += _whole_tables(results["whole_model"], niters, ranks, False)
    match = results["config"].get("match") or []
    if results.get("matched"):
        parts.append(rep.matched_table(results["matched"], match, ranks))
    head = rep.headline(ms, niters, ranks)
    if head:
        parts.append("the grid's best (cheapest pissa_fast niter at least as accurate as peft's best niter):\n" +
                     "\n".join("  " + h for h in head) + "\n")
    top = rep.matched_headline(results.get("matched", []), match, ranks)
    if top:
        parts.append("HEADLINE, matched accuracy (pissa_fast.svd_lowrank_equivalent vs peft's pissa_niter_N):\n" +
                     "\n".join("  " + h for h in top) + "\n")
    return "\n".join(parts)


def _markdown_report(results, niters, ranks, wl, header, plots) -> str:
    env, ms = results["environment"], results["measurements"]
    machine = f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch threads"
    if "gpu" in env:
        machine = f"{env['gpu']} ({env['gpu_memory_gib']} GiB, CUDA {env['cuda']}); host: {machine}"
    out = ["# pissa-fast bench", "",
           f"- date: {env['date']}",
           f"- machine: {machine}; device `{env['device']}`",
           f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
           f"- software: torch {env['torch']}, pissa_fast {env['pissa_fast']} ({env['pissa_fast_build']}), "
           f"Python {env['python']}, {env['platform']}",
           f"- command (every effective setting): `{env['command']}`",
           f"- as invoked: `{shlex.join(env['argv'])}`",
           f"- bench wall time: {env['wall_s']} s", "", "```", *header, "```", ""]
    out.append("Time covers the whole initialization, residual included (pissa_fast: " +
               ("in place into a fresh copy of W made off the clock" if results["config"]["residual"] == "inplace"
                else "a new residual tensor") +
               "; peft: `w = W.float()`, `torch.svd_lowrank(w, q=r, niter)`, `(w - B @ A).to(W.dtype)`). "
               "Errors are against the exact float64 SVD of each weight (`pissa_fast.error_vs_exact`).")
    out.append("")
    if wl.is_model:
        out += [f"Times: {_time_label(wl)}. Errors: means over the sampled weights, weighted by the number of "
                "weights each stands for.", ""]
    match = results["config"].get("match") or []
    top = rep.matched_headline(results.get("matched", []), match, ranks)
    if top:
        out += ["## Headline: matched accuracy", "",
                "peft's `pissa_niter_N` against `pissa_fast.decompose(W, r, **pissa_fast.svd_lowrank_equivalent(N, r))`"
                " (each weight stops at the first niter whose estimated error is below what svd_lowrank is "
                "predicted to make on it), timed side by side:", ""]
        out += [f"- {h}" for h in top] + ["", rep.matched_table(results["matched"], match, ranks, markdown=True)]
    head = rep.headline(ms, niters, ranks)
    if head:
        out += ["## Summary of the grid", ""] + [f"- {h}" for h in head] + [""]
    out += ["## Time", ""]
    out += rep.time_tables(ms, niters, ranks, label="time" if wl.kind == "shape" else "estimated whole-model time",
                           markdown=True)
    out += ["## Errors", ""] + rep.error_tables(ms, niters, ranks, markdown=True, errors=rep.ERRORS + ("sv_rel",))
    out += [rep.estimate_table(ms, niters, ranks, markdown=True)]
    if results.get("whole_model"):
        out += ["## Whole model (measured)", ""] + _whole_tables(results["whole_model"], niters, ranks, True)
    if len(results["matrices"]) > 1:
        out += ["## Per weight", ""]
        for mat in results["matrices"]:
            out += [f"### {mat['name']} ({mat['shape'][0]}x{mat['shape'][1]}, stands for {mat['count']})", ""]
            out += rep.time_tables(ms, niters, ranks, label="time", markdown=True, matrix=mat["name"])
            out += rep.error_tables(ms, niters, ranks, markdown=True, matrix=mat["name"], errors=("l1",))
    out += ["## Reference computations (not timed in the tables)", "",
            "| weight | shape | dtype | build s | exact float64 SVD s |", "|---|---|---|---|---|"]
    out += [f"| {m['name']} | {m['shape'][0]}x{m['shape'][1]} | {m['dtype']} | {m['build_s']:.3g} | "
            f"{m['exact_f64_svd_s']:.3g} |" for m in results["matrices"]]
    out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    return "\n".join(out)

