#!/usr/bin/env bash
# The C++ tests built with AddressSanitizer + UndefinedBehaviorSanitizer, then the Python tests
# against that build with the sanitizer runtimes preloaded. CPU backend only.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B build/asan -DMEMKERNELS_SANITIZE=ON -DMEMKERNELS_TESTS=ON -DMEMKERNELS_PYTHON=ON -DMEMKERNELS_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build/asan -j "$jobs"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/asan --output-on-failure -j "$jobs"
# Python itself is not instrumented and leaks by design, hence detect_leaks=0.
# Left out under the sanitizers (they run in run_all.sh): suites whose time goes to transformers,
# PyTorch, tokenizers, mypy or a second build rather than to our kernels (the models' kernel calls
# are covered under ASan by test_gguf.py, test_stream.py and test_demo.py).
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  MEMKERNELS_BUILD_DIR="$PWD/build/asan" PYTHONPATH="$PWD/python" MEMKERNELS_SANITIZED=1 \
  python -m pytest tests/python -q -x -p no:cacheprovider \
    --ignore=tests/python/test_models.py --ignore=tests/python/test_transformers_integration.py \
    --ignore=tests/python/test_torch_integration.py --ignore=tests/python/test_tokenizer.py \
    --ignore=tests/python/test_bench_summary.py --ignore=tests/python/test_typing.py \
    --ignore=tests/python/test_packaging.py
