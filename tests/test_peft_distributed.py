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


def _init(model):
    import peft

    import pissa_fast.peft

    torch.manual_seed(1)  # the backend's seed comes from torch's global RNG: the same on every rank
    with pissa_fast.peft.enabled():
        return peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(TARGETS),
                                                          init_lora_weights="pissa_niter_2"))


def _on_dtensors(rank, world):
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    # reference: plain weights, the fixed niter the sharded path runs
    os.environ["PISSA_FAST_NITER"] = "literal"
    ref = _init(_model())
    del os.environ["PISSA_FAST_NITER"]  # default mode: DTensors must still take the fixed niter

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    original = {i: model[int(i)].weight.detach().clone() for i in TARGETS}
    for i, placement in zip(TARGETS, (Shard(0), Shard(1), Shard(0))):  # uneven splits, rows and columns
        lin = model[int(i)]
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [placement]))
    pm = _init(model)
    facts = {}
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
    for rank, facts in enumerate(run_ranks(_on_dtensors, world=2, preload=("peft", "torch.distributed.tensor"))):
        for name, f in facts.items():
            where = f"rank {rank}, layer {name}: {f}"
            assert f["still_dtensor"], where
            assert f["changed"] > 0.01, where  # the residual really was written into the shards
            # same seed, niter and algorithm as the plain run: equal up to float32 summation order
            assert max(f["A"], f["B"], f["residual"], f["recon"]) <= 100 * eps, where
