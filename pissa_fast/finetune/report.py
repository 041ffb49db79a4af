"""report.md for a fine-tuning benchmark run, and the environment block of results.json."""
from __future__ import annotations

import datetime
import math
import os
import platform

import torch

from ..machine import cpu_model, loadavg
from .methods import ALL_METHOD_NAMES, DEFAULT_QPISSA_ITERS, METHODS, QUANT_METHODS


def environment() -> dict:
    import peft
    import transformers

    import pissa_fast

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "pissa_fast": pissa_fast.__version__, "pissa_fast_build": pissa_fast.build_info(),
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": "cpu",
        "loadavg_start": loadavg(),
    }


def _ordered(names):
    return sorted(names, key=lambda n: ALL_METHOD_NAMES.index(n) if n in ALL_METHOD_NAMES else 99)


def _fmt(v) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "—" if v is None else str(v)
    return f"{v:.3f}"


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{s:.1f} s"


def milestone_steps(steps: int) -> list[int]:
    """1, 2, 4, 8, ... up to steps, and steps itself."""
    out, k = [], 1
    while k < steps:
        out.append(k)
        k *= 2
    out.append(steps)
    return out


def loss_table(results: dict, methods: list[str]) -> list[str]:
    curves = results["curves"]
    steps = results["settings"]["steps"]
    marks = milestone_steps(steps)
    lines = ["| r | method | " + " | ".join(f"step {k}" for k in marks) + " | final (mean of last "
             f"{results['final_window']}) |",
             "|---|---|" + "---|" * (len(marks) + 1)]
    for rank in results["settings"]["ranks"]:
        r = str(rank)
        for name in methods:
            ys = curves.get(name, {}).get(r)
            if ys is None:
                continue
            cells = [_fmt(ys[k - 1]) if k <= len(ys) else "—" for k in marks]
            lines.append(f"| {r} | {name} | " + " | ".join(cells) + f" | {_fmt(results['final_loss'][name][r])} |")
    return lines


def _first_step_below(ys, level):
    for i, v in enumerate(ys, 1):
        if isinstance(v, (int, float)) and v <= level:
            return i
    return None


def headline(results: dict) -> list[str]:
    """PiSSA vs LoRA at each rank, in words, from the numbers."""
    curves, finals, out = results["curves"], results["final_loss"], []
    for rank in results["settings"]["ranks"]:
        r = str(rank)
        lo, pi = curves.get("lora", {}).get(r), curves.get("pissa", {}).get(r)
        if not lo or not pi:
            continue
        k = min(4, len(lo), len(pi))
        level = finals["lora"][r]
        reach = _first_step_below(pi, level)
        line = (f"- r = {rank}: at step {k} PiSSA's loss is {_fmt(pi[k - 1])} against LoRA's {_fmt(lo[k - 1])}; "
                f"final {_fmt(finals['pissa'][r])} against {_fmt(level)}")
        if reach is not None and finals["pissa"][r] < level:  # else a single easy batch could be the "reach"
            line += f"; PiSSA is at LoRA's final loss by step {reach} of {len(lo)}"
        out.append(line + ".")
    for r in (str(x) for x in results["settings"]["ranks"]):
        parts = [f"{n.replace('pissa_', '') if n != 'pissa' else 'principal'} {_fmt(finals[n][r])}"
                 for n in ("pissa", "pissa_middle", "pissa_minor") if r in finals.get(n, {})]
        if len(parts) > 1:
            out.append(f"- r = {r}, final loss by components: " + ", ".join(parts) + ".")
    return out


