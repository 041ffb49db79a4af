"""Which stored weights PiSSA initializes: `target_modules` resolved the way peft resolves it, against
the model class the checkpoint was saved from, then every target checked against the checkpoint.

Matching is peft's own (`check_target_module_exists` for a list of suffixes or a regex string,
`_maybe_include_all_linear_layers` for "all-linear"), on a LoraConfig that is the one later written
as adapter_config.json: what was decomposed is exactly what `PeftModel.from_pretrained` will wrap.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..options import PISSA_SAFETENSORS_CODES
from .checkpoint import Checkpoint
from .skeleton import Skeleton

ADAPTER_PREFIX = "base_model.model."  # peft's key prefix for the wrapped model's modules


@dataclass(frozen=True)
class Target:
    key: str  # tensor name in the checkpoint
    module: str  # module name in the model class (peft's adapter keys are built from it)
    transposed: bool  # Conv1D: stored (in_features, out_features)
    shape: tuple  # as stored
    dtype: str  # safetensors code, as stored

    @property
    def adapter_keys(self) -> tuple[str, str]:
        base = ADAPTER_PREFIX + self.module
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight"

    @property
    def out_in(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the matrix that is decomposed."""
        return (self.shape[1], self.shape[0]) if self.transposed else (self.shape[0], self.shape[1])


@dataclass
class TargetPlan:
    targets: list  # Target, in checkpoint order (shard, offset)
    lora_config: object  # the peft LoraConfig the targets were matched with (target_modules resolved)
    fan_in_fan_out: bool
    notes: list = field(default_factory=list)

    @property
    def by_key(self) -> dict:
        return {t.key: t for t in self.targets}


def make_lora_config(target_modules, *, r: int, lora_alpha: float, use_rslora: bool, task_type: str | None,
                     fan_in_fan_out: bool = False, base_model_name_or_path: str | None = None):
    """The adapter's LoraConfig. init_lora_weights=True: the weights are already PiSSA's, so loading
    the adapter runs no SVD (peft's advice for a saved PiSSA adapter)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise CheckpointError("pissa-fast init needs peft to match target_modules and write adapter_config.json: "
                              "pip install peft") from None
    alpha = int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True,
                          use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0, bias="none",
                          task_type=task_type, base_model_name_or_path=base_model_name_or_path)


def _checkpoint_keys(ckpt: Checkpoint, params: dict, prefix: str) -> dict:
    """model parameter name -> checkpoint tensor name. The names agree for the class the checkpoint was
    saved from; a base model saved without (or a head model with) base_model_prefix is mapped as
    transformers' from_pretrained maps it."""
    out = {}
    for k in ckpt.location:
        if k in params:
            out[k] = k
        elif prefix and f"{prefix}.{k}" in params:
            out[f"{prefix}.{k}"] = k
        elif prefix and k.startswith(prefix + ".") and k[len(prefix) + 1:] in params:
            out[k[len(prefix) + 1:]] = k
    return out


def _describe(spec) -> str:
    return repr(spec) if isinstance(spec, str) else ",".join(spec)


