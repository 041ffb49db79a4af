"""bitsandbytes' own 4-bit (NF4/FP4) quantizer, as QPiSSA and the QLoRA/LoftQ baselines use it.

Everything quantizes with `bitsandbytes.functional.quantize_4bit` and dequantizes with
`dequantize_4bit`, the functions transformers' `BitsAndBytesConfig(load_in_4bit=True)` calls when it
loads a checkpoint, so a residual fitted here is the tensor a 4-bit load reproduces. Two facts make
that exact:

- bnb quantizes a weight in the dtype it is loaded in (bf16 for a bf16 checkpoint), so we quantize
  in the weight's own dtype, never in float32: the absmax of each block is then a value of that dtype,
  the dequantized block keeps it as its largest magnitude, and quantizing the dequantized tensor
  again gives the same codes and the same absmax, i.e. the same tensor (checked by `round_trip_exact`).
- with double quantization the absmax vector is itself quantized around its mean, which moves when
  the tensor is quantized again; `fixed_point` iterates until a load reproduces the tensor and says
  whether it got there.

Blocks run over the flattened tensor (bnb's quantizer and its CUDA kernels). bnb 0.50's native CPU
dequantize kernel instead takes a 2-D shape and gets some shapes wrong whose last dimension is even
but not a multiple of the blocksize (64 x 96 or 64 x 160 at blocksize 64, for example; the
projections of real LLMs, multiples of 64 wide, are fine): `dequantize` therefore hands bnb the flat
shape, which every backend dequantizes by the quantizer's own block layout, and reshapes.

On CPU bnb's quantize_4bit is plain torch code whose temporaries are ~20 bytes per element (a float32
copy, scaled values, int32 codes); `quantize` runs it on row chunks of at most CHUNK_ELEMENTS elements
(whole blocks, so the result is bitwise the whole-tensor call) to bound that to ~20 MB.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what it quantizes
DOUBLE_QUANT_BLOCKSIZE = 256  # bnb's fixed blocksize for the absmax statistics
TRANSFORMERS_BLOCKSIZE = 64  # the one blocksize transformers' 4-bit loading uses (bnb's default)
CHUNK_ELEMENTS = 1 << 20
BNB_VERSION = "0.50.2"
INSTALL_HINT = f"pip install 'pissa_fast[quant]' (or: pip install bitsandbytes=={BNB_VERSION})"


def bnb_functional():
    """bitsandbytes.functional, or an ImportError that names the extra to install."""
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        raise ImportError(f"4-bit quantization (QPiSSA, LoftQ, QLoRA baselines) needs bitsandbytes: "
                          f"{INSTALL_HINT}") from e
    return F


@dataclass(frozen=True)
class QuantSpec:
    """A bnb 4-bit format. transformers' BitsAndBytesConfig has no blocksize option and loads with
    bnb's default (64), so a residual meant for `from_pretrained(..., quantization_config=...)`
    must use blocksize 64; `bnb_config_kwargs` gives the matching BitsAndBytesConfig arguments."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if (isinstance(self.blocksize, bool) or not isinstance(self.blocksize, numbers.Integral)
                or self.blocksize not in BLOCKSIZES):
            raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), "
                             f"got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(self.double_quant).__name__} "
                            f"{self.double_quant!r}")

    def bnb_config_kwargs(self) -> dict:
        """Arguments of transformers.BitsAndBytesConfig that load a residual quantized with this spec."""
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": self.double_quant}

    @property
    def loads_through_transformers(self) -> bool:
        """Whether BitsAndBytesConfig can load this format (it has no blocksize option: always 64)."""
        return self.blocksize == TRANSFORMERS_BLOCKSIZE

    def bnb_config_code(self, compute_dtype: str = "torch.bfloat16") -> str:
        """The BitsAndBytesConfig(...) expression that loads a residual quantized with this spec."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.bnb_config_kwargs().items())
        return f"BitsAndBytesConfig({args}, bnb_4bit_compute_dtype={compute_dtype})"


def _row_chunks(m: int, n: int, blocksize: int, max_elements: int):
    """Row ranges whose sizes (but the last) are whole multiples of blocksize elements, so every
    quantization block lies inside one chunk and the chunks quantize exactly as the whole tensor."""
    step = blocksize // math.gcd(n, blocksize)  # rows per whole number of blocks
    rows = max(step, (max(1, max_elements // max(n, 1)) // step) * step)
    return [(i, min(m, i + rows)) for i in range(0, m, rows)]


@torch.no_grad()
def quantize(x: torch.Tensor, spec: QuantSpec, *, max_elements: int = CHUNK_ELEMENTS):
    """bnb.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant, quant_type), run on
    row chunks of a 2-D x: returns (packed codes, QuantState), bitwise what the whole-tensor call gives."""
    F = bnb_functional()
    if x.dtype not in QUANT_DTYPES:
        raise TypeError(f"bitsandbytes quantizes float32, bfloat16 or float16 tensors, got {x.dtype}")
    x2 = x.reshape(1, -1) if x.dim() != 2 else x
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    packed, absmax = [], []
    for lo, hi in _row_chunks(x2.shape[0], x2.shape[1], spec.blocksize, max_elements):
        p, st = F.quantize_4bit(x2[lo:hi], blocksize=spec.blocksize, compress_statistics=False,
                                quant_type=spec.quant_type)
        packed.append(p)
        absmax.append(st.absmax)
    packed = packed[0] if len(packed) == 1 else torch.cat(packed)
    absmax = absmax[0] if len(absmax) == 1 else torch.cat(absmax)
    code = F.get_4bit_type(spec.quant_type, device=x.device)
    if not spec.double_quant:
        return packed, F.QuantState(absmax=absmax, shape=x.shape, code=code, blocksize=spec.blocksize,
                                    quant_type=spec.quant_type, dtype=x.dtype)
    # The statistics step of quantize_4bit(compress_statistics=True), on the whole absmax vector.
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=DOUBLE_QUANT_BLOCKSIZE)
    return packed, F.QuantState(absmax=qabsmax, shape=x.shape, code=code, blocksize=spec.blocksize,
                                quant_type=spec.quant_type, dtype=x.dtype, offset=offset, state2=state2)


@torch.no_grad()
def _flat(state):
    """state, with its shape flattened (see the module docstring: the CPU kernel's 2-D indexing)."""
    import copy

    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return flat


@torch.no_grad()
def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bnb.functional.dequantize_4bit: the tensor (in the quantized dtype) the codes stand for."""
    return bnb_functional().dequantize_4bit(packed, _flat(state)).reshape(state.shape)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(x)): the nearest tensor of the 4-bit format (x's dtype), as bnb rounds it."""
    return dequantize(*quantize(x, spec))


@torch.no_grad()
def round_trip_exact(x: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether a 4-bit load of x (bnb's own whole-tensor quantize_4bit, then dequantize_4bit)
    gives back x bit for bit."""
    F = bnb_functional()
    p, st = F.quantize_4bit(x, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                            quant_type=spec.quant_type)
    return torch.equal(dequantize(p, st), x)


def _nested_absmax(F, state) -> torch.Tensor:
    """The float32 block scales a nested (double-quantized) QuantState dequantizes with, as
    bnb.functional.dequantize_4bit computes them."""
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def _largest_codes(F, packed, state) -> torch.Tensor:
    """Per block, the largest |code| present (1 for any block that came out of quantize_4bit, 0 for
    an all-zero block): the block's absmax after a load is that code times its scale, rounded."""
    unit = F.QuantState(absmax=torch.ones_like(_nested_absmax(F, state) if state.nested else state.absmax),
                        shape=state.shape, code=state.code, blocksize=state.blocksize,
                        quant_type=state.quant_type, dtype=torch.float32)
    flat = dequantize(packed, unit).reshape(-1).abs()
    pad = (-flat.numel()) % state.blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, state.blocksize).amax(1)


@torch.no_grad()
def _settle_statistics(F, packed, state, max_rounds):
    """Double quantization: a load re-derives each block's absmax from R = dtype(code * scale) as
    dtype(scale) (times the block's largest code), then re-quantizes that vector around its new mean,
    which differs from the old one, so R moves. The codes themselves do not move (R / absmax stays
    within a rounding of each code, far from the NF4 decision boundaries), so the fixed point is
    searched on the absmax vector alone, numel / blocksize values per pass instead of the tensor.
    bf16 settles within ~25 passes in our tests; fp16/fp32 often wander (their finer grid lets the
    mean drift every pass). Returns (state, settled, moved)."""
    cmax = _largest_codes(F, packed, state)
    b = _nested_absmax(F, state)
    for passes in range(max_rounds):
        a = (cmax * b).to(state.dtype).float()  # what a load measures as each block's absmax
        offset = a.mean()
        qabsmax, state2 = F.quantize_blockwise(a - offset, blocksize=DOUBLE_QUANT_BLOCKSIZE)
        nxt = F.QuantState(absmax=qabsmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=state.dtype, offset=offset, state2=state2)
        b2 = _nested_absmax(F, nxt)
        if torch.equal(b2, b):
            return state, True, passes > 0
        state, b = nxt, b2
    return state, False, True


@torch.no_grad()
def fixed_point(packed, state, spec: QuantSpec, *, max_rounds: int = 64):
    """From codes (packed, state), the tensor R = dequantize(codes) that a 4-bit load reproduces.

    Without double quantization the first R already is one (see the module docstring); this costs one
    quantization of R to confirm it (and falls back to re-quantizing R until it stops moving, should
    it not be). With double quantization the absmax statistics are settled first (see
    _settle_statistics), which may not succeed within max_rounds: then R is the last dequantized
    tensor, a load changes it by ~1e-4 of its norm, and exact is False.
    Returns (packed, state, R, exact, changed): changed when R differs from dequantize(codes given)."""
    F = bnb_functional()
    moved = False
    if spec.double_quant and state.nested:
        state, _, moved = _settle_statistics(F, packed, state, max_rounds)
    R = dequantize(packed, state)
    for rounds in range(max_rounds):
        p2, st2 = quantize(R, spec)
        R2 = dequantize(p2, st2)
        if torch.equal(R2, R):
            return packed, state, R, True, moved or rounds > 0
        if spec.double_quant:  # the statistics did not settle: R stays what the codes give
            return packed, state, R, False, moved
        packed, state, R = p2, st2, R2
    return packed, state, R, False, True