def _err(v) -> str:
    return f"{v:.2e}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def quant_headline(results: dict) -> list[str]:
    """QPiSSA vs QLoRA at each rank, in words: the step-0 quantization error, then the losses."""
    curves, finals, runs, out = results["curves"], results["final_loss"], results["runs"], []
    for rank in results["settings"]["ranks"]:
        r = str(rank)
        ql, qp = curves.get("qlora", {}).get(r), curves.get("qpissa", {}).get(r)
        if not ql or not qp:
            continue
        k = min(4, len(ql), len(qp))
        line = (f"- r = {rank}, quantized: mean error ||W - (Q + BA)|| / ||W|| at step 0 is "
                f"{_err(runs['qpissa'][r].get('quant_error_mean'))} for QPiSSA against "
                f"{_err(runs['qlora'][r].get('quant_error_mean'))} for QLoRA; step-1 loss {_fmt(qp[0])} against "
                f"{_fmt(ql[0])}")
        lo = curves.get("lora", {}).get(r)
        if lo:
            line += f" (full precision: {_fmt(lo[0])})"
        line += (f"; at step {k} {_fmt(qp[k - 1])} against {_fmt(ql[k - 1])}; final {_fmt(finals['qpissa'][r])} "
                 f"against {_fmt(finals['qlora'][r])}")
        out.append(line + ".")
    return out


def quant_table(results: dict) -> list[str]:
    """The quantized methods' state at step 0, per rank: error of the quantized model + adapter, step-1 loss."""
    s, runs, curves = results["settings"], results["runs"], results["curves"]
    iters = s.get("qpissa_iters")
    lines = ["| r | method | layers | mean error | max error | QPiSSA mean error after rounds 1..T | step-1 loss |",
             "|---|---|---|---|---|---|---|"]
    for rank in s["ranks"]:
        r = str(rank)
        for name in ("lora", "pissa", *QUANT_METHODS):
            run = runs.get(name, {}).get(r)
            if run is None:
                continue
            if name in QUANT_METHODS:
                by_round = ", ".join(_err(v) for v in run.get("quant_error_by_round", [])) or "—"
                cells = [str(run.get("quantized_layers", "—")), _err(run.get("quant_error_mean")),
                         _err(run.get("quant_error_max")), by_round]
            else:
                cells = ["—", "0 (full precision)", "—", "—"]
            lines.append(f"| {r} | {name} | " + " | ".join(cells) + f" | {_fmt(curves[name][r][0])} |")
    return [
        "Errors are ||W - (Q + scaling B A)||_F / ||W||_F per targeted weight (float64), Q the dequantized "
        "NF4 base: for QLoRA B = 0 at step 0, so it is nf4(W)'s own error; for QPiSSA it is what "
        f"pissa_fast.qpissa reports for the round it returns ({iters} round(s) run, the lowest-error round "
        "kept). The step-1 loss is the loss of the model as initialized, before any update.", "", *lines]


def quant_caveats(results: dict) -> list[str]:
    s, name = results["settings"], results["model"]["name"]
    gguf = "GGUF" in name  # pissa_fast.models.smollm2 names its conversions "... (Q4_1 GGUF dequantized ...)"
    return [
        "- QLoRA vs QPiSSA shows whether keeping W's principal part in the full-precision adapter and "
        "quantizing only the residual starts closer to the full-precision model (lower error, step-1 loss "
        "nearer the unquantized one) and trains faster than quantizing W whole under a LoRA adapter, at "
        "equal trainable parameters, hyperparameters and quantizer.",
        f"- The quantization is **simulated**: {s.get('quantization', '')}. The NF4 codes and block scales are "
        "bitsandbytes' own, so the base weights are the values a 4-bit model dequantizes to, but nothing runs "
        "in 4 bits: a real QLoRA/QPiSSA run (bitsandbytes Linear4bit, bf16 compute, on a GPU) adds bf16 "
        "rounding to every matmul, and the memory and speed of 4-bit training are not measured here at all. "
        "No double quantization (QLoRA's paper uses it; it quantizes only the block scales).",
        *(["- This checkpoint was dequantized from a 4-bit GGUF file, so its weights already lie on another "
            "4-bit grid; NF4's error on it need not match that of a model trained in bf16."] if gguf else []),
    ]


def _missing(results: dict) -> list[str]:
    """The (method, rank) runs a partial benchmark did not finish, as a paragraph (nothing when complete)."""
    s = results["settings"]
    todo = [f"{m} r={r}" for m in s["methods"] for r in s["ranks"] if str(r) not in results["curves"].get(m, {})]
    if not todo:
        return []
    return [f"**Partial run**: stopped before {len(todo)} of {len(s['methods']) * len(s['ranks'])} runs "
            f"finished ({', '.join(todo)}); their rows and curves are missing.", ""]


