"""The one entry pissa_fast.core.decompose_many calls: does this call hold sharded weights, and if so,
decompose them the distributed way. Cheap for ordinary calls (no torch.distributed.tensor import)."""
from __future__ import annotations

from collections.abc import Mapping

from .shards import is_sharded


def wants(weights) -> bool:
    """True when any weight is a DTensor or a DeepSpeed ZeRO-3 parameter."""
    values = weights.values() if isinstance(weights, Mapping) else weights
    try:
        return any(is_sharded(w) for w in values)
    except TypeError:  # not iterable: core's own check names the problem
        return False


def decompose_many(weights, r, niter, **kwargs):
    from .sharded import decompose_sharded

    return decompose_sharded(weights, r, niter, **kwargs)
