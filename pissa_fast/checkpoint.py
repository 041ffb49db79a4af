"""`pissa-fast init` and `pissa-fast convert-to-lora`: PiSSA for transformers checkpoints on disk.

    pissa-fast init MODEL_DIR OUT_DIR --r 16 --alpha 16 --niter 4 --target-modules q_proj,v_proj
    pissa-fast convert-to-lora --initial OUT_DIR/pissa_init --trained TRAINED_ADAPTER_DIR OUT_LORA_DIR

`init` reads a transformers checkpoint directory (config.json + safetensors, sharded or not) and writes

    OUT_DIR/residual_model/   the residual weights W - B A, same shards, same index, same dtypes; every
                              other top-level file (config, tokenizer, generation config) copied
    OUT_DIR/pissa_init/       a peft LoRA adapter: adapter_config.json (init_lora_weights: true, so
                              loading it runs no SVD) and adapter_model.safetensors with peft's keys
                              base_model.model.<module>.lora_A.weight / .lora_B.weight

so that `AutoModelForCausalLM.from_pretrained(OUT_DIR/residual_model)` followed by
`PeftModel.from_pretrained(model, OUT_DIR/pissa_init)` computes what the original model computes.

It streams: the input is read with plain file reads (no mmap), a bounded group of targeted tensors
(--max-memory, never more than one shard) is in memory at a time, and every other tensor is copied in
chunks; the output safetensors are written by a streaming writer. Nothing is lost: the input directory
is only read; all work happens in OUT_DIR/.pissa_fast_staging under temporary names, each file renamed
when complete, the two output folders moved into place at the very end; an existing non-empty OUT_DIR
is refused unless --overwrite (which replaces only residual_model/ and pissa_init/); rerunning an
interrupted command resumes it from the shards already finished.

`convert-to-lora` turns the trained PiSSA adapter into a plain rank-2r LoRA for the *original* model,
exactly as peft's `save_pretrained(path_initial_model_for_weight_conversion=...)` does:
lora_A = cat([A', A0]), lora_B = cat([B', -B0]), r and lora_alpha doubled (alpha * sqrt(2) with
rslora), so that scaling * lora_B lora_A = scaling * (B' A' - B0 A0) = the trained delta W.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

STAGING = ".pissa_fast_staging"
MOVING = "moving"  # in the staging dir: both outputs are complete, only the final renames are left
RESIDUAL = "residual_model"
ADAPTER = "pissa_init"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_MAX_MEMORY = 2 << 30
COPY_CHUNK = 16 << 20
MAX_HEADER = 100 << 20
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# transformers models whose linear layers are Conv1D (weight stored in x out), for checkpoints whose
# architecture cannot be built (transformers missing, remote code).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
NOT_LINEAR_NAMES = re.compile(r"(^|\.)(lm_head|embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|"
                              r"position_embeddings|token_type_embeddings|embeddings|embed|output|score|"
                              r"classifier)$")

_DTYPES: dict[str, tuple[torch.dtype | None, float]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "C64": (torch.complex64, 8),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 1),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 1), "F8_E8M0": (None, 1),
}
_FLOAT_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
PISSA_CODES = ("F64", "F32", "F16", "BF16")


class CheckpointError(Exception):
    """A problem with the inputs or the output directory, reported as a one-paragraph message."""


# --------------------------------------------------------------------------------------------------
# safetensors, streamed
# --------------------------------------------------------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsFile:
    path: str
    tensors: dict  # name -> TensorInfo, in file (offset) order
    metadata: dict | None
    size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str) -> SafetensorsFile:
    """Parse and validate a safetensors header without reading the data: every tensor's bytes must lie
    inside the file and match its dtype and shape. Raises CheckpointError naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file: the header claims {n} bytes "
                                      f"but the file has {size} bytes")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None)
    start = 8 + n
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: bad entry for tensor {name!r}") from None
        if not 0 <= b <= e:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has offsets [{b}, {e}]")
        if start + e > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {start + e} "
                                  f"but the file has only {size} bytes (incomplete download or copy?)")
        numel = math.prod(shape)
        item = _DTYPES.get(dtype, (None, None))[1]
        if item is not None and dtype not in ("F8_E8M0",) and int(numel * item) != e - b:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} ({dtype}, shape "
                                  f"{list(shape)}) should take {int(numel * item)} bytes, its offsets give {e - b}")
        infos.append(TensorInfo(name, dtype, shape, start + b, start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    for prev, cur in zip(infos, infos[1:]):
        if cur.begin < prev.end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {prev.name!r} and {cur.name!r} "
                                  f"overlap")
    return SafetensorsFile(path, {t.name: t for t in infos}, metadata, size)


def _alloc(nbytes: int) -> bytearray:
    """Every bulk host buffer (loaded tensors, copy chunks) comes from here (tests count them)."""
    return _Buffer(nbytes)


class _Buffer(bytearray):
    """A bytearray that can be weak-referenced."""


def read_tensor(fh, info: TensorInfo) -> torch.Tensor:
    """Load one tensor with a plain read into a fresh host buffer (the tensor owns it)."""
    dtype = _DTYPES.get(info.dtype, (None, None))[0]
    if dtype is None:
        raise CheckpointError(f"tensor {info.name!r} has dtype {info.dtype}, which this torch cannot load")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = _alloc(info.nbytes)
    fh.seek(info.begin)
    got = fh.readinto(buf)
    if got != info.nbytes:
        raise CheckpointError(f"{getattr(fh, 'name', '?')}: truncated while reading {info.name!r} ({got} of "
                              f"{info.nbytes} bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _tmp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp.{os.getpid()}")


def _is_tmp(name: str) -> bool:
    return re.search(r"\.tmp\.\d+$", name) is not None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order given up front, to a temporary name;
    commit() fsyncs and renames it to its final name, abort() (or an exception in a `with`) removes it."""

    def __init__(self, path: str, entries: list[tuple[str, str, tuple, int]], metadata: dict | None = None):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors files are little-endian; this machine is big-endian")
        self.path, self.tmp = path, _tmp_name(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self._expect = []
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            self._expect.append((name, nbytes))
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._pos = 0
        self._fh = open(self.tmp, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def _next(self, name):
        if self._pos >= len(self._expect) or self._expect[self._pos][0] != name:
            want = self._expect[self._pos][0] if self._pos < len(self._expect) else None
            raise RuntimeError(f"SafetensorsWriter: got {name!r}, expected {want!r}")
        self._pos += 1
        return self._expect[self._pos - 1][1]

    def tensor(self, name: str, t: torch.Tensor) -> None:
        nbytes = self._next(name)
        t = t.detach().to("cpu").contiguous()
        if t.numel() * t.element_size() != nbytes:
            raise RuntimeError(f"SafetensorsWriter: {name!r} has {t.numel() * t.element_size()} bytes, "
                               f"expected {nbytes}")
        if nbytes:
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def copy(self, name: str, src, info: TensorInfo) -> None:
        """Copy a tensor's bytes from an open input file in bounded chunks."""
        nbytes = self._next(name)
        if nbytes != info.nbytes:
            raise RuntimeError(f"SafetensorsWriter: {name!r} size mismatch")
        if not nbytes:
            return
        buf = memoryview(_alloc(min(COPY_CHUNK, nbytes)))
        src.seek(info.begin)
        left = nbytes
        while left:
            n = src.readinto(buf[:min(len(buf), left)])
            if not n:
                raise CheckpointError(f"{getattr(src, 'name', '?')}: truncated while reading {name!r}")
            self._fh.write(buf[:n])
            left -= n

    def commit(self) -> None:
        if self._pos != len(self._expect):
            raise RuntimeError(f"SafetensorsWriter: {len(self._expect) - self._pos} tensors not written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write a dict of (small) tensors atomically."""
    entries = []
    for name, t in tensors.items():
        code = _FLOAT_CODES.get(t.dtype)
        if code is None:
            code = next((k for k, (dt, _) in _DTYPES.items() if dt == t.dtype), None)
        if code is None:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {t.dtype}")
        entries.append((name, code, tuple(t.shape), t.numel() * t.element_size()))
    with SafetensorsWriter(path, entries, metadata) as w:
        for name, t in tensors.items():
            w.tensor(name, t)
        w.commit()


def load_tensors(path: str) -> tuple[dict, dict | None]:
    st = read_header(path)
    with open(path, "rb") as fh:
        return {name: read_tensor(fh, info).clone() for name, info in st.tensors.items()}, st.metadata


def _write_text(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _copy_file(src: str, dst: str) -> None:
    tmp = _tmp_name(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------------------------------
# the input checkpoint
# --------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    root: str
    config: dict
    shards: list  # file names, in order
    index_name: str | None
    index: dict | None
    files: dict  # file name -> SafetensorsFile
    location: dict  # tensor name -> file name

    def info(self, name) -> TensorInfo:
        return self.files[self.location[name]].tensors[name]


def open_checkpoint(model_dir: str) -> Checkpoint:
    """Find and validate config.json and every safetensors shard (headers only) of a checkpoint dir."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{model_dir}: no config.json (expected a transformers checkpoint directory)")
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e})") from None
    names = sorted(os.listdir(model_dir))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    singles = [n for n in names if n.endswith(".safetensors")]
    index = index_name = None
    if indexes:
        index_name = "model" + INDEX_SUFFIX if "model" + INDEX_SUFFIX in indexes else indexes[0]
        if len(indexes) > 1 and index_name != "model" + INDEX_SUFFIX:
            raise CheckpointError(f"{model_dir}: several safetensors index files ({', '.join(indexes)}); "
                                  f"expected one model{INDEX_SUFFIX}")
        try:
            with open(os.path.join(model_dir, index_name)) as fh:
                index = json.load(fh)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not a dict of file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{os.path.join(model_dir, index_name)}: corrupt index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if os.path.basename(s) != s or s.startswith(".")]
        if bad:
            raise CheckpointError(f"{index_name}: shard names must be plain file names, got {bad[:3]}")
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise CheckpointError(f"{model_dir}: missing shard(s) listed in {index_name}: {', '.join(missing)}")
    elif singles:
        if len(singles) > 1:
            raise CheckpointError(f"{model_dir}: several .safetensors files ({', '.join(singles[:4])}) but no "
                                  f"*{INDEX_SUFFIX} to say which belong to the model")
        shards = singles
        weight_map = None
    else:
        others = [n for n in names if n.endswith(WEIGHT_EXTENSIONS)]
        hint = (f" (found {', '.join(others[:3])}: convert it first, e.g. load it with transformers and "
                f"save_pretrained(..., safe_serialization=True))") if others else ""
        raise CheckpointError(f"{model_dir}: no safetensors weights{hint}")

    files, location = {}, {}
    for s in shards:
        st = read_header(os.path.join(model_dir, s))
        files[s] = st
        for name in st.tensors:
            if name in location:
                raise CheckpointError(f"{model_dir}: tensor {name!r} is in both {location[name]} and {s}")
            location[name] = s
    if weight_map is not None:
        for name, s in weight_map.items():
            if name not in files[s].tensors:
                raise CheckpointError(f"{model_dir}: {index_name} puts {name!r} in {s}, which does not contain it "
                                      f"(shards from different checkpoints?)")
    return Checkpoint(model_dir, config, shards, index_name, index, files, location)


# --------------------------------------------------------------------------------------------------
# which tensors to decompose
# --------------------------------------------------------------------------------------------------

@dataclass
class Target:
    key: str  # tensor name in the checkpoint
    module: str  # module name in the model (peft's key is base_model.model.<module>.lora_X.weight)
    transposed: bool  # Conv1D: stored (in, out)

    def adapter_keys(self):
        base = f"base_model.model.{self.module}"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


@dataclass
class TargetPlan:
    targets: list
    target_modules: list  # for adapter_config.json
    fan_in_fan_out: bool
    task_type: str | None
    notes: list = field(default_factory=list)


def _skeleton(model_dir: str, config: dict):
    """The model built from its config on the meta device (no weights, no memory), or None (with the
    reason) when transformers is missing or cannot build it."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = transformers.AutoConfig.from_pretrained(model_dir)
            arch = (getattr(cfg, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            with torch.device("meta"):
                # the class `AutoModelForCausalLM.from_pretrained(residual_model)` will build (its module
                # names are the adapter's keys), else the one config.json names
                try:
                    model = transformers.AutoModelForCausalLM.from_config(cfg)
                except (ValueError, KeyError, ImportError):
                    if cls is None:
                        raise
                    model = cls._from_config(cfg)
        return model, None
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to names
        return None, f"transformers could not build {config.get('architectures')} ({type(e).__name__}: {e})"


def _match(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def plan_targets(ckpt: Checkpoint, spec: str, r: int) -> TargetPlan:
    """Resolve --target-modules against the model (built on the meta device from its config when
    transformers can, else judged by names) and check every target: a Linear/Conv1D weight, stored in
    the checkpoint, float, 2-D, the shape the config implies, r <= min(m, n)."""
    spec = spec.strip()
    all_linear = spec.lower() == "all-linear"
    wanted = [] if all_linear else [t.strip() for t in spec.split(",") if t.strip()]
    if not all_linear and not wanted:
        raise CheckpointError("--target-modules is empty")
    arch = (ckpt.config.get("architectures") or [""])[0]
    task_type = "CAUSAL_LM" if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") else None
    model, why = _skeleton(ckpt.root, ckpt.config)
    notes = []
    problems = []
    targets: list[Target] = []
    keys = set(ckpt.location)

    if model is not None:
        from transformers.pytorch_utils import Conv1D

        prefix = getattr(model, "base_model_prefix", "") or ""
        params = dict(model.state_dict(keep_vars=True))
        to_ckpt = {}
        for k in keys:
            if k in params:
                to_ckpt[k] = k
            elif prefix and f"{prefix}.{k}" in params:
                to_ckpt[f"{prefix}.{k}"] = k
            elif prefix and k.startswith(prefix + ".") and k[len(prefix) + 1:] in params:
                to_ckpt[k[len(prefix) + 1:]] = k
        for mkey, ckey in to_ckpt.items():  # shapes the config implies vs the checkpoint's
            info = ckpt.info(ckey)
            want = tuple(params[mkey].shape)
            if info.dtype in PISSA_CODES and want != info.shape:
                problems.append(f"{ckey}: shape {list(info.shape)} in {ckpt.location[ckey]}, but config.json "
                                f"implies {list(want)}")
        if problems:
            raise CheckpointError("mismatched shapes between the checkpoint and its config:\n  "
                                  + "\n  ".join(problems[:10]))
        modules = dict(model.named_modules())
        if all_linear:
            exclude = set()
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out_emb is not None:
                exclude |= {n for n, m in modules.items() if m is out_emb}
            chosen = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D)) and n not in exclude]
        else:
            chosen = [n for n in modules if n and _match(n, wanted)]
            unmatched = [t for t in wanted if not any(_match(n, [t]) for n in chosen)]
            if unmatched:
                notes.append(f"no module matches {', '.join(unmatched)}")
        for name in chosen:
            mod = modules[name]
            if not isinstance(mod, (torch.nn.Linear, Conv1D)):
                problems.append(f"{name}: {type(mod).__name__} layers cannot be PiSSA-initialized (only Linear "
                                f"and Conv1D); leave it out of --target-modules")
                continue
            ckey = to_ckpt.get(f"{name}.weight")
            if ckey is None:
                tied = any(mod.weight is m.weight for n, m in modules.items() if n != name and hasattr(m, "weight"))
                problems.append(f"{name}: its weight is not stored in the checkpoint"
                                + (" (tied to another module's weight)" if tied else ""))
                continue
            targets.append(Target(ckey, name, isinstance(mod, Conv1D)))
        resolved = sorted(chosen) if all_linear else wanted
    else:
        notes.append(f"module types judged by names ({why})")
        conv1d = ckpt.config.get("model_type") in CONV1D_MODEL_TYPES
        for k in sorted(keys, key=lambda k: (ckpt.location[k], ckpt.info(k).begin)):
            if not k.endswith(".weight"):
                continue
            name = k[: -len(".weight")]
            info = ckpt.info(k)
            if all_linear:
                if len(info.shape) != 2 or NOT_LINEAR_NAMES.search(name) or "norm" in name.split(".")[-1]:
                    continue
            elif not _match(name, wanted):
                continue
            targets.append(Target(k, name, conv1d))
        resolved = sorted(t.module for t in targets) if all_linear else wanted

    for t in targets:
        info = ckpt.info(t.key)
        if len(info.shape) != 2:
            problems.append(f"{t.key}: shape {list(info.shape)} is not a 2-D weight")
        elif info.dtype not in PISSA_CODES:
            problems.append(f"{t.key}: dtype {info.dtype}; PiSSA needs float32/float16/bfloat16 (or float64) "
                            f"weights (a quantized checkpoint? initialize on the float model, then quantize)")
        elif not 1 <= r <= min(info.shape):
            problems.append(f"{t.key}: r={r} is larger than the layer allows (min of {list(info.shape)})")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{len(problems)} target(s) cannot be PiSSA-initialized:\n  "
                              + "\n  ".join(problems[:12]) + more)
    if not targets:
        raise CheckpointError(f"--target-modules {spec!r} matches no layer of the model"
                              + (f" ({notes[-1]})" if notes else ""))
    order = {s: i for i, s in enumerate(ckpt.shards)}
    targets.sort(key=lambda t: (order[ckpt.location[t.key]], ckpt.info(t.key).begin))
    return TargetPlan(targets, resolved, any(t.transposed for t in targets), task_type, notes)


# --------------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------------

def _parse_niter(s: str):
    if s.lower() in ("exact", "none", "svd"):
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--niter must be an int >= 0 or 'exact', got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"--niter must be >= 0, got {v}")
    return v


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1 << 40}


def _parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", s)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 2GiB, 512MB, 1000000)")
    v = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if v <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {s!r}")
    return v


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 28) else f"{n / (1 << 20):.1f} MiB"


