"""decompose_many for sharded weights (DTensor: FSDP2, tensor parallel; DeepSpeed ZeRO-3 parameters).

Every rank of the job calls it with the same sharded weights in the same order (as when each rank
runs the same peft call on its part of one model). Then, for each weight:
  1. one owner rank, chosen by bytes (assign_by_bytes), receives the other ranks' shards: a gather to
     that rank only, so no rank ever holds more than one full weight beyond its own shards;
  2. the owner decomposes it with pissa_fast.core, exactly as one process would: the test matrix
     drawn from a generator seeded with `seed`, or with seed[key] when seed is a mapping of per-weight
     seeds (e.g. weight_seeds(seed, weights): per-name seeds), as core does for unsharded weights, so
     the result depends neither on the number of ranks nor on batching nor on sharding;
  3. the owner broadcasts A, B, S: every rank holds the same bits by construction;
  4. once every factor of every weight is in, each rank writes its own shard of W - B A in place.
Weights are processed in rounds holding one weight per owner, so all ranks decompose at once. A
failure anywhere (bad input on one rank, a NaN, an allocation) is exchanged before the next step, so
every rank raises (the failing one its own error) and nothing has been written.
Plain tensors passed alongside are this rank's own: it decomposes them alone, with the same rules.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .assign import assign_by_bytes, rounds
from .consensus import raise_if_any_failed
from .launch import comm_device
from .seeding import seed_for
from .shards import DTENSOR, LOCAL, Rect, check_disjoint, check_tiling, describe
from .transfer import broadcast_factors, gather_to_owner, new_full, write_residual

_WHAT = "pissa_fast.decompose_many (sharded weights)"


def _name(key, single: bool) -> str:
    return "weight" if single else f"weights[{key!r}]"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _with_name(exc: Exception, name: str, rank: int) -> Exception:
    """The owner's error from pissa_fast.core ("weight ...") with the weight's own name and rank."""
    if isinstance(exc, (ValueError, TypeError)):
        new = type(exc)(f"{exc} (in {name}, decomposed on rank {rank})")
        new.__cause__ = exc
        return new
    return exc


def _check_agreement(everyone: list) -> None:
    """Every rank must pass the same arguments and the same sharded weights; every rank runs this
    check on the same exchanged data, so all raise the same ValueError."""
    args0, sigs0, _ = everyone[0]
    for rank, (args, sigs, _) in enumerate(everyone):
        if args != args0:
            raise ValueError(f"ranks disagree on the arguments of decompose_many: rank 0 passes {args0}, "
                             f"rank {rank} passes {args}")
        if sigs != sigs0:
            at = next((i for i, (a, b) in enumerate(zip(sigs0, sigs)) if a != b), min(len(sigs0), len(sigs)))
            first = sigs0[at] if at < len(sigs0) else "nothing"
            other = sigs[at] if at < len(sigs) else "nothing"
            raise ValueError(f"ranks disagree on the sharded weights (every rank must pass the same ones, in the "
                             f"same order): rank 0 passes {len(sigs0)}, rank {rank} passes {len(sigs)}; sharded "
                             f"weight #{at} is {first} on rank 0 and {other} on rank {rank}")


def _owner_step(fn):
    """Run fn(); return (result, None) or (None, the exception) for the exchange that follows."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised on this rank by raise_if_any_failed
        return None, e


