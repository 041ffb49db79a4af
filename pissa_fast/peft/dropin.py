"""Drop-in for `peft.get_peft_model` / `PeftModel.add_adapter` with pissa_fast's batched PiSSA init.

    from pissa_fast.peft import get_peft_model          # same signature as peft.get_peft_model
    config = LoraConfig(r=16, lora_alpha=16, target_modules=[...], init_lora_weights="pissa_niter_4")
    model = get_peft_model(base_model, config)

It is peft's own call with the backend (backend.py) switched on for its duration, and two
differences that suit code written against pissa_fast:

- strict: a targeted layer pissa_fast cannot initialize (quantized, Embedding/Conv, float64, on the
  meta device, r > min(out, in)) raises ValueError listing every such layer, before any weight is
  written, and the model is put back as it was (the backend would hand those layers to peft);
- seeded: the test matrices come from `seed` (default 0, the same as `pissa-fast init`), not from
  torch's global RNG; `seed=None` takes it from the global RNG as the backend does.

Any other config (not LoRA, or another init) goes to peft unchanged.
"""
from __future__ import annotations

from typing import Any

from . import backend
from .layers import Pending, initialize, label, why_unsupported
from .niter import niter_mode, pissa_niter


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError("pissa_fast.peft needs peft: pip install 'pissa_fast[peft]'") from e
    return peft


def _is_pissa_lora(peft_config) -> bool:
    return isinstance(peft_config, _peft().LoraConfig) and pissa_niter(peft_config.init_lora_weights)[0]


def _inner(model):
    """The user's model inside a PeftModel / PeftMixedModel (module names as the user sees them)."""
    return getattr(getattr(model, "base_model", None), "model", model)


def _state_before(model) -> tuple[set[str], list]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {name for name, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)}
    return wrapped, [(p, p.requires_grad) for p in model.parameters()]


def _undo(model, adapter_name: str, before: tuple[set[str], list]) -> None:
    """Take the just-injected adapter out of `model` (the user's model) again: layers wrapped for it
    alone are put back as their base layers, older wrappers lose the adapter, requires_grad flags are
    restored. No weight was written (strict mode raises before)."""
    from peft.tuners.lora import LoraLayer

    wrapped_before, grads = before
    try:
        for name, mod in list(model.named_modules()):
            if not (isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "r", {})):
                continue
            if name in wrapped_before:
                mod.delete_adapter(adapter_name)
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.get_base_layer())
        for p, flag in grads:
            p.requires_grad_(flag)
    except Exception:  # noqa: BLE001 - best effort; the original error is what matters
        pass


def get_peft_model(model, peft_config, adapter_name: str = "default", *, seed: int | None = 0, **kwargs: Any):
    """`peft.get_peft_model` (same arguments, same result) with pissa_fast's batched PiSSA init; see the
    module docstring. kwargs go to peft.get_peft_model (mixed, autocast_adapter_dtype, revision,
    low_cpu_mem_usage)."""
    peft = _peft()
    if not _is_pissa_lora(peft_config):
        return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    niter_mode()
    before = _state_before(model)
    try:
        with backend.enabled(), backend.options(strict=True, seed=seed):
            return peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    except (ValueError, TypeError):
        _undo(model, adapter_name, before)
        raise


def add_adapter(peft_model, adapter_name: str, peft_config, *, seed: int | None = 0, **kwargs: Any) -> None:
    """`peft_model.add_adapter(adapter_name, peft_config, ...)` with pissa_fast's PiSSA init; like
    peft, a second PiSSA adapter decomposes the base weights as they are now (the first one's
    residual)."""
    if not _is_pissa_lora(peft_config):
        peft_model.add_adapter(adapter_name, peft_config, **kwargs)
        return
    niter_mode()
    before = _state_before(_inner(peft_model))
    try:
        with backend.enabled(), backend.options(strict=True, seed=seed):
            peft_model.add_adapter(adapter_name, peft_config, **kwargs)
    except (ValueError, TypeError):
        _undo(_inner(peft_model), adapter_name, before)
        getattr(peft_model, "peft_config", {}).pop(adapter_name, None)
        raise


def pissa_init_layers(model, adapter_name: str, niter: int | None, *, progress: bool | None = None,
                      seed: int = 0) -> int:
    """PiSSA-initialize, in place, every LoRA layer of `model` that holds `adapter_name` (created with
    a non-SVD init): the base weight becomes the residual, lora_A/lora_B the scaled principal factors.
    Validates every layer before writing any weight. Returns the number of layers initialized."""
    from peft.tuners.lora import LoraLayer

    pending, problems = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "r", {}):
            p = Pending(mod, adapter_name, niter, name)
            why = why_unsupported(mod, adapter_name)
            (problems.append(f"{label(p)}: {why}") if why else pending.append(p))
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"PiSSA init of adapter {adapter_name!r}: {len(problems)} targeted layer(s) cannot be "
                         f"initialized:\n  " + "\n  ".join(problems[:20]) + more)
    initialize(pending, seed, progress=progress)
    return len(pending)