def add_arguments_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="transformers checkpoint directory (config.json + *.safetensors); only read")
    p.add_argument("out_dir", help="output directory: gets residual_model/ and pissa_init/")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: = r, i.e. scaling 1)")
    p.add_argument("--niter", type=_parse_niter, default=4,
                   help="subspace iterations of the randomized SVD, or 'exact' (default 4)")
    p.add_argument("--target-modules", required=True,
                   help="comma-separated module-name suffixes as in peft (q_proj,v_proj,...), or all-linear")
    p.add_argument("--use-rslora", action="store_true", help="scaling = alpha / sqrt(r) (peft's use_rslora)")
    p.add_argument("--device", default="cpu", help="where to decompose: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--max-memory", type=_parse_size, default=DEFAULT_MAX_MEMORY,
                   help="bytes of weights loaded at once, at most one shard (default 2GiB; one tensor is "
                        "always allowed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test matrices (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR/residual_model and OUT_DIR/pissa_init if OUT_DIR is not empty")
    p.add_argument("--report-error", action="store_true",
                   help="report the error against the exact SVD on a sample of layers")
    p.add_argument("--error-samples", type=int, default=4, help="layers sampled by --report-error (default 4)")


def _fingerprint(args, ckpt: Checkpoint, plan: TargetPlan) -> dict:
    files = []
    for s in ckpt.shards:
        st = os.stat(os.path.join(ckpt.root, s))
        files.append([s, st.st_size, st.st_mtime_ns])
    return {
        "tool": "pissa_fast init", "version": 1, "model_dir": os.path.realpath(ckpt.root), "files": files,
        "r": args.r, "alpha": args.alpha, "niter": args.niter, "use_rslora": bool(args.use_rslora),
        "seed": args.seed, "targets": [t.key for t in plan.targets],
    }


