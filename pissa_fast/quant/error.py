"""Quantization error of a 4-bit base plus a low-rank adapter, as the PiSSA and LoftQ papers report it:
||W - (Q + B A)||_F / ||W||_F, with Q the dequantized base. Accumulated in float64 over row chunks, so
no full float32/float64 copy of a weight is made."""
from __future__ import annotations

import torch

ROWS_ELEMENTS = 1 << 18  # elements per row chunk (float64 temporaries of 2 MiB each)


def _rows(m: int, n: int):
    step = max(1, ROWS_ELEMENTS // max(n, 1))
    return range(0, m, step), step


@torch.no_grad()
def fro_norm(x: torch.Tensor) -> float:
    """||x||_F in float64, one row chunk at a time."""
    x = x.reshape(x.shape[0], -1) if x.dim() != 2 else x
    total = 0.0
    starts, step = _rows(*x.shape)
    for i in starts:
        total += float(torch.linalg.vector_norm(x[i:i + step], dtype=torch.float64) ** 2)
    return total ** 0.5


@torch.no_grad()
def quant_error(W: torch.Tensor, Q: torch.Tensor, A: torch.Tensor | None = None,
                B: torch.Tensor | None = None) -> float:
    """||W - (Q + B A)||_F / ||W||_F (without A, B: the plain quantization error ||W - Q|| / ||W||)."""
    if Q.shape != W.shape:
        raise ValueError(f"Q must have W's shape {tuple(W.shape)}, got {tuple(Q.shape)}")
    m, n = W.shape
    if (A is None) != (B is None):
        raise ValueError("pass both A and B, or neither")
    if A is not None and (A.shape[1] != n or B.shape[0] != m or A.shape[0] != B.shape[1]):
        raise ValueError(f"A (r, {n}) and B ({m}, r) expected, got {tuple(A.shape)} and {tuple(B.shape)}")
    A64 = None if A is None else A.to(torch.float64)
    num = den = 0.0
    starts, step = _rows(m, n)
    for i in starts:
        w = W[i:i + step].to(torch.float64)
        e = w - Q[i:i + step].to(torch.float64)
        if A64 is not None:
            e -= B[i:i + step].to(torch.float64) @ A64
        num += float(torch.linalg.vector_norm(e) ** 2)
        den += float(torch.linalg.vector_norm(w) ** 2)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5
