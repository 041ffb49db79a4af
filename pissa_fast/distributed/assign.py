"""Which rank does which piece of work: balanced by bytes, deterministic, the same on every rank.

Used for the weights of a sharded decompose_many (each weight decomposed by one owner rank) and meant
for the torchrun CLI (each output shard file written by one rank).
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign_by_bytes(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each item: largest item first to the least-loaded rank, ties to the lowest rank
    (the LPT rule: the busiest rank ends within 4/3 of the optimum). Every rank computes the same
    answer from the same sizes, so no communication is needed to agree on it."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for i, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"sizes[{i}] must be an int >= 0 (bytes), got {s!r}")
    heap = [(0, rank) for rank in range(world_size)]  # (load, rank): the pop is the least loaded, lowest rank
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + sizes[i], rank))
    return owners


def rounds(owners: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Items grouped into rounds holding at most one item per rank: round k has each rank's k-th item,
    its items largest first (as assign_by_bytes handed them out). Items of a round are listed in
    their original order. A rank then holds one gathered weight at a time, and all ranks work at once."""
    per_rank: dict[int, list[int]] = {}
    for i in sorted(range(len(owners)), key=lambda i: (-sizes[i], i)):
        per_rank.setdefault(owners[i], []).append(i)
    depth = max((len(v) for v in per_rank.values()), default=0)
    return [sorted(v[k] for v in per_rank.values() if k < len(v)) for k in range(depth)]
