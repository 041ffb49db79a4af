"""What happens to a group of loaded weights: the plug-in point of `pissa-fast init`.

A transform takes the targeted weights of one group, as stored (CPU, stored dtype, stored layout:
(in, out) for Conv1D), and returns for each its residual (same layout, in the dtype it names for
the output file) and its adapter factors in peft's convention. The pipeline around it (reading,
prefetching, writing, staging, resuming) does not care how the factors are found:

- PissaTransform: PiSSA's top-r factors, W = residual + scaling * lora_B lora_A, through
  pissa_fast.decompose_many (batched, in place).
- a QPiSSA transform (`init --quantize nf4 --qpissa-iters T`) plugs in here: it returns an
  NF4-representable residual (residual_code may then differ from the stored dtype; the output
  layout follows it) and the factors fitted to it.

Results must not depend on how weights are grouped (or, later, on which rank runs a group): every
weight's random test matrix comes from weight_seed(seed, name) alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..hf.targets import Target


@dataclass
class Factors:
    lora_A: torch.Tensor  # (r, in_features), on the CPU
    lora_B: torch.Tensor  # (out_features, r), on the CPU
    residual: torch.Tensor  # as stored: (out, in), or (in, out) for Conv1D; CPU; dtype of residual_code


class Transform(Protocol):
    def residual_code(self, target: Target) -> str:
        """safetensors dtype code of the target's residual in the output file."""

    def run_key(self) -> dict:
        """Everything that determines the output (JSON-able): resuming needs an equal key."""

    def __call__(self, weights: dict[str, torch.Tensor], targets: dict[str, Target]) -> dict[str, Factors]:
        """Factors and residual of every weight of one group (weights may be overwritten in place)."""


def weight_seed(seed: int, name: str) -> int:
    """The seed of one weight's random test matrix. Today every weight draws from the run's seed, as
    pissa_fast.decompose(w, seed=seed) and the peft drop-in do, so the CLI's adapter is the drop-in's
    bit for bit; the name is in the signature so a per-weight stream can come without touching the
    callers. Either way the result depends on (seed, name) only, never on grouping or ranks."""
    del name
    return int(seed)


@dataclass
class PissaTransform:
    """PiSSA: lora_A = A / sqrt(scaling), lora_B = B / sqrt(scaling) from pissa_fast's factors (A = sqrt(S) V^T,
    B = U sqrt(S)), residual = W - B A written into the loaded weight, in its dtype. scaling = lora_alpha / r
    (lora_alpha / sqrt(r) with rslora), exactly as peft's PiSSA init and pissa_fast.peft."""
    r: int
    lora_alpha: float
    niter: int | None = 4
    use_rslora: bool = False
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report_error: frozenset = frozenset()  # checkpoint keys whose error vs exact SVD is measured
    errors: list = field(default_factory=list)  # (module, ErrorReport) for report_error keys
    seconds: float = 0.0  # time spent decomposing (device synchronized)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def residual_code(self, target: Target) -> str:
        return target.dtype

    def run_key(self) -> dict:
        return {"method": "pissa", "r": self.r, "lora_alpha": self.lora_alpha, "niter": self.niter,
                "use_rslora": self.use_rslora, "seed": self.seed, "device": self.device.type}

    def __call__(self, weights: dict[str, torch.Tensor], targets: dict[str, Target]) -> dict[str, Factors]:
        from ..core import decompose_many

        on_cpu = self.device.type == "cpu"
        work = {k: (w if on_cpu else w.to(self.device, non_blocking=True)) for k, w in weights.items()}
        mats = {k: (w.t() if targets[k].transposed else w) for k, w in work.items()}  # (out, in)
        originals = {k: m.clone() for k, m in mats.items() if k in self.report_error}
        seeds = {weight_seed(self.seed, k) for k in mats}
        t0 = time.perf_counter()
        outs = {}
        for s in sorted(seeds):  # one call per seed: one call in all while the seed is shared
            part = {k: m for k, m in mats.items() if weight_seed(self.seed, k) == s}
            outs.update(decompose_many(part, self.r, self.niter, inplace=True, seed=s))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        root = math.sqrt(self.scaling)
        result = {}
        for k, d in outs.items():
            if k in originals:
                from ..metrics import error_vs_exact

                self.errors.append((targets[k].module, error_vs_exact(originals.pop(k), d)))
            keep = torch.float64 if d.A.dtype == torch.float64 else torch.float32
            if not on_cpu:
                weights[k].copy_(work[k].to("cpu"))
            result[k] = Factors((d.A / root).to("cpu", keep).contiguous(), (d.B / root).to("cpu", keep).contiguous(),
                                weights[k])
        return result
