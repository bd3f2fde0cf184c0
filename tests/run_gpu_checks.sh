#!/usr/bin/env bash
# Everything a session with a GPU should run, in as few device calls as possible (device time is
# scarce): build, the CUDA tests, the demo on the GPU, the GPU benchmarks, compute-sanitizer.
# Each stage runs under its own time limit, keeps going after a failure, and writes its log to
# OUTDIR; OUTDIR/summary.md lists each stage's exit code and time. Typical use through the device
# tool (which returns at most 8 files from $OUT, hence the tarball):
#   STAGES="build test demo" bash tests/run_gpu_checks.sh /tmp/gpu; tar -C /tmp/gpu -czf $OUT/gpu.tgz .
#   STAGES="bench sanitize" bash tests/run_gpu_checks.sh /tmp/gpu; tar -C /tmp/gpu -czf $OUT/gpu.tgz .
# (the second call on the still-warm machine, which keeps /tmp/gpu and the installed build).
# Stages: build (pip install --no-build-isolation ., sm_90, all cores), test (pytest -k cuda),
# demo (python -m memkernels demo --device cuda), bench (each bench/*.py GPU mode), sanitize
# (tests/run_compute_sanitizer.sh). STAGE_TIMEOUT (seconds, default 480) bounds each stage.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-checks}
mkdir -p "$out"
stages=${STAGES:-build test demo bench}
limit=${STAGE_TIMEOUT:-480}
summary="$out/summary.md"
[ -f "$summary" ] || {
  echo "# GPU checks, commit $(git rev-parse --short HEAD 2> /dev/null || echo '?'), $(date -u +%F)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
  echo
  echo "| stage | exit | seconds | log |"
  echo "|---|---|---|---|"
} > "$summary"

# run NAME COMMAND...: one stage, its output in $out/NAME.log, a row in the summary.
run() {
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name: $*"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $((SECONDS - t0)) | $name.log |" >> "$summary"
  tail -5 "$out/$name.log"
  return 0
}

for stage in $stages; do
  case $stage in
    build)
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DMEMKERNELS_CUDA=ON" \
        run build python -m pip install --no-build-isolation --no-deps -v . ;;
    test)
      run test-cuda python -m pytest tests/python -k cuda -q -rs -p no:cacheprovider ;;
    demo)
      run demo-cuda python -m memkernels demo --device cuda --model-only ;;
    bench)
      run bench-attention python bench/attention.py --gpu-only
      run bench-paged python bench/paged_attention.py --cuda --quick
      run bench-qgemm python bench/qgemm.py --cuda
      run bench-spmm python bench/spmm.py --cuda --quick ;;
    sanitize)
      run sanitize bash tests/run_compute_sanitizer.sh
      cp bench/results/compute-sanitizer* "$out"/ 2> /dev/null ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
cat "$summary"
