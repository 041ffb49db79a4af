"""benchmarks/bench_core.py's matched-accuracy search (issue 13's definition): the cheapest niter k
whose L1, worst of 3 seeds, is at most peft's."""
import os
import statistics
import sys

import pytest
import torch

import pissa_fast as pf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_core  # noqa: E402


@pytest.fixture(scope="module")
def weight():
    W64, _ = bench_core.test_matrix(192)
    W = W64.to(torch.bfloat16)
    return W, W.double(), pf.exact_factors(W.double())


def worst_l1(W, Wref, exact, r, k):
    return max(pf.error_vs_exact(Wref, pf.decompose(W, r, k, seed=s), exact=exact).l1 for s in range(3))


@pytest.mark.parametrize("r,N", [(4, 2), (8, 4)])
def test_cheapest_niter_is_the_least_k_as_accurate_as_peft(weight, r, N):
    W, Wref, exact = weight
    l1_peft = []
    for seed in range(3):
        torch.manual_seed(seed)
        l1_peft.append(pf.error_vs_exact(Wref, bench_core.peft_path(W, r, N), exact=exact).l1)
    target = statistics.mean(l1_peft)
    k, l1 = bench_core.cheapest_niter(W, Wref, exact, r, target, N)
    assert k is not None and 0 <= k <= N
    assert l1 == worst_l1(W, Wref, exact, r, k) <= target
    for j in range(k):  # every cheaper niter misses peft's error for at least one seed
        assert worst_l1(W, Wref, exact, r, j) > target


def test_cheapest_niter_none_when_no_niter_is_accurate_enough(weight):
    W, Wref, exact = weight
    assert bench_core.cheapest_niter(W, Wref, exact, 4, 0.0, 1) == (None, None)
