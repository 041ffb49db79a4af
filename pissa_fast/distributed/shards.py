"""What this rank holds of each weight of a sharded decompose_many call, validated before anything moves.

A weight is one of
- a DTensor (FSDP2 `fully_shard`, tensor parallel, or both): its local tensor is the block
  rows [r0, r1) x cols [c0, c1) of the full (m, n) matrix (a `Rect`);
- a DeepSpeed ZeRO-3 partitioned parameter: its `ds_tensor` holds the row-major flat range [s, e) of
  the full matrix (a `Flat`), padded on the last rank;
- a plain tensor passed alongside them: this rank's own weight, decomposed by this rank alone.
The validation rules are those of pissa_fast.core.decompose_many, applied to the full (global) shape.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..options import WEIGHT_DTYPES

DTENSOR, ZERO3, LOCAL = "dtensor", "zero3", "local"


@dataclass(frozen=True)
class Rect:
    """Rows [r0, r1) x cols [c0, c1) of the full matrix."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


@dataclass(frozen=True)
class Flat:
    """Elements [s, e) of the full matrix flattened row-major (a ZeRO-3 partition)."""

    s: int
    e: int

    @property
    def numel(self) -> int:
        return self.e - self.s


@dataclass
class WeightShard:
    """One weight as this rank sees it."""

    key: Any
    name: str                      # for messages: weights['q'] or weight
    kind: str                      # DTENSOR, ZERO3 or LOCAL
    tensor: torch.Tensor           # what the caller passed (returned as the residual when in place)
    shape: tuple[int, int]         # full (m, n)
    dtype: torch.dtype
    colmajor: bool                 # the full weight is laid out transposed (a DTensor .t() view)
    local: torch.Tensor | None     # this rank's data: a 2-D block (Rect), 1-D range (Flat), or the weight
    piece: Rect | Flat | None      # which part of the full matrix `local` holds (None: nothing)
    device: torch.device           # where this rank's data lives

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def signature(self) -> tuple:
        """What every rank must agree on for a sharded weight."""
        return (repr(self.key), self.kind, self.shape, str(self.dtype), self.colmajor)


def is_dtensor(w) -> bool:
    # A DTensor can only exist once its module is imported: no import (and its cost) here.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(w, mod.DTensor)


def is_zero3(w) -> bool:
    """A DeepSpeed ZeRO-3 parameter (deepspeed.zero.Init or a ZeRO-3 engine made it): it carries ds_*."""
    return isinstance(w, torch.Tensor) and hasattr(w, "ds_id") and hasattr(w, "ds_tensor") and hasattr(w, "ds_shape")


def is_sharded(w) -> bool:
    """Whether decompose_many takes the sharded path for this weight."""
    return is_dtensor(w) or is_zero3(w)


def full_shape(w) -> tuple[int, ...]:
    """The shape of the whole weight: a ZeRO-3 parameter's own .shape is (0,) while partitioned."""
    return tuple(w.ds_shape) if is_zero3(w) else tuple(w.shape)


def local_tensor(w) -> torch.Tensor:
    """This rank's own storage of a weight: a DTensor's local shard, a ZeRO-3 partition, or w itself
    (e.g. to tell tied weights apart by storage)."""
    if is_dtensor(w):
        return w.to_local()
    if is_zero3(w):
        return w.ds_tensor
    return w


def _check_common(name, shape, dtype, device, r):
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (out_features x in_features), got shape {shape}")
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {dtype}")
    if shape[0] * shape[1] == 0:
        raise ValueError(f"{name} is empty, shape {shape}")
    if device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no data to decompose)")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= min(shape):
        raise ValueError(f"r must be in [1, min(m, n) = {min(shape)}] for {name} of shape {shape}, got {r}")


def _check_grad(name, w):
    if w.requires_grad and w.is_leaf:
        raise ValueError(f"inplace=True on {name}, a leaf tensor that requires grad; pass weight.data (or "
                         f"weight.detach()) to update the parameter in place")
    if w.requires_grad:
        raise ValueError(f"inplace=True on {name}, which requires grad: autograd cannot see this update; "
                         f"pass weight.detach()")


def _layout(name, shape, stride) -> bool:
    """True when the full weight is laid out column-major (a transposed view), False for row-major."""
    m, n = shape
    if (n == 1 or stride[1] == 1) and (m == 1 or stride[0] == n):
        return False
    if (m == 1 or stride[0] == 1) and (n == 1 or stride[1] == m):
        return True
    raise ValueError(f"{name} has strides {tuple(stride)} for shape {shape}; a sharded weight must be laid "
                     f"out row-major or transposed (pass the parameter, or its .t())")


def _describe_dtensor(key, name, w, r, inplace) -> WeightShard:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    shape, local = tuple(w.shape), w.to_local()
    _check_common(name, shape, w.dtype, local.device, r)
    for p in w.placements:
        if not isinstance(p, (Shard, _StridedShard, Replicate)):
            raise ValueError(f"{name} has placement {p} on its device mesh; only Shard, Replicate (and FSDP2's "
                             f"strided sharding) hold the weight's values: redistribute it first")
    if inplace:
        _check_grad(name, w)
    colmajor = _layout(name, shape, w.stride())
    local_shape, offset = compute_local_shape_and_global_offset(shape, w.device_mesh, w.placements)
    if len(offset) == 0 or 0 in local_shape:  # this rank is outside the mesh, or its shard is empty
        return WeightShard(key, name, DTENSOR, w, shape, w.dtype, colmajor, None, None, local.device)
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(f"{name}: this rank's shard has shape {tuple(local.shape)}, but its placements "
                         f"{tuple(w.placements)} give {tuple(local_shape)} (a padded or hand-made local tensor?)")
    piece = Rect(offset[0], offset[0] + local_shape[0], offset[1], offset[1] + local_shape[1])
    return WeightShard(key, name, DTENSOR, w, shape, w.dtype, colmajor, local, piece, local.device)


