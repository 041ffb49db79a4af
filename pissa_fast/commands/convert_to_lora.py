"""`pissa-fast convert-to-lora --initial OUT/pissa_init --trained T LORA [--rank k]`: parses into
pissa_fast.convert_to_lora."""
from __future__ import annotations

import argparse

from ._common import report_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--initial", required=True, help="the PiSSA adapter as initialized (OUT/pissa_init)")
    p.add_argument("--trained", required=True, help="the PiSSA adapter after training (peft save_pretrained)")
    p.add_argument("out", metavar="OUT", help="output: a LoRA adapter for the original model")
    p.add_argument("--rank", type=int, default=None,
                   help="a rank-k LoRA: the best rank-k part of each trained change, with the dropped part reported "
                        "(default: exact, rank 2r and lora_alpha 2 alpha, as peft converts)")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the model pissa-fast init read)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from ..convert import convert_to_lora

    def go():
        print(convert_to_lora(args.initial, args.trained, args.out, rank=args.rank, base_model=args.base_model,
                              overwrite=args.overwrite))
        return 0
    return report_errors("convert-to-lora", go)
