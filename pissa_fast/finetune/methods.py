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
  base = W - scaling lora_B lora_A).

Adding a method (QLoRA and QPiSSA once pissa_fast.qpissa lands): write a `build(model, settings)` that
returns the peft model, and add a `Method(...)` line to `_REGISTRY`; the runner, results.json, the plots
and the report pick it up by name. Until then those names are in `PLANNED` and asking for them says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Every projection of a LLaMA block: "all linear layers" as in the paper (lm_head and embeddings excluded).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The method names results.json may hold, in the order tables and plots list them.
ALL_METHOD_NAMES = ("lora", "pissa", "pissa_middle", "pissa_minor", "qlora", "qpissa")


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


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # legend text
    color: str
    build: Callable[[torch.nn.Module, AdapterSettings], torch.nn.Module]
    figures: tuple[str, ...]  # "2": LoRA-vs-PiSSA figures 2.1/2.2; "3": principal/middle/minor figure
    description: str


def lora_config(settings: AdapterSettings, init_lora_weights):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, bias="none", init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")


def pissa_peft_model(model, config):
    """PiSSA through pissa_fast's peft backend: the one place the benchmark enters it.

    Today the backend is the drop-in `pissa_fast.peft.get_peft_model`. Once `pissa_fast.peft.enabled()`
    lands, this body becomes `with pissa_fast.peft.enabled(): return peft.get_peft_model(model, config)`.
    """
    from pissa_fast.peft import get_peft_model

    return get_peft_model(model, config)


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


_REGISTRY = (
    Method("lora", "LoRA (Gaussian A, zero B)", "#d62728", _build_lora, ("2",),
           "peft LoRA, init_lora_weights='gaussian'"),
    Method("pissa", "PiSSA (principal)", "#1f77b4", _build_pissa, ("2", "3"),
           "PiSSA through pissa_fast's peft backend"),
    Method("pissa_middle", "PiSSA on middle components", "#2ca02c", _components_builder("middle"), ("3",),
           "the r singular triplets at the middle of the spectrum, exact SVD"),
    Method("pissa_minor", "PiSSA on minor components", "#9467bd", _components_builder("minor"), ("3",),
           "the r smallest singular triplets, exact SVD"),
)
METHODS: dict[str, Method] = {m.name: m for m in _REGISTRY}
PLANNED = {
    "qlora": "QLoRA (NF4 base + LoRA) needs pissa_fast.qpissa (issue 12), which is not in this build yet",
    "qpissa": "QPiSSA (NF4 residual + PiSSA) needs pissa_fast.qpissa (issue 12), which is not in this build yet",
}
DEFAULT_METHODS = ("lora", "pissa", "pissa_middle", "pissa_minor")


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    if name in PLANNED:
        raise ValueError(f"method {name!r}: {PLANNED[name]}")
    raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