@torch.no_grad()
def decompose_sharded(weights, r, niter=4, *, inplace=False, method=None, oversample=None, normalizer="qr",
                      seed=0, generator=None, progress=False, _single=False):
    """pissa_fast.core.decompose_many for a call holding DTensor or ZeRO-3 weights (core routes here)."""
    from ..core import Decomposition, decompose

    is_map = isinstance(weights, Mapping)
    if not is_map and not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a dict or a list of tensors, got {type(weights).__name__}")
    if not dist.is_initialized():
        raise ValueError("sharded weights (DTensor or ZeRO-3 parameters) need torch.distributed to be initialized")
    items = list(weights.items()) if is_map else list(enumerate(weights))
    me, world = dist.get_rank(), dist.get_world_size()
    opts = dict(method=method, oversample=oversample, normalizer=normalizer)

    # 1. Validate on every rank, then agree: a bad weight on any rank stops all of them here.
    def validate():
        if generator is not None:
            raise TypeError("generator= cannot be used with sharded weights (each rank would draw from its own "
                            "stream); pass seed= (an int, or a mapping key -> int such as "
                            "pissa_fast.distributed.weight_seeds(seed, weights))")
        if isinstance(seed, Mapping):
            missing = next((key for key, _ in items if key not in seed), None)
            if missing is not None:
                raise ValueError(f"seed is a mapping of per-weight seeds but has no entry for "
                                 f"{_name(missing, _single)}")
        shards = [describe(key, _name(key, _single), w, r, inplace) for key, w in items]
        if inplace:
            check_disjoint(shards)
        return shards

    shards, error = _owner_step(validate)
    shards = shards or []
    sharded = [i for i, sh in enumerate(shards) if sh.kind != LOCAL]
    payload = (repr((r, niter, method, oversample, normalizer, seed, bool(inplace), is_map)),
               [shards[i].signature() for i in sharded], [shards[i].piece for i in sharded])
    everyone = raise_if_any_failed(error, _WHAT, payload=payload)
    _check_agreement(everyone)
    plans = []
    for j, i in enumerate(sharded):
        holders: dict = {}
        for rank, (_, _, pieces) in enumerate(everyone):
            if pieces[j] is not None:
                holders.setdefault(pieces[j], []).append(rank)
        check_tiling(shards[i].name, shards[i].shape, set(holders))
        plans.append(holders)

    sizes = [shards[i].nbytes for i in sharded]
    owners = assign_by_bytes(sizes, world)
    bar = None
    if progress and me == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(sharded), desc=f"pissa factors ({world} ranks)", unit="layer")

    # 2. Factors, one round at a time: gather to owners, decompose, agree, broadcast.
    factors: dict[int, tuple] = {}
    try:
        for rnd in rounds(owners, sizes):
            mine = next((j for j in rnd if owners[j] == me), None)
            sh = shards[sharded[mine]] if mine is not None else None
            dev = {j: comm_device(shards[sharded[j]].device) for j in rnd}
            full, error = (_owner_step(lambda: new_full(sh.shape, sh.dtype, dev[mine], sh.colmajor))
                           if sh is not None else (None, None))
            raise_if_any_failed(error, _WHAT)  # an owner that cannot hold its weight stops everyone first
            for j in rnd:
                s = shards[sharded[j]]
                gather_to_owner(s.colmajor, plans[j], owners[j], me, s.local, s.piece, dev[j],
                                out=full if j == mine else None)
            out, error = None, None
            if sh is not None:
                def factor():
                    d = decompose(full, r, niter, inplace=True, seed=seed_for(seed, sh.key), **opts)
                    return d.A, d.B, d.S  # not d.residual: the buffer must go before the next round's

                out, error = _owner_step(factor)
                error = error and _with_name(error, sh.name, me)
                del full
            raise_if_any_failed(error, _WHAT)
            for j in rnd:
                s = shards[sharded[j]]
                factors[j] = broadcast_factors(out if j == mine else None, s.shape, r, _acc(s.dtype), owners[j], me,
                                               dev[j])
            if bar is not None:
                bar.update(len(rnd))
    finally:
        if bar is not None:
            bar.close()

    # Plain tensors on this rank: factors now (on a copy when in place), residuals with the rest.
    local_out: dict[int, object] = {}

    def local_factors():
        for i, sh in enumerate(shards):
            if sh.kind == LOCAL:
                d = decompose(sh.local.clone() if inplace else sh.local, r, niter, inplace=inplace,
                              seed=seed_for(seed, sh.key), **opts)
                # in place: keep the factors only, so one copy of a weight exists at a time
                local_out[i] = (d.A, d.B, d.S) if inplace else d
                del d

    if any(sh.kind == LOCAL for sh in shards):
        _, error = _owner_step(local_factors)
        raise_if_any_failed(error, _WHAT)

    # 3. Every factor is in on every rank: write the residuals (no communication, nothing can fail
    # for want of agreement).
    meth = "exact" if niter is None else (method or "krylov")
    results = [None] * len(shards)
    for j, i in enumerate(sharded):
        sh = shards[i]
        A, B, S = (t.to(sh.device) for t in factors[j])
        if sh.kind == DTENSOR and not inplace:
            residual_local = sh.tensor.to_local().clone()
            if sh.piece is not None:
                write_residual(residual_local, sh.piece, A, B, sh.shape[1])
            residual = type(sh.tensor).from_local(residual_local, sh.tensor.device_mesh, sh.tensor.placements,
                                                  run_check=False, shape=sh.tensor.shape,
                                                  stride=sh.tensor.stride())
        else:
            if sh.piece is not None:
                write_residual(sh.local, sh.piece, A, B, sh.shape[1])
            residual = sh.tensor
        results[i] = Decomposition(A=A, B=B, S=S, residual=residual, method=meth, niter=niter)
    for i, d in local_out.items():
        sh = shards[i]
        if inplace:
            A, B, S = d
            write_residual(sh.local, Rect(0, sh.shape[0], 0, sh.shape[1]), A, B, sh.shape[1])
            d = Decomposition(A=A, B=B, S=S, residual=sh.tensor, method=meth, niter=niter)
        results[i] = d
    if is_map:
        return {sh.key: res for sh, res in zip(shards, results)}
    return results
