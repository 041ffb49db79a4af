"""Agreeing on failure: a rank that raises fails every rank, with its own message, and nobody hangs.

Every step of a sharded decomposition that can fail on some ranks only (bad input on one rank, a
NaN in one weight, an allocation) is followed by an exchange of each rank's error, so all ranks leave
together: the failing rank raises its own exception, the others a RankFailedError quoting it.
"""
from __future__ import annotations

import torch.distributed as dist


class RankFailedError(RuntimeError):
    """Another rank failed; its message is quoted. `rank` is the lowest failing rank."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def gather_objects(obj, group=None) -> list:
    """all_gather_object over `group` (default: the whole job); a single process needs no exchange."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_if_any_failed(error: BaseException | None, what: str, group=None, payload=None) -> list:
    """Exchange (this rank's error, payload) with every rank. If any rank failed, raise on all: the
    failing ranks their own exception, the others RankFailedError naming the lowest failing rank and
    its message. Otherwise return every rank's payload, in rank order."""
    entries = gather_objects((None if error is None else _describe(error), payload), group)
    failed = [(rank, msg) for rank, (msg, _) in enumerate(entries) if msg is not None]
    if not failed:
        return [p for _, p in entries]
    if error is not None:
        raise error
    rank, msg = failed[0]
    others = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
    raise RankFailedError(f"{what}: rank {rank} of {len(entries)} failed{others}: {msg}", rank)
