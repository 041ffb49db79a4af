"""The building blocks of pissa_fast.distributed, in one process: per-weight seeds, owners balanced by
bytes, process-group setup from torchrun's environment, how a ZeRO-3 range splits into blocks, and
the check that the ranks' shards cover a weight exactly once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pissa_fast.distributed import assign_by_bytes, from_env, rounds, seed_for, weight_seed, weight_seeds
from pissa_fast.distributed.hook import wants
from pissa_fast.distributed.launch import device_and_backend
from pissa_fast.distributed.shards import Flat, Rect, check_tiling
from pissa_fast.distributed.transfer import flat_blocks

SEEDING = os.path.join(os.path.dirname(__file__), "..", "pissa_fast", "distributed", "seeding.py")


def test_weight_seed_is_a_fixed_function_of_seed_and_name():
    # Literal values: a change of derivation changes every result, and must be deliberate.
    assert weight_seed(0, "model.layers.0.self_attn.q_proj.weight") == 802517819321077344
    assert weight_seed(7, "x") == 9033875551126070272
    assert weight_seed(-1, "") == 3369375707388152307
    assert weight_seed(0, "a") != weight_seed(1, "a") and weight_seed(0, "a") != weight_seed(0, "b")
    assert 0 <= weight_seed(2**70, "a") < 2**63
    torch.Generator().manual_seed(weight_seed(3, "w"))  # a valid torch seed


def test_weight_seed_ignores_python_hash_randomization():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('s', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.weight_seed(7, 'x'))")
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, SEEDING], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}).stdout
        assert int(out) == 9033875551126070272


def test_seed_for_is_cores_rule_and_weight_seeds_names_the_keys():
    # an int seeds every weight (as pissa_fast.core does unsharded); a mapping gives each its own
    assert seed_for(5, "q.weight") == 5 and seed_for(5, 3) == 5
    assert seed_for({"q.weight": 9}, "q.weight") == 9
    assert weight_seeds(5, {"q.weight": None, 3: None}) == {"q.weight": weight_seed(5, "q.weight"),
                                                           3: weight_seed(5, "3")}


def test_weight_seed_rejects_bad_arguments():
    with pytest.raises(TypeError, match="seed must be an int"):
        weight_seed(1.5, "a")
    with pytest.raises(TypeError, match="name must be a str"):
        weight_seed(1, 3)


def test_assign_by_bytes_balances_largest_first_and_is_deterministic():
    sizes = [10, 7, 6, 5, 4, 3, 1]
    owners = assign_by_bytes(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == k) for k in range(3)]
    assert owners == [0, 1, 2, 2, 1, 0, 1] and loads == [13, 12, 11]
    assert assign_by_bytes(sizes, 3) == owners
    assert assign_by_bytes([5, 5, 5, 5], 2) == [0, 1, 0, 1]  # ties go to the lowest rank
    assert assign_by_bytes([], 4) == [] and assign_by_bytes([3, 2], 1) == [0, 0]


@given(st.lists(st.integers(0, 10**6), max_size=40), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_assign_by_bytes_stays_within_the_greedy_bound(sizes, world):
    owners = assign_by_bytes(sizes, world)
    loads = [0] * world
    for s, o in zip(sizes, owners):
        loads[o] += s
    # Greedy to the least-loaded rank: the busiest rank exceeds the mean by less than one item.
    assert max(loads) <= sum(sizes) / world + (1 - 1 / world) * max(sizes, default=0) + 1e-9
    plan = rounds(owners, sizes)
    assert sorted(i for rnd in plan for i in rnd) == list(range(len(sizes)))
    for rnd in plan:
        assert len({owners[i] for i in rnd}) == len(rnd)  # one weight per owner per round


def test_assign_by_bytes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        assign_by_bytes([1], 0)
    with pytest.raises(ValueError, match=r"sizes\[1\] must be an int >= 0"):
        assign_by_bytes([1, -2], 2)


def test_from_env_reads_torchrun_and_picks_device_and_backend():
    single = from_env({}, cuda_count=0)
    assert (single.rank, single.world_size, single.local_rank, single.device, single.backend) == \
        (0, 1, 0, torch.device("cpu"), "gloo") and not single.distributed
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    cpu = from_env(env, cuda_count=0)
    assert (cpu.rank, cpu.world_size, cpu.local_rank, str(cpu.device), cpu.backend) == (5, 8, 1, "cpu", "gloo")
    gpu = from_env(env, cuda_count=4)
    assert (str(gpu.device), gpu.backend) == ("cuda:1", "nccl") and gpu.distributed
    assert device_and_backend(0, cuda_count=0) == (torch.device("cpu"), "gloo")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an int, got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, r"RANK must be in \[0, WORLD_SIZE = 2\), got 2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1, got 0"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 but this host has 2 CUDA device"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "LOCAL_RANK is not set"),
])
def test_from_env_rejects_inconsistent_launches(env, message):
    with pytest.raises(ValueError, match=message):
        from_env(env, cuda_count=2)


@given(st.integers(1, 9), st.data())
@settings(max_examples=80, deadline=None)
def test_flat_blocks_cover_a_zero3_range_in_order(n, data):
    s = data.draw(st.integers(0, 5 * n))
    e = data.draw(st.integers(s, 6 * n))
    blocks = flat_blocks(s, e, n)
    assert len(blocks) <= 3
    seen = []
    for row, k, c0, c1, off in blocks:
        assert off == len(seen) and 0 <= c0 < c1 <= n and (k == 1 or (c0, c1) == (0, n))
        seen += [(row + i) * n + c for i in range(k) for c in range(c0, c1)]
    assert seen == list(range(s, e))


def test_check_tiling_accepts_covers_and_names_the_weight_otherwise():
    check_tiling("w", (4, 6), {Rect(0, 2, 0, 6), Rect(2, 4, 0, 6)})
    check_tiling("w", (4, 6), {Rect(0, 4, 0, 3), Rect(0, 4, 3, 6)})
    check_tiling("w", (4, 6), {Rect(r, r + 2, c, c + 3) for r in (0, 2) for c in (0, 3)})
    check_tiling("w", (4, 6), {Flat(0, 12), Flat(12, 24)})
    bad = [{Rect(0, 2, 0, 6)}, {Rect(0, 3, 0, 6), Rect(2, 4, 0, 6)},  # a gap; an overlap
           {Rect(0, 2, 0, 3), Rect(2, 4, 3, 6)},  # two of four blocks
           {Flat(0, 12), Flat(13, 24)}, {Flat(0, 12), Rect(2, 4, 0, 6)}, set()]
    for pieces in bad:
        with pytest.raises(ValueError, match=r"weights\['q'\]: the shards the ranks hold do not cover its 4 x 6"):
            check_tiling("weights['q']", (4, 6), pieces)


def test_hook_routes_only_sharded_weights():
    w = torch.randn(4, 3)
    assert not wants({"a": w}) and not wants([w, w]) and not wants(3)
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_tensor, p.ds_shape = 0, torch.empty(6), torch.Size([2, 3])  # what deepspeed.zero.Init adds
    assert wants([w, p])
