"""The `pissa-fast` command (also `python -m pissa_fast`, so `torchrun -m pissa_fast` runs it too).

    pissa-fast init MODEL OUT --target-modules ...       residual model at OUT, adapter at OUT/pissa_init
    pissa-fast convert-to-lora --initial I --trained T OUT [--rank k]
    pissa-fast verify OUT                                does the adapter sit on its own residual?
    pissa-fast bench ...                                 the benchmark suite

Each subcommand is a module exposing `add_arguments(parser)` and `run(args) -> int` (or
`add_arguments_<name>` / `run_<name>`). Only the chosen subcommand's module is imported, so
`pissa-fast --help` and the pure-Python subcommands start fast and work without the compiled library.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "init": ("pissa_fast.commands.init", "PiSSA-initialize a transformers checkpoint: residual model + adapter"),
    "convert-to-lora": ("pissa_fast.commands.convert_to_lora",
                        "turn a trained PiSSA adapter into a LoRA for the original model (exact, or rank r)"),
    "verify": ("pissa_fast.commands.verify", "check that an adapter sits on its own residual model"),
    "bench": ("pissa_fast.bench", "benchmark niter x rank against exact SVD and the peft path"),
    "bench-qpissa": ("pissa_fast.quant.bench", "QPiSSA vs LoftQ vs QLoRA: 4-bit quantization error and time per layer"),
    "bench-finetune": ("pissa_fast.finetune.cli", "fine-tune a real LLM with LoRA vs PiSSA: loss curves, the paper's Figures 2-3"),
}


def _hook(module, name: str, what: str):
    return getattr(module, f"{what}_{name.replace('-', '_')}", None) or getattr(module, what)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pissa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # e.g. the compiled library is missing and this command needs it
            print(f"pissa-fast {name}: error: {e}", file=sys.stderr)
            return 2
        _hook(mod, name, "add_arguments")(p)
        p.set_defaults(_run=_hook(mod, name, "run"))
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
