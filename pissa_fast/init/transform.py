"""What happens to a group of loaded weights: the plug-in point of `pissa-fast init`.

A transform takes the targeted weights of one group, as stored (CPU, stored dtype, stored layout:
(in, out) for Conv1D), and returns for each its residual (same layout, in the dtype it names for
the output file) and its adapter factors in peft's convention. The pipeline around it (reading,
prefetching, writing, staging, resuming) does not care how the factors are found:

- PissaTransform: PiSSA's top-r factors, W = residual + scaling * lora_B lora_A, through
  pissa_fast.decompose_many (batched, in place).
- QPissaTransform (`init --quantize nf4 --qpissa-iters T`): a bf16 residual that a bitsandbytes
  4-bit load reproduces bit for bit, and the factors fitted to it (pissa_fast.qpissa_many). Its
  residual_code is BF16 whatever the stored dtype; the output layout follows it.

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

    def adapter_files(self) -> dict[str, str]:
        """Extra files (name -> text) for the adapter folder; the same on every process."""


def weight_seed(seed: int, name: str) -> int:
    """The seed of one weight's random test matrix: pissa_fast.distributed.weight_seed(seed, name) of
    its checkpoint name, as decompose_many derives it for sharded weights. The result depends on
    (seed, name) only, never on grouping, on ranks or on which other weights share a call; it equals
    pissa_fast.decompose(w, seed=weight_seed(seed, name))."""
    from ..distributed.seeding import weight_seed as derive

    return derive(int(seed), name)


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

    def adapter_files(self) -> dict[str, str]:
        return {}

    def run_key(self) -> dict:
        return {"method": "pissa", "r": self.r, "lora_alpha": self.lora_alpha, "niter": self.niter,
                "use_rslora": self.use_rslora, "seed": self.seed, "device": self.device.type}

    def __call__(self, weights: dict[str, torch.Tensor], targets: dict[str, Target]) -> dict[str, Factors]:
        from ..core import decompose_many

        on_cpu = self.device.type == "cpu"
        work = {k: (w if on_cpu else w.to(self.device, non_blocking=True)) for k, w in weights.items()}
        mats = {k: (w.t() if targets[k].transposed else w) for k, w in work.items()}  # (out, in)
        originals = {k: m.clone() for k, m in mats.items() if k in self.report_error}
        t0 = time.perf_counter()
        seeds = {k: weight_seed(self.seed, k) for k in mats}  # one call; each weight's result is its own
        outs = decompose_many(mats, self.r, self.niter, inplace=True, seed=seeds)
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


@dataclass
class QPissaTransform:
    """QPiSSA (pissa_fast.qpissa_many): per weight, a residual R in bf16 that bitsandbytes' 4-bit
    format `spec` represents exactly (a transformers load with spec's BitsAndBytesConfig and
    dtype=torch.bfloat16 gives R back bit for bit) and lora_A, lora_B fitted to W - R over `iters`
    rounds, scaled as PissaTransform's. The matrix is quantized in (out, in) orientation, as
    transformers quantizes a Conv1D weight (it transposes before quantizing), and stored as loaded.

    bf16 whatever the stored dtype: bnb quantizes in the dtype a model is loaded in, and only a residual
    stored in that dtype loads back exactly. An fp32/fp16 weight is rounded to bf16 first (~2^-9 of
    each element, ~1e-4 of the quantization error in quadrature); the reported error is against the
    stored weight. errors: module -> ||W - (R + B A)||_F / ||W||_F; inexact: modules whose residual a
    load would move (double quantization whose statistics did not settle, see quant.nf4.fixed_point).
    Both may hold modules decomposed early on a guess that the plan then dropped: filter by the plan."""
    r: int
    lora_alpha: float
    iters: int = 5
    niter: int | None = 4
    use_rslora: bool = False
    seed: int = 0
    spec: object = None  # pissa_fast.quant.QuantSpec (default NF4, blocksize 64, no double quantization)
    start: str | None = None  # qpissa's start and scales (None: its defaults, quant.qpissa.DEFAULT_*)
    scales: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    errors: dict = field(default_factory=dict)
    inexact: set = field(default_factory=set)
    seconds: float = 0.0

    RESIDUAL_CODE = "BF16"

    def __post_init__(self):
        from ..quant import QuantSpec
        from ..quant.qpissa import DEFAULT_SCALES, DEFAULT_START

        self.spec = self.spec or QuantSpec()
        self.start = self.start or DEFAULT_START
        self.scales = self.scales or DEFAULT_SCALES

    scaling = PissaTransform.scaling

    def residual_code(self, target: Target) -> str:
        return self.RESIDUAL_CODE

    def settings(self) -> dict:
        import bitsandbytes

        from ..quant.settings import settings
        return settings(self.spec, iters=self.iters, niter=self.niter, bnb_version=bitsandbytes.__version__,
                        start=self.start, scales=self.scales)

    def adapter_files(self) -> dict[str, str]:
        import json

        from ..quant.settings import SETTINGS_FILE
        return {SETTINGS_FILE: json.dumps(self.settings(), indent=1, sort_keys=True) + "\n"}

    def run_key(self) -> dict:
        return {"method": "qpissa", "r": self.r, "lora_alpha": self.lora_alpha, "niter": self.niter,
                "iters": self.iters, "quant": self.spec.quant_type, "blocksize": self.spec.blocksize,
                "double_quant": self.spec.double_quant, "start": self.start, "scales": self.scales,
                "use_rslora": self.use_rslora, "seed": self.seed,
                "device": self.device.type, "residual": self.RESIDUAL_CODE,
                "bitsandbytes": self.settings()["bitsandbytes"]}

    def __call__(self, weights: dict[str, torch.Tensor], targets: dict[str, Target]) -> dict[str, Factors]:
        from ..quant import qpissa_many
        from ..quant.error import quant_error

        bf16 = torch.bfloat16
        # the bf16 matrices QPiSSA works on, in stored layout (the loaded weight itself when it is bf16 on the CPU)
        work = {k: w if (w.dtype == bf16 and w.device == self.device) else w.to(self.device, bf16)
                for k, w in weights.items()}
        mats = {k: (x.t() if targets[k].transposed else x) for k, x in work.items()}  # (out, in)
        t0 = time.perf_counter()
        seeds = {k: weight_seed(self.seed, k) for k in mats}  # one call; each weight's result is its own
        outs = qpissa_many(mats, self.r, self.niter, iters=self.iters, quant=self.spec.quant_type,
                           blocksize=self.spec.blocksize, double_quant=self.spec.double_quant,
                           start=self.start, scales=self.scales, inplace=True, seed=seeds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        root = math.sqrt(self.scaling)
        result = {}
        for k, d in outs.items():
            residual = work[k].to("cpu")  # R, in stored layout (qpissa_many wrote it through the (out, in) view)
            A, B = d.A.to("cpu", torch.float32), d.B.to("cpu", torch.float32)
            if weights[k].dtype == bf16:
                err = d.error
            else:  # against the stored weight, not its bf16 rounding
                t = targets[k].transposed
                err = quant_error(weights[k].t() if t else weights[k], residual.t() if t else residual, A, B)
            self.errors[targets[k].module] = err
            if not d.exact:
                self.inexact.add(targets[k].module)
            result[k] = Factors((A / root).contiguous(), (B / root).contiguous(), residual)
        return result
