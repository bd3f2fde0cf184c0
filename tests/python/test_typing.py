"""The installed package is typed: stubs of the extension (nanobind stubgen) + py.typed, checked by mypy."""
import os
import re
import subprocess
import sys

import pytest

import memkernels as mk

# MEMKERNELS_BUILD_DIR runs the source tree against a CMake build (e.g. tests/run_sanitized.sh): there
# is no installed package to check.
pytestmark = pytest.mark.skipif(bool(os.environ.get("MEMKERNELS_BUILD_DIR")),
                                reason="checks the stubs of the installed package; MEMKERNELS_BUILD_DIR runs the source tree")

pytest.importorskip("mypy", reason="mypy is in the test extra (pip install .[test])")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "typing")
PKG = os.path.dirname(os.path.abspath(mk.__file__))


def _mypy(script, tmp_path):
    # Run outside the source tree, so mypy reads the installed package (with its stubs), not python/.
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict-equality", "--no-incremental", "--cache-dir",
                        str(tmp_path / "cache"), "--python-executable", sys.executable, script],
                       capture_output=True, text=True, cwd=tmp_path)
    return r.returncode, r.stdout + r.stderr


def test_stubs_and_marker_installed():
    assert os.path.isfile(os.path.join(PKG, "py.typed"))
    stub = open(os.path.join(PKG, "_memkernels.pyi")).read()
    for name in ("def flash_attention(", "class QuantizedMatrix", "def qgemm(", "class PagedKVCache"):
        assert name in stub, name


def test_mypy_accepts_the_example(tmp_path):
    rc, out = _mypy(os.path.join(EXAMPLES, "example_ok.py"), tmp_path)
    assert rc == 0, out


def test_mypy_reports_each_misuse(tmp_path):
    script = os.path.join(EXAMPLES, "example_errors.py")
    expected = {i + 1 for i, line in enumerate(open(script)) if re.search(r"#\s*E:", line)}
    rc, out = _mypy(script, tmp_path)
    assert rc == 1, out
    reported = {int(m.group(1)) for m in re.finditer(r"example_errors\.py:(\d+): error", out)}
    assert reported == expected, out
