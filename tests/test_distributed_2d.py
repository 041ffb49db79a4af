"""Two-dimensional meshes on 4 CPU ranks (gloo): FSDP2 on top of tensor parallel (FSDP2's strided
sharding), and HSDP (Replicate x Shard). Also checks what moves: each weight is gathered on its owner
only (one full buffer per rank at a time, none on the others) and each distinct shard is sent once.
"""
from __future__ import annotations

import pytest
import torch

from distributed_harness import RankError, run_ranks
from test_distributed_dtensor import NITER, R, RES_ULPS, SEED, _compare, _instrument, _model, _references

NAMES = ["0.weight", "1.weight", "2.weight"]


def _run(model, rank, world):
    import pissa_fast
    from pissa_fast.distributed import assign_by_bytes

    weights = {n: model.get_submodule(n[0]).weight.detach() for n in NAMES}
    placements = {n: str(w.placements) for n, w in weights.items()}
    own = [w.to_local().numel() * w.to_local().element_size() for w in weights.values()]
    stats = _instrument()
    outs = pissa_fast.decompose_many(weights, R, NITER, inplace=True, seed=SEED)
    refs = _references(torch.float32, NAMES)
    facts = {n: _compare(outs[n], refs[n], weights[n].full_tensor()) for n in NAMES}
    owners = assign_by_bytes([w.numel() * w.element_size() for w in weights.values()], world)
    facts["_owned"] = sum(o == rank for o in owners)
    facts["_own_piece_bytes_of_owned"] = sum(b for b, o in zip(own, owners) if o == rank)
    facts["_full_bytes"] = sum(w.numel() * w.element_size() for w in weights.values())
    facts["_placements"], facts["_stats"] = placements, dict(stats)
    return facts


def _fsdp_on_tp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model(torch.float32)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel(), "2": ColwiseParallel()})
    for layer in model:
        fully_shard(layer, mesh=mesh["dp"])
    return _run(model, rank, world)


def _hsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _model(torch.float32)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return _run(model, rank, world)


def _all_scenarios(rank, world):
    out = {}
    for name, fn in [("fsdp_on_tp", _fsdp_on_tp), ("hsdp", _hsdp)]:
        try:
            out[name] = fn(rank, world)
        except Exception as e:  # noqa: BLE001
            out[name] = RankError(e)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_scenarios, world=4, preload=("torch.distributed.fsdp", "torch.distributed.tensor.parallel"))


@pytest.mark.parametrize("scenario, placements", [
    ("fsdp_on_tp", {"0.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0))", "1.weight": "(Shard(dim=0), Shard(dim=1))",
                    "2.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0))"}),
    ("hsdp", {n: "(Replicate(), Shard(dim=0))" for n in NAMES}),
])
def test_2d_meshes_match_single_process_and_move_each_shard_once(ranks, scenario, placements):
    per_rank = [r[scenario] for r in ranks]
    for rank, f in enumerate(per_rank):
        assert not isinstance(f, RankError), f"rank {rank}: {f}\n{f.traceback}"
    assert per_rank[0]["_placements"] == placements
    for name in NAMES:
        for rank, f in enumerate(per_rank):
            assert f[name]["A"] and f[name]["B"] and f[name]["S"], f"rank {rank} {name}: factors differ"
            assert f[name]["res_err"] <= RES_ULPS
        assert len({f[name]["digest"] for f in per_rank}) == 1
    for f in per_rank:  # a full buffer only on a weight's owner, one at a time
        assert f["_stats"]["buffers"] == f["_owned"] and f["_stats"]["most_alive"] <= 1
    # Bytes sent: everything each owner lacked, exactly once (replicas of a shard are not sent twice).
    lacking = per_rank[0]["_full_bytes"] - sum(f["_own_piece_bytes_of_owned"] for f in per_rank)
    assert sum(f["_stats"]["sent"] for f in per_rank) == lacking
