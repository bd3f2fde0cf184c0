#!/usr/bin/env bash
# Runs each atheris fuzzer of tests/fuzz for a bounded time, then replays everything it found (the
# seeds plus every new corpus entry) under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Why two phases: gcc's libasan defines the __sanitizer_cov_* symbols itself, so with it preloaded
# atheris loses its (Python) coverage feedback and fuzzes blind. So phase 1 fuzzes with coverage
# against the plain library (MEMKERNELS_BUILD_DIR when set, else the installed package), and
# phase 2 re-runs every input phase 1 kept against build/asan (made by tests/run_sanitized.sh;
# built here when missing) with the sanitizer runtimes preloaded, as run_sanitized.sh does.
# The C++ code is not coverage-instrumented either way (gcc has no libFuzzer instrumentation); the
# harnesses turn error messages and outcomes into Python coverage (tests/fuzz/fuzz_common.py).
# Environment: FUZZ_SECONDS per fuzzer (default 30), FUZZERS (default: all), FUZZ_ASAN=0 skips phase 2.
# Crashing inputs go to build/fuzz/artifacts/. Exit status 1 on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
fuzzers=${FUZZERS:-"quant sparse_bytes sparse_scipy paged weight_store"}
python -c "import atheris" 2> /dev/null || python -m pip install -q atheris

plain=()
if [ -n "${MEMKERNELS_BUILD_DIR:-}" ]; then
  plain+=(MEMKERNELS_BUILD_DIR="$MEMKERNELS_BUILD_DIR" PYTHONPATH="$PWD/python")
fi
asan=()
if [ "${FUZZ_ASAN:-1}" = 1 ]; then
  if ! ls build/asan/_memkernels*.so > /dev/null 2>&1; then
    cmake -S . -B build/asan -DMEMKERNELS_SANITIZE=ON -DMEMKERNELS_TESTS=ON -DMEMKERNELS_PYTHON=ON \
      -DMEMKERNELS_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
    cmake --build build/asan -j "$(nproc 2> /dev/null || echo 2)"
  fi
  asan+=(MEMKERNELS_BUILD_DIR="$PWD/build/asan" PYTHONPATH="$PWD/python" MEMKERNELS_SANITIZED=1
    LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
fi

out=build/fuzz
mkdir -p "$out/artifacts"
failed=()
for f in $fuzzers; do
  work="$out/corpus-$f"
  rm -rf "$work" && mkdir -p "$work"
  echo "== fuzz $f (${seconds}s)"
  # -malloc_limit_mb: a single allocation above 1 GB from these tiny inputs is a finding.
  if ! env "${plain[@]}" python "tests/fuzz/fuzz_$f.py" "$work" "tests/fuzz/corpus/$f" \
      -max_total_time="$seconds" -timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=1024 \
      -artifact_prefix="$out/artifacts/$f-" -print_final_stats=1 > "$out/$f.log" 2>&1; then
    failed+=("$f")
    tail -n 60 "$out/$f.log"
    continue
  fi
  grep -E "^(Done|stat::new_units_added)" "$out/$f.log" | tr '\n' ' ' && echo
  if [ ${#asan[@]} -gt 0 ]; then
    n=$(find "$work" "tests/fuzz/corpus/$f" -type f | wc -l)
    if ! env "${asan[@]}" python "tests/fuzz/fuzz_$f.py" "$work" "tests/fuzz/corpus/$f" -runs=0 -timeout=120 \
        -rss_limit_mb=0 -artifact_prefix="$out/artifacts/$f-asan-" > "$out/$f-asan.log" 2>&1; then
      failed+=("$f(asan)")
      tail -n 60 "$out/$f-asan.log"
    else
      echo "   replayed $n inputs under ASan+UBSan: clean"
    fi
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzers with findings: ${failed[*]} (inputs in $out/artifacts/)"
  exit 1
fi
echo "fuzz: no findings (${seconds}s per fuzzer${asan:+, corpora replayed under ASan+UBSan})"
