"""PiSSA-initialize a batch of peft LoRA layers with pissa_fast, exactly as peft's `LoraLayer.pissa_init`
would leave each of them, but with one `decompose_many` call per (niter, r, device) group.

peft's conventions, per layer, with r and scaling as peft resolved them (rank_pattern, alpha_pattern,
use_rslora):

    lora_A = diag(sqrt(S / scaling)) V^T = A / sqrt(scaling)   (A, B: pissa_fast's factors of W)
    lora_B = U diag(sqrt(S / scaling))   = B / sqrt(scaling)
    W     <- W - scaling lora_B lora_A  = W - B A, in W's dtype, written in place

W is the (out, in) weight (the transpose of a transformers Conv1D's, fan_in_fan_out). The factors
are rounded through the base weight's dtype and stored in the dtype and device the adapter
parameters have, as peft's pissa_init followed by its move to the base layer's device does.
"""
from __future__ import annotations

import bisect
import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import memory
from .._heap import one_release
from ..distributed.shards import full_shape, is_dtensor, is_sharded, is_zero3, local_tensor
from ..memory import span
from ..options import PEFT_PISSA_DTYPES, progress_enabled
from .niter import decompose_kwargs, literal

_MAX_LAYERS_PER_CALL = {"cuda": 64}  # batching pays on GPUs; on CPUs small calls keep the progress bar moving
_MAX_LAYERS_PER_CALL_DEFAULT = 8
_MAX_BYTES_PER_CALL = 2 << 30  # also what one call gathers at once under DeepSpeed ZeRO-3
_PROGRESS_DELAY_S = 2.0  # the bar appears once the init has run this long
_QUANTIZED_HINTS = ("4bit", "8bit", "Quant", "Hqq", "Gptq", "GPTQ", "Awq", "AWQ", "Eetq", "TorchAO", "Aqlm", "Hqq")


@dataclass
class Pending:
    """One LoRA layer whose PiSSA init was asked for (peft's pissa_init(adapter, init) call)."""

    layer: object  # peft LoraLayer
    adapter: str
    niter: int | None  # None: "pissa", the exact SVD
    name: str = ""  # module name, filled in when known (messages only)


def label(p: Pending) -> str:
    return p.name or f"a {type(p.layer).__name__} layer"


def weight_shape(w: torch.Tensor) -> tuple[int, ...]:
    """The full shape, also for a parameter partitioned by DeepSpeed ZeRO-3 (its .shape is (0,)) and a
    DTensor (its .shape is already the global one)."""
    return full_shape(w)


def why_unsupported(layer, adapter: str) -> str | None:
    """None when pissa_fast initializes this layer exactly as peft would; otherwise why not (the
    layer then goes to peft's own pissa_init, or raises in strict mode)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = layer.get_base_layer()
    kind = f"{type(layer).__name__} wrapping {type(base).__name__}"
    quantized = "bnb" in type(layer).__module__ or any(h in type(layer).__name__ for h in _QUANTIZED_HINTS)
    if quantized:
        return (f"quantized base layer ({kind}); PiSSA needs a float32/float16/bfloat16 weight: initialize "
                f"PiSSA on the unquantized model, then quantize the residual")
    if not isinstance(layer, LoraLinear) or not _is_linear(base):
        return f"layer type {kind} (pissa_fast handles Linear and transformers Conv1D layers)"
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{kind} has no weight tensor"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) and not is_dtensor(weight):
        cls = type(weight)
        return (f"quantized or packed base weight ({cls.__module__}.{cls.__name__}); PiSSA needs a "
                f"float32/float16/bfloat16 weight: initialize PiSSA on the unquantized model, then quantize the residual")
    if weight.dtype not in PEFT_PISSA_DTYPES:
        return (f"base weight dtype {weight.dtype}; please initialize PiSSA under float32, float16, or bfloat16 "
                f"(as peft requires), then re-quantize the residual model")
    if weight.device.type == "meta":
        return "base weight is on the meta device (offloaded or not loaded); PiSSA needs its values"
    shape = weight_shape(weight)
    r = int(layer.r[adapter])
    if len(shape) != 2 or not 1 <= r <= min(shape):
        out_f, in_f = (shape[1], shape[0]) if layer.fan_in_fan_out else shape[:2]
        return (f"r={r} is larger than the layer allows (min(out, in) = {min(shape)} for a {out_f} x {in_f} "
                f"weight); lower r or use rank_pattern")
    return None


def _is_linear(base) -> bool:
    if isinstance(base, torch.nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - peft depends on transformers
        return False
    return isinstance(base, Conv1D)


def _span(w: torch.Tensor) -> tuple[str, int, int]:
    """(device, lo, hi): where w's values live; overlapping spans mean the layers share a weight."""
    if is_zero3(w):  # DeepSpeed ZeRO-3: the partitioned parameter itself is the identity
        return (f"ds:{w.ds_id}", 0, 1)
    local = local_tensor(w)  # a DTensor: this rank's shard (tied DTensors share it)
    if local.numel() == 0:  # an empty shard on this rank tells nothing: the DTensor object does
        return (f"dtensor:{id(w)}", 0, 1)
    lo, hi = span(local)
    return (str(local.device), lo, hi)


