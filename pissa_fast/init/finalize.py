"""The last step of `pissa-fast init` before the moves: the adapter folder (factors of every shard in
one adapter_model.safetensors with the pairing fingerprint, adapter_config.json by peft's own
LoraConfig.save_pretrained) and the rest of the residual model (index, config, tokenizer, every
other file and subfolder of the source), all in staging."""
from __future__ import annotations

import json
import os

from .. import pairing
from ..errors import CheckpointError
from ..io.safetensors import load_small, save_small
from ..io.staging import copy_file, copy_tree, remove
from .outdir import STAGED_ADAPTER
from .pipeline import FACTORS, PAIRING_PART_KEY, RESIDUAL
from .plan import InitPlan


def write_adapter(plan: InitPlan, staging: str, run_key: dict, revision: str | None = None) -> str:
    from .. import __version__

    ckpt = plan.ckpt
    tensors, layers = {}, {}
    for shard in ckpt.shards:
        part, meta = load_small(os.path.join(staging, FACTORS, shard))
        tensors.update(part)
        layers.update(json.loads(meta.get(PAIRING_PART_KEY, "{}")))
    order = [k for t in plan.targets.targets for k in t.adapter_keys]
    missing = [k for k in order if k not in tensors]
    if missing:
        raise CheckpointError(f"internal error: the staged factors lack {missing[:3]}; remove "
                              f"{staging} and run again")
    adapter = os.path.join(staging, STAGED_ADAPTER)
    remove(adapter)
    os.makedirs(adapter)
    meta = {"format": "pt", "pissa_fast_version": __version__, "pissa_fast_original_model": ckpt.name,
            "pissa_fast_run": json.dumps(run_key, sort_keys=True), pairing.METADATA_KEY: pairing.encode(layers)}
    save_small(os.path.join(adapter, pairing.ADAPTER_WEIGHTS), {k: tensors[k] for k in order}, meta)
    config = plan.targets.lora_config
    config.base_model_name_or_path = ckpt.name
    config.revision = revision
    config.save_pretrained(adapter)
    return adapter


def write_residual_extras(plan: InitPlan, staging: str) -> list:
    """Index, config and every other file and folder of the source into the staged residual.
    Returns [(name, why left out)]."""
    ckpt = plan.ckpt
    res = os.path.join(staging, RESIDUAL)
    if ckpt.index_name:  # same names, shapes, dtypes and shards: the index is unchanged
        copy_file(os.path.join(ckpt.root, ckpt.index_name), os.path.join(res, ckpt.index_name))
    keep, skipped = ckpt.other_entries(reserved=(pairing.ADAPTER_DIR, pairing.STAGING))
    for name in keep:
        src, dst = os.path.join(ckpt.root, name), os.path.join(res, name)
        if os.path.isdir(src):
            remove(dst)
            copy_tree(src, dst)
        else:
            copy_file(src, dst)
    return skipped
