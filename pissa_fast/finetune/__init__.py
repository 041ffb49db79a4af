"""The fine-tuning benchmark behind `pissa-fast bench-finetune`: PiSSA against LoRA in a real training loop.

Modules: `task` (the synthetic arithmetic data set), `methods` (how each adapter is built), `train` (the
loop), `plots` and `report` (the paper-style figures and report.md), `run` (the whole benchmark as a
Python function) and `cli` (the subcommand).
"""
