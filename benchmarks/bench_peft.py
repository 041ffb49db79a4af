"""peft's own PiSSA init against the same call on pissa_fast: the backend (`pissa_fast.peft.enabled()`
around `peft.get_peft_model`) and the drop-in (`pissa_fast.peft.get_peft_model`).

    PYTHONPATH=. python benchmarks/bench_peft.py                     # 8 TinyLlama-1.1B-shaped layers, bf16
    PYTHONPATH=. python benchmarks/bench_peft.py --preset smollm2-135m --layers 30   # a small model

One bf16 LLaMA-shaped checkpoint (hidden 2048, intermediate 5632, 32 heads / 4 KV heads: the
TinyLlama-1.1B shape; projection weights synthetic with a decaying spectrum W = U diag(s) V^T +
noise, s_i = i^-decay, as trained weights have) is written once with save_pretrained. Every
measurement is a fresh process that loads it with `AutoModelForCausalLM.from_pretrained` and then
times one `get_peft_model(model, LoraConfig(r, lora_alpha, target_modules=<all 7 projections>,
init_lora_weights="pissa_niter_N"))`, in two flows:

- from_pretrained: the weights as transformers leaves them, private mappings of the safetensors file;
- in-memory: every parameter first copied into anonymous memory (a model built or moved in Python).

Reported per (flow, niter, path): wall time and CPU time (user + sys of the process: less sensitive
to other processes on a shared machine), medians over --repeats runs whose order rotates, and the
peak extra RSS during the call (VmHWM reset just before it, after malloc_trim). Each run also checks
one layer: |W_res + scaling B A - W| / |W| against the checkpoint, and the L1 error of its factors
against the exact SVD is printed for one weight per niter (pissa_fast.metrics definitions).
Prints a markdown table; --json writes every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {  # (hidden, intermediate, heads, kv heads, default layers)
    "tinyllama-1.1b": (2048, 5632, 32, 4, 8),
    "smollm2-135m": (576, 1536, 9, 3, 30),
}
PATHS = ("peft", "backend", "dropin")  # also: backend-nopopulate (PISSA_FAST_POPULATE=0, file-backed cost)
FLOWS = ("from_pretrained", "in-memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--niters", default="4,16", help="comma-separated N of pissa_niter_N")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--flows", default=",".join(FLOWS))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="folder for the checkpoint (default: a temporary one)")
    p.add_argument("--decay", type=float, default=0.35)
    p.add_argument("--fast-niter", default="",
                   help="what-if for the pissa_fast paths, e.g. '4:2,16:4': a fixed niter 2 where peft runs "
                        "pissa_niter_4, replacing the accuracy mapping (pissa_fast.peft.decompose_kwargs); "
                        "check the L1 table that it is at least as accurate")
    p.add_argument("--json", default=None)
    p.add_argument("--no-errors", action="store_true", help="skip the L1 error table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_weight(m, n, decay, gen, k=256):
    """U diag(s) V^T (orthonormal U, V; s_i = i^-decay) plus a Gaussian floor near s_k, float32."""
    import torch

    k = min(k, m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (U * s) @ V.T + s[-1] / (math.sqrt(m) + math.sqrt(n)) * torch.randn(m, n, generator=gen)


def write_checkpoint(args, path):
    import torch
    import transformers

    hidden, inter, heads, kv, _ = PRESETS[args.preset]
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=256,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(name.endswith(f"{t}.weight") for t in PROJ):
                p.copy_(synthetic_weight(p.shape[0], p.shape[1], args.decay, gen))
            elif p.dim() == 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.fill_(1.0)
    model.save_pretrained(path)


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import ctypes
    import gc
    import resource
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import peft
    import transformers
    from safetensors import safe_open

    import pissa_fast.peft
    import pissa_fast.peft.layers

    if spec["fast_niter"]:  # what-if: the one mapping function, overridden for this benchmark only
        mapping = spec["fast_niter"]
        pissa_fast.peft.layers.decompose_kwargs = lambda niter, r: {"niter": mapping.get(str(niter), niter)}
    if spec["path"] == "backend-nopopulate":
        os.environ["PISSA_FAST_POPULATE"] = "0"

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16)
    if spec["flow"] == "in-memory":
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back: RSS = live data
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    rss0 = _status("VmRSS")
    config = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=PROJ,
                             init_lora_weights=f"pissa_niter_{spec['niter']}")
    torch.manual_seed(0)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if spec["path"] == "peft":
        pm = peft.get_peft_model(model, config)
    elif spec["path"].startswith("backend"):
        with pissa_fast.peft.enabled():
            pm = peft.get_peft_model(model, config)
    else:
        pm = pissa_fast.peft.get_peft_model(model, config)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status("VmHWM") - rss0
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    with safe_open(os.path.join(spec["checkpoint"], "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight").float()
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    rec = (layer.base_layer.weight.float() + layer.scaling["default"] * b @ a - w).norm() / w.norm()
    layers = sum(1 for m in pm.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    return dict(spec, wall=wall, cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                sys=r1.ru_stime - r0.ru_stime, peak_mib=peak / 2**20, rss0_mib=rss0 / 2**20, recon=float(rec),
                layers=layers, threads=torch.get_num_threads())


def errors(args, ckpt, niters, fast_niter):
    """L1 vs exact SVD of one weight: peft's factors (svd_lowrank, q = r, on the float32 weight) and
    pissa_fast's (decompose with the backend's kwargs), as pissa_fast.metrics reports them."""
    import torch
    from safetensors import safe_open

    from pissa_fast import decompose, error_vs_exact, exact_factors
    from pissa_fast.peft import decompose_kwargs

    class Factors:
        def __init__(self, A, B, S):
            self.A, self.B, self.S = A, B, S

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    exact = exact_factors(w)
    rows = []
    for n in niters:
        torch.manual_seed(0)
        V, S, U = torch.svd_lowrank(w.float(), args.r, niter=n)
        root = S.sqrt()
        e_peft = error_vs_exact(w, Factors(root[:, None] * U.T, V * root, S), exact=exact)
        kwargs = {"niter": fast_niter[str(n)]} if str(n) in fast_niter else decompose_kwargs(n, args.r)
        d = decompose(w, args.r, **kwargs)
        e_fast = error_vs_exact(w, d, exact=exact)
        rows.append((n, d.niter_used if d.niter_used is not None else kwargs["niter"], e_peft.l1, e_fast.l1))
    return "x".join(map(str, w.shape)), rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    hidden, inter, heads, kv, layers = PRESETS[args.preset]
    args.layers = args.layers or layers
    niters = [int(n) for n in args.niters.split(",")]
    flows = [f for f in args.flows.split(",") if f]
    paths = [p for p in args.paths.split(",") if p]
    fast_niter = {k: int(v) for k, v in (kv.split(":") for kv in args.fast_niter.split(",") if kv)}
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_peft_")
        ckpt = tmp.name
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if not os.path.exists(os.path.join(ckpt, "model.safetensors")):
        t0 = time.perf_counter()
        write_checkpoint(args, ckpt)
        print(f"checkpoint written in {time.perf_counter() - t0:.1f} s: {ckpt}", file=sys.stderr)
    env = dict(os.environ, PISSA_FAST_PROGRESS="0", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads distort a shared machine
    runs = []
    cases = [(f, n) for f in flows for n in niters]
    for rep in range(args.repeats):
        for flow, niter in cases:
            order = paths[rep % len(paths):] + paths[:rep % len(paths)]  # rotate: no path always first
            for path in order:
                spec = dict(flow=flow, niter=niter, path=path, r=args.r, alpha=args.alpha, checkpoint=ckpt,
                            threads=args.threads, fast_niter=fast_niter)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-4000:])
                    return 1
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(f"  {rep + 1}/{args.repeats} {flow:15s} niter {niter:2d} {path:8s} wall {run['wall']:6.2f} s "
                      f"cpu {run['cpu']:6.2f} s peak +{run['peak_mib']:7.1f} MiB recon {run['recon']:.1e}",
                      file=sys.stderr)
    err = None if args.no_errors else errors(args, ckpt, niters, fast_niter)

    import peft
    import torch
    import transformers

    import pissa_fast

    def med(flow, niter, path, key):
        vals = [r[key] for r in runs if (r["flow"], r["niter"], r["path"]) == (flow, niter, path)]
        return statistics.median(vals) if vals else float("nan")

    n_layers = runs[0]["layers"] if runs else 0
    print(f"### peft's PiSSA init vs pissa_fast (backend and drop-in), {args.preset} shape\n")
    print(f"`{' '.join(['python', 'benchmarks/bench_peft.py'] + (argv if argv is not None else sys.argv[1:]))}`, "
          f"started {started}. LLaMA shape hidden {hidden}, intermediate {inter}, {heads} heads / {kv} KV heads, "
          f"{args.layers} layers, {n_layers} targeted projections, bf16, r={args.r}, lora_alpha={args.alpha:g}. "
          f"torch {torch.__version__} on the CPU, {runs[0]['threads'] if runs else '?'} threads "
          f"(OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}), {os.cpu_count()} CPUs, load average {load0} at start; "
          f"peft {peft.__version__}, transformers {transformers.__version__}, pissa_fast {pissa_fast.__version__} "
          f"({pissa_fast.build_info()}, CPU passes: {pissa_fast.cpu_passes()}), {platform.machine()}. "
          f"Medians of {args.repeats} runs, each in a fresh "
          f"process; CPU = user + sys seconds of that process; peak = growth of VmHWM during the call. "
          f"PISSA_FAST_NITER={os.environ.get('PISSA_FAST_NITER') or '(unset: equivalent)'}.\n")
    head = "| flow | niter | path | wall (s) | speed-up | CPU (s) | CPU speed-up | peak extra RSS (MiB) |"
    if fast_niter:
        print(f"What-if: the pissa_fast paths ran niter {fast_niter} (peft's N: pissa_fast's), standing in for "
              f"the accuracy mapping; the L1 table below checks it.\n")
    print(head)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for flow, niter in cases:
        for path in paths:
            wall, cpu = med(flow, niter, path, "wall"), med(flow, niter, path, "cpu")
            sw = med(flow, niter, "peft", "wall") / wall if "peft" in paths else float("nan")
            sc = med(flow, niter, "peft", "cpu") / cpu if "peft" in paths else float("nan")
            print(f"| {flow} | {niter} | {path} | {wall:.2f} | {sw:.2f}x | {cpu:.2f} | {sc:.2f}x | "
                  f"{med(flow, niter, path, 'peak_mib'):.0f} |")
    worst = max((r["recon"] for r in runs), default=float("nan"))
    print(f"\nEvery run: |W_res + scaling B A - W| / |W| <= {worst:.1e} on model.layers.0.mlp.down_proj.")
    if err is not None:
        shape, rows = err
        print(f"\nL1 error against the exact SVD (pissa_fast.error_vs_exact), model.layers.0.self_attn.q_proj "
              f"({shape}):\n")
        print("| pissa_niter_N | peft (svd_lowrank, niter N) | pissa_fast niter used | pissa_fast |")
        print("|---:|---:|---:|---:|")
        for n, nf, lp, lf in rows:
            print(f"| {n} | {lp:.2e} | {nf} | {lf:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), runs=runs, errors=err), f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
