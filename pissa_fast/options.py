"""The package's shared vocabulary, defined once: niter values, dtype tables, the progress switch.

Every command, the peft backend and the benchmarks import these instead of keeping their own copies.
Pure Python: importable without the compiled library.
"""
from __future__ import annotations

import os

import torch

# Spellings of "exact SVD" (niter = None) accepted wherever a niter is parsed from text.
EXACT_NITER_WORDS = ("inf", "exact", "none", "svd", "∞")

# Weights pissa_fast decomposes; peft's PiSSA init accepts the same minus float64.
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
PEFT_PISSA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# User-facing dtype names -> torch dtype (CLI flags, JSON reports).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}

# safetensors dtype codes -> (torch dtype or None where this torch lacks it, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "C64": (torch.complex64, 8),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 1),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 1), "F8_E8M0": (None, 1),
}
# The float codes PiSSA can decompose, and the code of each float dtype.
PISSA_SAFETENSORS_CODES = ("F64", "F32", "F16", "BF16")
SAFETENSORS_CODE = {dt: code for code, (dt, _) in SAFETENSORS_DTYPES.items() if dt is not None}


def parse_niter(text) -> int | None:
    """A niter from text: an int >= 0, or one of EXACT_NITER_WORDS for the exact SVD (None).
    Raises ValueError with the accepted forms."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if s in EXACT_NITER_WORDS:
        return None
    try:
        v = int(s)
    except ValueError:
        raise ValueError(f"niter must be an int >= 0 or 'exact' (also: {', '.join(EXACT_NITER_WORDS)}), "
                         f"got {text!r}") from None
    if v < 0:
        raise ValueError(f"niter must be >= 0 (or 'exact'), got {v}")
    return v


def parse_dtype(text) -> torch.dtype:
    """A torch dtype from a name in DTYPE_NAMES (case-insensitive, 'torch.' prefix allowed)."""
    if isinstance(text, torch.dtype):
        return text
    s = str(text).strip().lower().removeprefix("torch.")
    if s not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}: use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[s]


def progress_enabled() -> bool:
    """Progress bars are on unless PISSA_FAST_PROGRESS=0 (or TQDM_DISABLE=1); read at call time."""
    off = ("0", "false", "no", "off")
    if os.environ.get("PISSA_FAST_PROGRESS", "1").strip().lower() in off:
        return False
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", *off)


# Byte-size units accepted in text (CLI flags such as --max-memory): SI and binary prefixes.
SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3,
              "gb": 1000 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
              "tib": 1 << 40}


def parse_size(text) -> int:
    """A byte count > 0 from an int or text such as 2GiB, 512MB, 1e9. Raises ValueError with examples."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in SIZE_UNITS:
            raise ValueError(f"not a size: {text!r} (e.g. 2GiB, 512MB, 1000000)")
        value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a size must be > 0 bytes, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Bytes for people: MiB below a quarter GiB, GiB above."""
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 28) else f"{n / (1 << 20):.1f} MiB"
