#!/usr/bin/env bash
# CUDA kernels without a GPU: configures a separate build with -DMEMKERNELS_CUDA_EMULATION=ON (the
# cuda/ files compiled by the host compiler against tests/cuda_emulation), builds it with -j2 and
# runs its ctest targets: the emulation layer's own tests and the CUDA kernels against the CPU
# backend. Then runs the kernel tests once more with a shuffled thread order between barriers
# (MKEMU_SEED), so that a missing __syncthreads shows up, and the tests that use streams with lazy
# streams (copies deferred until ordered: a missing event wait shows up). Needs the CUDA toolkit's headers
# (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) and GoogleTest; not a substitute for
# tests/run_gpu_checks.sh on a real GPU (speed, stream ordering, real PTX).
# Environment: BUILD_DIR (default build/cuda-emulation), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build/cuda-emulation}
jobs=${JOBS:-2}
start=$(date +%s)
mkdir -p "$build"
cmake -S . -B "$build" -DMEMKERNELS_CUDA_EMULATION=ON -DMEMKERNELS_PYTHON=OFF -DMEMKERNELS_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --no-tests=error --output-on-failure -j "$jobs" -L cuda_emulation
echo "== kernels again with a shuffled thread order (MKEMU_SEED=12345)"
MKEMU_SEED=12345 ctest --test-dir "$build" --no-tests=error --output-on-failure -j "$jobs" -R 'EmulatedCuda'
echo "== the kernels that use streams again with lazy streams (MKEMU_LAZY_STREAMS=1: copies run only once ordered)"
MKEMU_LAZY_STREAMS=1 ctest --test-dir "$build" --no-tests=error --output-on-failure -j "$jobs" \
  -R 'EmulatedCudaPaged|EmulatedCudaWeightStore|EmulatedCudaQgemm.BiasOfAnyFloatDtype'
echo "== CUDA emulation tests passed in $(( $(date +%s) - start )) s"
