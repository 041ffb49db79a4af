"""Per-weight seeds: decompose_many's mapping form of `seed` gives every weight the result of its own
decompose() call whatever else shares the call (order, batching), sharded or not; `pissa-fast init`
seeds each weight with distributed.weight_seed(seed, its checkpoint name)."""
from __future__ import annotations

import pytest
import torch
from distributed_harness import run_ranks

import pissa_fast
from pissa_fast.distributed import weight_seed
from pissa_fast.init import transform

R, NITER = 4, 2


def _weights():
    g = torch.Generator().manual_seed(11)
    return {"a": torch.randn(40, 24, generator=g), "b": torch.randn(40, 24, generator=g).bfloat16(),
            "c": torch.randn(24, 56, generator=g), "d": torch.randn(40, 24, generator=g)}


def _same(d, ref):
    for f in ("A", "B", "S", "residual"):
        assert torch.equal(getattr(d, f), getattr(ref, f)), f


def test_a_mapping_seed_gives_each_weight_its_own_call():
    ws = _weights()
    seeds = {k: weight_seed(5, k) for k in ws}
    refs = {k: pissa_fast.decompose(w, R, NITER, seed=seeds[k]) for k, w in ws.items()}
    together = pissa_fast.decompose_many(ws, R, NITER, seed=seeds)
    apart = pissa_fast.decompose_many({k: ws[k] for k in ("d", "c")}, R, NITER, seed=seeds)
    apart.update(pissa_fast.decompose_many({k: ws[k] for k in ("b", "a")}, R, NITER, seed=seeds))
    for k in ws:
        _same(together[k], refs[k])
        _same(apart[k], refs[k])
    listed = pissa_fast.decompose_many([ws["a"], ws["c"]], R, NITER, seed={0: seeds["a"], 1: seeds["c"]})
    _same(listed[0], refs["a"])
    _same(listed[1], refs["c"])
    # distinct seeds do matter (a shared seed would give every same-shape weight one test matrix)
    assert not torch.equal(pissa_fast.decompose(ws["a"], R, 0, seed=seeds["d"]).A,
                           pissa_fast.decompose(ws["a"], R, 0, seed=seeds["a"]).A)


def test_a_mapping_seed_is_checked_before_anything_is_written():
    ws = _weights()
    before = {k: w.clone() for k, w in ws.items()}
    with pytest.raises(ValueError, match=r"no entry for weights\['d'\]"):
        pissa_fast.decompose_many(ws, R, NITER, inplace=True, seed={"a": 1, "b": 2, "c": 3})
    with pytest.raises(TypeError, match=r"seed\['b'\] must be an int, got float"):
        pissa_fast.decompose_many(ws, R, NITER, inplace=True, seed={"a": 1, "b": 2.0, "c": 3, "d": 4})
    with pytest.raises(ValueError, match="not both"):
        pissa_fast.decompose_many(ws, R, NITER, inplace=True, seed={k: 1 for k in ws}, generator=torch.Generator())
    for k in ws:
        assert torch.equal(ws[k], before[k])


def test_init_seeds_each_weight_by_its_checkpoint_name():
    name = "model.layers.0.self_attn.q_proj.weight"
    assert transform.weight_seed(3, name) == weight_seed(3, name)
    assert transform.weight_seed(3, name) != transform.weight_seed(3, name.replace("q_proj", "k_proj"))


def _sharded_with_mapping(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    full = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    mesh = init_device_mesh("cpu", (world,))
    w = DTensor.from_local(full.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False, shape=(16, 12),
                           stride=(12, 1))
    out = pissa_fast.decompose_many({"w": w}, R, NITER, seed={"w": 1234})["w"]
    ref = pissa_fast.decompose(full, R, NITER, seed=1234)
    return all(torch.equal(getattr(out, f), getattr(ref, f)) for f in ("A", "B", "S"))


def test_sharded_weights_take_the_mapping_too():
    assert run_ranks(_sharded_with_mapping, world=2, timeout=120) == [True, True]
