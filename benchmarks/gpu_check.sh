#!/usr/bin/env bash
# The GPU check of /work/shared/GPU.md, in one script, for a GPU machine with no network:
#
#   benchmarks/gpu_check.sh OUTDIR            build (sm_90), pytest on CUDA, every CUDA op against its
#                                             CPU twin (poisoned outputs), compute-sanitizer, benchmark
#   benchmarks/gpu_check.sh OUTDIR --cpu-smoke the Python stages only, on the CPU with tiny shapes
#                                             (checks the script itself on a machine without a GPU)
#
# Every stage runs under its own time limit (the whole check must finish within 8 minutes) and its
# outcome -- ok, FAIL (exit status) or TIMEOUT -- is recorded, never skipped silently; a failed stage
# does not stop the later ones, except that nothing runs without a build. Logs and JSON go to OUTDIR
# (8 files at most); the last lines printed are the summary table, also kept in OUTDIR/summary.txt.
# Exit status: 0 when every stage passed, 1 otherwise.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--cpu-smoke]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
OUT=$1
shift
SMOKE=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    *) usage ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
# The interpreter that has torch: $PYTHON, else this checkout's .venv (CPU smoke), python3, python.
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for cand in "$( [[ $SMOKE -eq 1 ]] && echo "$ROOT/.venv/bin/python" )" python3 python; do
    if [[ -n $cand ]] && "$cand" -c 'import torch' >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[[ -n $PY ]] || { echo "no Python with torch found (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

STAGES=()    # "name|status|seconds|log|note"
run_stage() {  # run_stage NAME LIMIT_S LOG cmd...: run, record, never abort the script
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc=0
  echo "== $name (limit ${limit}s) -> $(basename "$log")"
  {
    echo "# $name: $*"
    echo "# started $(date -u +%FT%TZ)"
  } >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status
  if [[ $rc -eq 0 ]]; then status=ok
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status=TIMEOUT
  else status="FAIL(rc=$rc)"
  fi
  echo "# $name: $status after ${dt}s" >>"$log"
  echo "   $status after ${dt}s"
  if [[ $status != ok ]]; then tail -n 25 "$log" | sed 's/^/   | /'; fi
  STAGES+=("$name|$status|$dt|$(basename "$log")|")
  [[ $status == ok ]]
}
skip_stage() { STAGES+=("$1|skipped|0|-|$2"); echo "== $1: skipped ($2)"; }

BUILD_LOG=$OUT/build.log
TEST_LOG=$OUT/pytest.log
OPS_LOG=$OUT/ops_check.log
OPS_JSON=$OUT/ops_check.json
SAN_LOG=$OUT/sanitizer.log
BENCH_LOG=$OUT/bench.log
BENCH_JSON=$OUT/bench.json
SUMMARY=$OUT/summary.txt
: >"$BUILD_LOG"; : >"$TEST_LOG"; : >"$OPS_LOG"; : >"$SAN_LOG"; : >"$BENCH_LOG"
rm -f "$OPS_JSON" "$BENCH_JSON" "$SUMMARY"

if [[ $SMOKE -eq 1 ]]; then
  DEVICE=cpu
  SMALL=--small
else
  DEVICE=cuda
  SMALL=
fi

# ---- 1. build and import
{
  echo "# host: $(uname -a)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
} >>"$BUILD_LOG" 2>&1
BUILT=1
if [[ $SMOKE -eq 1 ]]; then
  skip_stage build "cpu smoke: uses the extension already built here"
else
  run_stage build 240 "$BUILD_LOG" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace || BUILT=0
fi
BUILD_INFO=$("$PY" -c 'import pissa_fast; print(pissa_fast.build_info())' 2>>"$BUILD_LOG") || { BUILT=0; BUILD_INFO="import failed"; }
echo "# pissa_fast.build_info(): $BUILD_INFO" | tee -a "$BUILD_LOG"
if [[ $SMOKE -eq 0 && $BUILD_INFO != cuda:* ]]; then
  echo "# the extension has no CUDA kernels" | tee -a "$BUILD_LOG"
  BUILT=0
fi
if [[ $BUILT -eq 1 ]]; then STAGES+=("import|ok|0|build.log|$BUILD_INFO"); else STAGES+=("import|FAIL|0|build.log|$BUILD_INFO"); fi

# ---- 2. tests on CUDA, then every op against its CPU twin
if [[ $BUILT -eq 1 ]]; then
  # The CUDA parametrizations (device=cuda) and the CUDA test module; CPU-only tests run elsewhere.
  run_stage pytest 120 "$TEST_LOG" "$PY" -m pytest -x -q -k cuda -p no:cacheprovider tests || true
  run_stage ops_check 90 "$OPS_LOG" "$PY" benchmarks/gpu_ops_check.py --device "$DEVICE" $SMALL --json "$OPS_JSON" || true
else
  skip_stage pytest "no build"
  skip_stage ops_check "no build"
fi

# ---- 3. compute-sanitizer memcheck (and racecheck for the shared-memory tiles) on small runs
if [[ $SMOKE -eq 1 ]]; then
  skip_stage sanitizer "cpu smoke"
elif [[ $BUILT -eq 0 ]]; then
  skip_stage sanitizer "no build"
elif ! command -v compute-sanitizer >/dev/null; then
  skip_stage sanitizer "compute-sanitizer not on PATH"
else
  run_stage memcheck 90 "$SAN_LOG" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" benchmarks/gpu_ops_check.py --device cuda --sanitize || true
  # racecheck finds shared-memory hazards (a missing barrier) that memcheck cannot; it is the first
  # thing to give up when the benchmark would not fit otherwise.
  if (( 465 - ($(date +%s) - T_START) >= 230 )); then
    run_stage racecheck 60 "$SAN_LOG" compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 \
      "$PY" benchmarks/gpu_ops_check.py --device cuda --sanitize --dtypes bf16 || true
  else
    skip_stage racecheck "time: the benchmark needs what is left"
  fi
fi

# ---- 4. the benchmark
if [[ $BUILT -eq 1 ]]; then
  ELAPSED=$(( $(date +%s) - T_START ))
  LEFT=$(( 465 - ELAPSED ))
  if [[ $SMOKE -eq 1 ]]; then LEFT=300; fi
  if [[ $LEFT -lt 60 ]]; then
    skip_stage bench "only ${LEFT}s left of the 8 minutes"
  else
    run_stage bench "$LEFT" "$BENCH_LOG" "$PY" benchmarks/gpu_bench.py --device "$DEVICE" $SMALL \
      --budget-s $(( LEFT - 20 )) --json "$BENCH_JSON" || true
  fi
else
  skip_stage bench "no build"
fi

# ---- summary: the last lines printed
{
  echo
  echo "== pissa_fast GPU check summary ($(date -u +%FT%TZ), $( [[ $SMOKE -eq 1 ]] && echo 'cpu smoke' || echo 'gpu'))"
  echo "build: $BUILD_INFO"
  printf '%-10s %-12s %5s  %-15s %s\n' stage status secs log note
  for s in "${STAGES[@]}"; do
    IFS='|' read -r n st dt lg note <<<"$s"
    printf '%-10s %-12s %5s  %-15s %s\n' "$n" "$st" "$dt" "$lg" "$note"
  done
  if [[ -f $OPS_JSON ]]; then
    "$PY" - "$OPS_JSON" <<'EOF' || echo "ops check: (unreadable JSON)"
import json, sys
d = json.load(open(sys.argv[1]))
worst = max((c.get("err_over_bound", 0.0) for r in d["results"] for c in r.get("checks", {}).values()), default=0.0)
print(f"ops check: {d['cases'] - d['failures']}/{d['cases']} cases ok on {d['device']}, worst error/bound {worst:.3f}")
EOF
  fi
  if [[ -f $BENCH_JSON ]]; then
    "$PY" - "$BENCH_JSON" <<'EOF' || echo "bench: (unreadable JSON)"
import json, sys
d = json.load(open(sys.argv[1]))
if "summary" in d:
    for line in d["summary"]:
        print(line)
else:  # cut short: what it had measured
    print("bench (incomplete): " + ", ".join(
        f"{k} {v}" for k, v in (("pissa_fast s", d.get("pissa_fast", {}).get("seconds")),
                                ("copy GB/s", d.get("copy_gbs")), ("gram GB/s", d.get("gram_model_gbs")),
                                ("residual_ GB/s", d.get("residual__model_gbs")),
                                ("peft s", d.get("peft_lowrank", {}).get("seconds"))) if v is not None))
EOF
  fi
  echo "total: $(( $(date +%s) - T_START ))s; logs in $OUT"
} | tee "$SUMMARY"

for s in "${STAGES[@]}"; do
  IFS='|' read -r n st dt lg note <<<"$s"
  if [[ $st != ok && $st != skipped ]]; then exit 1; fi
done
exit 0
