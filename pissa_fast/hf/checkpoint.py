"""A transformers checkpoint on disk: where it comes from (a folder, or the Hugging Face Hub through
huggingface_hub's cache), its config.json, its safetensors shards and index, and every other file
that travels with the model."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import CheckpointError
from ..io.safetensors import ShardHeader, TensorInfo, read_header

INDEX_SUFFIX = ".safetensors.index.json"
# Other serializations of the same weights. Copied next to a residual they would still hold the
# original model (and some loaders prefer them), so they are left out, with a note.
OTHER_WEIGHT_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot", ".tflite")
OTHER_WEIGHT_FOLDERS = ("onnx", "openvino", "coreml", "gguf")
# Hub downloads skip the same files: only safetensors, configs, tokenizers and module folders are needed.
HUB_IGNORE = ["*" + ext for ext in OTHER_WEIGHT_FORMATS] + [d + "/*" for d in OTHER_WEIGHT_FOLDERS]


def resolve_source(model: str, *, revision: str | None = None, cache_dir: str | None = None,
                   token: str | bool | None = None) -> str:
    """The local folder of MODEL: the folder itself, or its snapshot from the Hugging Face Hub via
    huggingface_hub.snapshot_download, which downloads what is missing and works offline
    (HF_HUB_OFFLINE=1, or no network) from the local cache."""
    if os.path.isdir(model):
        if revision is not None:
            raise CheckpointError(f"--revision {revision!r} applies to Hub models; {model} is a local folder")
        return model
    if os.path.exists(model):
        raise CheckpointError(f"MODEL {model}: a file; expected a checkpoint folder (config.json + *.safetensors) "
                              f"or a Hugging Face Hub model id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise CheckpointError(f"MODEL {model}: no such folder (and huggingface_hub, which would fetch it from the "
                              f"Hub, is not installed)") from None
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache_dir, token=token,
                                 ignore_patterns=HUB_IGNORE)
    except HFValidationError:
        raise CheckpointError(f"MODEL {model}: no such folder, and not a valid Hugging Face Hub model id") from None
    except Exception as e:  # noqa: BLE001 - offline with nothing cached, unknown repo, gated, network down
        raise CheckpointError(f"MODEL {model}: no such folder, and not available from the Hugging Face Hub or its "
                              f"local cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None


@dataclass
class Checkpoint:
    root: str  # local folder
    name: str  # as the user gave it (a path or a Hub id): recorded as the adapter's base model
    config: dict
    shards: list  # file names, in order
    index_name: str | None
    files: dict  # shard name -> ShardHeader
    location: dict  # tensor name -> shard name
    notes: list = field(default_factory=list)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.location[name]].tensors[name]

    def header(self, shard: str) -> ShardHeader:
        return self.files[shard]

    @property
    def data_bytes(self) -> int:
        return sum(h.data_bytes for h in self.files.values())

    def other_entries(self, reserved=()) -> tuple[list, list]:
        """(names to copy next to the residual, [(name, why left out)]) among the folder's top-level
        files and subfolders: everything but the model's own safetensors and index (rewritten),
        other serializations of the same weights, hidden entries and the reserved names."""
        keep, skipped = [], []
        own = set(self.shards) | ({self.index_name} if self.index_name else set())
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if name in own or name.startswith("."):
                continue
            if name in reserved:
                skipped.append((name, "its name is reserved for the adapter"))
            elif os.path.isdir(path):
                if name in OTHER_WEIGHT_FOLDERS:
                    skipped.append((name + "/", "another export of the original weights"))
                else:
                    keep.append(name)
            elif name.endswith(OTHER_WEIGHT_FORMATS) or name.endswith(".index.json"):
                skipped.append((name, "another serialization of the original weights"))
            elif name.endswith(".safetensors"):
                skipped.append((name, "not one of the model's shards (e.g. a consolidated copy of the original)"))
            elif os.path.isfile(path):
                keep.append(name)
        return keep, skipped


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot parse {what} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def open_checkpoint(root: str, name: str | None = None) -> Checkpoint:
    """Find and validate config.json and every safetensors shard (headers only) of a checkpoint folder."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a directory")
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{root}: no config.json (expected a transformers checkpoint folder)")
    config = _load_json(cfg_path, "config.json")
    names = sorted(os.listdir(root))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    singles = [n for n in names if n.endswith(".safetensors")]
    index_name = weight_map = None
    if "model" + INDEX_SUFFIX in indexes or len(indexes) == 1:
        index_name = "model" + INDEX_SUFFIX if "model" + INDEX_SUFFIX in indexes else indexes[0]
        index = _load_json(os.path.join(root, index_name), "the safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{os.path.join(root, index_name)}: corrupt index (weight_map is not a dict of "
                                  f"file names)")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if os.path.basename(s) != s or s.startswith(".")]
        if bad:
            raise CheckpointError(f"{index_name}: shard names must be plain file names, got {bad[:3]}")
        missing = [s for s in shards if not os.path.isfile(os.path.join(root, s))]
        if missing:
            raise CheckpointError(f"{root}: missing shard(s) listed in {index_name}: {', '.join(missing)}")
    elif indexes:
        raise CheckpointError(f"{root}: several safetensors index files ({', '.join(indexes)}); expected one "
                              f"model{INDEX_SUFFIX}")
    elif "model.safetensors" in singles or len(singles) == 1:
        shards = ["model.safetensors" if "model.safetensors" in singles else singles[0]]
    elif singles:
        raise CheckpointError(f"{root}: several .safetensors files ({', '.join(singles[:4])}) but no "
                              f"*{INDEX_SUFFIX} to say which belong to the model")
    else:
        others = [n for n in names if n.endswith(OTHER_WEIGHT_FORMATS)]
        hint = (f" (found {', '.join(others[:3])}: convert it first, e.g. load it with transformers and "
                f"save_pretrained(...), which writes safetensors)") if others else ""
        raise CheckpointError(f"{root}: no safetensors weights{hint}")

    files, location = {}, {}
    for s in shards:
        header = read_header(os.path.join(root, s))
        files[s] = header
        for t in header.tensors:
            if t in location:
                raise CheckpointError(f"{root}: tensor {t!r} is in both {location[t]} and {s}")
            location[t] = s
    if weight_map is not None:
        for t, s in weight_map.items():
            if t not in files[s].tensors:
                raise CheckpointError(f"{root}: {index_name} puts {t!r} in {s}, which does not contain it "
                                      f"(shards from different checkpoints?)")
    return Checkpoint(root, name if name is not None else root, config, shards, index_name, files, location)
