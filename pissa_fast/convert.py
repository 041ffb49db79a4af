"""`pissa_fast.convert_to_lora`: a trained PiSSA adapter as a plain LoRA for the *original* model.

Training moves the adapter from (A0, B0) to (A', B'); on the original model W = W_res + s B0 A0 the
same function is W + dW with

    dW = s (B' A' - B0 A0) = s [B', -B0] [A'; A0]        (rank <= 2r)

- exact (default): lora_A = [A'; A0], lora_B = [B', -B0], rank 2r and lora_alpha 2 alpha (alpha sqrt(2)
  with rslora), the same scaling; this is what peft's save_pretrained(path_initial_model_for_weight_
  conversion=...) writes.
- rank=k: the best rank-k approximation of each dW, from the factors only: QR of [B', -B0] (m x 2r)
  and of [A'; A0]^T (n x 2r), an SVD of the 2r x 2r product of their R factors, never an m x n
  matrix. It keeps lora_alpha / r's scaling (lora_alpha = scaling k, or scaling sqrt(k) with rslora)
  and reports the relative part of dW it drops, ||dW - dW_k||_F / ||dW||_F, per layer and overall.

Pure Python on torch and safetensors: needs neither the compiled library nor transformers; peft only
when the adapters use rank_pattern / alpha_pattern (to resolve them as peft does).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from .errors import CheckpointError
from .io.safetensors import load_small, save_small
from .io.staging import inside, remove, tmp_name, write_text
from .pairing import ADAPTER_WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")
_MATCHING = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")


@dataclass
class ConvertResult:
    out: str
    layers: int
    r: int  # of the PiSSA adapter
    new_r: int
    lora_alpha: float
    new_lora_alpha: float
    exact: bool
    base_model: str | None
    seconds: float
    dropped: float = 0.0  # ||dW - dW_k||_F / ||dW||_F over all layers together
    dropped_by_layer: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"pissa-fast convert-to-lora: {self.layers} layers, rank {self.r} -> {self.new_r}, lora_alpha "
                 f"{self.lora_alpha:g} -> {self.new_lora_alpha:g}, in {self.seconds:.1f} s"]
        if self.exact:
            lines.append(f"  exact: the trained change dW = B'A' - B0A0 has rank up to 2r = {2 * self.r}, so an exact "
                         f"LoRA needs rank {self.new_r} (as peft's conversion); --rank {self.r} gives a rank-{self.r} "
                         f"LoRA that keeps the best part of each dW and reports what it drops")
        else:
            worst = max(self.dropped_by_layer.items(), key=lambda kv: kv[1])
            lines.append(f"  rank {self.new_r}: dropped {self.dropped:.3e} of dW (||dW - dW_k||_F / ||dW||_F over all "
                         f"layers); worst layer {worst[0]}: {worst[1]:.3e}")
        lines.append(f"  wrote {self.out}/ (a LoRA adapter for {self.base_model or 'the original model'})")
        return "\n".join(lines)


def _load_adapter(path: str, what: str):
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{what} {path}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{what} {path}: a {cfg.get('peft_type')} adapter, not LoRA")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        bins = [n for n in os.listdir(path) if n.endswith(".bin")]
        raise CheckpointError(f"{what} {path}: no {ADAPTER_WEIGHTS}"
                              + (f" (found {bins[0]}: save with safe_serialization=True)" if bins else ""))
    tensors, meta = load_small(weights)
    return cfg, tensors, meta


def _check_pair(cfg0, init, cfg1, trained, trained_path):
    for k in _MATCHING:
        a, b = cfg0.get(k), cfg1.get(k)
        if (a or None) != (b or None) and a != b:
            raise CheckpointError(f"mismatched adapters: {k} is {a!r} in initial but {b!r} in trained")
    if cfg1.get("use_dora") or any("lora_magnitude_vector" in k for k in trained):
        raise CheckpointError("the trained adapter is a DoRA adapter; the PiSSA -> LoRA conversion needs plain LoRA")
    if cfg1.get("use_rslora") and (cfg1.get("rank_pattern") or cfg1.get("alpha_pattern")):
        raise CheckpointError("the conversion is not possible with use_rslora together with rank_pattern or "
                              "alpha_pattern (as in peft)")
    lora0 = {k for k in init if _LORA_KEY.match(k)}
    lora1 = {k for k in trained if _LORA_KEY.match(k)}
    if lora0 != lora1:
        only0, only1 = sorted(lora0 - lora1), sorted(lora1 - lora0)
        raise CheckpointError("mismatched adapters: different layers"
                              + (f"; only in initial: {only0[:3]}" if only0 else "")
                              + (f"; only in trained: {only1[:3]}" if only1 else ""))
    if not lora1:
        raise CheckpointError(f"trained {trained_path}: no lora_A/lora_B weights")
    for k in lora1:
        if init[k].shape != trained[k].shape:
            raise CheckpointError(f"mismatched shapes for {k}: {list(init[k].shape)} in initial, "
                                  f"{list(trained[k].shape)} in trained")


def _layer_scaling(cfg: dict):
    """module name -> scaling, resolving rank_pattern / alpha_pattern with peft's own rule."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def scale(rr, aa):
        return aa / (math.sqrt(rr) if cfg.get("use_rslora") else rr)

    if not rank_pattern and not alpha_pattern:
        return lambda module: (r, scale(r, alpha))
    from peft.utils.other import get_pattern_key

    def of(module):
        rr = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
        aa = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
        return rr, scale(rr, aa)
    return of