def _describe_zero3(key, name, w, r, inplace) -> WeightShard:
    shape = tuple(w.ds_shape)
    part = w.ds_tensor
    _check_common(name, shape, w.dtype, part.device if part is not None else w.device, r)
    if not inplace:
        raise ValueError(f"{name} is a ZeRO-3 partitioned parameter: it is decomposed in place only "
                         f"(inplace=True), each rank writing the residual into its own partition")
    status = getattr(getattr(w, "ds_status", None), "name", str(getattr(w, "ds_status", None)))
    if status != "NOT_AVAILABLE" or part is None:
        raise ValueError(f"{name} is a ZeRO-3 parameter in state {status}; decompose it while it is partitioned "
                         f"(outside GatheredParameters and forward), before deepspeed.initialize")
    if getattr(w, "ds_secondary_tensor", None) is not None or hasattr(part, "ds_quant_scale"):
        raise ValueError(f"{name} has a ZeRO++ secondary or quantized partition, which pissa_fast does not "
                         f"update; decompose it before deepspeed.initialize, without zero_hpz / quantized weights")
    if "nvme" in str(getattr(part, "final_location", "")).lower():
        raise ValueError(f"{name}'s ZeRO-3 partition is offloaded to NVMe; PiSSA needs it in memory")
    group = w.ds_process_group
    size = int(getattr(part, "ds_numel", part.numel()))
    numel = shape[0] * shape[1]
    start = dist.get_rank(group) * size
    end = min(start + size, numel)
    if end <= start:
        return WeightShard(key, name, ZERO3, w, shape, w.dtype, False, None, None, part.device)
    return WeightShard(key, name, ZERO3, w, shape, w.dtype, False, part.narrow(0, 0, end - start),
                       Flat(start, end), part.device)


def _describe_local(key, name, w, r, inplace) -> WeightShard:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    shape = tuple(w.shape)
    _check_common(name, shape, w.dtype, w.device, r)
    if inplace:
        _check_grad(name, w)
        if torch._debug_has_internal_overlap(w) == 1:
            raise ValueError(f"inplace=True on {name}, whose elements overlap in memory (strides {w.stride()}); "
                             f"pass a tensor with its own storage")
    m, n = shape
    return WeightShard(key, name, LOCAL, w, shape, w.dtype, False, w.detach(), Rect(0, m, 0, n), w.device)


def describe(key, name: str, w, r, inplace: bool) -> WeightShard:
    """Validate one weight and say what this rank holds of it; raises ValueError / TypeError."""
    if is_dtensor(w):
        return _describe_dtensor(key, name, w, r, inplace)
    if is_zero3(w):
        return _describe_zero3(key, name, w, r, inplace)
    return _describe_local(key, name, w, r, inplace)


def check_disjoint(shards: list[WeightShard]) -> None:
    """inplace=True: no two weights may share memory on this rank (tied weights would lose their
    principal part twice). Views of one storage are fine while they do not overlap."""
    spans = []
    for sh in shards:
        t = sh.local
        if t is None or t.numel() == 0:
            continue
        lo = t.data_ptr() - sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()) if st < 0)
        last = sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()))
        spans.append((str(t.device), lo, lo + (last + 1) * t.element_size(), sh.name))
    spans.sort(key=lambda s: (s[0], s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"inplace=True: {b[3]} overlaps {a[3]} in memory")


def check_tiling(name: str, shape: tuple[int, int], pieces: set) -> None:
    """The distinct pieces the ranks hold must cover the full matrix exactly once; otherwise a shard
    is missing, or the placements are ones pissa_fast does not read (e.g. a strided shard whose rows
    are not contiguous). Raises ValueError."""
    m, n = shape
    bad = ValueError(f"{name}: the shards the ranks hold do not cover its {m} x {n} shape exactly once "
                     f"(a missing shard, or a sharding other than Shard(0), Shard(1), Replicate, FSDP2's "
                     f"strided sharding, or ZeRO-3 partitions)")
    if not pieces or len({type(p) for p in pieces}) != 1:
        raise bad
    if isinstance(next(iter(pieces)), Flat):
        spans = sorted((p.s, p.e) for p in pieces)
        if spans[0][0] != 0 or spans[-1][1] != m * n or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise bad
        return
    # Sharding acts on each dim separately: the row ranges must tile [0, m), the column ranges [0, n),
    # and every (row range, column range) pair must be present once.
    for ranges, size in (({(p.r0, p.r1) for p in pieces}, m), ({(p.c0, p.c1) for p in pieces}, n)):
        spans = sorted(ranges)
        if spans[0][0] != 0 or spans[-1][1] != size or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise bad
    rows, cols = {(p.r0, p.r1) for p in pieces}, {(p.c0, p.c1) for p in pieces}
    if len(pieces) != len(rows) * len(cols):
        raise bad
