"""DeepSpeed ZeRO-3 partitioned parameters through pissa_fast.decompose_many, on 2 CPU ranks with gloo
(DeepSpeed's CPU accelerator), including PiSSA on a peft LoRA model under deepspeed.zero.Init followed by
a real ZeRO-3 engine (deepspeed.initialize) whose forward must equal the original model's.
"""
from __future__ import annotations

import math

import pytest
import torch

from distributed_harness import RankError, run_ranks
from test_distributed_dtensor import NITER, R, RES_ULPS, SEED, SHAPES, _compare, _digest, _model

pytest.importorskip("deepspeed", reason="deepspeed is not installed (requirements.txt installs it)")

NAMES = [f"{i}.weight" for i in range(len(SHAPES))]


def _config(dtype):
    # Every parameter partitioned (no small "persistent" ones), a torch optimizer on the CPU.
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": dtype == torch.bfloat16}, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False}


def _zero3_model(dtype):
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=_config(dtype)):
        return _model(dtype)


def _gathered(params):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _decompose(dtype):
    import pissa_fast

    model = _zero3_model(dtype)
    params = {n: model.get_submodule(n[0]).weight for n in NAMES}
    facts = {"_partition_numel": {n: p.ds_tensor.numel() for n, p in params.items()},
             "_shape_while_partitioned": tuple(params["0.weight"].shape)}
    # The reference starts from the weights as ZeRO-3 holds them (zero.Init may draw them differently).
    originals = dict(zip(NAMES, _gathered(list(params.values()))))
    refs = {n: pissa_fast.decompose(originals[n], R, NITER, seed=SEED) for n in NAMES}
    outs = pissa_fast.decompose_many(params, R, NITER, inplace=True, seed=SEED)
    full = dict(zip(NAMES, _gathered(list(params.values()))))
    facts.update({n: _compare(outs[n], refs[n], full[n]) for n in NAMES})
    facts["_residual_is_param"] = all(outs[n].residual is params[n] for n in NAMES)
    return facts


def _pissa_init(peft_model):
    """PiSSA the way pissa_fast.peft sets it (peft's conventions), with decompose_many taking the ZeRO-3
    base weights themselves."""
    import pissa_fast
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    outs = pissa_fast.decompose_many({n: m.get_base_layer().weight for n, m in layers.items()}, R, NITER,
                                     inplace=True, seed=SEED)
    for n, layer in layers.items():
        root = math.sqrt(layer.scaling["default"])
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(outs[n].A / root)
            layer.lora_B["default"].weight.copy_(outs[n].B / root)
    return {n: _digest(layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight) for n in layers}


def _peft_engine():
    import deepspeed
    from peft import LoraConfig, get_peft_model

    x = torch.randn(4, SHAPES[0][1], generator=torch.Generator().manual_seed(3))
    model = _zero3_model(torch.float32)
    reference = _model(torch.float32)  # the same model unsharded, with the values ZeRO-3 holds
    with torch.no_grad():
        for p, v in zip(reference.parameters(), _gathered(list(model.parameters()))):
            p.copy_(v)
        y_ref = reference(x)
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0", "1", "2"], init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    digests = _pissa_init(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=torch.optim.SGD(trainable, lr=1e-2),
                                      config=_config(torch.float32))
    y = engine(x)
    loss = (y.float() ** 2).mean()
    engine.backward(loss)
    engine.step()
    err = (y.detach().double() - y_ref.double()).abs().max().item() / y_ref.abs().max().item()
    return {"digests": digests, "forward_rel_err": err, "loss": loss.item(),
            "engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__}


def _errors():
    import deepspeed
    import pissa_fast

    model = _zero3_model(torch.float32)
    params = {n: model.get_submodule(n[0]).weight for n in NAMES}
    before = {n: p.ds_tensor.clone() for n, p in params.items()}
    out = {}
    try:
        pissa_fast.decompose_many(params, R, NITER, inplace=False)
    except Exception as e:  # noqa: BLE001
        out["copy"] = RankError(e)
    try:
        with deepspeed.zero.GatheredParameters([params["1.weight"]]):
            pissa_fast.decompose_many(params, R, NITER, inplace=True)
    except Exception as e:  # noqa: BLE001
        out["gathered"] = RankError(e)
    out["unchanged"] = all(torch.equal(p.ds_tensor, before[n]) for n, p in params.items())
    return out


def _all_scenarios(rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # joins the harness's process group
    out = {}
    for name, fn in [("fp32", lambda: _decompose(torch.float32)), ("bf16", lambda: _decompose(torch.bfloat16)),
                     ("peft_engine", _peft_engine), ("errors", _errors)]:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001
            out[name] = RankError(e)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_scenarios, world=2, timeout=400, env={"DS_ACCELERATOR": "cpu"},
                     preload=("peft", "torch._dynamo", "torch.distributed.fsdp"))


def _facts(ranks, scenario):
    per_rank = [r[scenario] for r in ranks]
    for rank, f in enumerate(per_rank):
        assert not isinstance(f, RankError), f"rank {rank}: {f}\n{f.traceback}"
    return per_rank


@pytest.mark.parametrize("scenario", ["fp32", "bf16"])
def test_zero3_partitions_match_single_process(ranks, scenario):
    per_rank = _facts(ranks, scenario)
    # 11 x 12 splits evenly (66 + 66); 9 x 11 = 99 pads to 100 (50 + 49 and a pad element)
    assert per_rank[0]["_partition_numel"] == {"0.weight": 66, "1.weight": 50, "2.weight": 45}
    assert per_rank[0]["_shape_while_partitioned"] == (0,)
    for name in NAMES:
        for rank, f in enumerate(per_rank):
            assert f[name]["A"] and f[name]["B"] and f[name]["S"], f"rank {rank} {name}: factors differ"
            assert f[name]["res_err"] <= RES_ULPS, f"rank {rank} {name}: residual off by {f[name]['res_err']} ulp"
        assert per_rank[0][name]["digest"] == per_rank[1][name]["digest"]
    assert all(f["_residual_is_param"] for f in per_rank)


def test_peft_pissa_under_zero3_then_engine_keeps_the_model_output(ranks):
    per_rank = _facts(ranks, "peft_engine")
    assert per_rank[0]["digests"] == per_rank[1]["digests"]  # the same adapters on every rank
    for f in per_rank:
        assert f["engine"] == "DeepSpeedEngine" and f["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        # residual + scaled B A reproduces W: float32 rounding of three chained layers
        assert f["forward_rel_err"] < 64 * torch.finfo(torch.float32).eps, f["forward_rel_err"]
        assert math.isfinite(f["loss"])


def test_zero3_refuses_copies_and_gathered_parameters_on_every_rank(ranks):
    for f in _facts(ranks, "errors"):
        assert f["unchanged"]
        assert f["copy"].type == "ValueError" and "decomposed in place only (inplace=True)" in f["copy"].message
        assert f["gathered"].type == "ValueError" and "in state AVAILABLE" in f["gathered"].message