def truncate(A1, B1, A0, B0, k: int, factor: float = 1.0):
    """The best rank-k approximation of factor * (B1 A1 - B0 A0) as (A, B) with B A = it, split
    sqrt(S) to each side, plus (dropped energy, total energy) = (sum of S_i^2 for i > k, sum of S_i^2).
    Works on the factors only (float64): QR of the stacked factors, SVD of a 2r x 2r matrix."""
    dtype = torch.float64
    Bc = torch.cat([B1.to(dtype), -B0.to(dtype)], dim=1)  # (m, 2r)
    Ac = torch.cat([A1.to(dtype), A0.to(dtype)], dim=0)  # (2r, n)
    Qb, Rb = torch.linalg.qr(Bc)
    Qa, Ra = torch.linalg.qr(Ac.T)
    U, S, Vh = torch.linalg.svd(factor * (Rb @ Ra.T))
    root = S[:k].sqrt()
    B = (Qb @ U[:, :k]) * root
    A = root[:, None] * (Vh[:k] @ Qa.T)
    energy = S.square()
    return A, B, energy[k:].sum().item(), energy.sum().item()


def convert_to_lora(initial: str, trained: str, out: str, *, rank: int | None = None, base_model: str | None = None,
                    overwrite: bool = False) -> ConvertResult:
    """Turn the trained PiSSA adapter `trained` (peft save_pretrained) into a LoRA for the original model,
    given the adapter as initialized (`initial`, e.g. OUT/pissa_init from pissa-fast init), into `out`.
    rank=None: exact, rank 2r. rank=k: the best rank-k approximation, with the dropped part reported.
    base_model: base_model_name_or_path to record (default: the model pissa-fast init read). Raises
    CheckpointError before writing anything."""
    t0 = time.perf_counter()
    initial, trained, out = os.fspath(initial), os.fspath(trained), os.fspath(out)
    for src in (initial, trained):
        if inside(out, src) or inside(src, out):
            raise CheckpointError(f"out {out} must not be or contain {src}, nor be inside it (inputs are only read)")
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    cfg0, init, meta0 = _load_adapter(initial, "initial")
    cfg1, tuned, _ = _load_adapter(trained, "trained")
    _check_pair(cfg0, init, cfg1, tuned, trained)
    r, alpha, rslora = cfg1["r"], cfg1["lora_alpha"], bool(cfg1.get("use_rslora"))
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CheckpointError(f"rank must be an int >= 1, got {rank!r}")
        too_big = [(k, v.shape[0]) for k, v in tuned.items() if k.endswith(".lora_A.weight") and rank > 2 * v.shape[0]]
        if too_big:
            key, r_layer = too_big[0]
            raise CheckpointError(f"rank {rank} is larger than 2r = {2 * r_layer} for {key}: the trained change has "
                                  f"rank at most 2r, so the exact conversion (no rank) already fits")

    result: dict[str, torch.Tensor] = {}
    dropped: dict[str, tuple[float, float]] = {}
    scaling_of = _layer_scaling(cfg1)
    default_scaling = alpha / (math.sqrt(r) if rslora else r)
    for k, v in tuned.items():
        m = _LORA_KEY.match(k)
        if not m:
            result[k] = v  # e.g. modules_to_save: independent of the base weights
            continue
        if m.group(2) == "B":
            continue
        base = m.group(1)
        ka, kb = f"{base}.lora_A.weight", f"{base}.lora_B.weight"
        A1, B1, A0, B0 = tuned[ka], tuned[kb], init[ka], init[kb]
        dtype = torch.promote_types(A1.dtype, A0.dtype)
        if rank is None:
            result[ka] = torch.cat([A1.to(dtype), A0.to(dtype)], dim=0)
            result[kb] = torch.cat([B1.to(dtype), -B0.to(dtype)], dim=1)
        else:
            _, s = scaling_of(base.removeprefix("base_model.model."))
            A, B, lost, total = truncate(A1, B1, A0, B0, rank, s / default_scaling)
            result[ka], result[kb] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
            dropped[base.removeprefix("base_model.model.")] = (lost, total)

    cfg = dict(cfg1)
    cfg["init_lora_weights"] = True
    cfg["inference_mode"] = True
    if rank is None:
        cfg["r"] = 2 * r
        cfg["lora_alpha"] = alpha * (math.sqrt(2) if rslora else 2)
        cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg1.get("rank_pattern") or {}).items()}
        cfg["alpha_pattern"] = {k: 2 * v for k, v in (cfg1.get("alpha_pattern") or {}).items()}
    else:  # one rank and one scaling for every layer; per-layer scalings are folded into the factors
        cfg["r"] = rank
        cfg["lora_alpha"] = default_scaling * (math.sqrt(rank) if rslora else rank)
        cfg["rank_pattern"], cfg["alpha_pattern"] = {}, {}
    if float(cfg["lora_alpha"]).is_integer():
        cfg["lora_alpha"] = int(cfg["lora_alpha"])
    base_model = base_model or meta0.get("pissa_fast_original_model")
    if base_model:
        cfg["base_model_name_or_path"] = base_model

    out_abs = os.path.abspath(out)
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    tmp = tmp_name(out_abs)
    remove(tmp)
    os.makedirs(tmp)
    try:
        save_small(os.path.join(tmp, ADAPTER_WEIGHTS), result, {"format": "pt"})
        write_text(os.path.join(tmp, ADAPTER_CONFIG), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        old = os.path.join(os.path.dirname(out_abs), f".{os.path.basename(out_abs)}.old.{os.getpid()}")
        if os.path.lexists(out_abs):
            os.replace(out_abs, old)
        os.replace(tmp, out_abs)
        remove(old)
    except BaseException:
        remove(tmp)
        raise
    lost = sum(v[0] for v in dropped.values())
    total = sum(v[1] for v in dropped.values())
    layers = sum(1 for k in tuned if k.endswith(".lora_A.weight"))
    return ConvertResult(out, layers, r, cfg["r"], alpha,
                         cfg["lora_alpha"], rank is None, base_model, time.perf_counter() - t0,
                         math.sqrt(lost / total) if total > 0 else 0.0,
                         {m: (math.sqrt(a / b) if b > 0 else 0.0) for m, (a, b) in dropped.items()})
