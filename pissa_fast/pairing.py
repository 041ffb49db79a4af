"""The pairing guard: does an adapter sit on its own residual, or on something else (the original model,
say, which gives a loss of about 13 in peft's own report)?

`pissa-fast init` records in the adapter (its safetensors metadata, key "pissa_fast_pairing") a
fingerprint of every target: a sketch of a few rows of the residual and of the original weight,
`Y = W[rows] G` with a fixed Gaussian G (n x 2), and the rows' norm. `verify` recomputes the sketch
from the weights a model actually has (files on disk, or a module in memory) and compares:

    d = ||Y_found - Y||_F / (sqrt(2) ||W[rows]||_F)

d is about the relative size of the difference of the rows (E||D g||^2 = ||D||_F^2 for Gaussian g):
0 for the same weights, at most the dtype's rounding when the model was loaded in a coarser dtype,
and about ||(B A)[rows]|| / ||W[rows]|| (the principal part the adapter carries) for the original
model. A layer is "residual" or "original" when d is within twice the coarser dtype's epsilon of
that reference, and "other" when it is near neither.

Pure Python on torch and safetensors: no compiled library needed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .errors import CheckpointError
from .options import SAFETENSORS_CODE, SAFETENSORS_DTYPES

METADATA_KEY = "pissa_fast_pairing"
ADAPTER_DIR = "pissa_init"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGING = ".pissa_fast_staging"
ROWS = 8
PROBES = 2
SEED = 0x5155A  # fixed: the sketch must be the same on every machine and in every version
_FLOAT_CODES = {dt: code for dt, code in SAFETENSORS_CODE.items() if dt.is_floating_point}


def _eps(code: str) -> float:
    """Rounding unit of a safetensors float dtype (bfloat16's for anything unknown)."""
    dt = SAFETENSORS_DTYPES.get(code, (None, 0))[0]
    return torch.finfo(dt).eps if dt is not None and dt.is_floating_point else torch.finfo(torch.bfloat16).eps


def sample_rows(nrows: int) -> list[int]:
    """ROWS row indices spread evenly over the stored rows, first and last included."""
    k = min(ROWS, nrows)
    return sorted({round(i * (nrows - 1) / max(1, k - 1)) for i in range(k)})


@lru_cache(maxsize=64)
def _probe(ncols: int) -> torch.Tensor:
    return torch.randn(ncols, PROBES, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


def sketch(rows: torch.Tensor) -> tuple[list[float], float]:
    """(Y = rows @ G flattened, ||rows||_F) in float64, rounded to 12 significant digits for storage."""
    r = rows.detach().to("cpu", torch.float64)
    y = (r @ _probe(r.shape[1])).reshape(-1).tolist()
    return [float(f"{v:.12g}") for v in y], float(f"{r.norm().item():.12g}")


def entry(key: str, shape, dtype: str, original_rows: torch.Tensor, residual_rows: torch.Tensor) -> dict:
    """The fingerprint of one target, from the same sampled rows (sample_rows) before and after."""
    y0, n0 = sketch(original_rows)
    y1, n1 = sketch(residual_rows)
    return {"key": key, "shape": list(shape), "dtype": dtype, "residual": y1, "residual_norm": n1,
            "original": y0, "original_norm": n0}


def encode(layers: dict) -> str:
    return json.dumps({"version": 1, "rows": ROWS, "probes": PROBES, "seed": SEED, "layers": layers},
                      separators=(",", ":"), sort_keys=True)


def _distance(y_found, y_ref, norm_ref: float) -> float:
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(y_found, y_ref)))
    return diff / (math.sqrt(PROBES) * max(norm_ref, 1e-300))


def classify(fp: dict, found_rows: torch.Tensor, found_dtype: str) -> tuple[str, float, float]:
    """("residual" | "original" | "other", d to the residual, d to the original) for one layer."""
    y, _ = sketch(found_rows)
    d_res = _distance(y, fp["residual"], fp["residual_norm"])
    d_orig = _distance(y, fp["original"], fp["original_norm"])
    tol = 2 * max(_eps(fp["dtype"]), _eps(found_dtype)) + 1e-9
    if d_res <= tol and d_res <= d_orig:
        return "residual", d_res, d_orig
    if d_orig <= tol:
        return "original", d_res, d_orig
    return "other", d_res, d_orig


@dataclass
class PairingReport:
    """What verify found. `paired` is True only when every layer of the adapter sits on its residual."""
    paired: bool
    status: str  # paired | original | mismatch | incomplete | no-adapter | no-fingerprint
    message: str
    layers: dict = field(default_factory=dict)  # module name -> residual | original | other | missing | unreadable

    def __bool__(self) -> bool:
        return self.paired


