"""Which implementation of the passes over the weights (wx, wtx, gram, residual) runs on CUDA tensors.

Two exist: "aten", the passes written on ATen/cuBLAS GEMMs (tensor cores for bf16/fp16 weights, with
the float32 test vectors split into a high and a low part so that precision matches the float32 CPU
path), and "kernels", the hand-written CUDA kernels. "default" picks, per GPU architecture, the kernels
where benchmarks/gpu_check.sh has proven them and the ATen passes everywhere else (today: everywhere).

    PISSA_FAST_CUDA_PASSES=aten|kernels|default     # read when the library loads
    pissa_fast.set_cuda_passes("kernels")            # at run time
    pissa_fast.cuda_passes()                         # "aten" or "kernels": what a CUDA call runs now
    with pissa_fast.use_cuda_passes("aten"): ...     # for a block of code

The switch lives in the native library (ops pissa_fast::set_cuda_passes / get_cuda_passes), so
libtorch users have it too.
"""
from __future__ import annotations

import contextlib

import torch

from ._ops import ops

SETTINGS = ("aten", "kernels", "default")


def set_cuda_passes(impl: str) -> None:
    """Run the passes of CUDA tensors with `impl`: "aten", "kernels" or "default" (per architecture)."""
    if impl not in SETTINGS:
        raise ValueError(f"impl must be one of {SETTINGS}, got {impl!r}")
    ops.set_cuda_passes(impl)


def cuda_passes_setting() -> str:
    """The current setting: "aten", "kernels" or "default"."""
    return ops.get_cuda_passes(-1)[0]


def cuda_passes(device: torch.device | str | int | None = None) -> str:
    """The implementation a pass on `device` (a CUDA device; default: the current one) runs now:
    "aten" or "kernels"."""
    index = -1
    if device is not None:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {dev}")
        index = -1 if dev.index is None else dev.index
    return ops.get_cuda_passes(index)[1]


@contextlib.contextmanager
def use_cuda_passes(impl: str):
    """set_cuda_passes(impl) for the body of a `with` block; the previous setting is restored after."""
    previous = cuda_passes_setting()
    set_cuda_passes(impl)
    try:
        yield
    finally:
        ops.set_cuda_passes(previous)


@contextlib.contextmanager
def _aten_cpu_config(block_bytes: int | None = None, native: bool | None = None):
    """Test hook: the row-block size and code path (native: the one CUDA runs) of the ATen passes'
    CPU registration (pissa_fast::<op>_aten) for the body of a `with` block."""
    old_block, old_native = ops._get_aten_cpu_config()
    ops._set_aten_cpu_config(old_block if block_bytes is None else int(block_bytes),
                             old_native if native is None else bool(native))
    try:
        yield
    finally:
        ops._set_aten_cpu_config(old_block, old_native)


_ATEN_TWINS = {"wx": "wx_aten", "wtx": "wtx_aten", "gram": "gram_aten", "residual": "residual_aten",
               "residual_": "residual_aten_"}


@contextlib.contextmanager
def _aten_passes_on_cpu():
    """Test and benchmark hook: in the body of a `with` block, pissa_fast::wx/wtx/gram/residual(_) on
    CPU tensors run the ATen passes (pissa_fast::<op>_aten) instead of the CPU kernels, so that the
    whole decomposition can be checked and measured with them on a machine without a GPU. The CPU
    kernels are back when the block ends."""
    lib = torch.library.Library("pissa_fast", "IMPL")
    try:
        for name, twin in _ATEN_TWINS.items():
            try:
                lib.impl(name, getattr(ops, twin), "CPU", allow_override=True)
            except TypeError:  # torch < 2.8 has no allow_override and only warns about the override
                lib.impl(name, getattr(ops, twin), "CPU")
        yield
    finally:
        lib._destroy()


def cpu_passes() -> str:
    """What the CPU gram and residual passes of a bf16 weight run on: "amx" (the AMX tiles of Intel
    Sapphire Rapids and later, where the OS grants them; PISSA_FAST_CPU_AMX=0 switches them off) or
    "float32" (a float32 copy of each row block through the BLAS; every other dtype, and shapes that are
    not multiples of 32, always take this path)."""
    return "amx" if ops._cpu_amx(-1) else "float32"
