"""decompose_many's grouping (issue 8, item 4): same-shape weights go in as few pissa_factors calls as
the memory budget allows, in balanced chunks; on CUDA the default budget is the free device memory
(device and caching allocator) less a reserve. Runs on the CPU: the budget is passed explicitly, and
the CUDA memory queries are replaced by fixed numbers."""
import pytest
import torch

import pissa_fast as pf
from pissa_fast import core


class CountingOps:
    """torch.ops.pissa_fast with a count of the pissa_factors calls and their group sizes."""

    def __init__(self):
        self.sizes = []

    def __getattr__(self, name):
        op = getattr(torch.ops.pissa_fast, name)
        if name != "pissa_factors":
            return op

        def counted(W, *args):
            self.sizes.append(len(W))
            return op(W, *args)

        return counted


@pytest.fixture
def counting(monkeypatch):
    c = CountingOps()
    monkeypatch.setattr(core, "ops", c)
    return c


def test_split_group_is_balanced_and_minimal():
    idxs = list(range(128))
    assert [len(c) for c in core._split_group(idxs, per=10, budget=1000)] == [64, 64]
    assert [len(c) for c in core._split_group(idxs, per=10, budget=10_000)] == [128]
    assert [len(c) for c in core._split_group(list(range(7)), per=10, budget=30)] == [3, 2, 2]
    assert [len(c) for c in core._split_group(list(range(5)), per=10, budget=0)] == [1] * 5
    assert sum(core._split_group(idxs, per=7, budget=300), []) == idxs  # order kept, nothing lost


def test_same_shape_weights_in_as_few_calls_as_the_budget_allows(counting):
    gen = torch.Generator().manual_seed(0)
    weights = {f"q{i}": torch.randn(48, 40, generator=gen).to(torch.bfloat16) for i in range(16)}
    weights.update({f"up{i}": torch.randn(64, 40, generator=gen).to(torch.bfloat16) for i in range(3)})
    per = core._batch_bytes(weights["q0"], 8, 2, "krylov")
    out = pf.decompose_many(weights, 4, niter=2, oversample=4, max_batch_bytes=16 * per)
    assert sorted(counting.sizes) == [3, 16]  # one call per shape
    counting.sizes.clear()
    grouped = pf.decompose_many(weights, 4, niter=2, oversample=4, max_batch_bytes=5 * per)
    assert sorted(counting.sizes) == [3, 4, 4, 4, 4]  # 16 in four balanced calls, 3 in one
    for key in weights:  # the grouping changes nothing in the results
        assert torch.equal(out[key].B, grouped[key].B) and torch.equal(out[key].residual, grouped[key].residual)


def test_default_budget_on_cuda_uses_free_memory_less_a_reserve(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    # 60 GiB free + 2 GiB cached but unused - 8 GiB reserve (a tenth of the device)
    assert core._default_budget(torch.device("cuda", 0)) == 54 * gib
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib // 2, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert core._default_budget(torch.device("cuda", 0)) == 256 << 20  # the floor: one matrix at a time
    assert core._default_budget(torch.device("cpu")) == 0


def test_llama_7b_square_group_fits_one_call_on_an_80gb_gpu():
    """The arithmetic behind the default: r 16, niter 4 (no oversampling), 4096 x 4096 bf16."""
    w = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
    per = core._batch_bytes(w, 16, 4, "krylov")
    assert 128 * per < 4 << 30  # 128 q/k/v/o matrices: under 4 GiB of factors and scratch
