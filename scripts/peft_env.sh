#!/usr/bin/env bash
# An extra environment with another peft (and the transformers/trl that trainers pin), for testing the
# pissa_fast peft backend against every peft version we claim (pissa_fast/peft/versions.py).
#
#   scripts/peft_env.sh peft-0.18          # create $PEFT_ENV_ROOT/peft-0.18 (default /work/venvs)
#   scripts/peft_env.sh peft-0.18 --test   # ... and run tests/test_peft_*.py in it
#
# The environment is a venv on top of the project's .venv: its site-packages holds a .pth that puts
# .venv's site-packages on sys.path after its own, so torch, accelerate, datasets... are reused and
# only the packages of scripts/peft_envs/NAME.txt are installed (--no-deps, exact pins). A venv's own
# site-packages comes first on sys.path, so they shadow .venv's copies; the script checks that they do.
# pissa_fast itself comes from this checkout (PYTHONPATH), built in place by ./run.sh setup.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NAME="${1:?usage: scripts/peft_env.sh NAME [--test] (NAME: a file in scripts/peft_envs/ without .txt)}"
REQS="scripts/peft_envs/$NAME.txt"
[ -f "$REQS" ] || { echo "peft_env: no $REQS" >&2; exit 2; }
BASE_PY="${PISSA_FAST_PY:-.venv/bin/python}"   # the project's venv (./run.sh setup makes it)
ENV_DIR="${PEFT_ENV_ROOT:-/work/venvs}/$NAME"
PY="$ENV_DIR/bin/python"

if [ ! -x "$PY" ] || ! cmp -s "$REQS" "$ENV_DIR/requirements.txt"; then
  rm -rf "$ENV_DIR"
  mkdir -p "$(dirname "$ENV_DIR")"
  "$BASE_PY" -m venv --without-pip "$ENV_DIR"
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/_pissa_fast_base_venv.pth"
  # pip comes from the base venv; it installs into this venv (sys.prefix) and never touches the base one
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -r "$REQS"
  cp "$REQS" "$ENV_DIR/requirements.txt"
fi

# Shadowing check: each pinned package must import from this venv, at the pinned version.
"$PY" - "$REQS" "$ENV_DIR" <<'PY'
import importlib, importlib.metadata as md, os, sys
reqs, env_dir = sys.argv[1], os.path.realpath(sys.argv[2])
modules = {"huggingface_hub": "huggingface_hub", "httpx": "httpx", "httpcore": "httpcore"}
for line in open(reqs):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    mod = importlib.import_module(modules.get(name, name))
    where = os.path.realpath(mod.__file__)
    if not where.startswith(env_dir) or md.version(name) != version:
        sys.exit(f"peft_env: {name} resolves to {md.version(name)} at {where}, expected {version} in {env_dir}")
print("peft_env:", ", ".join(f"{n} {md.version(n)}" for n in ("peft", "transformers", "trl", "torch")), "in", env_dir)
PY

if [ "${2:-}" = "--test" ]; then
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q tests/test_peft_*.py
fi
