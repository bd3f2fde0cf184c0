"""The installed package as C++ users and packagers see it: one library file, headers and a CMake
package inside memkernels/, found through `python -m memkernels --cmake-dir` by a separate project."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import memkernels as mk

# MEMKERNELS_BUILD_DIR runs the source tree against a CMake build (e.g. tests/run_sanitized.sh): there
# is no installed package to check.
pytestmark = pytest.mark.skipif(bool(os.environ.get("MEMKERNELS_BUILD_DIR")),
                                reason="checks the installed package; MEMKERNELS_BUILD_DIR runs the source tree")

PKG = os.path.dirname(os.path.abspath(mk.__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_library_is_shipped_once():
    libs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(PKG, "libmemkernels*")))
    assert libs == ["libmemkernels.so"], f"expected one libmemkernels.so in {PKG}, found {libs}"
    assert not any(os.path.islink(p) for p in glob.glob(os.path.join(PKG, "*.so*")))


def test_headers_and_cmake_package_shipped():
    assert os.path.isfile(os.path.join(mk.include_dir(), "memkernels", "memkernels.h"))
    for h in ("attention.h", "paged_kv_cache.h", "quant.h", "sparse.h", "tensor.h", "weight_store.h"):
        assert os.path.isfile(os.path.join(mk.include_dir(), "memkernels", h)), h
    for f in ("memkernelsConfig.cmake", "memkernelsConfigVersion.cmake", "memkernelsTargets.cmake"):
        assert os.path.isfile(os.path.join(mk.cmake_dir(), f)), f


def test_cmake_dir_flag_prints_the_package_folder():
    r = subprocess.run([sys.executable, "-m", "memkernels", "--cmake-dir"], capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == mk.cmake_dir()
    assert os.path.isfile(os.path.join(r.stdout.strip(), "memkernelsConfig.cmake"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_consumer_project_builds_against_the_pip_install(tmp_path):
    """tests/consumer (the find_package consumer ctest also builds) against this pip install."""
    cmake_dir = subprocess.run([sys.executable, "-m", "memkernels", "--cmake-dir"], capture_output=True, text=True,
                               check=True).stdout.strip()
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, CMAKE_PREFIX_PATH="")  # only memkernels_DIR may lead to the package
    for cmd in (["cmake", "-S", os.path.join(ROOT, "tests", "consumer"), "-B", str(build), *gen,
                 "-DCMAKE_BUILD_TYPE=Release", f"-Dmemkernels_DIR={cmake_dir}"], ["cmake", "--build", str(build)]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    exe = build / "consumer"
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # It linked the library inside the Python package, not some other copy.
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert os.path.join(PKG, "libmemkernels.so") in ldd, ldd
