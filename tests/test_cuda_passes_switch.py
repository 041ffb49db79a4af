"""The switch between the two CUDA implementations of the passes: pissa_fast.set_cuda_passes /
cuda_passes / use_cuda_passes, the ops behind them, and PISSA_FAST_CUDA_PASSES read when the library
loads. Runs on any build; on a CUDA build the "kernels" setting is accepted, on a CPU-only build it is
refused with an error that says why."""
import os
import subprocess
import sys

import pytest
import torch

import pissa_fast as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_KERNELS = pf.build_info().startswith("cuda")


@pytest.fixture(autouse=True)
def _restore_setting():
    before = pf.cuda_passes_setting()
    yield
    pf.ops.set_cuda_passes(before)


def test_default_is_aten_everywhere():
    pf.set_cuda_passes("default")
    assert pf.cuda_passes_setting() == "default"
    # No architecture is proven for the kernels yet, so "default" means the ATen passes on any GPU.
    assert pf.cuda_passes() == "aten"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            assert pf.cuda_passes(i) == "aten"
            assert pf.cuda_passes(f"cuda:{i}") == "aten"


def test_set_and_context_manager():
    pf.set_cuda_passes("aten")
    assert (pf.cuda_passes_setting(), pf.cuda_passes()) == ("aten", "aten")
    assert pf.ops.get_cuda_passes() == ("aten", "aten")
    if HAS_KERNELS:
        with pf.use_cuda_passes("kernels"):
            assert (pf.cuda_passes_setting(), pf.cuda_passes()) == ("kernels", "kernels")
        assert pf.cuda_passes_setting() == "aten"
    else:
        with pytest.raises(RuntimeError, match="'kernels' needs pissa_fast's CUDA kernels, and this CPU-only build"):
            pf.set_cuda_passes("kernels")
        assert pf.cuda_passes_setting() == "aten"  # unchanged by the refused call
    with pf.use_cuda_passes("default"):
        assert pf.cuda_passes_setting() == "default"
    assert pf.cuda_passes_setting() == "aten"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"impl must be one of \('aten', 'kernels', 'default'\), got 'fast'"):
        pf.set_cuda_passes("fast")
    with pytest.raises(ValueError, match="set_cuda_passes: impl must be 'aten', 'kernels' or 'default', got ''"):
        pf.ops.set_cuda_passes("")
    with pytest.raises(ValueError, match="device must be a CUDA device, got cpu"):
        pf.cuda_passes("cpu")


def _in_fresh_process(env_value, code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PISSA_FAST_CUDA_PASSES", None)
    if env_value is not None:
        env["PISSA_FAST_CUDA_PASSES"] = env_value
    return subprocess.run([sys.executable, "-c", "import pissa_fast as pf\n" + code], env=env,
                          capture_output=True, text=True, timeout=120)


def test_environment_variable_read_at_load():
    r = _in_fresh_process("aten", "print(pf.cuda_passes_setting(), pf.cuda_passes())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["aten", "aten"]


def test_environment_variable_invalid_or_unavailable():
    # A bad value is reported, naming the variable, by anything that needs the setting; an explicit
    # set_cuda_passes replaces it.
    code = ("try:\n    pf.cuda_passes()\nexcept ValueError as e:\n    print('raised:', e)\n"
            "pf.set_cuda_passes('aten')\nprint('then', pf.cuda_passes())")
    r = _in_fresh_process("Kernels", code)
    assert r.returncode == 0, r.stderr
    assert "raised: PISSA_FAST_CUDA_PASSES must be 'aten', 'kernels' or 'default' (or unset), got 'Kernels'" in r.stdout
    assert "then aten" in r.stdout
    r = _in_fresh_process("kernels", "print(pf.cuda_passes_setting())")
    if HAS_KERNELS:
        assert r.returncode == 0 and r.stdout.split() == ["kernels"], r.stderr
    else:
        assert r.returncode != 0
        assert "set to 'kernels' (PISSA_FAST_CUDA_PASSES or set_cuda_passes), but this CPU-only build" in r.stderr
