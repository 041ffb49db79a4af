"""The `pissa-fast` command: `bench` (the benchmark suite), `init` and `convert-to-lora` (checkpoints).

Each subcommand lives in its own module, which exposes `add_arguments_<name>(parser)` and
`run_<name>(args) -> int` (or plain `add_arguments` / `run` when the module has one subcommand).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "bench": ("pissa_fast.bench", "benchmark niter x rank against exact SVD and the peft path"),
    "init": ("pissa_fast.checkpoint", "PiSSA-initialize a transformers checkpoint, streaming its shards"),
    "convert-to-lora": ("pissa_fast.checkpoint", "turn a trained PiSSA adapter into a LoRA for the base model"),
    "bench-qpissa": ("pissa_fast.quant.bench", "QPiSSA vs LoftQ vs QLoRA: 4-bit quantization error and time per layer"),
    "bench-finetune": ("pissa_fast.finetune.cli", "fine-tune a real LLM with LoRA vs PiSSA: loss curves, the paper's Figures 2-3"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pissa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, "add_arguments_" + name.replace("-", "_"), getattr(mod, "add_arguments", None))(p)
        p.set_defaults(_run=getattr(mod, "run_" + name.replace("-", "_"), getattr(mod, "run", None)))
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