def _inside(a: str, b: str) -> bool:
    """Is path a equal to or inside path b (real paths)?"""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _prepare_out_dir(out_dir: str, fingerprint: dict, overwrite: bool) -> tuple[str, bool, bool]:
    """Create or check OUT_DIR; returns (staging dir, resuming?, only the final moves left?)."""
    staging = os.path.join(out_dir, STAGING)
    run_file = os.path.join(staging, "run.json")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    entries = set(os.listdir(out_dir))
    previous = None
    if STAGING in entries:
        try:
            with open(run_file) as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            previous = None
    resume = previous is not None and previous == fingerprint
    moving = resume and os.path.exists(os.path.join(staging, MOVING))
    others = entries - {STAGING} - {n for n in entries if n.startswith(".pissa_fast_old_")}
    if others and not overwrite and not resume:
        raise CheckpointError(f"{out_dir}: exists and is not empty ({', '.join(sorted(others)[:4])}); pass "
                              f"--overwrite to replace its {RESIDUAL}/ and {ADAPTER}/ (other files are kept)")
    if STAGING in entries and not resume:
        if not overwrite and previous is not None:
            raise CheckpointError(f"{out_dir}: holds an interrupted run with different settings or inputs; rerun "
                                  f"that command to finish it, or pass --overwrite to start over")
        shutil.rmtree(staging)
    if resume:  # leftovers of the interrupted process: partial files under temporary names
        for d, _, files in os.walk(staging):
            for f in files:
                if _is_tmp(f):
                    os.remove(os.path.join(d, f))
    else:
        os.makedirs(staging, exist_ok=True)
        _write_text(run_file, json.dumps(fingerprint, indent=1))
    if not moving:
        os.makedirs(os.path.join(staging, RESIDUAL), exist_ok=True)
        os.makedirs(os.path.join(staging, "factors"), exist_ok=True)
    return staging, resume, moving


