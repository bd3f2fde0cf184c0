"""Regression tests for issue 13 (reliability round 2), paged KV cache and quantization findings:
each test failed before its fix."""
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import memkernels as mk
from memkernels import PagedKVCache, paged_attention, paged_attention_raw

ISAS = [i for i in ("generic", "avx2", "avx512")
        if ["generic", "avx2", "avx512"].index(i) <= ["generic", "avx2", "avx512"].index(mk.info()["best_cpu_isa"])]


@pytest.fixture(params=ISAS)
def isa(request):
    old = mk.info()["cpu_isa"]
    mk.set_cpu_isa(request.param)
    yield request.param
    mk.set_cpu_isa(old)


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _run_script(body, timeout=300):
    """Runs `body` in a fresh interpreter, so a heap overflow or abort fails the test, not the suite."""
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script hung for more than {timeout} s")
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


# ---- 1: pool() of an int8 or KIVI cache is a byte view of exactly the pool ----
@pytest.mark.parametrize("dtype,np_dtype", [("kivi4", np.uint8), ("kivi2", np.uint8), ("int8", np.int8),
                                            ("float32", np.float32), ("float16", np.float16)])
def test_pool_view_has_the_pool_dtype_and_size(dtype, np_dtype):
    cache = PagedKVCache(3, 5, 16, 2, 32, dtype)
    pool = cache.pool()
    assert pool.dtype == np_dtype
    assert pool.nbytes == cache.stats()["pool_bytes"]
    assert pool.shape[:2] == (5, 3)
    pool[...] = 0  # the whole view is the cache's memory: writing it must be safe

