#!/usr/bin/env bash
# ThreadSanitizer run: the library, the Python extension and the C++ tests built with
# -fsanitize=thread, then the C++ tests and tests/python/test_concurrency.py (the Python-thread
# stress of PagedKVCache and WeightStore, plus the GIL-release checks) against that build with the
# TSan runtime preloaded into the (uninstrumented) interpreter. CPU backend only. Slow: not in CI.
#
# The kernels run on one OpenMP thread here (MEMKERNELS_NUM_THREADS=1): GNU libgomp is not built
# with TSan, so its barriers are invisible to it and every multithreaded region would be reported
# as a race. What this run checks is the code that has its own threads and locks: the paged KV
# cache used from several Python threads and the weight store's I/O thread pool and cache.
# Usage: bash tests/run_tsan.sh [extra pytest args]; exit status 0 = no report.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
flags="-fsanitize=thread -fno-omit-frame-pointer -g"
cmake -S . -B build/tsan -DMEMKERNELS_TESTS=ON -DMEMKERNELS_PYTHON=ON -DMEMKERNELS_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_C_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread \
  -DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=thread
cmake --build build/tsan -j "$jobs"
export MEMKERNELS_NUM_THREADS=1
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 history_size=4 suppressions=$PWD/tests/tsan.supp ${TSAN_OPTIONS:-}"
# TSan needs a low-entropy address space on recent kernels: run without ASLR where setarch can.
norand=""
if setarch "$(uname -m)" -R true 2>/dev/null; then norand="setarch $(uname -m) -R"; fi
# The consumer tests install and rebuild without the sanitizer: skip them here. ParallelErrors forces
# several OpenMP threads (it needs worker threads): libgomp's barriers are invisible to TSan, which
# then reports the region's stack and join as races. It runs in the normal and ASan builds.
$norand ctest --test-dir build/tsan --output-on-failure -E 'consumer|ParallelErrors' -j 1
# The interpreter binary itself (a pyenv-style `python` shim is a shell script, and bash dies with
# the TSan runtime preloaded).
py=$(python -c 'import sys; print(sys.executable)')
LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" MEMKERNELS_BUILD_DIR="$PWD/build/tsan" PYTHONPATH="$PWD/python" \
  $norand "$py" -m pytest tests/python/test_concurrency.py -q -x -p no:cacheprovider "$@"
echo "ThreadSanitizer: no report"