def _shard_done(staging: str, shard: str) -> bool:
    res = os.path.join(staging, RESIDUAL, shard)
    fac = os.path.join(staging, "factors", shard)
    if not (os.path.isfile(res) and os.path.isfile(fac)):
        return False
    try:
        read_header(res)
        read_header(fac)
    except CheckpointError:
        return False
    return True


def _groups(infos: list[TensorInfo], is_target, budget: int):
    """Split a shard's tensors (file order) into runs whose targeted tensors total <= budget bytes
    (a single larger tensor goes alone)."""
    group, nbytes = [], 0
    for info in infos:
        if is_target(info.name):
            if nbytes and nbytes + info.nbytes > budget:
                yield group
                group, nbytes = [], 0
            nbytes += info.nbytes
        group.append(info)
    if group:
        yield group


def _after_shard(shard: str) -> None:
    """Called after each shard is complete on disk (a hook for tests)."""


@contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit so temporary files are removed on the way out."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class _Stats:
    layers: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    decompose_s: float = 0.0
    max_group_bytes: int = 0
    errors: list = field(default_factory=list)


def _process_shard(ckpt: Checkpoint, shard: str, staging: str, plan_by_key: dict, args, device, scaling: float,
                   sample: set, stats: _Stats, bar) -> None:
    from .core import decompose_many

    st = ckpt.files[shard]
    infos = list(st.tensors.values())
    entries = [(i.name, i.dtype, i.shape, i.nbytes) for i in infos]
    root = math.sqrt(scaling)
    factors = {}
    src_path = os.path.join(ckpt.root, shard)
    with open(src_path, "rb") as src, \
            SafetensorsWriter(os.path.join(staging, RESIDUAL, shard), entries, st.metadata) as out:
        for group in _groups(infos, lambda n: n in plan_by_key, args.max_memory):
            loaded = {}
            for info in group:
                if info.name in plan_by_key:
                    loaded[info.name] = read_tensor(src, info)
            stats.max_group_bytes = max(stats.max_group_bytes, sum(info.nbytes for info in group
                                                                   if info.name in loaded))
            if loaded:
                work = {k: (t.to(device) if device.type != "cpu" else t) for k, t in loaded.items()}
                mats = {k: (w.t() if plan_by_key[k].transposed else w) for k, w in work.items()}
                originals = {k: m.clone() for k, m in mats.items() if k in sample}
                t0 = time.perf_counter()
                outs = decompose_many(mats, args.r, args.niter, inplace=True, seed=args.seed)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stats.decompose_s += time.perf_counter() - t0
                for k, d in outs.items():
                    if k in originals:
                        from .metrics import error_vs_exact

                        stats.errors.append((plan_by_key[k].module, error_vs_exact(originals.pop(k), d)))
                    keep = torch.float64 if d.A.dtype == torch.float64 else torch.float32
                    ka, kb = plan_by_key[k].adapter_keys()
                    factors[ka] = (d.A / root).to("cpu", keep).contiguous()
                    factors[kb] = (d.B / root).to("cpu", keep).contiguous()
                    if device.type != "cpu":
                        loaded[k].copy_(work[k].to("cpu"))
                del work, mats, outs, originals
                stats.layers += len(loaded)
            for info in group:
                if info.name in loaded:
                    out.tensor(info.name, loaded.pop(info.name))
                else:
                    out.copy(info.name, src, info)
                if bar is not None:
                    bar.update(info.nbytes)
            if bar is not None:
                bar.set_postfix(layers=stats.layers, refresh=False)
        out.commit()
    save_tensors(os.path.join(staging, "factors", shard), factors, {"format": "pt"})
    stats.shards_done += 1
    _after_shard(shard)


