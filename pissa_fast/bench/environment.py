"""What `pissa-fast bench` records about the machine and the run: software, CPU/GPU, threads, load."""
from __future__ import annotations

import datetime
import math
import os
import platform
import sys

import torch

from ..machine import cpu_model, loadavg
from .args import DEFAULT_SHAPE
from .workload import MODELS

# -------------------------------------------------------------------------------------- environment

def _argv() -> list[str]:
    """sys.argv with the program named as it was run (`pissa-fast`, or `python -m ...`)."""
    argv = list(sys.argv)
    if argv:
        prog = argv[0].replace(os.sep, "/")
        if prog.endswith("pissa_fast/cli.py"):
            argv[:1] = ["python", "-m", "pissa_fast.cli"]
        elif prog.endswith("pissa_fast/bench/__main__.py"):
            argv[:1] = ["python", "-m", "pissa_fast.bench"]
        elif os.path.basename(prog) == "pissa-fast":
            argv[0] = "pissa-fast"
    return argv


def environment(cfg) -> dict:
    import pissa_fast

    dev = cfg["device"]
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg["command"],
        "argv": _argv(),
        "cwd": os.getcwd(),
        "torch": torch.__version__,
        "pissa_fast": pissa_fast.__version__,
        "pissa_fast_build": pissa_fast.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "loadavg_start": loadavg(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def _clean(x):
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _describe(cfg) -> list[str]:
    wl = cfg["workload"]
    dt = _dtype_name(cfg["dtype"]) if cfg["dtype"] else None
    if wl.kind == "shape":
        what = f"one synthetic {wl.label} {dt or 'float32'} weight"
        if wl.label == f"{DEFAULT_SHAPE[0]}x{DEFAULT_SHAPE[1]}":
            what += " (the shape of llama-2-7b's q/k/v/o projections, 128 of its 224 weights)"
    elif wl.kind == "model":
        layers, projs = MODELS[wl.label]
        what = (f"synthetic {wl.label} weights ({layers} layers x {len(projs)} projections = {len(wl.every)} "
                f"weights, {dt or 'float32'}); measuring {len(wl.sampled)} of them (--sample {cfg['sample']})")
    else:
        what = (f"checkpoint {wl.label}: {len(wl.every)} projection weights ({dt or 'stored dtype'}); "
                f"measuring {len(wl.sampled)} of them (--sample {cfg['sample']})")
    lines = [f"workload: {what}"]
    if wl.kind != "checkpoint":
        sp = ("i^-%g with outliers x%s on s_1..s_4" % (wl.decay, "/".join(f"{o:g}" for o in (4, 2.5, 1.75, 1.25)))
              if wl.spectrum == "llm" else "i^-%g" % wl.decay)
        lines.append(f"  spectrum s_i = {sp}, random orthogonal singular vectors (seed {cfg['seed']})")
    for s in wl.sampled:
        extra = f" (stands for {s.count} weights: {', '.join(s.stands_for)})" if wl.is_model else ""
        lines.append(f"  {s.name}: {s.shape[0]}x{s.shape[1]}{extra}")
    lines.append(f"grid: niter {', '.join(map(str, cfg['niters']))} x r {', '.join(map(str, cfg['ranks']))}; "
                 f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up; niter inf = exact SVD, timed once")
    lines.append(f"methods: pissa_fast.decompose (method {cfg['pf_method'] or 'default'}, residual "
                 f"{cfg['residual']}) vs the peft path (torch.svd_lowrank q=r + W - B A)")
    lines.append(f"device: {cfg['device']}, {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}, {cpu_model()}")
    return lines


def _warn_if_busy(threads: int) -> str | None:
    la = loadavg()
    if la and la[0] > (os.cpu_count() or 1) * 0.5 + 0.25:
        msg = (f"note: load average {la[0]} on {os.cpu_count()} CPUs before starting: other work is running, so "
               "CPU timings will be noisy")
        if threads > 1:
            msg += (" (with several threads every parallel region can wait for a descheduled thread; "
                    "--threads 1 is far less affected)")
        return msg
    return None


