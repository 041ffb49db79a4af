"""Writing in place into weights that live in private file mappings.

`transformers.from_pretrained`, `safetensors.torch.load_file` and `safe_open` leave tensors as
copy-on-write (MAP_PRIVATE) mappings of the checkpoint file. The first write to each 4 KiB page then
takes a page fault that copies the page out of the page cache; writing a residual in place pays
that fault once per page, interleaved with the arithmetic, and on a loaded machine each fault costs
tens of microseconds (benchmarks/RESULTS.md, "peft backend"). `madvise(MADV_POPULATE_WRITE)`
(Linux >= 5.14) breaks copy-on-write for a whole range in one system call, so the residual is then
written into ordinary anonymous pages. The values do not change, and the file is never written
(private mapping). It costs about as much as faulting fresh memory (0.25 s for the 672 MiB of an
8-layer TinyLlama's projections here), so it runs on a background thread beside other work:
decompose_many starts it before computing the factors, which only read the weights, and waits for it
before writing the first residual; the peft backend starts it for each targeted weight as soon as
peft's injection names it (EarlyPopulate), behind peft's own single-threaded Python work. Anonymous
memory, read-only memory and other platforms are left alone; PISSA_FAST_POPULATE=0 turns this off (to
measure what it saves).

Also refuses, before anything is written, weights that lie in a read-only mapping: writing the
residual there would crash the process.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import queue
import sys
import threading

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


class Populating:
    """MADV_POPULATE_WRITE over byte ranges on a background thread (the factor phase of a
    decomposition only reads the weights, so the copy-on-write breaks can run beside it and need to be
    done only before the first residual is written). ctypes drops the GIL for each madvise call.
    wait() returns the bytes populated, once every range (and every covering block's) is done."""

    def __init__(self, ranges, after=()):
        self._ranges, self._after, self._bytes = list(ranges), list(after), 0
        self._thread = None
        if self._ranges:
            self._thread = threading.Thread(target=self._run, name="pissa_fast populate", daemon=True)
            self._thread.start()

    def _run(self):
        for a, b in self._ranges:
            if not _state["unsupported"] and _madvise(a, b, MADV_POPULATE_WRITE):
                self._bytes += b - a

    def wait(self) -> int:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for other in self._after:
            other.wait()
        return self._bytes


def _switched_off() -> bool:
    # diagnostic switch: measure the per-page faults this avoids (benchmarks/bench_peft.py)
    return os.environ.get("PISSA_FAST_POPULATE", "1").strip().lower() in ("0", "false", "no", "off")


def _file_ranges(tensors, names):
    """The parts of the CPU tensors that lie in private file mappings, as byte ranges, and the covering
    Populating blocks (prepared()) of those already handled. Raises ValueError for a tensor in a
    read-only mapping."""
    cpu = [(i, t) for i, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > 0]
    after = []
    if _state["covered"]:  # already handled by an enclosing prepared() block
        covered = sorted(_state["covered"], key=lambda c: c[0])
        starts = [lo for lo, _, _ in covered]

        def cover(t):
            a, b = span(t)
            k = bisect.bisect_right(starts, a) - 1
            return covered[k][2] if k >= 0 and b <= covered[k][1] else None

        rest = []
        for i, t in cpu:
            c = cover(t)
            if c is None:
                rest.append((i, t))
            elif all(c is not x for x in after):
                after.append(c)
        cpu = rest
    if _switched_off():
        cpu = []
    if not cpu or _state["unsupported"] or sum(t.numel() * t.element_size() for _, t in cpu) < _MIN_BYTES:
        return [], after
    try:
        maps = _mappings()
    except OSError:
        return [], after
    starts = [m[0] for m in maps]
    ranges = []
    for i, t in cpu:
        for a, b, perms, path in _overlaps(maps, starts, *span(t)):
            if "w" not in perms:
                name = names[i] if names is not None else f"weights[{i}]"
                raise ValueError(f"inplace=True: {name} lies in read-only memory ({path or 'anonymous'}, "
                                 f"{perms}); pass a writable copy")
            if _private_file(perms, path):
                ranges.append((a, b))
    return ranges, after


def _overlaps(maps, starts, lo, hi):
    """The mappings that overlap [lo, hi), clipped to it: [(a, b, perms, path)] in address order
    (maps as _mappings() reads them, starts their start addresses)."""
    out = []
    k = bisect.bisect_right(starts, lo) - 1
    while 0 <= k < len(maps) and maps[k][0] < hi:
        start, end, perms, path = maps[k]
        k += 1
        if end > lo:
            out.append((max(lo, start), min(hi, end), perms, path))
    return out


def _private_file(perms: str, path: str) -> bool:
    """A copy-on-write mapping of a file: not anonymous memory, the heap, the stack or another
    [special] region."""
    return perms.endswith("p") and bool(path) and not path.startswith("[")


def start_populate(tensors, names=None) -> Populating:
    """Check the CPU tensors about to be written in place (ValueError for a read-only mapping, before
    anything is written) and start populating, writable, the parts in private file mappings on a
    background thread; call .wait() on the result before writing them."""
    ranges, after = _file_ranges(tensors, names)
    return Populating(ranges, after=after)


class EarlyPopulate:
    """Populates weights on a background thread as they are named, long before their decomposition:
    the peft backend names each targeted layer's weight during peft's injection, whose Python work
    leaves the second core idle. prepared(..., early=this) then only checks the weights (read-only
    mappings fail there, before anything is written), and decompose_many waits for this thread just
    before its first residual, so what is left of the work also runs beside the factor phase."""

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._thread = None

    def add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.numel() == 0 or _switched_off() or _state["unsupported"]:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pissa_fast early populate", daemon=True)
            self._thread.start()
        self._queue.put(span(t))

    def _run(self):
        maps, starts = [], []
        while (item := self._queue.get()) is not None:
            lo, hi = item
            try:
                parts = _cover(maps, starts, lo, hi)
                if parts is None:  # a mapping made after the last read (or the first read)
                    maps = _mappings()
                    starts = [m[0] for m in maps]
                    parts = _cover(maps, starts, lo, hi)
            except OSError:
                parts = None
            # read-only parts are left to prepared()'s check, which raises before anything is written
            for a, b, perms, path in parts if parts is not None and all("w" in x[2] for x in parts) else ():
                if _private_file(perms, path) and not _state["unsupported"]:
                    _madvise(a, b, MADV_POPULATE_WRITE)

    def wait(self) -> None:
        """Wait for everything named so far (the thread ends; a later add starts another)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def _cover(maps, starts, lo, hi):
    """_overlaps(maps, starts, lo, hi) where they make up all of [lo, hi), else None (a hole)."""
    parts, at = _overlaps(maps, starts, lo, hi), lo
    for a, b, _, _ in parts:
        if a > at:
            return None
        at = b
    return parts if at >= hi else None


@contextlib.contextmanager
def prepared(tensors, names=None, early: EarlyPopulate | None = None):
    """Check the tensors and start populating them once, for a caller about to decompose them in
    several calls: inside the block, start_populate waits for this population instead of doing its
    own (one read of /proc/self/maps instead of one per call). With `early`, which has every one of
    them queued, the tensors are only checked and that population is the one waited for."""
    if early is None:
        handle = start_populate(tensors, names)
    else:
        _file_ranges(tensors, names)  # the read-only check
        handle = early
    spans = [span(t) + (handle,) for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    _state["covered"] = _state["covered"] + spans
    try:
        yield
    finally:
        _state["covered"] = _state["covered"][:len(_state["covered"]) - len(spans)]
        handle.wait()