class _Disjoint:
    """Disjoint byte spans per device, with an O(log n) overlap test."""

    def __init__(self):
        self.starts: dict[str, list[int]] = defaultdict(list)
        self.ends: dict[str, list[int]] = defaultdict(list)
        self.owner: dict[tuple[str, int], Pending] = {}

    def overlapping(self, dev: str, lo: int, hi: int) -> Pending | None:
        starts, ends = self.starts[dev], self.ends[dev]
        k = bisect.bisect_right(starts, lo)
        for j in (k - 1, k):  # the span starting at or before lo, and the next one
            if 0 <= j < len(starts) and starts[j] < hi and lo < ends[j]:
                return self.owner[(dev, starts[j])]
        return None

    def add(self, dev: str, lo: int, hi: int, p: Pending) -> None:
        k = bisect.bisect_right(self.starts[dev], lo)
        self.starts[dev].insert(k, lo)
        self.ends[dev].insert(k, hi)
        self.owner[(dev, lo)] = p


def ties(pending: list[Pending]) -> list[tuple[Pending, Pending]]:
    """(later, earlier) for every layer whose weight an earlier pending layer shares (tied weights)."""
    out, seen = [], _Disjoint()
    for p in pending:
        dev, lo, hi = _span(p.layer.get_base_layer().weight)
        earlier = seen.overlapping(dev, lo, hi)
        if earlier is not None:
            out.append((p, earlier))
        else:
            seen.add(dev, lo, hi, p)
    return out


def _waves(pending: list[Pending]) -> list[list[Pending]]:
    """Split into consecutive waves of layers with disjoint weights. A layer whose weight an earlier
    layer of its wave shares (tied weights) starts a new wave, so it decomposes that layer's residual,
    as peft's layer-by-layer loop does."""
    waves, current, spans = [], [], _Disjoint()
    for p in pending:
        dev, lo, hi = _span(p.layer.get_base_layer().weight)
        if spans.overlapping(dev, lo, hi) is not None:
            waves.append(current)
            current, spans = [], _Disjoint()
        current.append(p)
        spans.add(dev, lo, hi, p)
    if current:
        waves.append(current)
    return waves


def _chunks(items: list[Pending], device: torch.device):
    """Bounded calls, same shapes together (decompose_many runs one batched pass per shape)."""
    items = sorted(items, key=lambda p: (weight_shape(p.layer.get_base_layer().weight),
                                         str(p.layer.get_base_layer().weight.dtype)))
    most = _MAX_LAYERS_PER_CALL.get(device.type, _MAX_LAYERS_PER_CALL_DEFAULT)
    chunk, nbytes = [], 0
    for p in items:
        w = p.layer.get_base_layer().weight
        b = math.prod(weight_shape(w)) * w.element_size()
        if chunk and (len(chunk) >= most or nbytes + b > _MAX_BYTES_PER_CALL):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(p)
        nbytes += b
    if chunk:
        yield chunk


def _sharded(p: Pending) -> bool:
    return is_sharded(p.layer.get_base_layer().weight)


def early_populate(early: memory.EarlyPopulate, p: Pending) -> None:
    """Start populating p's weight if it is a private file mapping (memory.EarlyPopulate), while peft
    goes on injecting; sharded weights are left to pissa_fast.distributed, as in initialize."""
    if not _sharded(p):
        early.add(_matrix(p))


def _matrix(p: Pending) -> torch.Tensor:
    w = p.layer.get_base_layer().weight.detach()
    return w.t() if p.layer.fan_in_fan_out else w  # Conv1D stores W^T (in, out)


