"""Writing in place into weights that live in private file mappings.

`transformers.from_pretrained`, `safetensors.torch.load_file` and `safe_open` leave tensors as
copy-on-write (MAP_PRIVATE) mappings of the checkpoint file. The first write to each 4 KiB page then
takes a page fault that copies the page out of the page cache; writing a residual in place pays
that fault once per page, interleaved with the arithmetic, and on a loaded machine each fault costs
tens of microseconds (benchmarks/RESULTS.md, "peft backend"). `madvise(MADV_POPULATE_WRITE)`
(Linux >= 5.14) breaks copy-on-write for a whole range in one system call, so the passes and the
residual then run on ordinary anonymous pages. The values do not change, and the file is never
written (private mapping). Anonymous memory, read-only memory and other platforms are left alone;
PISSA_FAST_POPULATE=0 turns this off (to measure what it saves).

Also refuses, before anything is written, weights that lie in a read-only mapping: writing the
residual there would crash the process.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import sys

import torch

MADV_POPULATE_WRITE = 23  # <linux/mman.h>, since 5.14
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIN_BYTES = 1 << 20  # below this the page faults cost less than reading /proc/self/maps
_state = {"libc": None, "unsupported": not sys.platform.startswith("linux"), "covered": []}


def _mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of this process, sorted by start."""
    out = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, _, hi = parts[0].partition(b"-")
            path = parts[5].strip().decode(errors="replace") if len(parts) > 5 else ""
            out.append((int(lo, 16), int(hi, 16), parts[1].decode(), path))
    return out


def span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) that t's elements occupy."""
    size = t.element_size()
    lo = t.data_ptr() - size * sum((n - 1) * -s for n, s in zip(t.shape, t.stride()) if s < 0)
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
    return lo, lo + extent * size


def _madvise(lo: int, hi: int, advice: int) -> bool:
    if _state["libc"] is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _state["libc"] = libc
    start = lo - lo % _PAGE
    if _state["libc"].madvise(start, hi - start, advice) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):  # kernel < 5.14: fall back to faulting
        _state["unsupported"] = True
    return False


def prepare_inplace(tensors, names=None) -> int:
    """Make the CPU tensors about to be written in place cheap to write: populate, writable, the
    parts that lie in private file mappings (one madvise per tensor). Raises ValueError for a tensor
    in a read-only mapping. Returns the number of bytes populated."""
    cpu = [(i, t) for i, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > 0]
    if _state["covered"]:  # already handled by an enclosing prepared() block
        covered = sorted(_state["covered"])
        starts = [lo for lo, _ in covered]

        def inside(t):
            a, b = span(t)
            k = bisect.bisect_right(starts, a) - 1
            return k >= 0 and b <= covered[k][1]

        cpu = [(i, t) for i, t in cpu if not inside(t)]
    if os.environ.get("PISSA_FAST_POPULATE", "1").strip().lower() in ("0", "false", "no", "off"):
        cpu = []  # diagnostic switch: measure the per-page faults this avoids (benchmarks/bench_peft.py)
    if not cpu or _state["unsupported"] or sum(t.numel() * t.element_size() for _, t in cpu) < _MIN_BYTES:
        return 0
    try:
        maps = _mappings()
    except OSError:
        return 0
    starts = [m[0] for m in maps]
    populated = 0
    for i, t in cpu:
        lo, hi = span(t)
        k = bisect.bisect_right(starts, lo) - 1
        while 0 <= k < len(maps) and maps[k][0] < hi:
            start, end, perms, path = maps[k]
            k += 1
            if end <= lo:
                continue
            if "w" not in perms:
                name = names[i] if names is not None else f"weights[{i}]"
                raise ValueError(f"inplace=True: {name} lies in read-only memory ({path or 'anonymous'}, "
                                 f"{perms}); pass a writable copy")
            if perms.endswith("p") and path and not path.startswith("["):
                a, b = max(lo, start), min(hi, end)
                if not _state["unsupported"] and _madvise(a, b, MADV_POPULATE_WRITE):
                    populated += b - a
    return populated


@contextlib.contextmanager
def prepared(tensors, names=None):
    """prepare_inplace(tensors) once, for a caller about to decompose them in several calls: inside
    the block, prepare_inplace skips them (one read of /proc/self/maps instead of one per call)."""
    prepare_inplace(tensors, names)
    spans = [span(t) for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    _state["covered"] = _state["covered"] + spans
    try:
        yield
    finally:
        _state["covered"] = _state["covered"][:len(_state["covered"]) - len(spans)]
