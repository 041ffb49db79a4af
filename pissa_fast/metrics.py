"""Error of PiSSA factors against the exact SVD, as the PiSSA paper reports it, and more.

Definitions (W the original weight, m x n; U* S* V*^T its exact SVD in float64, truncated to r;
A* = sqrt(S*) V*^T, B* = U* sqrt(S*) the exact PiSSA factors; W_r = B* A* the best rank-r
approximation):

- l1: mean absolute difference of A and B from A* and B*, after flipping each singular pair of
  (A, B) to agree in sign with the exact one; the average of the two means. This is the paper's
  "average L1 distance" (Table 6) and REFERENCE.md's L1.
- rel_recon: ||B A - W_r||_F / ||W_r||_F, the relative error of the low-rank part.
- excess: ||W - B A||_F / ||W - W_r||_F - 1, how far the residual is from the smallest possible
  (0 for the exact factors). The denominator is floored at 2^-24 ||W||_F (float32's rounding of W),
  so a W of rank <= r gives a finite number: the residual's size in units of that rounding.
- sv_rel: max_i |S_i - S*_i| / S*_1, the error of the singular value estimates.
- l1_rel: l1 over the mean magnitude of the exact factors' entries, (mean |A*| + mean |B*|) / 2:
  l1 without the weight's scale. For delocalized singular vectors it is about the sqrt(S*)-weighted
  mean of ||v_j - v*_j|| and ||u_j - u*_j||, which is what Decomposition.estimate estimates and what
  `tol` bounds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class ErrorReport:
    l1: float
    rel_recon: float
    excess: float
    sv_rel: float
    l1_rel: float = float("nan")

    def as_dict(self):
        return asdict(self)


def exact_factors(weight: torch.Tensor, r: int | None = None):
    """Exact SVD of weight in float64 on its device: (U, S, Vh), truncated to r columns if given."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    if r is not None:
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    return U, S, Vh


def error_vs_exact(weight: torch.Tensor, out, exact=None) -> ErrorReport:
    """Errors of `out` (a Decomposition, or anything with .A, .B, .S) against the exact SVD of
    `weight`, the *original* weight (keep a copy when decomposing in place).

    exact: optionally (U, S, Vh) from exact_factors(weight) (any r >= out's rank), to share one
    exact SVD between several calls. Computed on weight's device in float64.
    """
    r = out.S.shape[0]
    W = weight.detach().to(torch.float64)
    U, S, Vh = exact if exact is not None else exact_factors(W)
    U, S, Vh = U[:, :r].to(W.device, torch.float64), S[:r].to(W.device, torch.float64), Vh[:r].to(W.device, torch.float64)
    A = out.A.detach().to(W.device, torch.float64)
    B = out.B.detach().to(W.device, torch.float64)
    root = S.clamp_min(0).sqrt()
    A_ref, B_ref = root[:, None] * Vh, U * root
    sign = torch.sign((B * B_ref).sum(0) + (A * A_ref).sum(1))
    sign[sign == 0] = 1
    l1 = 0.5 * ((A * sign[:, None] - A_ref).abs().mean() + (B * sign - B_ref).abs().mean())
    BA = B @ A
    W_r = B_ref @ A_ref
    nr = torch.linalg.matrix_norm(W_r)
    rel = torch.linalg.matrix_norm(BA - W_r) / nr if nr > 0 else torch.linalg.matrix_norm(BA)
    best = torch.linalg.matrix_norm(W - W_r)
    got = torch.linalg.matrix_norm(W - BA)
    floor = 2.0 ** -24 * float(torch.linalg.matrix_norm(W))
    excess = float((got - best) / max(float(best), floor)) if max(float(best), floor) > 0 else 0.0
    sv = float((out.S.detach().to(W.device, torch.float64) - S).abs().max() / S[0]) if S[0] > 0 else \
        float(out.S.detach().abs().max())
    scale = 0.5 * (A_ref.abs().mean() + B_ref.abs().mean())
    l1_rel = float(l1 / scale) if scale > 0 else float(l1)
    return ErrorReport(l1=float(l1), rel_recon=float(rel), excess=excess, sv_rel=sv, l1_rel=l1_rel)
