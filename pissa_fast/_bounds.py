"""Rounding-error bounds of the passes over W, derived from their arithmetic, for the checks that compare
them with float64 math (tests/test_aten_passes.py, tests/test_cuda_ops.py, benchmarks/gpu_ops_check.py).

All arguments are float64 tensors of absolute values or references; `split` says whether the float32
operand was split into bf16/fp16 hi + lo parts (the ATen passes on bf16/fp16 weights) or multiplied
as is (the CPU and CUDA kernels, and every float32/float64 weight).
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation: float32, float64 for float64 weights."""
    return torch.finfo(acc_dtype(dtype)).eps / 2


def part_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the hi/lo parts a float32 operand is split into for bf16/fp16 weights."""
    return {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(dtype, 0.0)


def gamma(n: int, u: float) -> float:
    """n u / (1 - n u): |fl(x . y) - x . y| <= gamma_n |x| . |y| for a length-n dot product in any
    summation order (Higham, Accuracy and Stability, 3.1)."""
    return n * u / (1 - n * u)


def pass_bound(aW: torch.Tensor, X: torch.Tensor, dtype: torch.dtype, split: bool) -> torch.Tensor:
    """|computed - exact| of op(W) X, aW = |op(W)| [.., rows, n], X the operand [.., n, k].

    Unsplit: one float32 accumulation of exact products, gamma_n |W| |X|. Split: the hi and lo parts'
    accumulations and their sum (gamma_{n+2}, on |hi| + |lo| <= (1 + 2 u_p) |X|), the split's own error
    u_p^2 |X|, and for fp16 the floor of the parts' subnormal range: 2^-24 in units where the column
    maximum is at least 2^14, i.e. 2^-38 of the column maximum."""
    n = aW.shape[-1]
    u, up = unit(dtype), part_unit(dtype) if split else 0.0
    aX = X.abs()
    bound = (gamma(n + 2 if up else n, u) * (1 + 2 * up) + up ** 2) * (aW @ aX)
    if split and dtype == torch.float16:
        bound = bound + 2.0 ** -38 * aW.sum(-1, keepdim=True) * aX.amax(-2, keepdim=True)
    return bound + 1e-300


def gram_bounds(aW: torch.Tensor, V: torch.Tensor, dtype: torch.dtype, split: bool):
    """(bound on Y = W V, bound on Z = W^T fl(Y)): Z carries Y's error through W^T, plus W^T's own
    rounding on |fl(Y)| <= |W V| + bound_Y."""
    Yb = pass_bound(aW, V, dtype, split)
    aWt = aW.mT
    return Yb, aWt @ Yb + pass_bound(aWt, (aW @ V.abs()) + Yb, dtype, split)


def residual_bound(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype, split: bool) -> torch.Tensor:
    """|computed - exact| of W - B A rounded once to W's dtype after a float32 accumulation.

    Unsplit: r products and W (gamma_{r+2}). Split (bf16/fp16 W, ATen passes): 3r exact products of
    parts, B A = Bh Ah + Bl Ah + Bh Al, whose dropped Bl Al and split errors add 3 u_p^2 (1 + u_p)^2
    |B| |A|, plus for fp16 the subnormal floor of the balanced parts, 6 2^-24 sqrt(max|A_t| max|B_t|)
    per rank t. The final rounding to W's dtype: eps |W - B A|."""
    u, up = unit(dtype), part_unit(dtype) if split else 0.0
    aB, aA = B.abs(), A.abs()
    BA = aB @ aA
    r = B.shape[-1]
    if up:
        e = gamma(3 * r + 2, u) * (1 + up) ** 2 * (BA + W.abs()) + 3 * up ** 2 * (1 + up) ** 2 * BA
    else:
        e = gamma(r + 2, u) * (BA + W.abs())
    if split and dtype == torch.float16:
        e = e + 6 * 2.0 ** -24 * (1 + up) * (aB.amax(-2) * aA.amax(-1)).sqrt().sum(-1)[..., None, None]
    eps = torch.finfo(dtype).eps
    return eps * (W - B @ A).abs() + e * (1 + eps) + 1e-300
