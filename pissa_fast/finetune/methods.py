"""The adapters the fine-tuning benchmark compares, one registry entry each.

Every method builds a peft LoRA model from the same LoraConfig (same r, lora_alpha, target modules, no
dropout), so all of them train the same number of parameters with the same hyperparameters; only the
initialization of lora_A, lora_B and the frozen base weight differs:

- `lora`: peft's Gaussian init (A ~ N(0, 1/r), B = 0), base weight untouched (the LoRA paper's init);
- `pissa`: the principal r singular triplets, initialized by pissa_fast through its peft backend
  (`pissa_peft_model` below), base weight = residual;
- `pissa_middle` / `pissa_minor`: the same construction on the r singular triplets in the middle of the
  spectrum / the r smallest ones (the paper's Figure 3), from an exact float64 SVD, written into the
  peft layers with peft's PiSSA conventions (lora_A = sqrt(S/scaling) Vᵀ, lora_B = U sqrt(S/scaling),
  base = W - scaling lora_B lora_A);
- `qlora`: the base weight replaced by dequantize(nf4(W)) (bitsandbytes' own quantizer, through
  pissa_fast.quant.qlora), then peft's Gaussian LoRA init, so its adapter is `lora`'s exactly;
- `qpissa`: pissa_fast.qpissa_many on the targeted weights: the base weight becomes the NF4-exact residual R
  (dequantized), the adapter its factors with peft's PiSSA scaling (lora_A = A / sqrt(scaling),
  lora_B = B / sqrt(scaling), so scaling lora_B lora_A = B A and W ~ R + B A).

The two quantized methods are simulated on the CPU: the NF4 codes are bitsandbytes', but the model holds
their dequantized values in float32 and runs float32 matmuls (no 4-bit kernels, no bf16 compute). Both use
the same format (`quant_spec()`) on the same layers: the targeted projections, i.e. every Linear layer but
lm_head, which is what a transformers 4-bit load quantizes.

Adding a method: write a `build(model, settings)` that returns the peft model, and add a `Method(...)`
line to `_REGISTRY`; the runner, results.json, the plots and the report pick it up by name. A builder may
record facts about its init (quantization error, ...) in `settings.stats`; the runner stores them with
the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

# Every projection of a LLaMA block: "all linear layers" as in the paper (lm_head and embeddings excluded).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The method names results.json may hold, in the order tables and plots list them.
ALL_METHOD_NAMES = ("lora", "pissa", "pissa_middle", "pissa_minor", "qlora", "qpissa")
QUANT_METHODS = ("qlora", "qpissa")
# QPiSSA's rounds R = nf4(W - B A), (A, B) = top-r(W - R). 5 is what the PiSSA authors' published QPiSSA
# fine-tuning runs use ("...-4bit-r128-5iter" residual models, GraphPKU/PiSSA scripts/run_qpissa.sh).
# On SmolLM2's layers 0-1 at r 16 (benchmarks/RESULTS.md, issue 12) the mean error goes 7.70e-2 (1 round)
# -> 7.14e-2 (5 rounds) against QLoRA's 9.51e-2; README "Fine-tuning benchmark" gives the init time.
DEFAULT_QPISSA_ITERS = 5
# Layers per qpissa_many call: bounds the working memory to a few weights at a time (see quant/qpissa.py).
QPISSA_GROUP = 8


@dataclass(frozen=True)
class AdapterSettings:
    """What every method of one comparison shares."""
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    niter: int | None = 4  # pissa's subspace iterations in pissa_fast (None: exact SVD)
    # Exact SVDs by layer name, shared by the runs of one benchmark (every run loads the same checkpoint):
    # the middle/minor methods then decompose each weight once, not once per (method, rank).
    svd_cache: dict | None = field(default=None, compare=False, repr=False)
    qpissa_iters: int = DEFAULT_QPISSA_ITERS
    # Where a builder records facts about its init (the quantized methods' errors); the runner keeps them.
    stats: dict | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # legend text
    color: str
    build: Callable[[torch.nn.Module, AdapterSettings], torch.nn.Module]
    figures: tuple[str, ...]  # "2": LoRA-vs-PiSSA figures 2.1/2.2; "q": QLoRA vs QPiSSA; "3": components
    description: str


def lora_config(settings: AdapterSettings, init_lora_weights):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, bias="none", init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")


def pissa_peft_model(model, config):
    """PiSSA through pissa_fast's peft backend, as a trainer gets it: peft's own get_peft_model with
    the backend switched on for this call (test matrices seeded from torch's global RNG, which the
    benchmark seeds; pissa_niter_N as an accuracy promise). The one place the benchmark enters it."""
    import peft

    import pissa_fast.peft

    with pissa_fast.peft.enabled():
        return peft.get_peft_model(model, config)


def component_slice(k: int, r: int, which: str) -> slice:
    """Indices (in decreasing singular value order) of the r components called `which` among k."""
    if not 1 <= r <= k:
        raise ValueError(f"r must be in [1, {k}] for a weight with {k} singular values, got {r}")
    if which == "principal":
        return slice(0, r)
    if which == "middle":
        start = (k - r) // 2
        return slice(start, start + r)
    if which == "minor":
        return slice(k - r, k)
    raise ValueError(f"which must be 'principal', 'middle' or 'minor', got {which!r}")


def _exact_svd(name: str, mat: torch.Tensor, cache: dict | None):
    """Thin SVD of `mat` computed in float64, held in float32 (U, S, Vh); from `cache` when the same layer
    with the same values was decomposed before (a cheap fingerprint guards against a stale entry)."""
    key = (tuple(mat.shape), float(mat.sum()), float(mat.abs().sum()))
    hit = cache.get(name) if cache is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    out = (u.float(), s.float(), vh.float())
    if cache is not None:
        cache[name] = (key, out)
    return out


@torch.no_grad()
def init_components(peft_model, which: str, adapter_name: str = "default", svd_cache: dict | None = None) -> int:
    """Re-initialize every LoRA layer of `adapter_name` from the `which` singular components of its base
    weight (exact SVD, float64), with peft's PiSSA conventions; the base weight becomes W - scaling B A,
    computed in float64 from the factors as stored. Returns the number of layers initialized."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        base = layer.get_base_layer()
        w = base.weight
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"init_components: base weight of dtype {w.dtype} (quantized?) is not supported")
        mat = w.detach().to(torch.float64)
        if layer.fan_in_fan_out:
            mat = mat.t()
        r, scaling = layer.r[adapter_name], float(layer.scaling[adapter_name])
        u, s, vh = _exact_svd(name, mat, svd_cache)
        sl = component_slice(s.numel(), r, which)
        root = torch.sqrt(s[sl].double() / scaling)
        lora_a = (root[:, None] * vh[sl].double()).to(layer.lora_A[adapter_name].weight.dtype)  # (r, in)
        lora_b = (u[:, sl].double() * root[None, :]).to(layer.lora_B[adapter_name].weight.dtype)  # (out, r)
        residual = mat - scaling * (lora_b.double() @ lora_a.double())
        if layer.fan_in_fan_out:
            residual = residual.t()
        w.copy_(residual.to(w.dtype))
        for module, value in ((layer.lora_A[adapter_name], lora_a), (layer.lora_B[adapter_name], lora_b)):
            module.weight.copy_(value.to(module.weight.dtype))
        n += 1
    return n


