#!/usr/bin/env bash
# Runs every test suite: installs memkernels with its test dependencies, builds and runs the
# GoogleTest suite (plus the find_package consumer) through ctest, then runs pytest.
# GoogleTest comes from the system (Debian's libgtest-dev, installed here when missing and root).
# Environment: MEMKERNELS_TEST_CUDA=ON|OFF|AUTO for the ctest build (default AUTO),
#              CMAKE_ARGS for the pip build (e.g. -DCMAKE_CUDA_ARCHITECTURES=90).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}

if ! [ -f /usr/include/gtest/gtest.h ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  echo "== apt-get install libgtest-dev"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq libgtest-dev > /dev/null
fi

echo "== pip install .[test]"
python -m pip install ".[test]"
# PyTorch is optional (its tests skip without it); install it only where a local CPU wheel lies
# ready (/opt/wheels on these machines), never the multi-GB CUDA build from the index.
torch_wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2> /dev/null | head -1 || true)
if [ -n "$torch_wheel" ] && ! python -c "import torch" 2> /dev/null; then
  echo "== pip install $torch_wheel"
  python -m pip install "$torch_wheel" || echo "(PyTorch not installed: its tests will skip)"
fi

echo "== C++ tests (ctest)"
cmake -S . -B build/ctest -DMEMKERNELS_TESTS=ON -DMEMKERNELS_PYTHON=OFF -DMEMKERNELS_CUDA="${MEMKERNELS_TEST_CUDA:-AUTO}" \
  ${MEMKERNELS_CTEST_CMAKE_ARGS:-}
cmake --build build/ctest -j "$jobs"
ctest --test-dir build/ctest --output-on-failure -j "$jobs"

echo "== Python tests (pytest)"
python -m pytest tests/python -q -ra
