"""Every benchmark in bench/ prints its ratios so that `python -m memkernels bench` collects them.

Each script runs in a subprocess on a small configuration (a smoke run: the timings mean nothing) and
its stdout goes through the summary's parser, memkernels.__main__._ratio_rows.
"""
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import memkernels as mk
from memkernels.__main__ import _ratio_rows

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.skipif(not (BENCH / "_common.py").is_file(), reason="no bench/ directory in this tree")

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None
HAVE_TRANSFORMERS = HAVE_TORCH and importlib.util.find_spec("transformers") is not None
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# bench/generate.py needs a real GGUF model (none ships with the repository): it runs here only when
# MEMKERNELS_BENCH_GGUF names one; otherwise it must skip quickly (test_generate_skips_without_a_model)
GGUF = os.environ.get("MEMKERNELS_BENCH_GGUF")

# script, arguments of a cheap run, ratio columns it must print on any CPU machine
CASES = [
    ("attention", ["--quick", "--no-memory", "--max-seq", "1024"],
     {"numpy/ours"} | ({"torch/ours"} if HAVE_TORCH else set())),
    ("spmm", ["--quick", "--shape", "1024x1024"],
     {"numpy/ours"} | ({"scipy/ours"} if HAVE_SCIPY else set()) | ({"torch/ours"} if HAVE_TORCH else set())),
    ("qgemm", ["--quick", "--shape", "1024x1024"],
     {"numpy/ours"} | ({"torch fp32/ours", "torch bf16/ours"} if HAVE_TORCH else set())),
    ("paged_attention", ["--quick", "--ctx", "512", "--max-len", "1024"],
     {"contig/ours", "flash/ours", "prealloc/ours"} | ({"sdpa/ours"} if HAVE_TORCH else set())),
    ("weight_stream", ["--quick", "--d-model", "256", "--d-ff", "1024", "--tokens", "6"],
     {"naive/ours bytes", "naive/ours time", "mmap-drop/ours bytes", "mmap-drop/ours time", "mmap/ours time"}),
]
if GGUF and hasattr(mk, "load_model"):
    CASES.append(("generate", ["--quick", "--rounds", "1", "--new-tokens", "4", "--prompt-tokens", "16"],
                  ({"llama.cpp/ours"} if HAVE_LLAMA_CPP else set())
                  | ({"transformers/ours"} if HAVE_TRANSFORMERS else set())))


def run_bench(name, args, env=None):
    env = dict(os.environ if env is None else env)
    # the child imports the same memkernels as this process
    pkg_root = str(Path(mk.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, "-W", "ignore", str(BENCH / f"{name}.py"), *args], capture_output=True,
                         text=True, timeout=600, env=env, cwd=str(BENCH.parent))
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bench_ratios_reach_the_summary(name, args, expected):
    out = run_bench(name, args)
    rows = _ratio_rows(name, out)
    if name == "generate" and not expected:
        pytest.skip("neither llama-cpp-python nor transformers installed: no peer to compare with")
    assert rows, f"no ratio rows parsed from {name}:\n{out}"
    columns = {col for _, _, _, col, _ in rows}
    assert expected <= columns, f"{name}: missing ratio columns {expected - columns}:\n{out}"
    for bench, table, case, col, value in rows:
        assert bench == name and table and case, (table, case, col)
        assert "/ours" in col, f"{name}: ratio column {col!r} is not peer/ours"
        assert math.isfinite(value) and value > 0, f"{name}: {table} | {case} | {col} = {value}:\n{out}"
    # Markdown tables only (no fixed-width leftovers): every table has a title and full rows
    width = None
    for line in out.splitlines():
        if line.startswith("### "):
            width = None
        elif line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            width = width or len(cells)
            assert len(cells) == width, f"{name}: ragged table row {line!r}"
        else:
            assert not line.startswith("---"), f"{name}: fixed-width table left:\n{out}"


def test_print_table_rows_parse_back(capsys):
    # what the CUDA sections print (they cannot run without a GPU): n/a cells are left out of the summary
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    _common.print_table("GPU qgemm, fp16 x", ["case", "ours ms", "cublas fp16 ms", "cublas/ours"],
                        iter([["28672x8192 batch 1 int4 g128", _common.fmt_ms(2e-5, 4), _common.fmt_ms(5e-5, 4),
                               _common.fmt_ratio(5e-5, 2e-5)],
                              ["28672x8192 batch 2 int4 g128", "n/a", "n/a", _common.fmt_ratio(None, 1.0)]]))
    print("trailing text")
    rows = _ratio_rows("qgemm", capsys.readouterr().out)
    assert rows == [("qgemm", "GPU qgemm, fp16 x", "28672x8192 batch 1 int4 g128", "cublas/ours", 2.5)]


def test_generate_skips_without_a_model():
    # `python -m memkernels bench` runs every script: without a GGUF model generate.py must say why it
    # did nothing and succeed, quickly (before loading any engine)
    env = {k: v for k, v in os.environ.items() if k != "MEMKERNELS_BENCH_GGUF"}
    t = time.perf_counter()
    out = run_bench("generate", ["--quick"], env=env)
    assert time.perf_counter() - t < 60
    assert "skipped" in out and "MEMKERNELS_BENCH_GGUF" in out, out
    assert _ratio_rows("generate", out) == [] and "|" not in out, out


def test_generate_rejects_a_missing_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(mk.__file__).resolve().parents[1]))
    missing = tmp_path / "none.gguf"
    res = subprocess.run([sys.executable, str(BENCH / "generate.py"), str(missing), "--quick"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=str(BENCH.parent))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert str(missing) in res.stderr and "Traceback" not in res.stderr, res.stderr