def write_report(results: dict, out_dir: str, plots: list[str]) -> str:
    s, env = results["settings"], results["environment"]
    methods = _ordered(results["curves"])
    quant = any(m in QUANT_METHODS for m in s["methods"])
    lines = [
        "# Fine-tuning benchmark: PiSSA against LoRA" + (" (and QPiSSA against QLoRA)" if quant else ""),
        "",
        f"Command: `{results['command']}`",
        "",
        f"- date {env['date']}, wall time {_duration(results['wall_s'])}"
        + (" (interrupted: partial results)" if results.get("partial") else ""),
        f"- machine: {env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch threads, load average "
        f"{env.get('loadavg_start')} at start and {env.get('loadavg_end')} at the end (other jobs share the "
        "machine when the load exceeds the CPU count)",
        f"- torch {env['torch']} (CUDA build {env['torch_cuda_build']}, run on the CPU), transformers "
        f"{env['transformers']}, peft {env['peft']}, pissa_fast {env['pissa_fast']} ({env['pissa_fast_build']})",
        f"- model: {results['model']['name']} ({results['model']['parameters'] / 1e6:.0f} M parameters, "
        f"{results['model']['layers']} layers), float32, from `{results['model']['path']}`",
        f"- task: {s['task']}",
        f"- training: {s['steps']} steps, batch {s['batch_size']}, AdamW lr {s['lr']:g} (constant, no weight decay), "
        f"lora_alpha {s['lora_alpha']}, dropout 0, targets {', '.join(s['target_modules'])}; "
        f"PiSSA through pissa_fast's peft backend with {s['pissa_init']}",
        *([f"- qlora / qpissa: {s['quantization']}; QPiSSA by pissa_fast.qpissa_many, {s['qpissa_iters']} "
           f"round(s) (`--qpissa-iters`; the default {DEFAULT_QPISSA_ITERS} is what the PiSSA authors' published "
           f"QPiSSA models use, and the table of step-0 errors below shows what each round bought), top-r step "
           f"with {s['pissa_init']}"] if quant else []),
        "- every method trains the same number of parameters on the same batches with the same "
        "hyperparameters and seed; only the initialization differs"
        + (" (for qlora and qpissa: the adapter and the quantized base weights)" if quant else ""),
        "",
        *_missing(results),
        "## Headline",
        "",
        *headline(results),
        *quant_headline(results),
        "",
        "## Figures",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Loss at steps 1, 2, 4, ...",
        "",
        *loss_table(results, methods),
        "",
        "## Trainable parameters and time per run",
        "",
        "| r | method | trainable parameters | adapter init (s) | training (s) | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for rank in s["ranks"]:
        r = str(rank)
        for name in methods:
            run = results["runs"].get(name, {}).get(r)
            if run is None:
                continue
            lines.append(f"| {r} | {name} | {run['trainable_params']:,} | {run['init_s']:.2f} | {run['train_s']:.1f} | "
                         f"{run['s_per_step']:.2f} |")
    if any(m in results["runs"] for m in QUANT_METHODS):
        lines += ["", "## Quantized methods at step 0", "", *quant_table(results)]
    full_precision = any(m not in QUANT_METHODS for m in s["methods"])
    lines += [
        "",
        "## What this shows and what it does not",
        "",
        *(["- It shows, on a real pretrained LLM and a real training loop, whether PiSSA's loss falls faster than "
        "LoRA's from the first steps at equal trainable parameters and hyperparameters, and whether the principal "
        "components train better than the middle and minor ones (the paper's Figures 2 and 3): an end-to-end "
        "check that pissa_fast's factors are the right ones."] if full_precision else []),
        f"- It does not show accuracy on GSM8K or any benchmark: the model is small "
        f"({results['model']['parameters'] / 1e6:.3g} M parameters), the task "
        "is synthetic and easy, the run is a few dozen steps on a CPU with one learning rate (for each method a "
        "tuned learning rate can narrow the gap), and every number comes from one seed.",
        *(quant_caveats(results) if quant else []),
        "",
        "Methods: " + "; ".join(f"`{n}`: {METHODS[n].description}" for n in methods if n in METHODS) + ".",
        "",
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
