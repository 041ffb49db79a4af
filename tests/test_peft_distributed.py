"""The peft backend on sharded base weights: DTensors (FSDP2 / tensor parallel) go through
pissa_fast.distributed, on 2 CPU ranks with gloo, and give what the same init gives on plain weights."""
import pytest
import torch

pytest.importorskip("peft")

from distributed_harness import run_ranks  # noqa: E402

TARGETS = ("0", "2", "3")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 11), torch.nn.ReLU(), torch.nn.Linear(11, 9),
                               torch.nn.Linear(9, 10)).eval()


def _init(model, seed=None):
    """peft's own get_peft_model with the backend on; seed: the test matrices' seed (None: drawn
    from torch's global RNG, as in a trainer)."""
    import peft

    import pissa_fast.peft
    from pissa_fast.peft.backend import options

    with pissa_fast.peft.enabled(), options(seed=seed):
        return peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(TARGETS),
                                                          init_lora_weights="pissa_niter_2"))


def _shard(model, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    for i, placement in zip(TARGETS, (Shard(0), Shard(1), Shard(0))):  # uneven splits, rows and columns
        lin = model[int(i)]
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [placement]))
    return model


def _digest(pm) -> str:
    import hashlib

    h = hashlib.sha256()
    for i in TARGETS:
        layer = pm.base_model.model[int(i)]
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight.full_tensor()):
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _on_dtensors(rank, world):
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    # reference: plain weights, the fixed niter the sharded path runs
    os.environ["PISSA_FAST_NITER"] = "literal"
    ref = _init(_model(), seed=5)
    del os.environ["PISSA_FAST_NITER"]  # default mode: DTensors must still take the fixed niter

    mesh = init_device_mesh("cpu", (world,))
    model = _shard(_model(), mesh)
    original = {i: model[int(i)].weight.detach().full_tensor().clone() for i in TARGETS}
    pm = _init(model, seed=5)
    # the seed from torch's global RNG, which differs between the ranks here: they must agree on one
    torch.manual_seed(10 + rank)
    drawn = _digest(_init(_shard(_model(), mesh)))
    facts = {"drawn": drawn}
    for i in TARGETS:
        got, want = pm.base_model.model[int(i)], ref.base_model.model[int(i)]
        w = got.base_layer.weight
        full = w.full_tensor().detach()
        recon = full + got.scaling["default"] * got.lora_B["default"].weight @ got.lora_A["default"].weight
        facts[i] = dict(
            still_dtensor=isinstance(w, DTensor),
            A=(got.lora_A["default"].weight - want.lora_A["default"].weight).abs().max().item(),
            B=(got.lora_B["default"].weight - want.lora_B["default"].weight).abs().max().item(),
            residual=(full - want.base_layer.weight).abs().max().item(),
            recon=(recon - original[i]).abs().max().item(),
            changed=(full - original[i]).abs().max().item(),
        )
    return facts


def test_backend_decomposes_dtensor_weights_like_plain_ones():
    eps = torch.finfo(torch.float32).eps
    ranks = run_ranks(_on_dtensors, world=2, preload=("peft", "torch.distributed.tensor"))
    assert ranks[0].pop("drawn") == ranks[1].pop("drawn")  # same factors and residual on every rank
    for rank, facts in enumerate(ranks):
        for name, f in facts.items():
            where = f"rank {rank}, layer {name}: {f}"
            assert f["still_dtensor"], where
            assert f["changed"] > 0.01, where  # the residual really was written into the shards
            # same seed, niter and algorithm as the plain run: equal up to float32 summation order
            assert max(f["A"], f["B"], f["residual"], f["recon"]) <= 100 * eps, where
