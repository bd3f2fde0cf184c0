#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: runs the CUDA tests under NVIDIA compute-sanitizer, once with
# memcheck (out-of-bounds / misaligned device accesses, API errors) and once with racecheck (shared-
# memory hazards), and writes the logs plus a summary to bench/results/compute-sanitizer-*.
# The CUDA tests are the pytest tests whose names contain "cuda" (they need a GPU, and CuPy or
# PyTorch for device arrays where they use them); the GoogleTest suite has no CUDA tests yet.
# compute-sanitizer comes with the CUDA toolkit, or from pip: nvidia-cuda-sanitizer-api-cu12.
# Environment: MEMKERNELS_BUILD_DIR (a CUDA-enabled build; default: the installed package),
#              TOOLS (default "memcheck racecheck"), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null ||
  python -c "import glob, nvidia, os; print(next(iter(glob.glob(os.path.join(list(nvidia.__path__)[0],
  'cuda_sanitizer_api', 'compute-sanitizer', 'compute-sanitizer'))), ''))" 2> /dev/null || true)
[ -n "$cs" ] || { echo "compute-sanitizer not found (install the CUDA toolkit)"; exit 2; }
nvidia-smi -L > /dev/null 2>&1 || { echo "no NVIDIA GPU visible"; exit 2; }
python -c "import memkernels as m, sys; sys.exit(0 if m.info()['cuda_available'] else 1)" ||
  { echo "memkernels sees no CUDA device (CPU-only build?)"; exit 2; }

res=bench/results
mkdir -p "$res"
summary="$res/compute-sanitizer.md"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
{
  echo "# compute-sanitizer over the CUDA tests"
  echo
  echo "Machine: $gpu; $("$cs" --version | tail -1); date $(date -u +%F); commit $(git rev-parse --short HEAD)"
  echo
  echo "| tool | suite | exit | errors reported | log |"
  echo "|---|---|---|---|---|"
} > "$summary"

status=0
for tool in ${TOOLS:-memcheck racecheck}; do
  extra=()
  # memcheck: defaults. No --leak-check: CuPy's and PyTorch's caching allocators keep device memory until exit (noise).
  [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
  log="$res/compute-sanitizer-$tool-pytest.log"
  set +e
  # --error-exitcode makes any reported hazard/error fail the run; the CPU tests are deselected.
  "$cs" --tool "$tool" "${extra[@]}" --error-exitcode 99 --target-processes all --log-file "$log" \
    python -m pytest tests/python -k cuda -q -p no:cacheprovider ${PYTEST_ARGS:-} > "$log.pytest" 2>&1
  rc=$?
  set -e
  n=$(grep -Eo "ERROR SUMMARY: [0-9]+|RACECHECK SUMMARY: [0-9]+ hazard" "$log" | grep -Eo "[0-9]+" | awk '{s += $1} END {print s + 0}')
  echo "| $tool | pytest -k cuda ($(tail -1 "$log.pytest")) | $rc | $n | $(basename "$log") |" >> "$summary"
  [ "$rc" = 0 ] || status=1
done
cat "$summary"
exit $status