def _adapter_config(args, plan: TargetPlan, residual_path: str) -> dict:
    alpha = args.alpha
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    kwargs = dict(r=args.r, lora_alpha=alpha, target_modules=plan.target_modules, init_lora_weights=True,
                  use_rslora=bool(args.use_rslora), fan_in_fan_out=plan.fan_in_fan_out, lora_dropout=0.0,
                  bias="none", task_type=plan.task_type, base_model_name_or_path=residual_path)
    try:
        from peft import LoraConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LoraConfig(**kwargs).to_dict()
        cfg["inference_mode"] = True  # as peft's save_pretrained writes it
        for k, v in list(cfg.items()):
            if isinstance(v, set):
                cfg[k] = sorted(v)
            elif hasattr(v, "value"):  # enums
                cfg[k] = v.value
        return cfg
    except ImportError:
        return dict(kwargs, peft_type="LORA", inference_mode=True, rank_pattern={}, alpha_pattern={},
                    modules_to_save=None, layers_to_transform=None, layers_pattern=None, use_dora=False,
                    revision=None)


def _finalize(ckpt: Checkpoint, staging: str, out_dir: str, args, plan: TargetPlan) -> None:
    res_stage = os.path.join(staging, RESIDUAL)
    ad_stage = os.path.join(staging, ADAPTER)
    # residual_model: shards are there; add the index (unchanged: same names, shapes, dtypes) and the
    # config, tokenizer and other non-weight files.
    if ckpt.index_name:
        _copy_file(os.path.join(ckpt.root, ckpt.index_name), os.path.join(res_stage, ckpt.index_name))
    for name in sorted(os.listdir(ckpt.root)):
        path = os.path.join(ckpt.root, name)
        if name.startswith(".") or not os.path.isfile(path) or name.endswith(WEIGHT_EXTENSIONS) \
                or name.endswith(".index.json"):
            continue
        _copy_file(path, os.path.join(res_stage, name))
    # pissa_init: the factors of every shard, in model order, into one adapter file
    os.makedirs(ad_stage, exist_ok=True)
    tensors = {}
    for shard in ckpt.shards:
        part, _ = load_tensors(os.path.join(staging, "factors", shard))
        tensors.update(part)
    order = []
    for t in plan.targets:
        order += list(t.adapter_keys())
    missing = [k for k in order if k not in tensors]
    if missing:
        raise CheckpointError(f"internal error: factors missing for {missing[:3]}")
    from . import __version__

    meta = {"format": "pt", "pissa_fast_version": __version__, "pissa_fast_niter": str(args.niter),
            "pissa_fast_seed": str(args.seed), "pissa_fast_original_model": os.path.realpath(ckpt.root)}
    save_tensors(os.path.join(ad_stage, ADAPTER_WEIGHTS), {k: tensors[k] for k in order}, meta)
    residual_final = os.path.realpath(os.path.join(out_dir, RESIDUAL))
    _write_text(os.path.join(ad_stage, ADAPTER_CONFIG),
                json.dumps(_adapter_config(args, plan, residual_final), indent=2, sort_keys=True) + "\n")
    _write_text(os.path.join(staging, MOVING), "")
    _move_into_place(staging, out_dir)


