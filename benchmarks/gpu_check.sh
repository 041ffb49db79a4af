#!/usr/bin/env bash
# The GPU check of /work/shared/GPU.md, in one script, for a GPU machine with no network:
#
#   benchmarks/gpu_check.sh OUTDIR            build (sm_90); then for each CUDA implementation of the
#                                             passes -- the ATen/cuBLAS passes (the default), then the
#                                             hand-written kernels -- pytest on CUDA, every op against its
#                                             CPU twin (poisoned outputs) and the 7B benchmark, each in its
#                                             own process; compute-sanitizer on the kernels; one table
#                                             comparing the two and saying which should be the default
#   benchmarks/gpu_check.sh OUTDIR --cpu-smoke the Python stages only, on the CPU with tiny shapes
#                                             (checks the script itself on a machine without a GPU; there
#                                             "aten" runs the ATen passes in place of the CPU kernels)
#
# Every stage runs under its own time limit (the whole check must finish within 8 minutes) and its
# outcome -- ok, FAIL (exit status) or TIMEOUT -- is recorded, never skipped silently; a failed stage
# does not stop the later ones, except that nothing runs without a build. The ATen passes are checked
# and measured first, so that a kernel crash cannot cost their numbers. Logs and JSON go to OUTDIR
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
  # The 8-minute budget is the GPU machine's; a CPU smoke run on a shared 2-core machine gets 4x.
  if [[ $SMOKE -eq 1 ]]; then limit=$(( limit * 4 )); fi
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

left() { echo $(( 465 - ($(date +%s) - T_START) )); }
declare -A STATUS  # stage -> ok / FAIL / TIMEOUT / skipped, for the summary's recommendation
stage() {  # stage NAME LIMIT LOG cmd...: run_stage, remembering the outcome
  local name=$1
  if run_stage "$@"; then STATUS[$name]=ok; else STATUS[$name]=failed; fi
}

# ---- 2. the ATen passes: CUDA tests, every op against its CPU twin, the benchmark (with the peft
#         path and torch.linalg.svd baselines)
if [[ $BUILT -eq 1 ]]; then
  # The CUDA parametrizations (device=cuda, impl=aten) and the CUDA test modules; CPU-only tests run elsewhere.
  stage pytest_aten 100 "$TEST_LOG" "$PY" -m pytest -x -q -p no:cacheprovider tests -k "cuda and not kernels"
  stage ops_aten 60 "$OPS_LOG" "$PY" benchmarks/gpu_ops_check.py --device "$DEVICE" --impls aten $SMALL --json "$OPS_JSON"
  # Leave ~200 s for the kernels' stages.
  LIMIT=$(( $(left) - 200 )); if [[ $SMOKE -eq 1 ]]; then LIMIT=60; fi
  if (( LIMIT > 200 )); then LIMIT=200; fi
  if (( LIMIT < 45 )); then
    skip_stage bench_aten "only $(left)s left of the 8 minutes"
  else
    stage bench_aten "$LIMIT" "$BENCH_LOG" "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --impl aten --baselines \
      $SMALL --budget-s $(( LIMIT - 15 )) --json "$BENCH_JSON"
  fi
else
  skip_stage pytest_aten "no build"; skip_stage ops_aten "no build"; skip_stage bench_aten "no build"
fi

# ---- 3. the hand-written kernels: CUDA tests, ops against the CPU twin, compute-sanitizer, benchmark
if [[ $BUILT -eq 1 ]]; then
  stage pytest_kernels 70 "$TEST_LOG" "$PY" -m pytest -x -q -p no:cacheprovider tests -k "cuda and kernels"
  stage ops_kernels 50 "$OPS_LOG" "$PY" benchmarks/gpu_ops_check.py --device "$DEVICE" --impls kernels $SMALL --json "$OPS_JSON"
else
  skip_stage pytest_kernels "no build"; skip_stage ops_kernels "no build"
fi
if [[ $SMOKE -eq 1 ]]; then
  skip_stage memcheck "cpu smoke"
elif [[ $BUILT -eq 0 ]]; then
  skip_stage memcheck "no build"
elif ! command -v compute-sanitizer >/dev/null; then
  skip_stage memcheck "compute-sanitizer not on PATH"
else
  stage memcheck 75 "$SAN_LOG" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" benchmarks/gpu_ops_check.py --device cuda --impls kernels --sanitize
  # racecheck finds shared-memory hazards (a missing barrier) that memcheck cannot; it is the first
  # thing to give up when the kernels' benchmark would not fit otherwise.
  if (( $(left) >= 130 )); then
    stage racecheck 60 "$SAN_LOG" compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 \
      "$PY" benchmarks/gpu_ops_check.py --device cuda --impls kernels --sanitize --dtypes bf16
  else
    skip_stage racecheck "time: the kernels' benchmark needs what is left"
  fi
fi
if [[ $BUILT -eq 1 ]]; then
  LIMIT=$(( $(left) - 15 )); if [[ $SMOKE -eq 1 ]]; then LIMIT=60; fi
  if (( LIMIT < 40 )); then
    skip_stage bench_kernels "only $(left)s left of the 8 minutes"
  else
    stage bench_kernels "$LIMIT" "$BENCH_LOG" "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --impl kernels \
      $SMALL --budget-s $(( LIMIT - 10 )) --json "$BENCH_JSON"
  fi
else
  skip_stage bench_kernels "no build"
fi

# ---- summary: the last lines printed
{
  echo
  echo "== pissa_fast GPU check summary ($(date -u +%FT%TZ), $( [[ $SMOKE -eq 1 ]] && echo 'cpu smoke' || echo 'gpu'))"
  echo "build: $BUILD_INFO"
  printf '%-15s %-12s %5s  %-15s %s\n' stage status secs log note
  for s in "${STAGES[@]}"; do
    IFS='|' read -r n st dt lg note <<<"$s"
    printf '%-15s %-12s %5s  %-15s %s\n' "$n" "$st" "$dt" "$lg" "$note"
  done
  "$PY" benchmarks/gpu_summary.py --ops "$OPS_JSON" --bench "$BENCH_JSON" \
    --stages "memcheck=${STATUS[memcheck]:-skipped},racecheck=${STATUS[racecheck]:-skipped}" || echo "summary: failed"
  echo "total: $(( $(date +%s) - T_START ))s; logs in $OUT"
} | tee "$SUMMARY"

for s in "${STAGES[@]}"; do
  IFS='|' read -r n st dt lg note <<<"$s"
  if [[ $st != ok && $st != skipped ]]; then exit 1; fi
done
exit 0
