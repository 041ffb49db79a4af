"""pissa_fast.memory: weights that are private file mappings (safetensors loads) are populated before an
in-place decomposition; read-only mappings are refused before anything is written."""
import hashlib
import mmap
import sys
import threading
import warnings

import pytest
import torch

import pissa_fast
from pissa_fast import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise")


@pytest.fixture
def checkpoint(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(512, 1024, generator=gen).to(torch.bfloat16),
               "small": torch.randn(8, 8, generator=gen)}, path)
    return path


def _kernel_has_populate_write():
    w = torch.empty(1 << 20, dtype=torch.uint8)
    return memory._madvise(w.data_ptr(), w.data_ptr() + w.numel(), memory.MADV_POPULATE_WRITE)


def test_file_backed_weight_is_populated_and_decomposed_in_place(checkpoint):
    from safetensors.torch import load_file

    if not _kernel_has_populate_write():
        pytest.skip("kernel without MADV_POPULATE_WRITE (< 5.14)")
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    w = load_file(checkpoint)["w"]
    original = w.clone()
    assert memory.start_populate([w]).wait() == w.numel() * 2  # the whole weight sits in the file mapping
    assert torch.equal(w, original)  # populating changes no value
    out = pissa_fast.decompose(w, 8, 2, inplace=True)
    assert out.residual.data_ptr() == w.data_ptr()
    torch.testing.assert_close((w.float() + out.B @ out.A), original.float(), rtol=0, atol=0.05)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before  # a private mapping: the file is intact


def test_anonymous_small_and_switched_off_are_left_alone(checkpoint, monkeypatch):
    from safetensors.torch import load_file

    assert memory.start_populate([torch.randn(512, 1024)]).wait() == 0  # anonymous memory
    loaded = load_file(checkpoint)
    assert memory.start_populate([loaded["small"]]).wait() == 0  # under 1 MiB: not worth reading /proc/self/maps
    monkeypatch.setenv("PISSA_FAST_POPULATE", "0")
    assert memory.start_populate([loaded["w"]]).wait() == 0


def test_read_only_mapping_is_refused_before_any_write(tmp_path):
    path = tmp_path / "ro.bin"
    values = torch.randn(1024, 512)
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        w = torch.frombuffer(mm, dtype=torch.float32).view(1024, 512)
    with pytest.raises(ValueError, match=r"weights\['ro'\] lies in read-only memory"):
        pissa_fast.decompose_many({"ro": w}, 4, 1, inplace=True)
    assert torch.equal(w, values)
    out = pissa_fast.decompose(w, 4, 1)  # out of place is fine
    assert out.residual.data_ptr() != w.data_ptr()
    del w


def _anonymous_bytes(lo, hi):
    """Bytes of anonymous (copy-on-write broken) pages in the mappings that overlap [lo, hi)."""
    total, hit = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                hit = a < hi and lo < b
            elif hit and line.startswith("Anonymous:"):
                total += int(line.split()[1]) * 1024
    return total


def test_early_populate_does_the_work_and_decompose_many_waits_for_it(checkpoint, monkeypatch):
    """EarlyPopulate (the peft backend names each weight during peft's injection) breaks copy-on-write
    on a background thread; inside prepared(..., early) decompose_many populates nothing itself and
    waits for that thread before writing."""
    from safetensors.torch import load_file

    if not _kernel_has_populate_write():
        pytest.skip("kernel without MADV_POPULATE_WRITE (< 5.14)")
    w = load_file(checkpoint)["w"]
    original = w.clone()
    lo, hi = memory.span(w)
    assert _anonymous_bytes(lo, hi) < w.numel() * 2  # still the file's pages
    callers, real = [], memory._madvise
    monkeypatch.setattr(memory, "_madvise", lambda *a: callers.append(threading.current_thread().name) or real(*a))
    early = memory.EarlyPopulate()
    early.add(w)
    early.add(torch.randn(256, 512))  # anonymous: nothing to do
    with memory.prepared([w], ["w"], early):
        out = pissa_fast.decompose(w, 8, 2, inplace=True)
    assert callers and set(callers) == {"pissa_fast early populate"}
    assert _anonymous_bytes(lo, hi) >= w.numel() * 2
    torch.testing.assert_close((w.float() + out.B @ out.A), original.float(), rtol=0, atol=0.05)


def test_early_populate_leaves_read_only_weights_to_the_check(tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(torch.randn(1024, 512).numpy().tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        w = torch.frombuffer(mm, dtype=torch.float32).view(1024, 512)
    early = memory.EarlyPopulate()
    early.add(w)  # skipped there: writing it would crash
    with pytest.raises(ValueError, match="ro lies in read-only memory"):
        with memory.prepared([w], ["ro"], early):
            pass
    del w
