"""pissa_fast's peft drop-in against peft's own PiSSA init, on the same LLaMA-shaped model.

    PYTHONPATH=. python benchmarks/bench_peft.py                        # 2 layers of LLaMA-2-7B shape, bf16, CPU
    PYTHONPATH=. python benchmarks/bench_peft.py --layers 32 --device cuda   # the full 7B shape on a GPU

Both paths run `get_peft_model(model, LoraConfig(r, lora_alpha, target_modules=all 7 projections,
init_lora_weights="pissa_niter_N"))` on one model whose projection weights are synthetic with a
decaying spectrum (W = U diag(s) V^T + noise, s_i = i^-decay, U, V orthonormal; trained LLM weights
have such spectra, random init ones do not): `peft.get_peft_model` (torch.svd_lowrank per layer, in
float32) and `pissa_fast.peft.get_peft_model` (batched pissa_fast.decompose_many). Each run starts from
the same weights (the model is unloaded and its weights restored in between, outside the timing).
Times are the whole get_peft_model call, median of --repeats runs, the order alternating.

Error against the exact SVD (float64) on a sample of layers: the factors each path computes before
peft rounds them through the base dtype (both are rounded the same way after that), with the metrics
of pissa_fast.metrics: l1 (the PiSSA paper's average L1 distance of A and B), rel_recon
(|BA - W_r| / |W_r|), excess (|W - BA| / |W - W_r| - 1).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads")
    p.add_argument("--vocab", type=int, default=256, help="small: embeddings are not targeted")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--targets", default=",".join(PROJ))
    p.add_argument("--error-layers", default="model.layers.0.self_attn.q_proj,model.layers.0.mlp.down_proj",
                   help="comma-separated module names whose error vs exact SVD is reported ('' for none)")
    p.add_argument("--decay", type=float, default=0.35, help="singular values s_i = i^-decay")
    p.add_argument("--rank-structured", type=int, default=256,
                   help="singular directions built explicitly; the rest is a noise floor at that level")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the progress bars of both paths")
    return p.parse_args(argv)


def synthetic_weight(m, n, k, decay, gen):
    """U diag(s) V^T (U: m x k, V: n x k orthonormal, s_i = i^-decay) plus a Gaussian floor whose largest
    singular value is about s_k, in float32."""
    k = min(k, m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    W = (U * s) @ V.T
    floor = s[-1] / (math.sqrt(m) + math.sqrt(n))
    W += floor * torch.randn(m, n, generator=gen)
    return W


def build_model(args, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
                                   max_position_embeddings=128)
    with torch.device("meta"):  # no random init of 7B-shaped layers: every parameter is set below
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device="cpu")  # (buffers such as rotary inv_freq stay unset: no forward pass here)
    gen = torch.Generator().manual_seed(args.seed)
    targets = [t for t in args.targets.split(",") if t]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(name.endswith(f"{t}.weight") for t in targets):
                p.copy_(synthetic_weight(p.shape[0], p.shape[1], args.rank_structured, args.decay, gen))
            elif p.dim() == 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.fill_(1.0)
    return model.to(device).eval(), targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(kind, model, targets, originals, args, dtype, device):
    import peft

    from pissa_fast.peft import get_peft_model as fast_get_peft_model

    with torch.no_grad():  # restore the original weights (outside the timing)
        for name, mod in model.named_modules():
            if name in originals:
                mod.weight.copy_(originals[name])
    config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                             init_lora_weights=f"pissa_niter_{args.niter}")
    fn = peft.get_peft_model if kind == "peft" else fast_get_peft_model
    torch.manual_seed(args.seed)
    sync(device)
    t0 = time.perf_counter()
    pm = fn(model, config)
    sync(device)
    elapsed = time.perf_counter() - t0
    n_layers = sum(1 for m in pm.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    model = pm.unload()
    return elapsed, n_layers, model


class _Factors:
    def __init__(self, A, B, S):
        self.A, self.B, self.S = A, B, S


def algorithm_errors(weight, args):
    """Errors vs the exact SVD of what each path computes for this weight (before peft's rounding)."""
    from pissa_fast import decompose, error_vs_exact, exact_factors

    exact = exact_factors(weight)
    out = {}
    # peft's pissa_init: svd_lowrank on the float32 weight, q = r, niter
    torch.manual_seed(args.seed)
    V, S, U = torch.svd_lowrank(weight.float(), args.r, niter=args.niter)
    root = S.sqrt()
    out["peft"] = error_vs_exact(weight, _Factors(root[:, None] * U.T, V * root, S), exact=exact)
    d = decompose(weight, args.r, args.niter, seed=args.seed)
    out["pissa_fast"] = error_vs_exact(weight, d, exact=exact)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"  # peft's bars (read when tqdm is first imported)
        os.environ["PISSA_FAST_PROGRESS"] = "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import peft
    import transformers

    import pissa_fast

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    t0 = time.perf_counter()
    model, targets = build_model(args, dtype, device)
    originals = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
                 if any(name.endswith(t) for t in targets) and hasattr(mod, "weight")}
    build_s = time.perf_counter() - t0

    times = {"peft": [], "pissa_fast": []}
    n_layers = 0
    for i in range(args.repeats):
        order = ("peft", "pissa_fast") if i % 2 == 0 else ("pissa_fast", "peft")
        for kind in order:
            elapsed, n_layers, model = run_once(kind, model, targets, originals, args, dtype, device)
            times[kind].append(elapsed)
            print(f"  run {i + 1}/{args.repeats} {kind:10s} {elapsed:8.2f} s", file=sys.stderr)

    errors = {}
    for name in [n for n in args.error_layers.split(",") if n]:
        if name in originals:
            errors[name] = algorithm_errors(originals[name], args)

    med = {k: statistics.median(v) for k, v in times.items()}
    try:
        load = "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        load = "?"
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"### peft drop-in vs peft.get_peft_model, init_lora_weights=\"pissa_niter_{args.niter}\"\n")
    print(f"LLaMA shape hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layer(s), "
          f"{n_layers} targeted projections ({','.join(targets)}), {args.dtype}, r={args.r}, "
          f"lora_alpha={args.alpha:g}, on {device}{gpu}; {torch.get_num_threads()} torch threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"{os.cpu_count()} CPUs, load average {load}; torch {torch.__version__}, peft {peft.__version__}, "
          f"transformers {transformers.__version__}, pissa_fast {pissa_fast.__version__} "
          f"({pissa_fast.build_info()}), {platform.machine()}. Model built in {build_s:.1f} s.\n")
    print("| path | get_peft_model time, median (s) | all runs (s) | speedup vs peft |")
    print("|---|---:|---|---:|")
    for kind in ("peft", "pissa_fast"):
        runs = ", ".join(f"{t:.2f}" for t in times[kind])
        print(f"| {'peft.get_peft_model' if kind == 'peft' else 'pissa_fast.peft.get_peft_model'} | "
              f"{med[kind]:.2f} | {runs} | {med['peft'] / med[kind]:.2f}x |")
    if errors:
        print("\nError against the exact SVD (float64) of the factors each path computes:\n")
        print("| layer | shape | path | l1 | rel_recon | excess | sv_rel |")
        print("|---|---|---|---:|---:|---:|---:|")
        for name, per in errors.items():
            shape = "x".join(str(s) for s in originals[name].shape)
            for kind, e in per.items():
                print(f"| {name} | {shape} | {kind} | {e.l1:.3e} | {e.rel_recon:.3e} | {e.excess:.3e} | "
                      f"{e.sv_rel:.3e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
