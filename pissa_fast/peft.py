"""Drop-in for `peft.get_peft_model` whose PiSSA init runs on pissa_fast's batched kernels.

    from pissa_fast.peft import get_peft_model          # same signature as peft.get_peft_model
    config = LoraConfig(r=16, lora_alpha=16, target_modules=[...], init_lora_weights="pissa_niter_4")
    model = get_peft_model(base_model, config)

For a LoraConfig whose `init_lora_weights` is "pissa" (exact SVD) or "pissa_niter_N", peft builds the
adapter layers with its plain init (`init_lora_weights=True`, so it runs no SVD), and then every
targeted layer is PiSSA-initialized by one `pissa_fast.decompose_many` call per (rank, device) group,
each layer where it lives (a model on CUDA is decomposed on CUDA). The result follows peft's
`LoraLayer.pissa_init` conventions exactly:

    scaling = lora_alpha / r                 (lora_alpha / sqrt(r) with use_rslora; per layer r/alpha
                                              from rank_pattern/alpha_pattern, as peft resolved them)
    lora_A  = diag(sqrt(S / scaling)) V^T    = A / sqrt(scaling)   (A, B: pissa_fast's factors)
    lora_B  = U diag(sqrt(S / scaling))      = B / sqrt(scaling)
    base    = W - scaling * lora_B lora_A    = W - B A, in the base weight's dtype (written in place)

with the adapter weights rounded through the base dtype and then held in the dtype peft gives them
(float32 with the default autocast_adapter_dtype=True), as peft's own path does. The config keeps its
"pissa..." value, so `save_pretrained` and `save_pretrained(path_initial_model_for_weight_conversion=...)`
(peft's PiSSA -> LoRA conversion) behave exactly as after `peft.get_peft_model`. As with peft, save
the initial adapter with `init_lora_weights = True` if you reload it on the residual model.

A progress bar over layers is shown unless PISSA_FAST_PROGRESS=0 (or TQDM_DISABLE=1).

Everything is validated before any weight is written: quantized base layers (bitsandbytes & co.), layer
types PiSSA cannot initialize (Embedding, Conv, MultiheadAttention, target_parameters), weights that
are not float32/float16/bfloat16 (as peft), on the meta device, shared between targeted layers, or an
r larger than min(out, in) raise, and the model is restored to its state before the call. Any other
config (not LoRA, or another init) goes to peft unchanged.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch

PISSA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_LAYERS_PER_CALL = {"cuda": 64}  # batching pays on GPUs; on CPUs small calls keep the progress bar moving
_MAX_LAYERS_PER_CALL_DEFAULT = 8
_MAX_BYTES_PER_CALL = 2 << 30


def progress_enabled() -> bool:
    """Progress bars are on unless PISSA_FAST_PROGRESS=0 (or TQDM_DISABLE=1), read at call time."""
    off = ("0", "false", "no", "off")
    if os.environ.get("PISSA_FAST_PROGRESS", "1").strip().lower() in off:
        return False
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", *off)


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError("pissa_fast.peft needs peft: pip install peft transformers") from e
    return peft


def pissa_niter(init_lora_weights) -> tuple[bool, int | None]:
    """(is it a PiSSA init, niter): "pissa" -> (True, None) (exact SVD), "pissa_niter_N" -> (True, N);
    anything that is not a string starting with "pissa" -> (False, None). Raises ValueError for any
    other "pissa..." string, as peft does (but before the model is touched)."""
    if not isinstance(init_lora_weights, str) or not init_lora_weights.startswith("pissa"):
        return False, None
    if init_lora_weights == "pissa":
        return True, None
    parts = init_lora_weights.split("_niter_")  # peft's own test (layer.py, pissa_init)
    if len(parts) == 2:
        try:
            niter = int(parts[1])
        except ValueError:
            niter = -1
        if niter >= 0:
            return True, niter
    raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got "
                     f"{init_lora_weights!r} instead.")


def _is_pissa_lora(peft_config) -> bool:
    peft = _peft()
    return isinstance(peft_config, peft.LoraConfig) and pissa_niter(peft_config.init_lora_weights)[0]


def _tuner_layer_names(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)}


def _adapter_layers(model, adapter_name):
    """(name, layer) of every LoRA layer holding `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "r", {}):
            out.append((name, mod))
    return out


def _quantized_kind(weight) -> str | None:
    cls = type(weight).__name__
    if cls in ("Params4bit", "Int8Params"):
        return f"bitsandbytes {cls}"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(weight).__module__}.{cls}"
    return None


def _plan(layers, adapter_name) -> tuple[list[dict], list[str]]:
    """Per layer: the (out, in) weight view to decompose, r, scaling; and every problem found."""
    from peft.tuners.lora import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    plans, problems = [], []
    seen_storage: dict[tuple, str] = {}
    for name, layer in layers:
        kind = type(layer).__name__
        base = layer.get_base_layer()
        if not isinstance(layer, LoraLinear) or not isinstance(base, (torch.nn.Linear, Conv1D)):
            what = f"{kind} wrapping {type(base).__name__}"
            if "bnb" in type(layer).__module__ or any(q in kind for q in ("4bit", "8bit", "Quant", "Hqq", "Gptq",
                                                                             "Awq", "Eetq", "TorchAO", "Aqlm")):
                problems.append(f"{name}: quantized base layer ({what}); PiSSA needs a float32/float16/bfloat16 "
                                f"weight: initialize PiSSA on the unquantized model, then quantize the residual")
            else:
                problems.append(f"{name}: layer type {what} is not supported by PiSSA init (only Linear and "
                                f"transformers Conv1D layers are); leave it out of target_modules")
            continue
        weight = base.weight
        q = _quantized_kind(weight)
        if q is not None:
            problems.append(f"{name}: quantized base weight ({q}); PiSSA needs a float32/float16/bfloat16 weight: "
                            f"initialize PiSSA on the unquantized model, then quantize the residual")
            continue
        if weight.dtype not in PISSA_DTYPES:
            problems.append(f"{name}: base weight dtype {weight.dtype}; please initialize PiSSA under float32, "
                            f"float16, or bfloat16 (as peft requires), then re-quantize the residual model")
            continue
        if weight.device.type == "meta":
            problems.append(f"{name}: base weight is on the meta device (offloaded or not loaded); PiSSA needs "
                            f"its values")
            continue
        mat = weight.detach()
        if layer.fan_in_fan_out:  # Conv1D stores W^T (in, out)
            mat = mat.t()
        r = int(layer.r[adapter_name])
        out_f, in_f = mat.shape
        if not 1 <= r <= min(out_f, in_f):
            problems.append(f"{name}: r={r} is larger than the layer allows (min(out, in) = {min(out_f, in_f)} for "
                            f"a {out_f} x {in_f} weight); lower r or use rank_pattern")
            continue
        key = (mat.device, mat.untyped_storage().data_ptr())
        if key in seen_storage:
            problems.append(f"{name}: base weight shares storage with {seen_storage[key]} (tied weights); PiSSA "
                            f"would subtract its principal part twice")
            continue
        seen_storage[key] = name
        plans.append(dict(name=name, layer=layer, mat=mat, r=r, scaling=float(layer.scaling[adapter_name]),
                          base_dtype=weight.dtype))
    return plans, problems


def _chunks(items, device: torch.device):
    """Split a (rank, device) group into calls of bounded size, same shapes together (one batched pass
    per shape inside decompose_many)."""
    items = sorted(items, key=lambda p: (tuple(p["mat"].shape), str(p["mat"].dtype)))
    most = _MAX_LAYERS_PER_CALL.get(device.type, _MAX_LAYERS_PER_CALL_DEFAULT)
    chunk, nbytes = [], 0
    for p in items:
        b = p["mat"].numel() * p["mat"].element_size()
        if chunk and (len(chunk) >= most or nbytes + b > _MAX_BYTES_PER_CALL):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(p)
        nbytes += b
    if chunk:
        yield chunk


def _set_param(module: torch.nn.Module, value: torch.Tensor, base_dtype: torch.dtype) -> None:
    """Write a LoRA factor into module.weight the way peft's pissa_init + device move + autocast leave it:
    rounded through the base layer's dtype, held in the parameter's own dtype and device."""
    param = module.weight
    value = value.to(base_dtype)
    if param.device.type == "meta" or param.shape != value.shape:
        module.weight = torch.nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
        return
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def pissa_init_layers(model, adapter_name: str, niter: int | None, *, progress: bool | None = None,
                      seed: int = 0) -> int:
    """PiSSA-initialize, in place, every LoRA layer of `model` that holds `adapter_name` (created with
    a non-SVD init): the base weight becomes the residual, lora_A/lora_B the scaled principal factors.
    Validates every layer before writing any weight. Returns the number of layers initialized."""
    from .core import decompose_many

    layers = _adapter_layers(model, adapter_name)
    plans, problems = _plan(layers, adapter_name)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"PiSSA init of adapter {adapter_name!r}: {len(problems)} targeted layer(s) cannot be "
                         f"initialized:\n  " + "\n  ".join(problems[:20]) + more)
    if not plans:
        return 0

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in plans:
        groups[(p["r"], p["mat"].device)].append(p)

    bar = None
    if progress if progress is not None else progress_enabled():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plans), desc=f"PiSSA init ({'exact' if niter is None else f'niter {niter}'})",
                   unit="layer")
    try:
        for (r, device), items in groups.items():
            for chunk in _chunks(items, device):
                outs = decompose_many([p["mat"] for p in chunk], r, niter, inplace=True, seed=seed)
                for p, d in zip(chunk, outs):
                    root = math.sqrt(p["scaling"])
                    layer = p["layer"]
                    _set_param(layer.lora_A[adapter_name], d.A / root, p["base_dtype"])
                    _set_param(layer.lora_B[adapter_name], d.B / root, p["base_dtype"])
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return len(plans)


def _inner(model):
    """The user's model inside a PeftModel / PeftMixedModel (module names as the user sees them)."""
    return getattr(getattr(model, "base_model", None), "model", model)


def _state_before(model) -> tuple[set[str], list]:
    return _tuner_layer_names(model), [(p, p.requires_grad) for p in model.parameters()]


def _undo(peft_model, adapter_name: str, before: tuple[set[str], list]) -> None:
    """Take the just-injected adapter out again: layers wrapped for it alone are put back as their base
    layers, older wrappers lose the adapter, its config goes, requires_grad flags are restored."""
    from peft.tuners.lora import LoraLayer

    wrapped_before, grads = before
    model = _inner(peft_model)
    try:
        for name, mod in list(model.named_modules()):
            if not (isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "r", {})):
                continue
            if name in wrapped_before:
                mod.delete_adapter(adapter_name)
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.get_base_layer())
        getattr(peft_model, "peft_config", {}).pop(adapter_name, None)
        for p, flag in grads:
            p.requires_grad_(flag)
    except Exception:  # noqa: BLE001 - best effort; the original error is what matters
        pass


def _with_plain_init(peft_config, create):
    """Run create() with peft_config.init_lora_weights = True (peft's init, no SVD); restore after."""
    original = peft_config.init_lora_weights
    peft_config.init_lora_weights = True
    try:
        result = create()
    finally:
        peft_config.init_lora_weights = original
    return result, original


def _finish_pissa(peft_model, adapter_name, original, niter, before) -> None:
    """Put the PiSSA setting back in the stored config, then run the fast init; on a bad layer,
    restore the model as it was before peft touched it."""
    stored = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if stored is not None:
        stored.init_lora_weights = original
    try:
        pissa_init_layers(peft_model, adapter_name, niter)
    except (ValueError, TypeError):
        _undo(peft_model, adapter_name, before)
        raise


def get_peft_model(model, peft_config, adapter_name: str = "default", **kwargs: Any):
    """`peft.get_peft_model` (same arguments, same result) with a fast, batched PiSSA init.

    kwargs go to peft.get_peft_model (mixed, autocast_adapter_dtype, revision, low_cpu_mem_usage).
    """
    peft = _peft()
    if not _is_pissa_lora(peft_config):
        return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    _, niter = pissa_niter(peft_config.init_lora_weights)
    before = _state_before(model)
    peft_model, original = _with_plain_init(
        peft_config, lambda: peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs))
    _finish_pissa(peft_model, adapter_name, original, niter, before)
    return peft_model


def add_adapter(peft_model, adapter_name: str, peft_config, **kwargs: Any) -> None:
    """`peft_model.add_adapter(adapter_name, peft_config, ...)` with the fast PiSSA init; like peft, a
    second PiSSA adapter decomposes the base weights as they are now (the first one's residual)."""
    if not _is_pissa_lora(peft_config):
        peft_model.add_adapter(adapter_name, peft_config, **kwargs)
        return
    _, niter = pissa_niter(peft_config.init_lora_weights)
    before = _state_before(_inner(peft_model))
    _, original = _with_plain_init(peft_config, lambda: peft_model.add_adapter(adapter_name, peft_config, **kwargs))
    _finish_pissa(peft_model, adapter_name, original, niter, before)


__all__ = ["add_adapter", "get_peft_model", "pissa_init_layers", "pissa_niter"]
