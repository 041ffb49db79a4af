"""PISSA_FAST_PEFT=1 through the pissa_fast_peft.pth startup hook, each case in a fresh interpreter.

The .pth is processed the way Python's startup does it (site.addsitedir on a folder holding a copy of
the repository's file); where the package is installed (./run.sh's editable install, a wheel), the
installed file is tested with a plain interpreter start too."""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = "pissa_fast_peft.pth"

# Runs a tiny get_peft_model with a PiSSA init and reports what happened, as JSON on the last line.
PROBE = r"""
import json, sys
startup = {"torch": "torch" in sys.modules, "hook": "_pissa_fast_peft_hook" in sys.modules}
import peft, torch
import pissa_fast.core as core, pissa_fast.peft as pfp
calls = []
original = core.decompose_many
core.decompose_many = lambda w, *a, **k: (calls.append(len(w)), original(w, *a, **k))[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16))
x = torch.randn(3, 32)
ref = model(x)
pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="pissa_niter_4"))
print(json.dumps(dict(startup, enabled=pfp.is_enabled(), weights=sum(calls),
                      err=(pm(x) - ref).abs().max().item())))
"""


def _run(code, env_value, pth_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "PISSA_FAST_PEFT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PISSA_FAST_PROGRESS"] = "0"
    if env_value is not None:
        env["PISSA_FAST_PEFT"] = env_value
    prelude = f"import site; site.addsitedir({str(pth_dir)!r})\n" if pth_dir else ""
    out = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    shutil.copy(ROOT / PTH, d / PTH)
    return d


def test_pth_file_is_one_cheap_line():
    lines = (ROOT / PTH).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import os;")  # site executes lines starting with "import"
    assert "PISSA_FAST_PEFT" in lines[0] and "torch" not in lines[0]


STARTUP = r"""
import json, sys
print(json.dumps({"torch": "torch" in sys.modules, "hook": "_pissa_fast_peft_hook" in sys.modules,
                  "waiting": any(type(f).__name__ == "_PeftFinder" for f in sys.meta_path)}))
"""


@pytest.mark.parametrize("value", [None, "0"])
def test_startup_costs_nothing_when_off(pth_dir, value):
    got = _run(STARTUP, value, pth_dir)
    assert got == {"torch": False, "hook": value is not None, "waiting": False}  # unset: the hook is not imported


def test_env_var_turns_the_backend_on(pth_dir):
    got = _run(PROBE, "1", pth_dir)
    assert got["torch"] is False and got["hook"] is True  # nothing heavy until the program imports peft
    assert got["enabled"] is True and got["weights"] == 2 and got["err"] < 1e-4


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("0", False), ("off", False),
                                       ("", False)])
def test_values(monkeypatch, value, on):
    import _pissa_fast_peft_hook as hook

    monkeypatch.setenv("PISSA_FAST_PEFT", value)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "peft", raising=False)  # as at startup (restored after the test)
    hook.install()
    hook.install()  # twice: still one finder
    assert sum(isinstance(f, hook._PeftFinder) for f in sys.meta_path) == (1 if on else 0)


def test_enabled_at_once_when_peft_is_already_imported(monkeypatch):
    """install() after `import peft` (e.g. from sitecustomize) enables right away."""
    pytest.importorskip("peft")
    import _pissa_fast_peft_hook as hook

    import pissa_fast.peft

    monkeypatch.setenv("PISSA_FAST_PEFT", "1")
    assert not pissa_fast.peft.is_enabled()
    hook.install()
    try:
        assert pissa_fast.peft.is_enabled()
    finally:
        pissa_fast.peft.disable()


def test_installed_pth_enables_at_plain_startup():
    """Where this package is installed (./run.sh does `pip install -e .`), a plain `python` honours the
    variable; peft's own import triggers it."""
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    if not any((Path(d) / PTH).exists() for d in dirs):
        pytest.skip(f"{PTH} is not installed in {dirs} (PYTHONPATH checkout without `pip install -e .`)")
    got = _run(PROBE, "1")
    assert got["torch"] is False and got["hook"] is True and got["enabled"] is True and got["weights"] == 2
