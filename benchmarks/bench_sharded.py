"""Sharded PiSSA init on CPU ranks: decompose_many over FSDP-style row-sharded DTensors on N ranks
(gloo, one thread each) against (a) one process decomposing all the full weights and (b) the floor:
N independent processes, each decomposing its share of the full weights with no communication at all
(what perfect sharding could reach on this machine). Runs interleaved, medians reported. The first
sharded run is checked bitwise against the single-process factors.

    python benchmarks/bench_sharded.py --ranks 2 --layers 8 --shape 2048x2048 --dtype bfloat16 --r 16 --niter 4
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time

import torch


def _weights(args):
    m, n = args.shape
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(m, n, generator=g).to(args.dtype) for i in range(args.layers)}


def _single(args, share, out):
    """Decompose `share` of the full weights (a slice of layer indices) in this process alone."""
    import pissa_fast

    torch.set_num_threads(1)
    weights = dict(list(_weights(args).items())[share])
    t0 = time.perf_counter()
    pissa_fast.decompose_many(weights, args.r, args.niter, inplace=True)
    out.put(("single", 0, time.perf_counter() - t0, None))


def _rank(rank, world, init_file, args, check, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import pissa_fast

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = _weights(args)
    name0 = next(iter(full))
    keep = full[name0].clone() if check and rank == 0 else None
    weights = {k: distribute_tensor(w, mesh, [Shard(0)]) for k, w in full.items()}
    del full
    dist.barrier()
    t0 = time.perf_counter()
    outs = pissa_fast.decompose_many(weights, args.r, args.niter, inplace=True, seed=0)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    ok = None
    if keep is not None:
        ref = pissa_fast.decompose(keep, args.r, args.niter, seed=0)
        ok = torch.equal(ref.A, outs[name0].A.cpu()) and torch.equal(ref.B, outs[name0].B.cpu())
    dist.destroy_process_group()
    out.put(("sharded", rank, elapsed, ok))


def _launch(ctx, target, nproc, args_of):
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), out)) for i in range(nproc)]
    for p in procs:
        p.start()
    got = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", default="2048x2048", help="MxN of every weight")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pissa_fast.options import parse_dtype

    args.shape = tuple(int(x) for x in args.shape.lower().split("x"))
    args.dtype = parse_dtype(args.dtype)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread per process, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# {args.layers} x {args.shape[0]}x{args.shape[1]} {args.dtype}, r={args.r}, niter={args.niter}, "
          f"{args.ranks} ranks (gloo, Shard(0)) vs 1 process")
    ctx = mp.get_context("fork")
    single, floor, sharded = [], [], []
    k = args.ranks
    for rep in range(args.repeats):
        single.append(_launch(ctx, _single, 1, lambda i: (args, slice(None)))[0][2])
        floor.append(max(r[2] for r in _launch(ctx, _single, k, lambda i: (args, slice(i, None, k)))))
        with tempfile.TemporaryDirectory() as tmp:
            res = _launch(ctx, _rank, args.ranks, lambda i: (i, args.ranks, os.path.join(tmp, "pg"), args, rep == 0))
        if rep == 0:
            ok = [r[3] for r in res if r[3] is not None]
            assert ok == [True], "sharded factors differ from the single-process ones"
        sharded.append(max(r[2] for r in res))
        print(f"repeat {rep}: 1 process {single[-1]:.3f} s, {k} independent processes {floor[-1]:.3f} s, "
              f"{k} ranks sharded {sharded[-1]:.3f} s", flush=True)
    s, f, d = statistics.median(single), statistics.median(floor), statistics.median(sharded)
    print(f"median: 1 process {s:.3f} s | {k} independent processes (floor) {f:.3f} s | {k} ranks sharded "
          f"{d:.3f} s | sharded / floor {d / f:.2f} | 1 process / sharded {s / d:.2f}x")


if __name__ == "__main__":
    main()
