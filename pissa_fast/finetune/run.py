"""The whole fine-tuning benchmark as one Python function: `run_finetune(out=..., ...)`.

For each rank, each method trains a fresh copy of the model on the same batches (see `train`); the
per-step losses go to results.json (`curves[method][rank]`, rank as a string), which is rewritten after
every run so an interrupted benchmark keeps what it measured; at the end come report.md and the plots.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

from ..machine import loadavg
from . import methods as M
from .plots import write_plots
from .report import environment, write_report
from .task import make_batches
from .train import run_method

DEFAULT_RANKS = (1, 4, 16)
# 12 runs x 24 steps of batch 8 (about 600 tokens each): the default is sized for the 15 minutes the
# issue allows on a quiet 2-core machine, from its measurement there (about 0.9 s per step); this
# project's machine was too busy to confirm it (see README), so it is an extrapolation.
DEFAULT_STEPS = 24
DEFAULT_BATCH = 8
DEFAULT_LR = 2e-4
DEFAULT_NITER = 4
FINAL_WINDOW = 5  # "final loss" = mean of the last FINAL_WINDOW steps (one batch is noisy)
QUANTIZATION = ("NF4 by bitsandbytes' quantize_4bit / dequantize_4bit (blocksize 64, no double quantization) on "
                "the targeted projections, held dequantized in float32 and run with float32 matmuls on the CPU "
                "(simulated: no 4-bit kernels, no bf16 compute); embeddings and lm_head unquantized")
TASK = ("synthetic GSM8K-style arithmetic word problems (pissa_fast.finetune.task, 6 templates), "
        "'Question: ...\\nAnswer: ...' with loss on the answer tokens and EOS only")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _clean(x):
    """JSON-safe: non-finite floats become "nan" / "inf" / "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _target_shapes(model, targets) -> list[tuple[str, tuple[int, int]]]:
    return [(name, tuple(mod.weight.shape)) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def validate(methods: Sequence[str], ranks: Sequence[int], steps: int, batch_size: int, lr: float,
             lora_alpha, niter, qpissa_iters: int = M.DEFAULT_QPISSA_ITERS) -> tuple[list[str], list[int]]:
    """Check every argument before anything is fetched, loaded or written; returns (methods, ranks)."""
    if not methods:
        raise ValueError("methods: give at least one")
    methods = list(dict.fromkeys(methods))
    for name in methods:
        M.get_method(name)  # raises with the choices
    if not ranks:
        raise ValueError("ranks: give at least one")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks must be ints >= 1, got {r!r}")
    for label, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be an int >= 1, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lora_alpha is not None and not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha)
                                       and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a positive number or None (= r, as in the PiSSA paper), got {lora_alpha!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be an int >= 0 or None (exact SVD), got {niter!r}")
    if isinstance(qpissa_iters, bool) or not isinstance(qpissa_iters, int) or qpissa_iters < 1:
        raise ValueError(f"qpissa_iters must be an int >= 1, got {qpissa_iters!r}")
    if any(m in M.QUANT_METHODS for m in methods):
        from pissa_fast.quant.nf4 import bnb_functional

        bnb_functional()  # a missing bitsandbytes is an ImportError naming the extra, before any work
    return methods, sorted(dict.fromkeys(ranks))


def resolve_model(model: str | None, cache_dir: str | None, log: Callable[[str], None]) -> str:
    """The checkpoint folder to fine-tune: `model` if given, else SmolLM2 (fetched and converted once)."""
    from pissa_fast.models import smollm2

    if model is None:
        return smollm2.ensure_checkpoint(cache_dir, log=log)
    if not smollm2.is_checkpoint(model):
        raise ValueError(f"model {model!r}: not a transformers checkpoint folder (config.json and *.safetensors)")
    return os.path.abspath(model)


def run_finetune(*, out: str, model: str | None = None, cache_dir: str | None = None,
                 methods: Sequence[str] = M.DEFAULT_METHODS, ranks: Sequence[int] = DEFAULT_RANKS,
                 steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
                 lora_alpha: float | None = None, niter: int | None = DEFAULT_NITER,
                 qpissa_iters: int = M.DEFAULT_QPISSA_ITERS, seed: int = 0, threads: int | None = None,
                 plots: bool = True, progress: bool | None = None, command: str | None = None,
                 log: Callable[[str], None] = _stderr) -> dict:
    """Fine-tune `model` (default: SmolLM2-135M-Instruct) with each method at each rank; write results.json,
    report.md and the plots into `out`; return the results dict. lora_alpha None means lora_alpha = r
    (scaling 1, the PiSSA paper's setting); qpissa_iters: QPiSSA's rounds (methods "qpissa")."""
    methods, ranks = validate(methods, ranks, steps, batch_size, lr, lora_alpha, niter, qpissa_iters)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} exists and is not a folder")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out, model, cache_dir, methods, ranks, steps, batch_size, lr, lora_alpha, niter, qpissa_iters,
                    seed, plots, progress, command, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(out, model, cache_dir, methods, ranks, steps, batch_size, lr, lora_alpha, niter, qpissa_iters, seed, plots,
         progress, command, log) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pissa_fast.options import progress_enabled

    t_start = time.perf_counter()
    path = resolve_model(model, cache_dir, log)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load_model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    probe = load_model()
    shapes = _target_shapes(probe, M.LLAMA_TARGETS)
    if not shapes:
        raise ValueError(f"model {path}: no Linear layers named {', '.join(M.LLAMA_TARGETS)} to adapt")
    smallest = min(min(s) for _, s in shapes)
    if max(ranks) > smallest:
        raise ValueError(f"ranks: r = {max(ranks)} exceeds the smallest targeted weight dimension {smallest} of {path}")
    source = os.path.join(path, "pissa_fast_source.json")
    if os.path.isfile(source):
        with open(source) as f:
            name = json.load(f)["model"]
    else:
        name = os.path.basename(path.rstrip(os.sep))
    model_info = {"name": name, "path": path, "parameters": sum(p.numel() for p in probe.parameters()),
                  "layers": getattr(probe.config, "num_hidden_layers", None),
                  "hidden_size": getattr(probe.config, "hidden_size", None), "adapted_layers": len(shapes)}
    del probe

    batches = make_batches(tokenizer, steps, batch_size, seed)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    answer_tokens = [int((b["labels"] != -100).sum()) for b in batches]
    settings = {
        "methods": methods, "ranks": ranks, "steps": steps, "batch_size": batch_size, "lr": lr,
        "lora_alpha": "r" if lora_alpha is None else lora_alpha, "niter": niter,
        "pissa_init": "exact SVD" if niter is None else f"niter {niter}", "seed": seed,
        "target_modules": list(M.LLAMA_TARGETS), "optimizer": "AdamW, weight_decay 0, constant lr",
        "dtype": "float32", "task": TASK, "examples": steps * batch_size,
        "tokens_per_batch_mean": round(statistics.mean(tokens), 1),
        "answer_tokens_per_batch_mean": round(statistics.mean(answer_tokens), 1),
    }
    if any(m in M.QUANT_METHODS for m in methods):
        settings["quantization"] = QUANTIZATION
        settings["qpissa_iters"] = qpissa_iters
    env = environment()
    load = env.get("loadavg_start")
    if load and load[0] > (os.cpu_count() or 1) * 0.5 + 0.25:
        log(f"note: load average {load[0]} on {os.cpu_count()} CPUs: other work is running, so this will be slow"
            + ("; with several torch threads every step waits for descheduled threads, --threads 1 suffers "
               "far less" if torch.get_num_threads() > 1 else ""))
    results = {"benchmark": "pissa-fast bench-finetune", "command": command or "run_finetune(...)",
               "model": model_info, "settings": settings, "environment": env, "final_window": FINAL_WINDOW,
               "curves": {}, "final_loss": {}, "runs": {}, "partial": True, "wall_s": 0.0}
    os.makedirs(out, exist_ok=True)

    def save():
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(_clean(results), f, indent=1)

    bar = None
    if progress if progress is not None else progress_enabled():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(methods) * len(ranks) * steps, desc="fine-tuning", unit="step")
    svd_cache: dict = {}
    interrupted = False
    try:
        for name, r in run_order(methods, ranks):
            alpha = float(r) if lora_alpha is None else float(lora_alpha)
            stats: dict = {}
            adapter = M.AdapterSettings(r=r, lora_alpha=alpha, niter=niter, svd_cache=svd_cache,
                                        qpissa_iters=qpissa_iters, stats=stats)
            if bar is not None:
                bar.set_postfix_str(f"{name} r={r}: building the adapter")

            def on_step(i, loss, name=name, r=r):
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{name} r={r} loss {loss:.3f}")

            res = run_method(load_model, M.get_method(name), adapter, batches, lr, seed, on_step=on_step)
            if bar is not None and len(res.losses) < steps:
                bar.update(steps - len(res.losses))
            key = str(r)
            results["curves"].setdefault(name, {})[key] = res.losses
            tail = res.losses[-FINAL_WINDOW:]
            results["final_loss"].setdefault(name, {})[key] = (
                statistics.fmean(tail) if res.diverged_at is None else float("nan"))
            results["runs"].setdefault(name, {})[key] = {
                "init_s": round(res.init_s, 3), "train_s": round(res.train_s, 2),
                "s_per_step": round(res.train_s / max(1, len(res.losses)), 3),
                "trainable_params": res.trainable, "diverged_at": res.diverged_at, **stats}
            counts = {n: per[key]["trainable_params"] for n, per in results["runs"].items() if key in per}
            if len(set(counts.values())) != 1:  # a bug in a builder, not a measurement: stop and say so
                raise RuntimeError(f"r = {r}: methods train different numbers of parameters: {counts}")
            save()
    except KeyboardInterrupt:
        # Keep what was measured: the report and plots below say the run is partial.
        interrupted = True
        log("interrupted: writing the report and plots of the runs that finished")
    finally:
        if bar is not None:
            bar.close()
        env["loadavg_end"] = loadavg()
        save()

    results["partial"] = interrupted
    save()
    written = write_plots(results, out) if plots and results["curves"] else []
    write_report(results, out, written)
    save()
    log(f"wrote {out}/results.json, report.md" + (", " + ", ".join(written) if written else ""))
    if interrupted:
        raise KeyboardInterrupt
    return results


def run_order(methods: Sequence[str], ranks: Sequence[int]) -> list[tuple[str, int]]:
    """LoRA-vs-PiSSA runs (Figures 2.1 and 2.2) at every rank first, then QLoRA-vs-QPiSSA, then the
    component runs (Figure 3), so a benchmark stopped early has whole comparisons rather than halves."""
    def group(m):
        figures = getattr(M.METHODS.get(m), "figures", ())
        return 0 if "2" in figures else 1 if "q" in figures else 2

    groups = [[m for m in methods if group(m) == g] for g in range(3)]
    return [(m, r) for members in groups for r in ranks for m in members]