def plan_targets(ckpt: Checkpoint, skel: Skeleton, target_modules, *, r: int, lora_alpha: float,
                 use_rslora: bool = False) -> TargetPlan:
    """Resolve target_modules (a list of suffixes, a regex string or "all-linear", as in LoraConfig) on
    the skeleton and check every target: a Linear or Conv1D whose weight is stored in the checkpoint,
    not tied to another module, float, the shape config.json implies, r <= min(out, in).
    Raises CheckpointError listing every problem."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    model = skel.model
    config = make_lora_config(target_modules, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                              task_type=skel.task_type, base_model_name_or_path=ckpt.name)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    if all_linear:
        config = _maybe_include_all_linear_layers(config, model)
    modules = dict(model.named_modules())
    chosen = [n for n in modules if n and check_target_module_exists(config, n)]
    notes = list(skel.notes)
    if isinstance(target_modules, (list, tuple, set)) and not all_linear:
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in chosen)]
        if unmatched and chosen:
            notes.append(f"no module of {skel.class_name} matches {', '.join(unmatched)}")
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))})
        raise CheckpointError(f"--target-modules {_describe(target_modules)} matches no module of {skel.class_name}"
                              f" (its Linear layers end in: {', '.join(linear[:12]) or 'none'})")

    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, list[str]] = {}
    for name, p in params.items():
        owners.setdefault(id(p), []).append(name)
    to_ckpt = _checkpoint_keys(ckpt, params, getattr(model, "base_model_prefix", "") or "")
    if not to_ckpt:
        some = sorted(ckpt.location)[:2]
        raise CheckpointError(f"{ckpt.root}: none of the checkpoint's tensor names ({', '.join(some)}, ...) is a "
                              f"parameter of {skel.class_name}; does config.json name the right architectures?")
    problems = []
    for pkey, ckey in to_ckpt.items():
        info = ckpt.info(ckey)
        want = tuple(params[pkey].shape)
        if info.dtype in PISSA_SAFETENSORS_CODES and want != info.shape:
            problems.append(f"{ckey}: shape {list(info.shape)} in {ckpt.location[ckey]}, but config.json implies "
                            f"{list(want)}")
    if problems:
        raise CheckpointError("mismatched shapes between the checkpoint and its config:\n  "
                              + "\n  ".join(problems[:10]))

    targets = []
    for name in chosen:
        mod = modules[name]
        if not isinstance(mod, (torch.nn.Linear, Conv1D)):
            problems.append(f"{name}: {type(mod).__name__} layers cannot be PiSSA-initialized (only Linear and "
                            f"Conv1D); leave it out of --target-modules")
            continue
        pkey = f"{name}.weight"
        tied = [o for o in owners[id(mod.weight)] if o != pkey]
        if tied:
            problems.append(f"{name}: its weight is tied to {tied[0]} (e.g. tie_word_embeddings); transformers "
                            f"re-ties them on load, so a residual stored for one would be replaced by the other; "
                            f"leave it out of --target-modules")
            continue
        ckey = to_ckpt.get(pkey)
        if ckey is None:
            problems.append(f"{name}: its weight {pkey} is not stored in the checkpoint")
            continue
        info = ckpt.info(ckey)
        t = Target(ckey, name, isinstance(mod, Conv1D), info.shape, info.dtype)
        if len(info.shape) != 2:
            problems.append(f"{ckey}: shape {list(info.shape)} is not a 2-D weight")
        elif info.dtype not in PISSA_SAFETENSORS_CODES:
            problems.append(f"{ckey}: dtype {info.dtype}; PiSSA needs float32/float16/bfloat16 (or float64) weights "
                            f"(a quantized checkpoint? initialize the float model, then quantize)")
        elif not 1 <= r <= min(info.shape):
            problems.append(f"{ckey}: r={r} is larger than the layer allows (min of {list(info.shape)})")
        else:
            targets.append(t)
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{len(problems)} target(s) cannot be PiSSA-initialized:\n  "
                              + "\n  ".join(problems[:12]) + more)
    order = {s: i for i, s in enumerate(ckpt.shards)}
    targets.sort(key=lambda t: (order[ckpt.location[t.key]], ckpt.info(t.key).begin))
    fan_in_fan_out = any(t.transposed for t in targets)
    if fan_in_fan_out and not all(t.transposed for t in targets):
        raise CheckpointError("the targets mix Linear and Conv1D layers; one adapter has one fan_in_fan_out: "
                              "initialize them in two runs")
    config.fan_in_fan_out = fan_in_fan_out
    if all_linear:
        config.target_modules = _compact(sorted(t.module for t in targets), list(modules))
    return TargetPlan(targets, config, fan_in_fan_out, notes)


def _compact(names: list, all_names: list):
    """peft's own shortening of a long target list to the fewest suffixes that select the same modules
    (what get_peft_model does before saving), so adapter_config.json stays short."""
    from peft.tuners.tuners_utils import _find_minimal_target_modules
    from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION

    if len(names) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return names
    chosen = set(names)
    suffixes = tuple("." + n for n in names)
    others = [n for n in all_names if n not in chosen and not n.endswith(suffixes)]
    return sorted(_find_minimal_target_modules(names, others))