def _move_into_place(staging: str, out_dir: str) -> None:
    """Rename the staged outputs to OUT_DIR/residual_model and OUT_DIR/pissa_init (replacing old ones,
    which --overwrite allowed), then drop the staging dir. Safe to rerun after an interruption."""
    for name in (RESIDUAL, ADAPTER):
        stage = os.path.join(staging, name)
        final = os.path.join(out_dir, name)
        old = os.path.join(out_dir, f".pissa_fast_old_{name}")
        if os.path.exists(stage):
            if os.path.exists(old):
                shutil.rmtree(old)
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(stage, final)
        if os.path.exists(old):
            shutil.rmtree(old)
    _fsync_dir(out_dir)
    shutil.rmtree(staging)


def run_init(args) -> int:
    try:
        return _run_init(args)
    except CheckpointError as e:
        print(f"pissa-fast init: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npissa-fast init: interrupted; finished shards are kept in {os.path.join(args.out_dir, STAGING)}: "
              f"rerun the same command to resume", file=sys.stderr)
        return 130


def _run_init(args) -> int:
    t_start = time.perf_counter()
    if args.r < 1:
        raise CheckpointError(f"--r must be >= 1, got {args.r}")
    if args.alpha is None:
        args.alpha = float(args.r)
    model_dir, out_dir = args.model_dir, args.out_dir
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory")
    if _inside(out_dir, model_dir) or _inside(model_dir, out_dir):
        raise CheckpointError(f"OUT_DIR {out_dir} and MODEL_DIR {model_dir} must not contain each other (the "
                              f"input directory is never written)")
    device = torch.device(args.device)
    if device.type == "cuda":
        from . import build_info

        if not torch.cuda.is_available():
            raise CheckpointError(f"--device {args.device}: CUDA is not available")
        if not build_info().startswith("cuda"):
            raise CheckpointError(f"--device {args.device}: pissa_fast was built without CUDA ({build_info()})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type != "cpu":
        raise CheckpointError(f"--device {args.device}: only cpu and cuda are supported")

    ckpt = open_checkpoint(model_dir)
    plan = plan_targets(ckpt, args.target_modules, args.r)
    for note in plan.notes:
        print(f"pissa-fast init: note: {note}", file=sys.stderr)
    scaling = args.alpha / (math.sqrt(args.r) if args.use_rslora else args.r)
    if scaling <= 0:
        raise CheckpointError(f"--alpha must be > 0, got {args.alpha}")
    budget = max(1, min(args.max_memory, max(st.data_bytes for st in ckpt.files.values())))
    args.max_memory = budget
    fingerprint = _fingerprint(args, ckpt, plan)
    staging, resumed, moving = _prepare_out_dir(out_dir, fingerprint, args.overwrite)

    plan_by_key = {t.key: t for t in plan.targets}
    sample = set()
    if args.report_error and args.error_samples > 0:
        n = len(plan.targets)
        k = min(n, args.error_samples)
        sample = {plan.targets[round(i * (n - 1) / max(1, k - 1))].key for i in range(k)}

    todo = [] if moving else [s for s in ckpt.shards if not (resumed and _shard_done(staging, s))]
    stats = _Stats(shards_skipped=len(ckpt.shards) - len(todo))
    if resumed:
        print(f"pissa-fast init: resuming an interrupted run ({stats.shards_skipped} of {len(ckpt.shards)} shards "
              f"already done)", file=sys.stderr)
    from tqdm.auto import tqdm

    total = sum(ckpt.files[s].data_bytes for s in todo)
    from .peft import progress_enabled

    with _sigterm_as_exit(), tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc="pissa-fast init", disable=not progress_enabled()) as bar:
        for shard in todo:
            bar.set_description(f"pissa-fast init {shard}")
            _process_shard(ckpt, shard, staging, plan_by_key, args, device, scaling, sample, stats, bar)
        if moving:
            _move_into_place(staging, out_dir)
        else:
            _finalize(ckpt, staging, out_dir, args, plan)

    elapsed = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines = [
        f"pissa-fast init: {len(plan.targets)} layers ({stats.layers} decomposed now"
        + (f", {len(plan.targets) - stats.layers} in {stats.shards_skipped} shards finished earlier" if resumed
           else "") + f") in {len(ckpt.shards)} shard(s)",
        f"  r={args.r} alpha={args.alpha:g} scaling={scaling:g}{' (rslora)' if args.use_rslora else ''} "
        f"niter={'exact' if args.niter is None else args.niter} device={device}",
        f"  time {elapsed:.1f} s (decomposition {stats.decompose_s:.1f} s)",
        f"  peak memory: {_gib(rss)} RSS (process), largest group of weights loaded {_gib(stats.max_group_bytes)}"
        f" (bound {_gib(budget)})"
        + (f", CUDA {_gib(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else ""),
    ]
    if stats.errors:
        lines.append(f"  error vs exact SVD on {len(stats.errors)} sampled layer(s) "
                     f"(l1 = mean |A-A*|,|B-B*| after sign alignment; rel_recon = |BA - W_r|/|W_r|; "
                     f"excess = |W - BA|/|W - W_r| - 1):")
        for name, e in stats.errors:
            lines.append(f"    {name}: l1 {e.l1:.3e}  rel_recon {e.rel_recon:.3e}  excess {e.excess:.3e}  "
                         f"sv_rel {e.sv_rel:.3e}")
    res, ad = os.path.join(out_dir, RESIDUAL), os.path.join(out_dir, ADAPTER)
    lines += [f"  wrote {res}/ ({len(ckpt.shards)} shard(s)) and {ad}/ (peft adapter, init_lora_weights=true)",
              f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({res!r}), {ad!r})"]
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------------
# convert-to-lora
# --------------------------------------------------------------------------------------------------

def add_arguments_convert_to_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--initial", required=True, help="the PiSSA adapter as initialized (OUT_DIR/pissa_init)")
    p.add_argument("--trained", required=True, help="the PiSSA adapter after training (peft save_pretrained)")
    p.add_argument("out_dir", help="output: a LoRA adapter of rank 2r for the original model")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the original model pissa-fast init read)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")


