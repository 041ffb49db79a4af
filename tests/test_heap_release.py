"""One release of the C heap per batch (pissa_fast/_heap.py, csrc/small_dense.h): decompose_many and
the peft backend bracket their pissa_factors calls, so that each weight reuses the pages the previous
one freed; the pages still go back to the system once, at the bracket's end."""
import pytest
import torch

import pissa_fast as pf
from pissa_fast._heap import one_release

releases = torch.ops.pissa_fast._defer_heap_release


def big_enough():
    # the per-call release is on only where the call's tall blocks reach 2 MiB (factors.cpp):
    # (2 n + m) l (niter + 1) 4 bytes = 3072 * 32 * 9 * 4 here
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1024, 1024, generator=g) for _ in range(3)]


def test_a_batch_releases_once_and_a_single_call_once():
    ws = big_enough()
    before = releases(-1)
    pf.decompose(ws[0].clone(), 24, niter=8)
    assert releases(-1) == before + 1
    before = releases(-1)
    pf.decompose_many([w.clone() for w in ws], 24, niter=8)
    assert releases(-1) == before + 1  # one per call would be 3


def test_small_calls_release_nothing():
    before = releases(-1)
    pf.decompose_many([torch.randn(64, 48) for _ in range(3)], 4, niter=2)
    assert releases(-1) == before


def test_brackets_nest_and_the_outermost_close_releases():
    ws = big_enough()
    before = releases(-1)
    with one_release():
        with one_release():
            pf.decompose(ws[0].clone(), 24, niter=8)
        assert releases(-1) == before
        pf.decompose(ws[1].clone(), 24, niter=8)
        assert releases(-1) == before
    assert releases(-1) == before + 1


def test_results_do_not_depend_on_the_bracket():
    ws = big_enough()
    alone = [pf.decompose(w.clone(), 24, niter=4, seed=7) for w in ws]
    batch = pf.decompose_many([w.clone() for w in ws], 24, niter=4, seed=7)
    for a, b in zip(alone, batch):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.residual, b.residual)


def test_an_error_inside_closes_the_bracket():
    ws = big_enough()
    bad = ws[1].clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError):
        pf.decompose_many([ws[0].clone(), bad], 24, niter=8)
    with pytest.raises(RuntimeError, match="without a matching"):
        releases(0)  # nothing left open


def test_bad_mode():
    with pytest.raises(RuntimeError, match="mode must be"):
        releases(2)
