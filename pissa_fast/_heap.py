"""One release of the C heap per batch of decompositions instead of one per weight.

Each pissa_factors call hands its freed pages back to the system when it ends (csrc/small_dense.h,
ReleaseFreeHeap), which keeps a big weight's temporaries from piling up as resident holes. Over a
batch of weights that costs the next weight a page fault for every page it touches again: 8-10 % of
decomposing a TinyLlama layer (benchmarks/RESULTS.md). Inside `one_release()` the releases wait for the
end of the outermost block, so the batch reuses its own pages and still returns them when done.
"""
from __future__ import annotations

import contextlib

from ._ops import ops


@contextlib.contextmanager
def one_release():
    ops._defer_heap_release(1)
    try:
        yield
    finally:
        ops._defer_heap_release(0)
