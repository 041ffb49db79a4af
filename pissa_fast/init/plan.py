"""The plan of `pissa-fast init`: which output shards exist, what each holds, and the units of work.

Every output shard is a ShardJob: the input shard of the same name, the layout of the output file
(same tensors, same order; a target's dtype is the transform's residual dtype) and its targets in
groups of bounded size. A job is written by exactly one worker and carries its size in bytes, so
jobs can be split across workers balanced by bytes (`split_by_bytes`: the ranks of `torchrun -m
pissa_fast init`) and the results do not depend on the split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..hf.checkpoint import Checkpoint
from ..hf.targets import Target, TargetPlan
from ..io.safetensors import ShardHeader


@dataclass
class ShardJob:
    shard: str  # file name, the input's and the output's
    source: str  # input file path
    header: ShardHeader
    layout: list  # [(name, safetensors code, shape)] of the output file, in order
    targets: list  # Target, in file order
    groups: list  # lists of Target: read, transformed and written together

    @property
    def nbytes(self) -> int:
        """Bytes of the input shard's tensors: the I/O of this job (decomposition scales with the
        targets' share of them)."""
        return self.header.data_bytes

    @property
    def target_bytes(self) -> int:
        return sum(self.header.tensors[t.key].nbytes for t in self.targets)

    def copies(self) -> list:
        """Runs of untouched tensors, each a list of TensorInfo adjacent in the input, and so in the
        output too (same tensors, same order, same sizes): one disk-to-disk copy moves a run."""
        touched = {t.key for t in self.targets}
        runs, run = [], []
        for info in self.header.tensors.values():
            if info.name in touched:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append(info)
        if run:
            runs.append(run)
        return runs


@dataclass
class InitPlan:
    ckpt: Checkpoint
    targets: TargetPlan
    jobs: list  # ShardJob, in checkpoint order

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def _groups(targets: list, infos: dict, group_bytes: int) -> list:
    """Consecutive targets whose bytes total at most group_bytes (a larger tensor alone)."""
    groups, group, size = [], [], 0
    for t in targets:
        n = infos[t.key].nbytes
        if group and size + n > group_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(t)
        size += n
    if group:
        groups.append(group)
    return groups


def make_plan(ckpt: Checkpoint, tplan: TargetPlan, residual_code, group_bytes: int) -> InitPlan:
    """One job per input shard (every shard is rewritten, with or without targets, so the output is a
    complete model). residual_code(target) -> the residual's safetensors dtype code."""
    by_shard: dict[str, list[Target]] = {s: [] for s in ckpt.shards}
    for t in tplan.targets:
        by_shard[ckpt.location[t.key]].append(t)
    jobs = []
    for shard in ckpt.shards:
        header = ckpt.header(shard)
        codes = {t.key: residual_code(t) for t in by_shard[shard]}
        layout = [(i.name, codes.get(i.name, i.dtype), i.shape) for i in header.tensors.values()]
        jobs.append(ShardJob(shard, os.path.join(ckpt.root, shard), header, layout, by_shard[shard],
                             _groups(by_shard[shard], header.tensors, group_bytes)))
    return InitPlan(ckpt, tplan, jobs)


def split_shards(sizes: list, workers: int) -> list:
    """[(shard, bytes)] dealt to `workers` lists of shard names: largest first to the least loaded
    worker, ties to the lower worker and the earlier shard (distributed.assign_by_bytes), each list
    in the given order. Deterministic, so every rank computes the same split without talking."""
    from ..distributed.assign import assign_by_bytes

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    owners = assign_by_bytes([int(n) for _, n in sizes], workers)
    parts: list = [[] for _ in range(workers)]
    for (shard, _), owner in zip(sizes, owners):
        parts[owner].append(shard)
    return parts


def split_by_bytes(jobs: list, workers: int) -> list:
    """Jobs dealt to `workers` lists as split_shards deals their shards (by ShardJob.nbytes), so a
    split made from the checkpoint's headers before the plan exists is the same split."""
    by_name = {j.shard: j for j in jobs}
    return [[by_name[s] for s in part] for part in split_shards([(j.shard, j.nbytes) for j in jobs], workers)]