def _set_param(module: torch.nn.Module, value: torch.Tensor, base_dtype: torch.dtype) -> None:
    """Write a LoRA factor into module.weight as peft's pissa_init and the move to the base layer
    leave it: rounded through the base weight's dtype, held in the parameter's own dtype and device."""
    param = module.weight
    value = value.to(base_dtype)
    if param.device.type == "meta" or param.shape != value.shape:  # low_cpu_mem_usage: no storage yet
        # straight into _parameters: accelerate's init_empty_weights (still active around peft's
        # injection with low_cpu_mem_usage) would put a parameter set through register_parameter on meta
        module._parameters["weight"] = torch.nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
        return
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def initialize(pending: list[Pending], seed: int, *, progress: bool | None = None, gather: bool = True,
               early: memory.EarlyPopulate | None = None) -> None:
    """PiSSA-initialize every pending layer (validated by the caller with why_unsupported), in place.
    Every weight of one decompose_many call is checked and factored before any residual is written;
    `seed` draws the test matrices (decompose_many's seed). gather=False when the caller already
    holds peft's gather_params_ctx for these weights. early: the weights' population begun during the
    injection (memory.EarlyPopulate; see early_populate)."""
    if not pending:
        return
    seed = _agreed_seed(pending, seed)
    bar = None
    if progress if progress is not None else progress_enabled():
        from tqdm.auto import tqdm

        niters = {p.niter for p in pending}
        what = "exact" if niters == {None} else "niter " + ",".join(str(n) for n in sorted(niters, key=str))
        # only for a long init: a small model's injection prints nothing (tqdm's delay), and on a
        # distributed run only the first rank draws it
        rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0
        bar = tqdm(total=len(pending), desc=f"PiSSA init (pissa_fast, {what})", unit="layer",
                   delay=_PROGRESS_DELAY_S, disable=not rank0)
    # one look at the process's memory map for the whole batch (file-backed weights: memory.py);
    # ZeRO-3-partitioned weights have no data until gathered, and DTensors are written shard by shard
    # by pissa_fast.distributed: neither is a file mapping to populate here
    local = [p for p in pending if not _sharded(p)]
    try:
        # one heap release for the whole injection, not one per decompose_many call (_heap.py)
        with memory.prepared([_matrix(p) for p in local], [label(p) for p in local], early), one_release():
            _run(pending, seed, gather, bar)
    finally:
        if bar is not None:
            bar.close()


def _agreed_seed(pending: list[Pending], seed: int) -> int:
    """Rank 0's seed on every rank when any weight is sharded. The seed comes from torch's global RNG,
    which ranks need not share (per-rank seeding, or random ops on DTensors that advance it on some
    ranks only); sharded weights are decomposed collectively, and every rank must hold the same
    factors. Every rank runs peft's injection over the same layers, so all of them get here."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seed
    if not any(_sharded(p) for p in pending):
        return seed
    box = [int(seed)]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _run(pending: list[Pending], seed: int, gather: bool, bar) -> None:
    from peft.utils.integrations import gather_params_ctx

    from ..core import decompose_many

    for wave in _waves(pending):
        groups: dict[tuple, list[Pending]] = defaultdict(list)
        for p in wave:
            w = p.layer.get_base_layer().weight
            # DTensors apart: pissa_fast.distributed decomposes them collectively, every rank making
            # the same calls in the same order (peft's injection runs on every rank)
            groups[(p.niter, int(p.layer.r[p.adapter]), w.device, is_dtensor(w))].append(p)
        for (niter, r, device, dtensor), items in groups.items():
            kwargs = decompose_kwargs(niter, r)
            if dtensor:  # the sharded path takes a fixed niter only (still at least svd_lowrank's accuracy)
                kwargs = literal(kwargs)
            for chunk in _chunks(items, device):
                weights = [p.layer.get_base_layer().weight for p in chunk]
                # peft gathers each weight around its pissa_init (DeepSpeed ZeRO-3); so do we, per call.
                # Gathered, a ZeRO-3 weight's detached data is the full matrix: decomposed like a plain
                # one on every rank, as peft does, and re-partitioned from rank 0 when the context ends.
                with gather_params_ctx(weights) if gather else contextlib.nullcontext():
                    outs = decompose_many([_matrix(p) for p in chunk], r, inplace=True, seed=seed, **kwargs)
                    for p, w, d in zip(chunk, weights, outs):
                        root = math.sqrt(p.layer.scaling[p.adapter])
                        _set_param(p.layer.lora_A[p.adapter], d.A / root, w.dtype)
                        _set_param(p.layer.lora_B[p.adapter], d.B / root, w.dtype)
                if bar is not None:
                    bar.update(len(chunk))
