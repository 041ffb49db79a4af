"""The record of how a QPiSSA residual was quantized, written beside its adapter by `pissa-fast init
--quantize`, and the BitsAndBytesConfig rebuilt from it.

A residual is exactly NF4-representable only under the format it was fitted to: loading it with
another quant type, double-quantization setting or dtype silently changes the weights the adapter
sits on. So the settings travel with the adapter (OUT/pissa_init/pissa_fast_quantization.json; peft
ignores unknown files in an adapter folder), and `bnb_config(OUT)` gives the matching config:

    model = AutoModelForCausalLM.from_pretrained(OUT, quantization_config=bnb_config(OUT), dtype=torch.bfloat16)
"""
from __future__ import annotations

import json
import os

from .nf4 import QuantSpec

SETTINGS_FILE = "pissa_fast_quantization.json"
RESIDUAL_DTYPE = "bfloat16"  # bnb quantizes in the dtype a checkpoint is loaded in: the residual's own


def settings(spec: QuantSpec, *, iters: int, niter, bnb_version: str, start: str, scales: str) -> dict:
    """What a loader needs (the BitsAndBytesConfig arguments and the dtype to load in) and how the
    residual was made."""
    return {"method": "qpissa", "bnb_config": spec.bnb_config_kwargs(), "dtype": RESIDUAL_DTYPE,
            "blocksize": spec.blocksize, "qpissa_iters": iters, "niter": niter, "qpissa_start": start,
            "qpissa_scales": scales, "bitsandbytes": bnb_version}


def _settings_path(path: str) -> str:
    """The settings file of an init output folder OUT, or of its adapter folder OUT/pissa_init."""
    from ..pairing import ADAPTER_DIR

    path = os.fspath(path)
    for p in (os.path.join(path, SETTINGS_FILE), os.path.join(path, ADAPTER_DIR, SETTINGS_FILE)):
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{path}: no {SETTINGS_FILE} here or in {ADAPTER_DIR}/ (written by pissa-fast init "
                            f"--quantize); is this a QPiSSA output?")


def read_settings(path: str) -> dict:
    with open(_settings_path(path)) as fh:
        return json.load(fh)


def bnb_config(path: str, compute_dtype=None):
    """transformers.BitsAndBytesConfig that loads the QPiSSA residual at `path` (OUT or OUT/pissa_init)
    exactly as it was fitted. Load with dtype=torch.bfloat16 (read_settings(path)["dtype"]).
    compute_dtype: bnb_4bit_compute_dtype (default torch.bfloat16)."""
    import torch
    from transformers import BitsAndBytesConfig

    s = read_settings(path)
    if s.get("blocksize", 64) != 64:
        raise ValueError(f"{path}: the residual was quantized with blocksize {s['blocksize']}; transformers' "
                         f"BitsAndBytesConfig always uses 64")
    return BitsAndBytesConfig(**s["bnb_config"], bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)
