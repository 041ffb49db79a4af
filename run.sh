#!/usr/bin/env bash
# One front door for a fresh clone: `./run.sh bench` (the main job) and `./run.sh test`.
# Creates .venv, installs requirements.txt into it, builds the native library in place
# (`pip install --no-build-isolation -e .`: torch must exist at build time), then runs the job.
set -euo pipefail
cd "$(dirname "$0")"

PY=.venv/bin/python

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv .venv
  fi
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  "$PY" -c "import pissa_fast; print('pissa_fast', pissa_fast.__version__, 'built for', pissa_fast.build_info())"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test)
    setup
    "$PY" -m pytest -q tests "$@"
    ;;
  bench)
    setup
    .venv/bin/pissa-fast bench "$@"
    ;;
  core-bench)
    setup
    "$PY" benchmarks/bench_core.py "$@"
    ;;
  *)
    echo "usage: ./run.sh {bench|test|core-bench|setup} [args...]" >&2
    exit 2
    ;;
esac
