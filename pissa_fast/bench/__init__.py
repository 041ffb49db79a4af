"""`pissa-fast bench`: pissa_fast.decompose against peft's PiSSA init path, niter x rank, time and error.

For every sampled weight W and every (niter, r) of the grid it times (median of --repeats runs after
--warmup untimed ones, residual included) pissa_fast.decompose and the peft path side by side, and
measures both against the exact float64 SVD of W (computed once per weight, off the clock) with
pissa_fast.error_vs_exact. niter "inf" is the exact torch.linalg.svd path of each, timed once per
weight at the largest r (its factors at smaller r are the same SVD truncated).

Prints the tables (time, errors, ratios pissa_fast / peft) and writes --out DIR: results.json (the
environment and every measurement), report.md (the tables, the machine, the date, the command) and
PNG plots (time vs niter, error vs niter, error vs time). With --device cuda (and --whole-model) it
also times whole-model initializations: one decompose_many(..., inplace=True) call over every weight
of the model against the peft path layer by layer.

Workloads (pissa_fast.bench.workload): synthetic weights shaped like a named model (llama-2-7b,
mistral-7b, gemma-7b, llama-small, tiny), one shape (--shape 4096x4096), or the projection weights of a
local safetensors checkpoint (--model PATH).
"""
from .args import add_arguments_bench
from .run import run_bench

__all__ = ["add_arguments_bench", "run_bench"]
