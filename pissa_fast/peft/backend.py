"""The switch that moves peft's own PiSSA init onto pissa_fast, for every entry point
(peft.get_peft_model, PeftModel.add_adapter, transformers' model.add_adapter, TRL, LLaMA-Factory...).

    import pissa_fast.peft
    pissa_fast.peft.enable()            # or: with pissa_fast.peft.enabled(): ...
    model = peft.get_peft_model(model, LoraConfig(..., init_lora_weights="pissa_niter_16"))

enable() replaces two attributes of peft's classes; disable() puts the originals back:

- `peft.tuners.lora.layer.LoraLayer.pissa_init` (peft's per-layer SVD + residual, called by
  `update_layer` inside `gather_params_ctx`): records the layer instead. A layer pissa_fast cannot
  initialize exactly (quantized, not a Linear/Conv1D, r > min(out, in), float64...) runs the original
  instead, and one warning per injection names those layers. Outside an injection, or for a layer with
  a LoRA variant (DoRA: its init right after needs the PiSSA factors), the layer is initialized at once
  on pissa_fast.
- `peft.tuners.tuners_utils.BaseTuner.inject_adapter` (one adapter injected into a whole model): runs
  the original, then initializes every layer recorded during it with one `decompose_many` call per
  (niter, r, device) group, in place, inside `gather_params_ctx` (DeepSpeed ZeRO-3), with the test
  matrices drawn from a seed taken from torch's global RNG (torch.manual_seed makes it reproducible).

Everything else (configs, scaling, rank/alpha patterns, adapter dtype casts, saving, PiSSA -> LoRA
conversion) stays peft's own code.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from dataclasses import dataclass, field

import torch

from ..memory import EarlyPopulate
from .layers import Pending, early_populate, initialize, label, ties, why_unsupported
from .niter import niter_mode, pissa_niter
from .versions import PEFT_SPECIFIER

_lock = threading.RLock()
_originals: dict[str, tuple[type, str, object]] = {}  # "Class.attr" -> (owner, attr, original function)
_local = threading.local()  # per thread: sessions (stack), options (stack)


@dataclass
class _Session:
    """One running inject_adapter call."""

    model: object
    adapter: str
    pending: list[Pending] = field(default_factory=list)
    fallbacks: list[tuple[object, str]] = field(default_factory=list)  # (layer, why) run by peft's code
    problems: list[tuple[object, str]] = field(default_factory=list)  # strict mode: (layer, why)
    done: set[int] = field(default_factory=set)  # ids of layers initialized at once (LoRA variants)
    # file-backed weights made writable on a background thread while peft injects (memory.py)
    early: EarlyPopulate = field(default_factory=EarlyPopulate)


def _sessions() -> list[_Session]:
    if not hasattr(_local, "sessions"):
        _local.sessions = []
    return _local.sessions


def _option(name: str, default):
    stack = getattr(_local, "options", None)
    return stack[-1].get(name, default) if stack else default


@contextlib.contextmanager
def options(*, strict: bool = False, seed: int | None = None):
    """Per-thread settings for the drop-in: strict (unsupported layers raise instead of falling back
    to peft) and a fixed seed (instead of one drawn from torch's global RNG)."""
    if not hasattr(_local, "options"):
        _local.options = []
    _local.options.append({"strict": strict, "seed": seed})
    try:
        yield
    finally:
        _local.options.pop()


def _seed() -> int:
    seed = _option("seed", None)
    if seed is not None:
        return int(seed)
    # Drawn from torch's default CPU generator, as torch.svd_lowrank's test matrix is in peft.
    return int(torch.randint(0, 2**62, (1,)).item())


def _names(model) -> dict[int, str]:
    try:
        return {id(m): n for n, m in model.named_modules()}
    except Exception:  # noqa: BLE001 - names only decorate messages
        return {}


def _warn_fallback(items: list[tuple[str, str]]) -> None:
    shown = "\n  ".join(f"{name}: {why}" for name, why in items[:10])
    more = f"\n  ... and {len(items) - 10} more" if len(items) > 10 else ""
    warnings.warn(f"pissa_fast PiSSA backend: {len(items)} layer(s) initialized by peft's own pissa_init "
                  f"instead:\n  {shown}{more}", RuntimeWarning, stacklevel=4)


def _pissa_init(self, adapter_name, init_lora_weights):
    """Replaces LoraLayer.pissa_init while the backend is enabled (see the module docstring)."""
    original = _originals["LoraLayer.pissa_init"][2]
    _, niter = pissa_niter(init_lora_weights)  # peft's ValueError for a bad string
    niter_mode()  # a bad PISSA_FAST_NITER raises here, before any weight is touched
    sessions = _sessions()
    session = sessions[-1] if sessions else None
    why = why_unsupported(self, adapter_name)
    if why is not None:
        if _option("strict", False):
            if session is None:
                raise ValueError(f"PiSSA init of adapter {adapter_name!r}: {label(Pending(self, adapter_name, niter))}: "
                                 f"{why}")
            session.problems.append((self, why))
            return None
        if session is None:
            _warn_fallback([(label(Pending(self, adapter_name, niter)), why)])
        else:
            session.fallbacks.append((self, why))
        return original(self, adapter_name, init_lora_weights)
    pending = Pending(self, adapter_name, niter)
    if session is None or adapter_name in getattr(self, "lora_variant", {}):
        # update_layer calls us inside gather_params_ctx(weight) already
        initialize([pending], _seed(), progress=False, gather=False)
        if session is not None:
            session.done.add(id(self))
        return None
    session.pending.append(pending)
    early_populate(session.early, pending)
    return None


def _inject_adapter(self, model, adapter_name, *args, **kwargs):
    """Replaces BaseTuner.inject_adapter while the backend is enabled (see the module docstring)."""
    original = _originals["BaseTuner.inject_adapter"][2]
    session = _Session(model, adapter_name)
    sessions = _sessions()
    sessions.append(session)
    try:
        try:
            result = original(self, model, adapter_name, *args, **kwargs)
        finally:
            sessions.pop()
            if session.fallbacks:
                names = _names(model)
                _warn_fallback([(names.get(id(layer), type(layer).__name__), why) for layer, why in session.fallbacks])
        _finish(session, getattr(self, "peft_config", {}).get(adapter_name))
    finally:
        session.early.wait()
    return result


def _finish(session: _Session, config) -> None:
    if not (session.pending or session.problems or _option("strict", False)):
        return
    names = _names(session.model)
    for p in session.pending:
        p.name = names.get(id(p.layer), "")
    if _option("strict", False) and config is not None and pissa_niter(getattr(config, "init_lora_weights", None))[0]:
        _strict_check(session, names)
    tied = ties(session.pending)
    if tied and _option("strict", False):
        session.problems += [(p.layer, f"base weight shares storage with {label(q)} (tied weights); PiSSA would "
                                       f"subtract its principal part twice") for p, q in tied]
    elif tied:
        warnings.warn("pissa_fast PiSSA backend: tied weights; as in peft, each layer decomposes the residual "
                      "the previous one left, so the model's output changes:\n  " +
                      "\n  ".join(f"{label(p)} shares its weight with {label(q)}" for p, q in tied[:10]),
                      RuntimeWarning, stacklevel=4)
    if session.problems:
        lines = [f"{names.get(id(layer), type(layer).__name__)}: {why}" for layer, why in session.problems]
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise ValueError(f"PiSSA init of adapter {session.adapter!r}: {len(lines)} targeted layer(s) cannot be "
                         f"initialized:\n  " + "\n  ".join(lines[:20]) + more)
    initialize(session.pending, _seed(), early=session.early)


def _strict_check(session: _Session, names: dict[int, str]) -> None:
    """Strict mode: a targeted layer whose type never asks for PiSSA (peft gives an Embedding or a
    Conv layer its plain init instead) is an error too."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen = {id(p.layer) for p in session.pending} | {id(layer) for layer, _ in session.problems} | session.done
    for name, mod in session.model.named_modules():
        if isinstance(mod, BaseTunerLayer) and id(mod) not in seen and session.adapter in getattr(mod, "r", {}):
            base = mod.get_base_layer()
            session.problems.append((mod, f"layer type {type(mod).__name__} wrapping {type(base).__name__} is not "
                                          f"supported by PiSSA init (only Linear and transformers Conv1D layers "
                                          f"are); leave it out of target_modules"))


def _targets():
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    return {"LoraLayer.pissa_init": (LoraLayer, "pissa_init", _pissa_init),
            "BaseTuner.inject_adapter": (BaseTuner, "inject_adapter", _inject_adapter)}


def _check_version() -> None:
    import peft

    try:
        from packaging.specifiers import SpecifierSet

        tested = SpecifierSet(PEFT_SPECIFIER).contains(peft.__version__, prereleases=True)
    except Exception:  # noqa: BLE001 - no packaging: skip the courtesy warning
        tested = True
    if not tested:
        warnings.warn(f"pissa_fast PiSSA backend: peft {peft.__version__} is outside the tested range "
                      f"peft{PEFT_SPECIFIER}; enabled anyway", RuntimeWarning, stacklevel=3)


def _wrap(original, replacement):
    """A fresh function that looks like peft's (name, docstring, signature via __wrapped__)."""
    @functools.wraps(original)
    def patched(*args, **kwargs):
        return replacement(*args, **kwargs)

    return patched


def enable() -> None:
    """Route peft's PiSSA init through pissa_fast (process-wide) until disable(). Idempotent."""
    with _lock:
        if _originals:
            return
        try:
            targets = _targets()
        except ImportError as e:
            raise ImportError("pissa_fast.peft.enable() needs peft: pip install 'pissa_fast[peft]'") from e
        for key, (owner, attr, _) in targets.items():
            if not callable(owner.__dict__.get(attr)):
                import peft

                raise RuntimeError(f"pissa_fast.peft.enable(): peft {peft.__version__} has no {key}; the backend "
                                   f"supports peft{PEFT_SPECIFIER}")
        _check_version()
        for key, (owner, attr, replacement) in targets.items():
            original = owner.__dict__[attr]
            _originals[key] = (owner, attr, original)
            setattr(owner, attr, _wrap(original, replacement))


def disable() -> None:
    """Put peft's original pissa_init and inject_adapter back. Idempotent."""
    with _lock:
        for key, (owner, attr, original) in list(_originals.items()):
            current = owner.__dict__.get(attr)
            if getattr(current, "__wrapped__", None) is not original:
                raise RuntimeError(f"pissa_fast.peft.disable(): {key} was replaced by someone else after "
                                   f"pissa_fast patched it; not restoring")
        for key, (owner, attr, original) in list(_originals.items()):
            setattr(owner, attr, original)
            del _originals[key]


def is_enabled() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def enabled():
    """`with pissa_fast.peft.enabled(): ...` turns the backend on for the block and restores the
    previous state after (it stays on if it was on before)."""
    with _lock:
        was = is_enabled()
        enable()
    try:
        yield
    finally:
        if not was:
            with _lock:
                disable()
