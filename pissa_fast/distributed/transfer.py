"""The three movements of a sharded decomposition: shards to the owner of a weight (a gather to one
rank, not an all-gather), its factors from the owner to every rank (one broadcast), and each rank's
residual written into its own shard (no communication).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._ops import ops
from .shards import Rect


def new_full(shape, dtype, device, colmajor: bool) -> torch.Tensor:
    """An (m, n) buffer laid out as the weight is (row-major, or transposed for a .t() view), so the
    owner decomposes exactly what a single process would."""
    m, n = shape
    if colmajor:
        return torch.empty(n, m, dtype=dtype, device=device).t()
    return torch.empty(m, n, dtype=dtype, device=device)


def _region(full: torch.Tensor, piece) -> torch.Tensor:
    if isinstance(piece, Rect):
        return full[piece.r0:piece.r1, piece.c0:piece.c1]
    return full.view(-1)[piece.s:piece.e]  # ZeRO-3 weights are always row-major


def _wire(t: torch.Tensor, colmajor: bool) -> torch.Tensor:
    """A region in the order its elements travel: the buffer's own memory order."""
    return t.t() if colmajor and t.dim() == 2 else t


def sender_of(owner: int, holders: list[int]) -> int:
    """The one rank that delivers a piece: the owner itself when it holds the piece, else the lowest
    holder (replicas of a piece are sent once)."""
    return owner if owner in holders else holders[0]


def gather_to_owner(colmajor: bool, pieces: dict, owner: int, me: int, local, my_piece, device: torch.device,
                    out: torch.Tensor | None) -> None:
    """Assemble the full weight in `out` (new_full's buffer) on `owner` only; every other rank sends its
    piece there (if it is the piece's sender) and passes out=None.

    pieces: piece -> ranks holding it. Regions that are contiguous in the owner's buffer (row blocks,
    ZeRO-3 ranges) are received in place, all at once; others (column blocks) one at a time through a
    buffer of one shard, so the owner never holds more than the weight plus one shard.
    """
    if me != owner:
        if my_piece is not None and my_piece in pieces and sender_of(owner, pieces[my_piece]) == me:
            dist.send(_wire(local, colmajor).to(device=device, memory_format=torch.contiguous_format), dst=owner)
        return
    full = out
    pending, later = [], []
    for piece in sorted(pieces, key=lambda p: tuple(vars(p).values())):
        src = sender_of(owner, pieces[piece])
        region = _region(full, piece)
        if src == me:
            region.copy_(local)
        elif _wire(region, colmajor).is_contiguous():
            pending.append(dist.irecv(_wire(region, colmajor), src=src))
        else:
            later.append((region, src))
    for req in pending:
        req.wait()
    for region, src in later:
        tmp = torch.empty_like(_wire(region, colmajor), memory_format=torch.contiguous_format)
        dist.recv(tmp, src=src)
        _wire(region, colmajor).copy_(tmp)
        del tmp


def broadcast_factors(factors, shape, r: int, acc: torch.dtype, owner: int, me: int, device: torch.device):
    """(A, B, S) from the owner to every rank in one broadcast; every rank, the owner included, returns
    views of the broadcast buffer, so the factors are identical everywhere by construction."""
    m, n = shape
    if me == owner:
        A, B, S = factors
        buf = torch.cat([A.reshape(-1), B.reshape(-1), S.reshape(-1)]).to(device=device, dtype=acc)
    else:
        buf = torch.empty(r * n + m * r + r, dtype=acc, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(buf, src=owner)
    return buf[:r * n].view(r, n), buf[r * n:r * n + m * r].view(m, r), buf[r * n + m * r:]


def _rows_ok(w: torch.Tensor) -> bool:
    """The kernels read rows with unit column stride (as pissa_fast.core's layout rule)."""
    m, n = w.shape
    return (n == 1 or w.stride(1) == 1) and (m == 1 or w.stride(0) >= n)


def _residual_block(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    """w -= b @ a in place, w in its own dtype; b (p, r), a (r, q) in the accumulation dtype."""
    b, a = b.to(w.device), a.to(w.device)
    if _rows_ok(w):
        ops.residual_([w], b.contiguous().unsqueeze(0), a.contiguous().unsqueeze(0))
    elif _rows_ok(w.t()):  # a transposed block: W^T - A^T B^T, as core does for a transposed weight
        ops.residual_([w.t()], a.t().contiguous().unsqueeze(0), b.t().contiguous().unsqueeze(0))
    else:
        tmp = w.contiguous()
        ops.residual_([tmp], b.contiguous().unsqueeze(0), a.contiguous().unsqueeze(0))
        w.copy_(tmp)


def flat_blocks(s: int, e: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """The row-major range [s, e) of a matrix with n columns as at most three blocks
    (row, rows, c0, c1, offset in the range): a partial first row, whole rows, a partial last row."""
    out, pos = [], s
    while pos < e:
        row, col = divmod(pos, n)
        if col != 0 or e - pos < n:
            c1 = min(n, col + (e - pos))
            out.append((row, 1, col, c1, pos - s))
            pos += c1 - col
        else:
            k = (e - pos) // n
            out.append((row, k, 0, n, pos - s))
            pos += k * n
    return out


def write_residual(local: torch.Tensor, piece, A: torch.Tensor, B: torch.Tensor, n: int) -> None:
    """This rank's shard of W - B A, written into `local` (the shard itself) in place."""
    if isinstance(piece, Rect):
        _residual_block(local, B[piece.r0:piece.r1], A[:, piece.c0:piece.c1])
        return
    for row, k, c0, c1, off in flat_blocks(piece.s, piece.e, n):
        block = local.narrow(0, off, k * (c1 - c0)).view(k, c1 - c0)
        _residual_block(block, B[row:row + k], A[:, c0:c1])
