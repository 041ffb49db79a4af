"""`pissa-fast init MODEL OUT --target-modules ...`: parses into pissa_fast.init_checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ..pairing import STAGING
from ._common import niter_type, report_errors, size_type

_REGEX_CHARS = set("*+?[](){}|^$\\")


def target_modules_arg(values: list[str]):
    """--target-modules as peft's LoraConfig takes it: all-linear; one argument with regex characters is a
    regex string (full match on module names); otherwise module-name suffixes, comma- or space-separated."""
    if len(values) == 1 and values[0].strip().lower() == "all-linear":
        return "all-linear"
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        return values[0]
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--target-modules is empty")
    bad = [n for n in names if _REGEX_CHARS & set(n)]
    if bad:
        raise argparse.ArgumentTypeError(f"--target-modules: {bad[0]!r} looks like a regex; pass a regex alone, as "
                                         f"one argument")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..init import DEFAULT_MAX_MEMORY

    p.add_argument("model", metavar="MODEL",
                   help="checkpoint folder (config.json + *.safetensors), or a Hugging Face Hub id (resolved through "
                        "the local cache, which works offline); only read")
    p.add_argument("out", metavar="OUT", help="output folder: the residual model, and the adapter in OUT/pissa_init")
    p.add_argument("--target-modules", nargs="+", required=True, metavar="T",
                   help="as in peft's LoraConfig: module-name suffixes (q_proj,v_proj or q_proj v_proj), one regex "
                        "(full match, e.g. '.*\\.(q|v)_proj'), or all-linear")
    p.add_argument("--r", "--lora-rank", dest="r", type=int, default=16,
                   help="LoRA rank (default 16); spell it --lora-rank after torchrun, whose parser reads --r as an "
                        "abbreviation of its own options")
    p.add_argument("--alpha", "--lora-alpha", dest="alpha", type=float, default=None,
                   help="lora_alpha (default: r, i.e. scaling 1)")
    p.add_argument("--niter", type=niter_type, default=4,
                   help="applications of W^T W in the randomized SVD, or 'exact' (default 4)")
    p.add_argument("--use-rslora", action="store_true", help="scaling = alpha / sqrt(r) (peft's use_rslora)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test matrices (default 0)")
    p.add_argument("--device", default=None,
                   help="where to decompose: cpu (the default), cuda, cuda:1, ...; under torchrun each rank's own "
                        "(cuda:LOCAL_RANK where its host has CUDA, else cpu)")
    p.add_argument("--max-memory", type=size_type, default=DEFAULT_MAX_MEMORY,
                   help="bytes of weights in memory at once, e.g. 2GiB (default; one tensor is always allowed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the decomposition (default: torch's)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT (same-named files replaced, old *.safetensors removed)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code (config.json auto_map) to run, as in transformers")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a Hub MODEL")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: huggingface_hub's)")
    p.add_argument("--report-error", type=int, nargs="?", const=4, default=0, metavar="N",
                   help="report the error against the exact SVD on N sampled layers (default N 4; slow)")
    q = p.add_argument_group("QPiSSA (4-bit residual; needs bitsandbytes: pip install 'pissa_fast[quant]')")
    q.add_argument("--quantize", choices=("nf4", "fp4"), default=None,
                   help="write a bf16 residual that is exactly representable in this bitsandbytes 4-bit format, "
                        "with the adapter fitted to it (QPiSSA); load it with the BitsAndBytesConfig printed at the "
                        "end")
    q.add_argument("--qpissa-iters", type=int, default=None, metavar="T",
                   help="QPiSSA rounds R = quant(W - BA), BA = top-r(W - R) (default 5; the best round is kept)")
    q.add_argument("--qpissa-start", choices=("pissa", "quantized", "best"), default=None,
                   help="QPiSSA's start: pissa (the paper's: PiSSA's factors), quantized (LoftQ's: B A = 0) or best "
                        "(both, the lower error kept per weight; twice the work). Default: pissa")
    q.add_argument("--qpissa-scales", choices=("search", "absmax"), default=None,
                   help="NF4 block scales: search (per block the error-minimizing scale, still exact under "
                        "bitsandbytes) or absmax (bitsandbytes' own rounding, the paper's). Default: search")
    q.add_argument("--double-quant", action="store_true",
                   help="bitsandbytes' double quantization of the block scales (bnb_4bit_use_double_quant)")
    q.add_argument("--quant-blocksize", type=int, default=None, metavar="N",
                   help="only 64: transformers' BitsAndBytesConfig has no blocksize option and always uses 64")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the run's numbers as JSON to PATH")


def run(args) -> int:
    from ..init import init_checkpoint

    def go():
        try:
            targets = target_modules_arg(args.target_modules)
        except argparse.ArgumentTypeError as e:
            print(f"pissa-fast init: error: {e}", file=sys.stderr)
            return 2
        try:
            result = init_checkpoint(args.model, args.out, target_modules=targets, r=args.r, lora_alpha=args.alpha,
                                     niter=args.niter, use_rslora=args.use_rslora, seed=args.seed, device=args.device,
                                     max_memory=args.max_memory, overwrite=args.overwrite,
                                     trust_remote_code=args.trust_remote_code, revision=args.revision,
                                     cache_dir=args.cache_dir, report_error=args.report_error, threads=args.threads,
                                     quantize=args.quantize, qpissa_iters=args.qpissa_iters,
                                     quant_blocksize=args.quant_blocksize, double_quant=args.double_quant,
                                     qpissa_start=args.qpissa_start, qpissa_scales=args.qpissa_scales)
        except KeyboardInterrupt:
            print(f"\npissa-fast init: interrupted; finished shards are kept in {os.path.join(args.out, STAGING)}: "
                  f"rerun the same command to resume", file=sys.stderr)
            return 130
        print(result)
        if args.json and result.rank == 0:  # under torchrun, rank 0 reports the run
            data = {k: v for k, v in asdict(result).items() if k != "errors"}
            data["errors"] = {m: asdict(e) for m, e in result.errors}
            with open(args.json, "w") as fh:
                json.dump(data, fh, indent=1)
        return 0
    return report_errors("init", go)
