#!/usr/bin/env bash
# Build the libtorch (CMake) front door and run its ctest. It links the CPU build of libtorch from
# a small second venv (.venv-cpu, torch 2.13.0 CPU wheel): a CUDA libtorch's CMake config insists on
# a complete CUDA toolkit (cuBLAS et al. under one root), which a CPU-only check does not need. The
# CUDA kernels are compiled by setup.py (./run.sh setup) whenever torch has CUDA and nvcc exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-cpu/bin/python ]; then
  python3 -m venv .venv-cpu
fi
.venv-cpu/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
prefix=$(.venv-cpu/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
cmake --build build-cmake -j"${MAX_JOBS:-2}" >>build-cmake.log 2>&1 || { tail -50 build-cmake.log; exit 1; }
ctest --test-dir build-cmake --output-on-failure
