"""The CUDA kernels' own source, run on the CPU through tests/cuda_emu (one std::thread per CUDA thread,
emulated barriers, shuffles, clusters, cp.async and atomics), against float64 references.

This is how the kernels are checked on machines without a GPU: same kernel code, same launch geometry
(plan_pass), device limits chosen to reach every path -- H100-like (thread-block clusters), A100-like
(no clusters), and small shared memory (many slices, streamed column chunks, gram split in two).
It compiles a C++ module (about a minute) and runs for minutes, so it is opt-in:

    PISSA_FAST_EMULATE=1 pytest tests/test_cuda_emulated.py

With PISSA_FAST_EMULATE=asan the module is built with -fsanitize=address (run python with
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0) to catch out-of-bounds
global and shared-memory accesses, as compute-sanitizer would on a GPU.
"""
from __future__ import annotations

import os
import pathlib
import zlib

import pytest
import torch

MODE = os.environ.get("PISSA_FAST_EMULATE", "")
pytestmark = pytest.mark.skipif(not MODE, reason="set PISSA_FAST_EMULATE=1 to run the emulated CUDA kernels")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# [smem_per_sm, smem_per_block (opt-in), smem_reserved, max_cluster]
H100 = [233472, 232448, 1024, 8]
A100 = [167936, 166912, 1024, 1]
SMALL = [2 * (40 << 10) + 2048, 48 << 10, 1024, 8]  # many slices per row block
TINY = [2 * (36 << 10) + 2048, 36 << 10, 1024, 1]   # no clusters, long rows streamed in chunks
LIMITS = {"h100": H100, "a100": A100, "small": SMALL, "tiny": TINY}



@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    flags = ["-O1", "-std=c++20", "-g0", "-DPISSA_FAST_EMULATE", f"-I{HERE / 'cuda_emu'}"]
    ldflags = []
    name = "pissa_fast_emu"
    if MODE == "asan":
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
        name += "_asan"
    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(HERE / "cuda_emu" / "emu_ops.cpp")], extra_cflags=flags,
                extra_ldflags=ldflags, build_directory=str(build), verbose=False)


def _ops():
    import pissa_fast  # noqa: F401  (registers the CPU ops)

    return torch.ops.pissa_fast


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit(dtype):
    return torch.finfo(_acc(dtype)).eps / 2


def _gamma(n, u):
    """n u / (1 - n u): the rounding bound of a length-n dot product in unit roundoff u (any order)."""
    return n * u / (1 - n * u)


def _weights(b, m, n, dtype, gen, view):
    ws = []
    for _ in range(b):
        if view == "cols":  # row stride > n, 16-byte aligned rows
            base = torch.randn(m, n + 3, generator=gen).to(dtype)
            ws.append(base[:, :n])
        elif view == "offset":  # row stride > n and a start that breaks 16-byte alignment
            base = torch.randn(m, n + 1, generator=gen).to(dtype)
            ws.append(base[:, 1:])
        else:
            ws.append(torch.randn(m, n, generator=gen).to(dtype))
    return ws


def _check_close(got, ref, bound, what):
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten or poisoned output)"
    err = (got.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} entries outside the rounding bound; worst "
                           f"err {float(err.max()):.3e} vs bound {float(bound.flatten()[err.argmax()]):.3e}")


# (b, m, n, k, view): odd sizes, single rows and columns, strided and misaligned views, lists.
PASS_CASES = [
    (1, 1, 40, 5, "plain"),
    (1, 37, 1, 3, "plain"),
    (3, 37, 53, 16, "plain"),
    (2, 70, 300, 20, "cols"),
    (2, 33, 129, 7, "offset"),
    (1, 130, 1000, 33, "plain"),
    (1, 9, 5000, 4, "plain"),
]


