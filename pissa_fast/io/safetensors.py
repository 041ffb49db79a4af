"""safetensors files, streamed: headers and tensors through the safetensors library, byte offsets
for disk-to-disk copies, and ShardWriter, which writes a shard without holding it in memory.

Reading goes through `safetensors.safe_open`: it validates the header (offsets inside the file,
contiguous, sizes matching dtypes and shapes) and loads one tensor at a time. The library does not
expose byte offsets, which the raw-copy path needs, so `read_header` also parses the JSON header
itself (8-byte length + JSON, the format's whole definition) after safe_open has accepted the file.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import sys
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..options import SAFETENSORS_CODE, SAFETENSORS_DTYPES
from .staging import fsync_dir, tmp_name

COPY_CHUNK = 16 << 20  # bounce buffer of the fallback copy, where copy_file_range is unavailable
KERNEL_STEP = 256 << 20  # bytes per copy_file_range call: a cancelled run stops within one step


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    path: str
    tensors: dict  # name -> TensorInfo, in file (offset) order
    metadata: dict | None
    size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _explain(path: str, err: Exception) -> CheckpointError:
    text = str(err)
    if "incomplete metadata" in text or "too small" in text or "not fully covered" in text:
        return CheckpointError(f"{path}: truncated safetensors file (incomplete download or copy?): {text}")
    return CheckpointError(f"{path}: corrupt safetensors header: {text}")


def read_header(path: str) -> ShardHeader:
    """Validate a safetensors file with safe_open and return its tensors' names, dtypes, shapes and
    absolute byte ranges (data not read). Raises CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        size = os.path.getsize(path)
        with safe_open(path, framework="pt") as f:
            names = list(f.offset_keys())
            metadata = f.metadata()
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except SafetensorError as e:
        raise _explain(path, e) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    start = 8 + n
    tensors = {}
    for name in names:
        entry = header[name]
        b, e = (int(x) for x in entry["data_offsets"])
        tensors[name] = TensorInfo(name, entry["dtype"], tuple(int(s) for s in entry["shape"]), start + b, start + e)
    return ShardHeader(path, tensors, metadata, size)


def load_tensor(handle, name: str) -> torch.Tensor:
    """One tensor, read into memory it owns (writable). Every bulk read of a weight goes through here."""
    try:
        return handle.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types (dtype unknown to this torch, I/O)
        raise CheckpointError(f"cannot load tensor {name!r}: {e}") from None


def read_rows(path: str, name: str, rows) -> torch.Tensor:
    """The given rows (dim 0) of one tensor, read without loading the rest of it."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        sl = f.get_slice(name)
        return torch.cat([sl[int(i):int(i) + 1] for i in rows])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor as stored (C order, native = little-endian byte order)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def copy_range(src_fd: int, dst_fd: int, count: int, src_off: int, dst_off: int, cancel=None) -> None:
    """Copy bytes between files inside the kernel (copy_file_range: no user-space buffer; the GIL is
    released), falling back to a bounded pread/pwrite loop where the kernel or filesystem says no.
    `cancel` (a threading.Event) is checked between steps of at most KERNEL_STEP bytes."""
    use_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        if cancel is not None and cancel.is_set():
            raise InterruptedError("copy cancelled")
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, KERNEL_STEP), src_off, dst_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel = False
                continue
        else:
            chunk = os.pread(src_fd, min(count, COPY_CHUNK), src_off)
            _pwrite_all(dst_fd, memoryview(chunk), dst_off)
            n = len(chunk)
        if n == 0:
            raise CheckpointError(f"unexpected end of file while copying {count} more bytes at offset {src_off}")
        count, src_off, dst_off = count - n, src_off + n, dst_off + n


class ShardWriter:
    """Writes one .safetensors file whose header is known up front and whose tensors arrive in any
    order: each is written at its own offset (pwrite) or copied disk to disk from an input file.

    Why not safetensors' own `save_file`: it takes a dict of every tensor of the file, in memory at
    once. A shard of a large model is 5-10 GB; here only a bounded group of weights is in memory,
    the tensors that do not change go from the input file to this one inside the kernel, and the
    residuals are written as the pipeline finishes them, in whatever order. The files are plain
    safetensors (the header padded to 8 bytes as the library does); tests read them back with it.

    The file is written under a temporary name; commit() checks that every tensor was written,
    fsyncs and renames it to its final name; abort() (or leaving a `with` block by an exception)
    removes it.
    """

    def __init__(self, path: str, layout: list[tuple[str, str, tuple]], metadata: dict | None = None):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors files are little-endian; this machine is big-endian")
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        regions = {}
        for name, code, shape in layout:
            if code not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unknown safetensors dtype {code!r}")
            nbytes = SAFETENSORS_DTYPES[code][1]
            for s in shape:
                nbytes *= int(s)
            header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [off, off + nbytes]}
            regions[name] = (off, nbytes)
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        self.path, self.tmp = path, tmp_name(path)
        self.regions = {k: (start + o, n) for k, (o, n) in regions.items()}
        self.size = start + off
        self._pending = set(self.regions)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.abort()
            raise

    def _take(self, name: str, nbytes: int) -> int:
        if name not in self.regions:
            raise RuntimeError(f"ShardWriter({self.path}): no tensor {name!r} in this file")
        off, want = self.regions[name]
        if nbytes != want:
            raise RuntimeError(f"ShardWriter({self.path}): {name!r} has {nbytes} bytes, its header says {want}")
        self._pending.discard(name)
        return off

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        off = self._take(name, data.nbytes)
        _pwrite_all(self._fd, data, off)

    def copy(self, src_fd: int, infos: list[TensorInfo], cancel=None) -> None:
        """Tensors straight from an input file (same names, dtypes and shapes), adjacent there and
        here, as one disk-to-disk copy."""
        if not infos:
            return
        off = self._take(infos[0].name, infos[0].nbytes)
        for prev, info in zip(infos, infos[1:]):
            if info.begin != prev.end or self.regions[info.name][0] != self.regions[prev.name][0] + prev.nbytes:
                raise RuntimeError(f"ShardWriter({self.path}): {prev.name!r} and {info.name!r} are not adjacent")
            self._take(info.name, info.nbytes)
        copy_range(src_fd, self._fd, infos[-1].end - infos[0].begin, infos[0].begin, off, cancel)

    def flush(self) -> None:
        """Start writing what is written so far to disk (fdatasync), so commit's fsync has less left:
        the pipeline calls it while the next group decomposes."""
        os.fdatasync(self._fd)

    def commit(self) -> None:
        if self._pending:
            raise RuntimeError(f"ShardWriter({self.path}): {len(self._pending)} tensor(s) never written, e.g. "
                               f"{sorted(self._pending)[0]!r}")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def save_small(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write a file of small tensors (an adapter, a shard's factors) atomically, through ShardWriter, so
    the same tensors and metadata give the same bytes in every process: safetensors' own save_file
    writes the metadata in the order of a hash map that changes from process to process (then the
    adapter of a torchrun run would differ from one process's in its header alone). Tensors of dtypes
    safetensors cannot store are refused by name."""
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_CODE:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {t.dtype} in safetensors")
    layout = [(str(name), SAFETENSORS_CODE[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, layout, metadata) as writer:
        for name, t in tensors.items():
            writer.write(str(name), t)
        writer.commit()


def load_small(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a small safetensors file, validated by safe_open."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.offset_keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise _explain(path, e) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
