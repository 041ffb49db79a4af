"""`pissa-fast init` on N CPU ranks under torchrun against one process, the whole CLI (interpreter
start, imports, planning, decomposition, writes, the final moves) timed from outside, one thread per
rank (torchrun's OMP_NUM_THREADS=1; the single process gets --threads 1). The checkpoint is built
locally from a Llama config (random weights, no download), sharded so every rank has shards to
write. Runs are interleaved, each into a fresh OUT; the first pair is checked file for file (the
outputs must be bitwise identical). Also prints each side's own account (--json): decomposition
seconds, planning seconds, the per-rank split.

    python benchmarks/bench_init_ranks.py --ranks 2 --layers 8 --hidden 1024 --intermediate 2816 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build(path: Path, args) -> int:
    """A Llama checkpoint of args' size in args.dtype, in about 2 shards per rank; returns its bytes."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(1, nbytes // (2 * args.ranks)))
    return nbytes


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", PISSA_FAST_PROGRESS="0", HF_HUB_OFFLINE="1")


def run(cmd, out: Path, report: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}")
    return wall, json.loads(report.read_text())


def files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", default=None, help="build the checkpoint here and keep it (default: a temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.keep) if args.keep else tmp / "model"
        nbytes = build(model, args)
        shards = sorted(model.glob("*.safetensors"))

        def command(side, out, report):
            init = ["init", str(model), str(out), "--lora-rank", str(args.r), "--niter", str(args.niter),
                    "--target-modules", "all-linear", "--json", str(report)]
            if side == "1":
                return [sys.executable, "-m", "pissa_fast", *init, "--threads", "1"]
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.ranks), "-m", "pissa_fast", *init]

        print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread per process, "
              f"load average {os.getloadavg()[0]:.1f} (1 min) before")
        print(f"# Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
              f"{args.vocab}, {args.dtype}: {nbytes / 2**20:.0f} MiB in {len(shards)} shards; r={args.r} "
              f"niter={args.niter} all-linear; {args.ranks} ranks (torchrun, gloo) vs 1 process")

        walls = {"1": [], "N": []}
        inner = {"1": [], "N": []}
        for rep in range(args.repeats):
            outs = {}
            for side in ("1", "N"):
                out, report = tmp / f"out{side}", tmp / f"report{side}.json"
                wall, data = run(command(side, out, report), out, report)
                walls[side].append(wall)
                inner[side].append(data)
                outs[side] = out
            if rep == 0:
                a, b = files(outs["1"]), files(outs["N"])
                differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                assert not differ, f"{args.ranks} ranks and 1 process wrote different files: {differ}"
            n = inner["N"][-1]
            per = ", ".join(f"rank {i}: {len(x['shards'])} shards {x['bytes'] / 2**20:.0f} MiB decomposition "
                            f"{x['decompose']:.1f} s done {x['seconds']:.1f} s" for i, x in enumerate(n["per_rank"]))
            one = inner["1"][-1]["seconds"]
            print(f"repeat {rep}: 1 process {walls['1'][-1]:.2f} s (init {one['total']:.1f} s, decomposition "
                  f"{one['decompose']:.1f} s), {args.ranks} ranks {walls['N'][-1]:.2f} s ({per})", flush=True)
        s, m = statistics.median(walls["1"]), statistics.median(walls["N"])
        ds = statistics.median(x["seconds"]["decompose"] for x in inner["1"])
        dm = statistics.median(max(r["decompose"] for r in x["per_rank"]) for x in inner["N"])
        print(f"median wall: 1 process {s:.2f} s | {args.ranks} ranks {m:.2f} s | speed-up {s / m:.2f}x; "
              f"decomposition: 1 process {ds:.1f} s, slowest rank {dm:.1f} s ({ds / dm:.2f}x); outputs bitwise "
              f"identical; load average {os.getloadavg()[0]:.1f} (1 min) after")


if __name__ == "__main__":
    main()