def _load_adapter(path: str, what: str):
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"--{what} {path}: no {ADAPTER_CONFIG} (not a peft adapter directory)")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"--{what} {path}: a {cfg.get('peft_type')} adapter, not LoRA")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        bins = [n for n in os.listdir(path) if n.endswith(".bin")]
        raise CheckpointError(f"--{what} {path}: no {ADAPTER_WEIGHTS}" + (f" (found {bins[0]}: save with "
                                                                          f"safe_serialization=True)" if bins else ""))
    tensors, meta = load_tensors(weights)
    return cfg, tensors, meta or {}


_LORA_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")


def run_convert_to_lora(args) -> int:
    try:
        return _run_convert(args)
    except CheckpointError as e:
        print(f"pissa-fast convert-to-lora: error: {e}", file=sys.stderr)
        return 2


def _run_convert(args) -> int:
    t0 = time.perf_counter()
    for src in (args.initial, args.trained):
        if _inside(args.out_dir, src) or _inside(src, args.out_dir):
            raise CheckpointError(f"out_dir {args.out_dir} must not be or contain {src} (inputs are never written)")
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise CheckpointError(f"{args.out_dir}: exists; pass --overwrite to replace it")
    cfg0, init, meta0 = _load_adapter(args.initial, "initial")
    cfg1, trained, _ = _load_adapter(args.trained, "trained")
    for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        a, b = cfg0.get(k), cfg1.get(k)
        if (a or None) != (b or None) and a != b:
            raise CheckpointError(f"mismatched adapters: {k} is {a!r} in --initial but {b!r} in --trained")
    if cfg1.get("use_dora") or any("lora_magnitude_vector" in k for k in trained):
        raise CheckpointError("--trained is a DoRA adapter; the PiSSA -> LoRA conversion needs plain LoRA")
    if cfg1.get("use_rslora") and (cfg1.get("rank_pattern") or cfg1.get("alpha_pattern")):
        raise CheckpointError("the conversion is not possible with use_rslora together with rank_pattern or "
                              "alpha_pattern (as in peft)")
    lora0 = {k for k in init if _LORA_KEY.match(k)}
    lora1 = {k for k in trained if _LORA_KEY.match(k)}
    if lora0 != lora1:
        only0, only1 = sorted(lora0 - lora1), sorted(lora1 - lora0)
        raise CheckpointError("mismatched adapters: different layers"
                              + (f"; only in --initial: {only0[:3]}" if only0 else "")
                              + (f"; only in --trained: {only1[:3]}" if only1 else ""))
    if not lora1:
        raise CheckpointError(f"--trained {args.trained}: no lora_A/lora_B weights")
    out = {}
    for k, v in trained.items():
        m = _LORA_KEY.match(k)
        if not m:
            out[k] = v  # e.g. modules_to_save: independent of the base weights
            continue
        v0 = init[k]
        if v0.shape != v.shape:
            raise CheckpointError(f"mismatched shapes for {k}: {list(v0.shape)} in --initial, {list(v.shape)} in "
                                  f"--trained")
        dtype = torch.promote_types(v.dtype, v0.dtype)
        if m.group(2) == "A":
            out[k] = torch.cat([v.to(dtype), v0.to(dtype)], dim=0)
        else:
            out[k] = torch.cat([v.to(dtype), -v0.to(dtype)], dim=1)
    cfg = dict(cfg1)
    cfg["init_lora_weights"] = True
    cfg["r"] = 2 * cfg1["r"]
    cfg["lora_alpha"] = cfg1["lora_alpha"] * (2 ** 0.5 if cfg1.get("use_rslora") else 2)
    if cfg1.get("rank_pattern"):
        cfg["rank_pattern"] = {k: 2 * v for k, v in cfg1["rank_pattern"].items()}
    if cfg1.get("alpha_pattern"):
        cfg["alpha_pattern"] = {k: 2 * v for k, v in cfg1["alpha_pattern"].items()}
    base = args.base_model or meta0.get("pissa_fast_original_model")
    if base:
        cfg["base_model_name_or_path"] = base
    cfg["inference_mode"] = True

    out_dir = os.path.abspath(args.out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(out_dir)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        save_tensors(os.path.join(tmp, ADAPTER_WEIGHTS), out, {"format": "pt"})
        _write_text(os.path.join(tmp, ADAPTER_CONFIG), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        old = os.path.join(parent, f".{os.path.basename(out_dir)}.old.{os.getpid()}")
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if os.path.exists(old):
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(1 for k in out if _LORA_KEY.match(k)) // 2
    print(f"pissa-fast convert-to-lora: {n} layers, rank {cfg1['r']} -> {cfg['r']}, lora_alpha {cfg1['lora_alpha']:g} "
          f"-> {cfg['lora_alpha']:g}, in {time.perf_counter() - t0:.1f} s\n  wrote {out_dir}/ (a LoRA adapter for "
          f"{cfg.get('base_model_name_or_path') or 'the original model'})")
    return 0


def main(argv=None) -> int:
    """`python -m pissa_fast.checkpoint {init,convert-to-lora} ...` (the same as `pissa-fast ...`)."""
    parser = argparse.ArgumentParser(prog="pissa_fast.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="PiSSA-initialize a transformers checkpoint, streaming its shards")
    add_arguments_init(p)
    p.set_defaults(_run=run_init)
    p = sub.add_parser("convert-to-lora", help="turn a trained PiSSA adapter into a LoRA for the base model")
    add_arguments_convert_to_lora(p)
    p.set_defaults(_run=run_convert_to_lora)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