# dtype: the test matrix of conftest.py.
@pytest.mark.parametrize("limits", list(LIMITS))
@pytest.mark.parametrize("case", PASS_CASES, ids=lambda c: "x".join(map(str, c[:4])) + c[4])
def test_pass_kernels(emu, limits, dtype, case):
    b, m, n, k, view = case
    dt = dtype
    if dt == torch.float64 and limits in ("small", "a100"):
        pytest.skip("fp64 runs on h100 / tiny geometry only (time)")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((limits, dtype, case)).encode()))
    W = _weights(b, m, n, dt, gen, view)
    acc = _acc(dt)
    V = torch.randn(b, n, k, generator=gen, dtype=acc)
    Yin = torch.randn(b, m, k, generator=gen, dtype=acc)
    W64 = torch.stack([w.double() for w in W])
    aW = W64.abs()
    u = _unit(dt)
    ops = _ops()
    plans = []
    for op in ("wx", "wtx", "gram"):
        X = Yin if op == "wtx" else V
        Y, Z, p = emu.pass_op(op, W, X, LIMITS[limits])
        plans += p
        if op in ("wx", "gram"):
            ref = W64 @ V.double()
            bound = _gamma(n, u) * (aW @ V.double().abs()) + 1e-300
            _check_close(Y, ref, bound, f"{op} Y")
            cpu = ops.gram(W, V)[0] if op == "gram" else ops.wx(W, V)
            _check_close(cpu, ref, bound, f"{op} Y (CPU twin, sanity)")
        if op == "wtx":
            ref = W64.mT @ Yin.double()
            bound = _gamma(m, u) * (aW.mT @ Yin.double().abs()) + 1e-300
            _check_close(Z, ref, bound, "wtx Z")
        if op == "gram":
            ref = W64.mT @ (W64 @ V.double())
            bound = _gamma(n + m, u) * (aW.mT @ (aW @ V.double().abs())) + 1e-300
            _check_close(Z, ref, bound, "gram Z")
    # The geometry this case was meant to reach.
    if limits == "h100" and (m, n) == (130, 1000) and dt != torch.float64:
        assert any(p["cluster"] for p in plans), plans
    if limits == "small" and n >= 300:
        assert any(p["groups"] > 1 for p in plans), plans
    if limits == "tiny" and n == 5000:
        assert any(not p["resident"] for p in plans), plans


RESIDUAL_CASES = [
    (1, 1, 7, 3, "plain"),
    (1, 5, 1, 1, "plain"),
    (3, 67, 131, 16, "plain"),
    (2, 64, 256, 40, "cols"),
    (2, 33, 129, 5, "offset"),
]


@pytest.mark.parametrize("inplace", [True, False], ids=["residual_", "residual"])
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: "x".join(map(str, c[:4])) + c[4])
def test_residual_kernel(emu, inplace, dtype, case):
    b, m, n, r, view = case
    dt = dtype
    gen = torch.Generator().manual_seed(zlib.crc32(repr((inplace, dtype, case)).encode()))
    W = _weights(b, m, n, dt, gen, view)
    acc = _acc(dt)
    B = torch.randn(b, m, r, generator=gen, dtype=acc)
    A = torch.randn(b, r, n, generator=gen, dtype=acc)
    W64 = torch.stack([w.double() for w in W])
    ref = W64 - B.double() @ A.double()
    bound = (torch.finfo(dt).eps * ref.abs() + _gamma(r + 2, _unit(dt)) * (B.double().abs() @ A.double().abs() + W64.abs())
             + 1e-300)
    cpu = _ops().residual(W, B, A)
    _check_close(torch.stack(cpu), ref, bound, "CPU twin (sanity)")
    orig = [w.clone() for w in W]
    orig_base = [w._base.clone() if w._base is not None else None for w in W]
    out = emu.residual(W, B, A, inplace)
    _check_close(torch.stack(out), ref, bound, "residual")
    if inplace:
        assert all(o.data_ptr() == w.data_ptr() for o, w in zip(out, W))
    else:
        assert all(o.is_contiguous() for o in out)
        assert all(torch.equal(w, o) for w, o in zip(W, orig)), "residual wrote its input"
    for w, ob in zip(W, orig_base):  # the columns outside a view are untouched
        if view == "cols":
            assert torch.equal(w._base[:, n:], ob[:, n:])
        elif view == "offset":
            assert torch.equal(w._base[:, :1], ob[:, :1])
