#!/usr/bin/env bash
# Runs each atheris fuzzer of tests/fuzz for a bounded time against the ASan + UBSan build
# (build/asan, made by tests/run_sanitized.sh; built here when missing) with the sanitizer
# runtimes preloaded, as tests/run_sanitized.sh does for pytest. The C++ code is not coverage-
# instrumented (gcc has no libFuzzer instrumentation): atheris steers by the Python-side coverage of
# the harnesses and ASan/UBSan catch memory errors in the native code.
# Environment: FUZZ_SECONDS per fuzzer (default 30), FUZZERS (default: all),
#              FUZZ_ASAN=0 to run against MEMKERNELS_BUILD_DIR / the installed package instead.
# New corpus entries go to a scratch dir; crashes to build/fuzz/artifacts/. Exit status 1 on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
fuzzers=${FUZZERS:-"quant sparse_bytes sparse_scipy paged weight_store"}
python -c "import atheris" 2> /dev/null || python -m pip install -q atheris

env_vars=(PYTHONPATH="$PWD/python")
if [ "${FUZZ_ASAN:-1}" = 1 ]; then
  jobs=$(nproc 2> /dev/null || echo 2)
  if ! ls build/asan/_memkernels*.so > /dev/null 2>&1; then
    cmake -S . -B build/asan -DMEMKERNELS_SANITIZE=ON -DMEMKERNELS_TESTS=ON -DMEMKERNELS_PYTHON=ON \
      -DMEMKERNELS_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
    cmake --build build/asan -j "$jobs"
  fi
  env_vars+=(MEMKERNELS_BUILD_DIR="$PWD/build/asan" MEMKERNELS_SANITIZED=1
    LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
elif [ -n "${MEMKERNELS_BUILD_DIR:-}" ]; then
  env_vars+=(MEMKERNELS_BUILD_DIR="$MEMKERNELS_BUILD_DIR")
fi

out=build/fuzz
mkdir -p "$out/artifacts"
failed=()
for f in $fuzzers; do
  work="$out/corpus-$f"
  rm -rf "$work" && mkdir -p "$work"
  echo "== fuzz $f (${seconds}s)"
  # -rss_limit_mb: Python + ASan shadow memory; a single malloc above it is reported as a finding.
  if ! env "${env_vars[@]}" python "tests/fuzz/fuzz_$f.py" "$work" "tests/fuzz/corpus/$f" \
      -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -malloc_limit_mb=2048 \
      -artifact_prefix="$out/artifacts/$f-" -print_final_stats=1 > "$out/$f.log" 2>&1; then
    failed+=("$f")
    tail -n 60 "$out/$f.log"
  else
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done)" "$out/$f.log" || tail -n 3 "$out/$f.log"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzers with findings: ${failed[*]} (inputs in $out/artifacts/)"
  exit 1
fi
echo "fuzz: no findings in ${seconds}s per fuzzer"