def read_fingerprint(adapter: str) -> dict | None:
    """The pairing fingerprint stored in an adapter folder, or None if it carries none."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(adapter, ADAPTER_WEIGHTS)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter ({e})") from None
    if METADATA_KEY not in meta:
        return None
    try:
        return json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt pairing fingerprint ({e})") from None


def _rows_from_files(root: str):
    from .hf.checkpoint import open_checkpoint
    from .io.safetensors import read_rows

    ckpt = open_checkpoint(root)

    def rows(fp: dict):
        key = fp["key"]
        if key not in ckpt.location:
            return None, None
        info = ckpt.info(key)
        if list(info.shape) != list(fp["shape"]):
            return "shape", None
        return read_rows(os.path.join(ckpt.root, ckpt.location[key]), key, sample_rows(info.shape[0])), info.dtype
    return rows


def _rows_from_module(model: torch.nn.Module):
    weights = {}
    for name, mod in model.named_modules():
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        w = getattr(base, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        name = name.removeprefix("base_model.model.")
        for suffix in (".base_layer",):
            name = name.removesuffix(suffix)
        weights.setdefault(name, (w, bool(getattr(mod, "merged", False))))

    def rows(fp: dict, module: str):
        if module not in weights:
            return None, None
        w, merged = weights[module]
        if merged:
            return "merged", None
        if w.dtype not in _FLOAT_CODES or w.device.type == "meta":
            return "unreadable", None
        if list(w.shape) != list(fp["shape"]):
            return "shape", None
        return w.detach()[sample_rows(w.shape[0])], _FLOAT_CODES[w.dtype]
    return rows


def verify(model, adapter: str | None = None) -> PairingReport:
    """Does the adapter sit on its own residual? `model`: a model folder (read from disk: only a few
    rows of each target) or a torch module (a transformers model, or a PeftModel: its base layers are
    read). `adapter`: the adapter folder pissa-fast init wrote (default MODEL/pissa_init for a folder).
    Never raises for a mismatch; the report says what was found. Raises CheckpointError for unreadable
    inputs."""
    is_path = isinstance(model, (str, os.PathLike))
    if adapter is None:
        if not is_path:
            raise CheckpointError("verify(model_module): pass adapter= (the folder pissa-fast init wrote, "
                                  "OUT/pissa_init)")
        adapter = os.path.join(os.fspath(model), ADAPTER_DIR)
    adapter = os.fspath(adapter)
    incomplete = is_path and os.path.isdir(os.path.join(os.fspath(model), STAGING))
    if not os.path.isfile(os.path.join(adapter, ADAPTER_WEIGHTS)):
        msg = f"no adapter at {adapter}"
        if incomplete:
            msg += (f"; an interrupted pissa-fast init is still in {os.path.join(os.fspath(model), STAGING)}: "
                    f"rerun the same command to finish it")
        return PairingReport(False, "incomplete" if incomplete else "no-adapter", msg)
    fp = read_fingerprint(adapter)
    if fp is None:
        return PairingReport(False, "no-fingerprint",
                             f"{adapter} carries no pairing fingerprint (pissa-fast init writes one; peft's "
                             f"save_pretrained does not keep it): check against the initial adapter "
                             f"(OUT/{ADAPTER_DIR}) instead")
    if is_path:
        from_files = _rows_from_files(os.fspath(model))

        def get(layer, module):
            return from_files(layer)
    else:
        from_module = _rows_from_module(model)

        def get(layer, module):
            return from_module(layer, module)

    layers = {}
    for module, layer in fp["layers"].items():
        rows, dtype = get(layer, module)
        if rows is None:
            layers[module] = "missing"
        elif isinstance(rows, str):
            layers[module] = {"shape": "other", "merged": "merged"}.get(rows, "unreadable")
        else:
            layers[module] = classify(layer, rows, dtype)[0]
    counts = {s: sum(1 for v in layers.values() if v == s) for s in set(layers.values())}
    n = len(layers)
    where = os.fspath(model) if is_path else type(model).__name__
    if counts.get("residual", 0) == n and not incomplete:
        return PairingReport(True, "paired", f"{adapter} sits on its own residual ({n} layers checked in {where})",
                             layers)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if incomplete:
        status = "incomplete"
        msg = (f"an interrupted pissa-fast init is still in {os.path.join(os.fspath(model), STAGING)}: the residual "
               f"and the adapter may be from different runs ({summary}); rerun the same command to finish it")
    elif counts.get("original", 0) == n:
        status = "original"
        msg = (f"{where} is the ORIGINAL model, not the residual {adapter} was made for: load the residual (the "
               f"folder pissa-fast init wrote) as the base, or the adapter adds its principal part twice")
    else:
        status = "mismatch"
        bad = [m for m, v in layers.items() if v != "residual"][:3]
        msg = (f"{adapter} does not sit on its own residual in {where}: {summary} of {n} layers (e.g. "
               f"{', '.join(bad)}); the base is another model, a different run's residual, or was modified")
        if counts.get("merged"):
            msg += "; merged layers cannot be checked (verify before merging)"
    return PairingReport(False, status, msg, layers)
