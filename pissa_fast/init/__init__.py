"""`pissa-fast init`: PiSSA initialization of a transformers checkpoint on disk, streamed.

    api.py        init_checkpoint(): validate, plan, run, finish
    plan.py       ShardJob / InitPlan: output shards, their layout, groups of targets (units of work)
    transform.py  what happens to a group of weights (PiSSA; the plug-in point for QPiSSA)
    pipeline.py   reader / transform / writer threads over the jobs, staged and resumable
    finalize.py   the adapter folder and the rest of the residual model, in staging
    outdir.py     the output folder's rules and the pairing-safe final moves
"""
from .api import DEFAULT_MAX_MEMORY, InitResult, init_checkpoint

__all__ = ["DEFAULT_MAX_MEMORY", "InitResult", "init_checkpoint"]
