"""The one test matrix: devices (CUDA only when present), dtypes, and per-dtype tolerances."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def eps(dtype):
    return torch.finfo(dtype).eps


def acc_eps(dtype):
    """Rounding unit of the accumulation: float32 except for float64 weights."""
    return eps(torch.float64 if dtype == torch.float64 else torch.float32)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (tests of whole tiny models and CLI runs: they gain nothing from
    threads, OpenMP's spin-waits make each tiny op far slower on a shared 2-core machine, and CPU
    results are bitwise reproducible for a given thread count); restored after the module. Use with
    `pytestmark = [..., pytest.mark.usefixtures("one_torch_thread")]`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spectrum_matrix(m, n, s, dtype=torch.float64, device="cpu", seed=0):
    """W = U diag(s) V^T with Haar-random orthonormal U (m x k), V (n x k), k = len(s); returns
    (W in dtype, U, s, V in float64)."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    s = torch.as_tensor(s, dtype=torch.float64)
    W = (U * s) @ V.T
    return W.to(device=device, dtype=dtype), U, s, V
