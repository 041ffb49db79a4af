"""Sharded weights inside training: DTensor (FSDP2 fully_shard, tensor parallel) through
pissa_fast.decompose_many on 2 CPU ranks with gloo.

All scenarios run in one spawn of 2 ranks (module fixture), each rank comparing its results with a
single-process reference built from the same seed; the tests below assert on what the ranks saw.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from distributed_harness import RankError, run_ranks

R, NITER, SEED = 3, 2, 7
SHAPES = [(11, 12), (9, 11), (10, 9)]  # uneven splits on 2 ranks in both dims


def _model(dtype):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(i, o) for o, i in SHAPES]
    return torch.nn.Sequential(*layers).to(dtype)


def _digest(*ts) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _compare(out, ref, full_residual) -> dict:
    """Facts about one weight: factors bitwise equal to the reference, residual difference in units of
    the weight dtype's eps times the residual's scale."""
    scale = ref.residual.abs().max().double().item() or 1.0
    diff = (full_residual.double() - ref.residual.double()).abs().max().item()
    return dict(A=torch.equal(out.A.cpu(), ref.A), B=torch.equal(out.B.cpu(), ref.B), S=torch.equal(out.S.cpu(), ref.S),
                res_exact=torch.equal(full_residual, ref.residual), res_err=diff / (scale * torch.finfo(ref.residual.dtype).eps),
                digest=_digest(out.A, out.B, out.S))


def _instrument():
    """Count full-weight buffers (allocated, alive at once) and bytes sent point to point on this rank."""
    import weakref

    import torch.distributed as dist
    from pissa_fast.distributed import sharded

    stats = {"buffers": 0, "alive": 0, "most_alive": 0, "sent": 0}
    make, send = sharded.new_full, dist.send

    def new_full(*args, **kwargs):
        t = make(*args, **kwargs)
        stats["buffers"] += 1
        stats["alive"] += 1
        stats["most_alive"] = max(stats["most_alive"], stats["alive"])
        weakref.finalize(t, lambda: stats.__setitem__("alive", stats["alive"] - 1))
        return t

    def counted_send(tensor, *args, **kwargs):
        stats["sent"] += tensor.numel() * tensor.element_size()
        return send(tensor, *args, **kwargs)

    sharded.new_full, dist.send = new_full, counted_send
    return stats


def _references(dtype, names, transpose=(), seeds=None):
    import pissa_fast

    ref_model = _model(dtype)
    refs = {}
    for name in names:
        w = ref_model.get_submodule(name.rsplit(".", 1)[0]).weight.detach().clone()
        if name in transpose:
            w = w.t()
        refs[name] = pissa_fast.decompose(w, R, NITER, seed=SEED if seeds is None else seeds)
    return refs


def _fsdp(dtype):
    import pissa_fast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = _model(dtype)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    names = [f"{i}.weight" for i in range(len(model))]
    weights = {n: model.get_submodule(n.rsplit(".", 1)[0]).weight.detach() for n in names}
    placements = {n: str(w.placements) for n, w in weights.items()}
    stats = _instrument()
    outs = pissa_fast.decompose_many(weights, R, NITER, inplace=True, seed=SEED)
    facts = {"_stats": dict(stats)}
    refs = _references(dtype, names)
    facts.update({n: _compare(outs[n], refs[n], weights[n].full_tensor()) for n in names})
    # the residual is the parameter itself: FSDP2's own all-gather sees it
    facts["_in_param"] = all(outs[n].residual is weights[n] for n in names)
    facts["_placements"] = placements
    return facts


def _tp(dtype):
    import pissa_fast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    model = _model(dtype)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel(), "2": ColwiseParallel()})
    names = ["0.weight", "1.weight", "2.weight"]
    weights = {n: model.get_submodule(n[0]).weight.detach() for n in names}
    weights["2.weight"] = weights["2.weight"].t()  # a transposed view (as peft passes Conv1D weights)
    placements = {n: str(w.placements) for n, w in weights.items()}
    outs = pissa_fast.decompose_many(weights, R, NITER, inplace=True, seed=SEED)
    refs = _references(dtype, names, transpose={"2.weight"})
    facts = {n: _compare(outs[n], refs[n], weights[n].full_tensor()) for n in names}
    facts["_placements"] = placements
    return facts


def _replicate_list_and_copy():
    """Replicate placement; a list (seed used as is); inplace=False (a new DTensor, input untouched)."""
    import pissa_fast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = [_model(torch.float32)[i].weight.detach().clone() for i in range(3)]
    dts = [distribute_tensor(full[0].clone(), mesh, [Replicate()]), distribute_tensor(full[1].clone(), mesh, [Shard(1)]),
           distribute_tensor(full[2].clone(), mesh, [Shard(0)])]
    before = [d.to_local().clone() for d in dts]
    outs = pissa_fast.decompose_many(dts, R, NITER, inplace=False, seed=SEED, progress=True)
    refs = [pissa_fast.decompose(w, R, NITER, seed=SEED) for w in full]
    facts = {f"list[{i}]": _compare(o, ref, o.residual.full_tensor()) for i, (o, ref) in enumerate(zip(outs, refs))}
    facts["_untouched"] = all(torch.equal(d.to_local(), b) for d, b in zip(dts, before))
    facts["_residual_placements"] = [str(o.residual.placements) for o in outs]
    return facts


def _mixed(rank):
    """A DTensor and this rank's own plain tensor (different on each rank) in one call, with an int
    seed and with per-name seeds: each gives what one process's decompose_many gives the same dict
    of plain tensors (sharding changes nothing, seeds included)."""
    import pissa_fast
    from pissa_fast.distributed import weight_seeds
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = _model(torch.float32)[0].weight.detach().clone()
    plain = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + rank))
    facts = {}
    for how, seed in (("int", SEED), ("names", weight_seeds(SEED, ["0.weight", "mine"]))):
        refs = pissa_fast.decompose_many({"0.weight": full.clone(), "mine": plain.clone()}, R, NITER, seed=seed)
        dt = distribute_tensor(full.clone(), mesh, [Shard(0)])
        mine = plain.clone()
        outs = pissa_fast.decompose_many({"0.weight": dt, "mine": mine}, R, NITER, inplace=True, seed=seed)
        facts[f"{how}:0.weight"] = _compare(outs["0.weight"], refs["0.weight"], dt.full_tensor())
        facts[f"{how}:mine"] = _compare(outs["mine"], refs["mine"], mine)
        facts[f"_{how}:plain_in_place"] = outs["mine"].residual is mine
    return facts


def _expect_failure(rank, make_call):
    """Run one call that must fail; report what each rank raised and whether any weight changed."""
    weights, call = make_call(rank)
    before = {k: w.to_local().clone() for k, w in weights.items()}
    try:
        call(weights)
        raised = None
    except Exception as e:  # noqa: BLE001
        raised = RankError(e)
    unchanged = all(torch.equal(w.to_local().nan_to_num(7.0), before[k].nan_to_num(7.0)) for k, w in weights.items())
    return {"raised": raised, "unchanged": unchanged}


def _two_weights(rank, nan_on_rank=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    model = _model(torch.float32)
    big = distribute_tensor(model[0].weight.detach().clone(), mesh, [Shard(0)])  # 132 elements: owned by rank 0
    small = distribute_tensor(model[1].weight.detach().clone(), mesh, [Shard(1)])  # owned by rank 1
    if nan_on_rank == rank:
        big.to_local()[0, 0] = float("nan")
    return {"big": big, "small": small}


def _errors(rank):
    import pissa_fast

    def bad_r_on_rank1(rank):
        ws = _two_weights(rank)
        return ws, lambda w: pissa_fast.decompose_many(w, 1000 if rank == 1 else R, NITER, inplace=True)

    def nan_in_rank1_shard(rank):
        ws = _two_weights(rank, nan_on_rank=1)
        return ws, lambda w: pissa_fast.decompose_many(w, R, NITER, inplace=True)

    def missing_on_rank1(rank):
        ws = _two_weights(rank)
        return ws, lambda w: pissa_fast.decompose_many(w if rank == 0 else {"big": w["big"]}, R, NITER, inplace=True)

    def generator(rank):
        ws = _two_weights(rank)
        return ws, lambda w: pissa_fast.decompose_many(w, R, NITER, inplace=True, generator=torch.Generator())

    def grad_leaf(rank):
        ws = {k: torch.nn.Parameter(v) for k, v in _two_weights(rank).items()}
        return ws, lambda w: pissa_fast.decompose_many(w, R, NITER, inplace=True)

    cases = [bad_r_on_rank1, nan_in_rank1_shard, missing_on_rank1, generator, grad_leaf]
    return {case.__name__: _expect_failure(rank, case) for case in cases}


def _all_scenarios(rank, world):
    out = {}
    for name, fn in [("fsdp_fp32", lambda: _fsdp(torch.float32)), ("fsdp_bf16", lambda: _fsdp(torch.bfloat16)),
                     ("tp_fp32", lambda: _tp(torch.float32)), ("tp_fp16", lambda: _tp(torch.float16)),
                     ("replicate_list_copy", _replicate_list_and_copy), ("mixed", lambda: _mixed(rank)),
                     ("errors", lambda: _errors(rank)), ("after_errors", lambda: _fsdp(torch.float32))]:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
            out[name] = RankError(e)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_scenarios, world=2, preload=("torch.distributed.fsdp", "torch.distributed.tensor.parallel"))


def _facts(ranks, scenario):
    per_rank = [r[scenario] for r in ranks]
    for rank, f in enumerate(per_rank):
        assert not isinstance(f, RankError), f"rank {rank}: {f}\n{f.traceback}"
    return per_rank


# The residual is W - B A computed by the same kernel from the same factors on a block of W instead of
# all of W; a BLAS may sum the r products in another order for another block shape, so allow a few ulps.
RES_ULPS = 4


def _assert_matches_reference(per_rank, names):
    for name in names:
        for rank, facts in enumerate(per_rank):
            f = facts[name]
            assert f["A"] and f["B"] and f["S"], f"rank {rank} {name}: factors differ from the single-process ones"
            assert f["res_err"] <= RES_ULPS, f"rank {rank} {name}: residual off by {f['res_err']:.2f} ulp"
        assert per_rank[0][name]["digest"] == per_rank[1][name]["digest"], f"{name}: ranks hold different factors"


@pytest.mark.parametrize("scenario", ["fsdp_fp32", "fsdp_bf16", "after_errors"])
def test_fsdp2_fully_shard_matches_single_process(ranks, scenario):
    per_rank = _facts(ranks, scenario)
    assert per_rank[0]["_placements"]["0.weight"] == "(Shard(dim=0),)"
    _assert_matches_reference(per_rank, [f"{i}.weight" for i in range(3)])
    assert all(f["_in_param"] for f in per_rank)
    # 132, 99 and 90 elements: rank 0 owns the largest, rank 1 the two others, one after the other
    assert [f["_stats"]["buffers"] for f in per_rank] == [1, 2]
    assert [f["_stats"]["most_alive"] for f in per_rank] == [1, 1]


@pytest.mark.parametrize("scenario", ["tp_fp32", "tp_fp16"])
def test_tensor_parallel_shard0_shard1_and_transposed(ranks, scenario):
    per_rank = _facts(ranks, scenario)
    assert per_rank[0]["_placements"] == {"0.weight": "(Shard(dim=0),)", "1.weight": "(Shard(dim=1),)",
                                          "2.weight": "(Shard(dim=1),)"}  # 2.weight: Shard(0) seen through .t()
    _assert_matches_reference(per_rank, ["0.weight", "1.weight", "2.weight"])


def test_replicate_list_and_out_of_place(ranks):
    per_rank = _facts(ranks, "replicate_list_copy")
    _assert_matches_reference(per_rank, ["list[0]", "list[1]", "list[2]"])
    for f in per_rank:
        assert f["_untouched"]
        assert f["_residual_placements"] == ["(Replicate(),)", "(Shard(dim=1),)", "(Shard(dim=0),)"]


@pytest.mark.parametrize("how", ["int", "names"])
def test_plain_tensors_beside_dtensors_stay_local_and_seeds_mean_the_same_sharded(ranks, how):
    """An int seed and per-name seeds (weight_seeds) give a DTensor in a dict the factors one
    process's decompose_many gives the same dict of plain tensors."""
    per_rank = _facts(ranks, "mixed")
    _assert_matches_reference(per_rank, [f"{how}:0.weight"])
    for f in per_rank:
        mine = f[f"{how}:mine"]
        assert mine["A"] and mine["B"] and mine["res_err"] <= RES_ULPS and f[f"_{how}:plain_in_place"]
    assert per_rank[0][f"{how}:mine"]["digest"] != per_rank[1][f"{how}:mine"]["digest"]  # each rank's own weight


