"""The baselines QPiSSA is compared with: QLoRA (the whole weight in NF4, no adapter) and LoftQ.

LoftQ (Li et al. 2023, arXiv 2310.08659) as peft implements it in peft/utils/loftq_utils.py,
`loftq_init(weight, num_bits=4, reduced_rank=r, num_iter=T)`: with res = W (float32),

    T times:  Q = dequantize_4bit(Params4bit(res, compress_statistics=False, quant_type="nf4"))
              (L, R) = rank-r truncation of the full SVD of W - Q   (peft's _low_rank_decomposition)
              res = W - L R          (skipped after the last round)

and it returns (Q in W's dtype, lora_A = R, lora_B = L). peft runs it on a hard-coded "cuda" (or
"xpu") device, so on other devices `loftq` runs `loftq_reference`, the same steps on W's own device
(bnb's Params4bit defaults, peft's own SVD helper). tests/test_qpissa_loftq.py checks it against
peft's code bit for bit. Dequantization goes through nf4.dequantize, i.e. bnb's dequantize_4bit in the
block layout of its quantizer, which bnb's native CPU kernel gets wrong for some shapes that no real
projection has (see nf4.py); peft on a GPU computes the same.
"""
from __future__ import annotations

import torch

from . import nf4


def _check(weight, r, iters):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D floating-point tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    for name, v in (("r", r), ("iters", iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if r > min(weight.shape):
        raise ValueError(f"r must be <= min(m, n) = {min(weight.shape)}, got {r}")


@torch.no_grad()
def qlora(weight: torch.Tensor, spec: nf4.QuantSpec | None = None) -> torch.Tensor:
    """QLoRA's base: the weight itself quantized by bnb in its own dtype, then dequantized."""
    return nf4.fake_quantize(weight.detach(), spec or nf4.QuantSpec())


@torch.no_grad()
def loftq_reference(weight: torch.Tensor, r: int, iters: int = 1, *, on_round=None):
    """peft's loftq_init(weight, num_bits=4, reduced_rank=r, num_iter=iters), step for step, on
    weight's device. Returns (dequantized base in weight's dtype, lora_A (r x n), lora_B (m x r)).
    on_round(i, base, lora_A, lora_B), if given, sees the state after round i = 1..iters (what
    num_iter=i would return); it changes nothing in the loop."""
    _check(weight, r, iters)
    nf4.bnb_functional()
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    device, dtype = weight.device, weight.dtype
    w = weight.detach().to(dtype=torch.float32)
    res = w.clone()
    for i in range(iters):
        q = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                              quant_type="nf4").to(device)
        deq = nf4.dequantize(q.data, q.quant_state)  # = bnb's dequantize_4bit (see nf4.py for the CPU shapes)
        res = w - deq
        out = _low_rank_decomposition(res, reduced_rank=r)
        L, R = out["L"], out["R"]
        if on_round is not None:
            on_round(i + 1, deq.to(device=device, dtype=dtype), R, L)
        if i + 1 == iters:
            break
        res = w - torch.mm(L, R)
    return deq.to(device=device, dtype=dtype), R, L


def loftq(weight: torch.Tensor, r: int, iters: int = 1):
    """LoftQ with peft's own loftq_init where it runs (a CUDA or XPU weight), else loftq_reference.
    Returns (dequantized base, lora_A, lora_B)."""
    _check(weight, r, iters)
    if weight.device.type in ("cuda", "xpu"):
        nf4.bnb_functional()
        from peft.utils.loftq_utils import loftq_init
        return loftq_init(weight.detach(), num_bits=4, reduced_rank=r, num_iter=iters)
    return loftq_reference(weight, r, iters)
