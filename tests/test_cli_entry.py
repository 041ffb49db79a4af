"""The `pissa-fast` entry points: `python -m pissa_fast` is the same program; --help and the pure-Python
commands work without the compiled library and without importing transformers or peft; plus the
small parsers and the plan's split by bytes."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pissa_fast.commands.init import target_modules_arg
from pissa_fast.init.plan import split_by_bytes
from pissa_fast.options import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_LIBRARY = "import sys; sys.modules['pissa_fast._C'] = None\n"  # as if the library was never built


def run_py(code, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PISSA_FAST_PROGRESS="0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_python_dash_m_is_the_cli():
    proc = run_py(None, "-m", "pissa_fast", "--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("init", "convert-to-lora", "verify", "bench"):
        assert name in proc.stdout
    proc = run_py(None, "-m", "pissa_fast", "init", "--help")
    assert proc.returncode == 0 and "--target-modules" in proc.stdout and "--trust-remote-code" in proc.stdout


def _adapter(path, A, B, r, alpha=None, meta=None):
    from safetensors.torch import save_file

    os.makedirs(path)
    save_file({"base_model.model.l.lora_A.weight": A, "base_model.model.l.lora_B.weight": B},
              os.path.join(path, "adapter_model.safetensors"), metadata=meta or {"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha or r, "target_modules": ["l"]}, fh)


def test_without_the_compiled_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    A0, B0 = torch.randn(2, 12, generator=g), torch.randn(10, 2, generator=g)
    _adapter(tmp_path / "init", A0, B0, 2, meta={"format": "pt", "pissa_fast_original_model": "org/base"})
    _adapter(tmp_path / "trained", A0 + 0.1, B0 - 0.1, 2)
    code = NO_LIBRARY + (
        "from pissa_fast.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('heavy imports:', sorted(m for m in ('transformers', 'peft', 'pissa_fast.core') if m in sys.modules))\n"
        "sys.exit(rc)\n")
    proc = run_py(code, "convert-to-lora", "--initial", tmp_path / "init", "--trained", tmp_path / "trained",
                  tmp_path / "lora", "--rank", 2)
    assert proc.returncode == 0, proc.stderr
    assert "rank 2 -> 2" in proc.stdout and "heavy imports: []" in proc.stdout
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["base_model_name_or_path"] == "org/base"
    proc = run_py(code, "verify", "--help")
    assert proc.returncode == 0 and "--adapter" in proc.stdout
    proc = run_py(code, "init", tmp_path / "nowhere", tmp_path / "out", "--target-modules", "q_proj")
    assert proc.returncode == 2 and "compiled library pissa_fast._C could not be loaded" in proc.stderr
    assert "pip install --no-build-isolation" in proc.stderr and not (tmp_path / "out").exists()
    proc = run_py(NO_LIBRARY + "import pissa_fast, torch\n"
                  "print(pissa_fast.build_info(), hasattr(pissa_fast, 'no_such_name'))\n"
                  "pissa_fast.decompose(torch.randn(4, 4), 2)\n")
    assert "missing False" in proc.stdout
    assert "NativeLibraryMissing: pissa_fast.decompose: the compiled library" in proc.stderr


def test_help_imports_nothing_heavy():
    proc = run_py("import sys\nfrom pissa_fast.cli import main\n"
                  "try:\n    main(['init', '--help'])\nexcept SystemExit:\n    pass\n"
                  "print('heavy imports:', sorted(m for m in ('transformers', 'peft', 'huggingface_hub') "
                  "if m in sys.modules))\n")
    assert proc.returncode == 0, proc.stderr
    assert "heavy imports: []" in proc.stdout


def test_target_modules_arg():
    assert target_modules_arg(["all-linear"]) == "all-linear"
    assert target_modules_arg(["ALL-LINEAR"]) == "all-linear"
    assert target_modules_arg(["q_proj,v_proj"]) == ["q_proj", "v_proj"]
    assert target_modules_arg(["q_proj", "v_proj,", "self_attn.o_proj"]) == ["q_proj", "v_proj", "self_attn.o_proj"]
    assert target_modules_arg([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"
    assert target_modules_arg([r"layers\.[0-3]\..*proj"]) == r"layers\.[0-3]\..*proj"


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MB") == 512 * 10 ** 6 and parse_size(1000) == 1000
    assert parse_size("1e9") == 10 ** 9 and parse_size(" 1.5 kib ") == 1536
    for bad in ("0", "-1", "2 parsecs", "", "GiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_split_by_bytes_balances_and_keeps_every_job_once():
    jobs = [SimpleNamespace(shard=f"s{i}", nbytes=n) for i, n in enumerate([50, 10, 40, 30, 30, 20, 5, 5])]
    parts = split_by_bytes(jobs, 3)
    assert sorted(j.shard for p in parts for j in p) == sorted(j.shard for j in jobs)
    loads = [sum(j.nbytes for j in p) for p in parts]
    assert max(loads) - min(loads) <= max(j.nbytes for j in jobs) and sum(loads) == 190
    assert [[j.shard for j in p] for p in parts] == [[j.shard for j in p] for p in split_by_bytes(jobs, 3)]
    for p in parts:  # each worker keeps checkpoint order
        assert [int(j.shard[1:]) for j in p] == sorted(int(j.shard[1:]) for j in p)
    assert split_by_bytes(jobs, 1) == [jobs]
    with pytest.raises(ValueError):
        split_by_bytes(jobs, 0)