def test_a_failing_rank_fails_every_rank_with_its_message_and_writes_nothing(ranks):
    errors = _facts(ranks, "errors")
    for case in ["bad_r_on_rank1", "nan_in_rank1_shard", "missing_on_rank1", "generator", "grad_leaf"]:
        for rank in (0, 1):
            assert errors[rank][case]["unchanged"], f"{case}: rank {rank} had a weight written"
            assert errors[rank][case]["raised"] is not None, f"{case}: rank {rank} did not raise"
    r0, r1 = (e["bad_r_on_rank1"]["raised"] for e in errors)
    assert r1.type == "ValueError" and "r must be in [1, min(m, n) = 11]" in r1.message and "1000" in r1.message
    assert r0.type == "RankFailedError" and "rank 1 of 2 failed" in r0.message and "got 1000" in r0.message
    r0, r1 = (e["nan_in_rank1_shard"]["raised"] for e in errors)
    assert r0.type == "ValueError" and "NaN or Inf" in r0.message and "weights['big']" in r0.message
    assert r1.type == "RankFailedError" and "rank 0 of 2 failed" in r1.message and "NaN or Inf" in r1.message
    for e in errors:
        missing = e["missing_on_rank1"]["raised"]
        assert missing.type == "ValueError" and "ranks disagree on the sharded weights" in missing.message
        assert "rank 0 passes 2, rank 1 passes 1" in missing.message
        gen = e["generator"]["raised"]
        assert gen.type == "TypeError" and "generator=" in gen.message and "seed=" in gen.message
        leaf = e["grad_leaf"]["raised"]
        assert leaf.type == "ValueError" and "leaf tensor that requires grad" in leaf.message


def _one_rank_never_calls(rank, world):
    """Rank 1 leaves without calling decompose_many (it crashed elsewhere); rank 0 must not hang."""
    import time

    if rank == 1:
        return "left"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import pissa_fast

    mesh = init_device_mesh("cpu", (2,))
    w = DTensor.from_local(torch.randn(4, 6), mesh, [Shard(0)], run_check=False, shape=(8, 6), stride=(6, 1))
    t0 = time.monotonic()
    try:
        pissa_fast.decompose_many({"w": w}, R, NITER, inplace=True)
    except Exception as e:  # noqa: BLE001
        return {"raised": RankError(e), "seconds": time.monotonic() - t0}
    return {"raised": None}


def test_a_rank_that_dies_outside_the_call_fails_the_others_instead_of_hanging():
    out = run_ranks(_one_rank_never_calls, world=2, timeout=120)
    assert out[1] == "left"
    assert out[0]["raised"] is not None, "rank 0 went on without rank 1"
    assert out[0]["seconds"] < 100  # the connection closing (or the collective timeout), not a hang
