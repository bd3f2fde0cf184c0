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


# ---- 2: read_kv sizes its output and reads under one lock ----
def test_read_kv_concurrent_with_append_never_overflows():
    # Before: the output was sized from length(), then filled under the lock after an append from
    # another thread had made the sequence longer: a heap overflow (a crash here, or garbage).
    out = _run_script("""
        import threading
        import numpy as np
        from memkernels import PagedKVCache
        kvh, D, chunk = 8, 128, 48
        cache = PagedKVCache(1, 400, 16, kvh, D)
        seq = cache.add_sequence()
        k = np.random.default_rng(0).standard_normal((chunk, kvh, D)).astype(np.float32)
        stop = threading.Event()
        def writer():
            while not stop.is_set():
                for _ in range(30):
                    cache.append([seq], 0, k, k, [chunk])
                cache.truncate(seq, 0)
        t = threading.Thread(target=writer)
        t.start()
        try:
            reads = 0
            for _ in range(600):
                a, b = cache.read_kv(seq, 0)
                assert a.shape == b.shape and a.shape[1:] == (kvh, D) and a.shape[0] % chunk == 0, a.shape
                n = a.shape[0] // chunk
                np.testing.assert_array_equal(a, np.tile(k, (n, 1, 1)))
                reads += a.shape[0] > 0
        finally:
            stop.set()
            t.join()
        print("ok", reads)
    """)
    assert out.startswith("ok")


# ---- 8: quantized caches refuse integer k/v instead of reading them as another dtype ----
@pytest.mark.parametrize("dtype", ["int8", "kivi4", "kivi2"])
@pytest.mark.parametrize("kv_dtype", [np.int8, np.uint8, np.int32])
def test_quantized_cache_refuses_integer_kv(dtype, kv_dtype):
    cache = PagedKVCache(1, 4, 16, 2, 16, dtype)
    seq = cache.add_sequence()
    k = np.ones((3, 2, 16), kv_dtype)
    with pytest.raises(TypeError, match=r"append: k has dtype .*float32, float16 or bfloat16"):
        cache.append([seq], 0, k, k, [3])
    assert cache.length(seq) == 0


def test_float_cache_refuses_other_dtypes_by_name():
    cache = PagedKVCache(1, 4, 16, 2, 16, "float16")
    seq = cache.add_sequence()
    with pytest.raises(TypeError, match="append: k has dtype float32 but the cache holds float16"):
        cache.append([seq], 0, np.ones((1, 2, 16), np.float32), np.ones((1, 2, 16), np.float16))