def quant_spec():
    """The 4-bit format of both quantized methods: NF4, blocksize 64 (what transformers' 4-bit load uses),
    no double quantization (which only stores the block scales in 8 bits; it is left out so that the
    residual stays NF4-exact in float32, see quant/nf4.py)."""
    from pissa_fast.quant import QuantSpec

    return QuantSpec("nf4", 64, False)


def adapter_layers(peft_model, adapter_name: str = "default") -> list:
    """(name, LoraLayer) of every layer holding `adapter_name`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, layer) for name, layer in peft_model.named_modules()
            if isinstance(layer, LoraLayer) and adapter_name in layer.r]


def _quantizable_weight(name: str, layer) -> torch.Tensor:
    w = layer.get_base_layer().weight
    if layer.fan_in_fan_out:
        raise TypeError(f"{name}: a Conv1D (fan_in_fan_out) base layer stores W transposed; the quantized "
                        f"methods support Linear layers only")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: base weight of dtype {w.dtype} cannot be NF4-quantized (float32, float16 or "
                        f"bfloat16 expected)")
    return w


def _record(stats: dict | None, **facts) -> None:
    if stats is not None:
        stats.update(facts)


@torch.no_grad()
def quantize_base_weights(peft_model, stats: dict | None = None, adapter_name: str = "default") -> list[float]:
    """QLoRA's base: every base weight of `adapter_name`'s layers replaced, in place, by
    dequantize(nf4(W)) in its own dtype (bitsandbytes' quantizer, pissa_fast.quant.qlora). Returns the
    per-layer errors ||W - Q||_F / ||W||_F (float64), also recorded in `stats`."""
    from pissa_fast.quant import qlora, quant_error

    spec, errors = quant_spec(), []
    layers = adapter_layers(peft_model, adapter_name)
    weights = [_quantizable_weight(name, layer) for name, layer in layers]  # all checked first
    for w in weights:
        q = qlora(w, spec)
        errors.append(quant_error(w.detach(), q))
        w.copy_(q)
    _record(stats, quantized_layers=len(errors), quant_error_mean=math.fsum(errors) / max(1, len(errors)),
            quant_error_max=max(errors, default=0.0))
    return errors


@torch.no_grad()
def init_qpissa(peft_model, r: int, niter: int | None, iters: int, stats: dict | None = None,
                adapter_name: str = "default") -> list[float]:
    """QPiSSA: pissa_fast.qpissa_many on the base weights of `adapter_name`'s layers, QPISSA_GROUP at a
    time, in place: each base weight becomes its NF4-exact residual R (dequantized, in its dtype), lora_A /
    lora_B become A / sqrt(scaling), B / sqrt(scaling) (peft's PiSSA conventions). Returns the per-layer
    errors ||W - (R + B A)||_F / ||W||_F that qpissa reports (float64), also recorded in `stats` with the
    mean error after each round and whether every residual loads back bit for bit through bnb."""
    from pissa_fast.quant import qpissa_many

    spec = quant_spec()
    layers = adapter_layers(peft_model, adapter_name)
    weights = [_quantizable_weight(name, layer) for name, layer in layers]  # all checked first
    errors, by_round, exact = [], [], []
    for lo in range(0, len(layers), QPISSA_GROUP):
        group = layers[lo:lo + QPISSA_GROUP]
        outs = qpissa_many([w.detach() for w in weights[lo:lo + QPISSA_GROUP]], r, niter, iters=iters,
                           quant=spec.quant_type, blocksize=spec.blocksize, double_quant=spec.double_quant,
                           inplace=True)
        for (name, layer), d in zip(group, outs):
            root = math.sqrt(float(layer.scaling[adapter_name]))
            for module, value in ((layer.lora_A[adapter_name], d.A / root), (layer.lora_B[adapter_name], d.B / root)):
                module.weight.copy_(value.to(module.weight.dtype))
            errors.append(d.error)
            by_round.append(d.errors)
            exact.append(d.exact)
    n = max(1, len(errors))
    _record(stats, quantized_layers=len(errors), quant_error_mean=math.fsum(errors) / n,
            quant_error_max=max(errors, default=0.0), qpissa_iters=iters,
            quant_error_by_round=[math.fsum(e[t] for e in by_round) / n for t in range(iters)] if by_round else [],
            nf4_exact=all(x is True for x in exact))
    return errors


def _build_lora(model, s: AdapterSettings):
    import peft

    return peft.get_peft_model(model, lora_config(s, "gaussian"))


def _build_pissa(model, s: AdapterSettings):
    return pissa_peft_model(model, lora_config(s, "pissa" if s.niter is None else f"pissa_niter_{s.niter}"))


def _components_builder(which: str):
    def build(model, s: AdapterSettings):
        import peft

        # peft's plain init creates the layers (its random A is overwritten right after).
        peft_model = peft.get_peft_model(model, lora_config(s, True))
        init_components(peft_model, which, svd_cache=s.svd_cache)
        return peft_model
    return build


def _build_qlora(model, s: AdapterSettings):
    import peft

    # The Gaussian A is drawn as in `lora` (quantizing draws no random numbers), so with the same seed the
    # two runs differ only in the base weights.
    peft_model = peft.get_peft_model(model, lora_config(s, "gaussian"))
    quantize_base_weights(peft_model, s.stats)
    return peft_model


def _build_qpissa(model, s: AdapterSettings):
    import peft

    peft_model = peft.get_peft_model(model, lora_config(s, True))  # layers only: A, B are overwritten
    init_qpissa(peft_model, s.r, s.niter, s.qpissa_iters, s.stats)
    return peft_model


_REGISTRY = (
    Method("lora", "LoRA (Gaussian A, zero B)", "#d62728", _build_lora, ("2",),
           "peft LoRA, init_lora_weights='gaussian'"),
    Method("pissa", "PiSSA (principal)", "#1f77b4", _build_pissa, ("2", "3"),
           "PiSSA through pissa_fast's peft backend"),
    Method("pissa_middle", "PiSSA on middle components", "#2ca02c", _components_builder("middle"), ("3",),
           "the r singular triplets at the middle of the spectrum, exact SVD"),
    Method("pissa_minor", "PiSSA on minor components", "#9467bd", _components_builder("minor"), ("3",),
           "the r smallest singular triplets, exact SVD"),
    Method("qlora", "QLoRA (NF4 base, Gaussian A, zero B)", "#ff7f0e", _build_qlora, ("q",),
           "base = dequantize(nf4(W)) (bitsandbytes, simulated in float32), then peft LoRA "
           "init_lora_weights='gaussian'"),
    Method("qpissa", "QPiSSA (NF4 residual, principal)", "#17becf", _build_qpissa, ("q",),
           "pissa_fast.qpissa_many: base = NF4-exact residual (dequantized, float32), adapter = its top-r "
           "factors with peft's PiSSA scaling"),
)
METHODS: dict[str, Method] = {m.name: m for m in _REGISTRY}
# qlora and qpissa are opt-in (--methods): they add 6 runs and QPiSSA's rounds to a default sized for 15 minutes.
DEFAULT_METHODS = ("lora", "pissa", "pissa_middle", "pissa_minor")


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
