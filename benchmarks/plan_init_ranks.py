"""A plan on paper for `torchrun -m pissa_fast init` on 70B and 405B checkpoints: a calculation from
the code's own rules, not a measurement.

What it uses from the code:
  - the split: pissa_fast.init.plan.split_shards (whole shard files, by bytes) on the checkpoint's
    shard count, every shard taken as total / shards bytes (published checkpoints are about equal);
  - each rank reads its shards once and writes the same bytes back (residual, same dtype);
  - host memory of weights per rank: at most max(--max-memory, the largest target) (pipeline budget);
    on the GPU the group being decomposed: at most max(--max-memory / 2, the largest target);
  - rank 0 loads every staged factor (float32, r (m + n) per target) to write the adapter;
  - OUT holds the residual, the staged factors and the adapter until the final renames.
Times: target bytes of the busiest rank / a per-device throughput you pass (MiB of target weights
decomposed per second); the default is this machine's measured CPU figure (benchmarks/RESULTS.md,
issue 11 part 2: one thread per rank, loaded). No GPU figure is assumed: pass one once measured.

    python benchmarks/plan_init_ranks.py --r 16 --throughput 60
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pissa_fast.init.plan import split_shards  # noqa: E402

# Public config.json values (meta-llama/Llama-3.1-70B, -405B) and their shard counts (model-000NN-of-000SS).
MODELS = {
    "Llama-3.1-70B": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=128256, shards=30),
    "Llama-3.1-405B": dict(hidden=16384, inter=53248, layers=126, heads=128, kv=8, vocab=128256, shards=191),
}
GB = 1e9


def targets(m: dict) -> list:
    """(out, in) of every all-linear target of one layer (q, k, v, o, gate, up, down)."""
    h, d = m["hidden"], m["hidden"] // m["heads"]
    return [(h, h), (m["kv"] * d, h), (m["kv"] * d, h), (h, h), (m["inter"], h), (m["inter"], h), (h, m["inter"])]


def plan(name: str, m: dict, ranks: int, r: int, max_memory: float, throughput_mib: float) -> dict:
    per_layer = targets(m)
    target_bytes = m["layers"] * sum(o * i for o, i in per_layer) * 2  # bf16
    other = 2 * m["vocab"] * m["hidden"] * 2 + (2 * m["layers"] + 1) * m["hidden"] * 2  # embed, lm_head, norms
    total = target_bytes + other
    adapter = m["layers"] * sum(r * (o + i) for o, i in per_layer) * 4  # float32 factors
    largest = max(o * i for o, i in per_layer) * 2
    shard = total / m["shards"]
    parts = split_shards([(f"s{i}", round(shard)) for i in range(m["shards"])], ranks)
    busiest = max(len(p) for p in parts) * shard
    busy = sum(1 for p in parts if p)
    busiest_targets = busiest * target_bytes / total
    return dict(model=name, ranks=ranks, total=total, shards=m["shards"], busy=busy, busiest=busiest,
                ideal=total / ranks, host=max(max_memory, largest), gpu=max(max_memory / 2, largest),
                adapter=adapter, out_peak=total + 2 * adapter,
                minutes=busiest_targets / (throughput_mib * 2**20) / 60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--max-memory", type=float, default=2 * 2**30, help="bytes (init's default 2 GiB)")
    ap.add_argument("--throughput", type=float, default=60.0,
                    help="MiB of target weights decomposed per second per rank (default: this machine's CPU, "
                         "1 thread per rank, from bench_init_ranks.py)")
    ap.add_argument("--ranks", default="8,16,64,256")
    args = ap.parse_args()
    print(f"# calculation, not a measurement: r={args.r}, all-linear, bf16, --max-memory "
          f"{args.max_memory / 2**30:g} GiB, {args.throughput:g} MiB/s per rank")
    print("| model | ranks | ranks with work | bytes read (= written) by the busiest rank | ideal (total / ranks) "
          "| weights in host memory per rank | on the GPU per rank | rank 0's factors | OUT at peak "
          "| decomposition, busiest rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for n in (int(x) for x in args.ranks.split(",")):
            p = plan(name, m, n, args.r, args.max_memory, args.throughput)
            print(f"| {name} ({p['total'] / GB:.0f} GB, {p['shards']} shards) | {n} | {p['busy']} | "
                  f"{p['busiest'] / GB:.1f} GB | {p['ideal'] / GB:.1f} GB | ≤ {p['host'] / GB:.2f} GB | "
                  f"≤ {p['gpu'] / GB:.2f} GB | {p['adapter'] / GB:.2f} GB | {p['out_peak'] / GB:.0f} GB | "
                  f"{p['minutes']:.1f} min |")


if __name__ == "__main__":
    main()
