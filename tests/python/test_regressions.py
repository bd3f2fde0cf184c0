"""Regression tests for the bugs the fuzzers found (tests/fuzz), and a replay of the committed fuzz
corpora through the fuzz harnesses (each input: success matching the oracle, or a documented error)."""
import glob
import importlib
import os
import resource
import struct
import sys

import numpy as np
import pytest
import scipy.sparse as sps

import memkernels as mk

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz")


def _i32(a):
    # Through int64 and astype: NumPy gives empty results of astype zero strides, as the fuzzer did.
    return np.array(a, np.int64).astype(np.int32)


def _f32(shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# ---- finding 1 (fuzz_paged, fuzz_sparse_scipy): empty arrays with zero strides were "not contiguous" ----

def test_empty_arrays_with_zero_strides_are_accepted():
    q = _f32((0, 2, 8))
    assert q.strides == (0, 0, 0) and q.flags.c_contiguous  # NumPy calls it contiguous
    kp = _f32((3, 4, 1, 8))
    out = mk.paged_attention_raw(q, kp, kp, _i32([0, 1]), _i32([2]), _i32([3]), _i32([0, 0]))
    assert out.shape == (0, 2, 8)
    out = mk.paged_attention_raw(q, kp, kp, _i32([0]), _i32([]), _i32([]))  # batch 0: empty index arrays
    assert out.shape == (0, 2, 8)
    assert mk.flash_attention(_f32((1, 0, 2, 8)), _f32((1, 3, 2, 8)), _f32((1, 3, 2, 8))).shape == (1, 0, 2, 8)
    assert mk.spmm(mk.SparseMatrix.from_dense(_f32((4, 16))), _f32((0, 16))).shape == (0, 4)
    m = sps.csr_array((np.array([1.0]), np.array([0]), np.array([0, 1])), shape=(1, 1))
    m.indptr, m.indices, m.data = _i32([0]), _i32([]), np.array([], np.float64).astype(np.float32)
    m._shape = (0, 5)
    sp = mk.SparseMatrix.from_scipy(m)
    assert sp.shape == (0, 5) and sp.nnz == 0
    # Non-empty strided arrays are still refused.
    with pytest.raises(ValueError, match="contiguous"):
        mk.paged_attention_raw(_f32((1, 2, 16))[:, :, ::2], kp, kp, _i32([0, 1]), _i32([2]), _i32([3]))


# ---- finding 2 (fuzz_quant): a re-sealed header with a huge shape made from_bytes allocate it ----

def _fnv1a64(b):
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def test_quant_from_bytes_rejects_huge_shape_before_allocating():
    b = bytearray(mk.quantize(_f32((2, 128)), "int4", group_size=128).to_bytes())
    struct.pack_into("<q", b, 16, 1 << 24)  # rows: 2 -> 16M (a 1.1 GB matrix), in a 328-byte input
    b[-8:] = struct.pack("<Q", _fnv1a64(bytes(b[:-8])))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(mk.CorruptDataError, match="too small for its shape"):
        mk.from_bytes(bytes(b))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"from_bytes touched {grown_mb:.0f} MB for a 328-byte input"


# ---- finding 3 (WeightStore.open options): extreme max_read_bytes / budgets overran the budget ----

def test_weight_store_extreme_options_stay_within_budget(tmp_path):
    path = str(tmp_path / "s.mkws")
    up = np.ones((8, 4), np.float32)
    mk.write_weight_store(path, {"t": np.ones(10, np.float32)}, {0: {"up": up, "down": up.T.copy()}})
    file_bytes = os.path.getsize(path)
    # max_read_bytes 2^62 made the staging-size arithmetic overflow: it tried to allocate ~2^62 bytes.
    for max_read in (2**62, 2**63 - 1, 1 << 40, 0, -5):
        with mk.WeightStore.open(path, 1 << 20, max_read_bytes=max_read, io_threads=4) as ws:
            st = ws.stats()
            assert st["staging_bytes"] + st["cache_capacity_bytes"] <= 1 << 20
            np.testing.assert_array_equal(ws.get_rows(0, [1, 7]), np.ones((2, 2, 4), np.float32))
    # A budget far beyond the file allocates no more than the file needs (the neuron arena was sized
    # to the budget, and its slot ids were int32: a 1 TB budget of small neurons overflowed them).
    with mk.WeightStore.open(path, 1 << 40, max_read_bytes=1 << 40) as ws:
        st = ws.stats()
        assert st["cache_capacity_bytes"] <= 8 * 2 * 4 * 4, st
        assert st["staging_bytes"] <= 16 * (file_bytes + 8192), st
        np.testing.assert_array_equal(ws.get_rows(0, np.arange(8)), np.ones((8, 2, 4), np.float32))


# ---- finding 4 (PagedKVCache geometry): int64 overflow gave a 0-byte pool that append wrote past ----

def test_paged_cache_geometry_overflow_is_rejected():
    # Each of these wrapped the pool size to 0 (or negative); append() then segfaulted.
    for args in [(2**30, 4, 2**20, 1, 2**13), (2**20, 2**20, 2**20, 2**20, 2**20), (2**12, 2**4, 2**20, 2**20, 2**12)]:
        for dtype in ("float32", "int8"):
            with pytest.raises(ValueError, match="pool size overflows"):
                mk.PagedKVCache(*args, dtype=dtype)
    # Every geometry of powers of two: either the pool has exactly the bytes the geometry needs (small
    # ones are built) or the constructor refuses it; never a pool smaller than the geometry.
    exps = [0, 4, 10, 20, 30]
    for L in exps:
        for P in exps:
            for ps in (0, 4, 20):
                for kvh in exps:
                    for d in exps:
                        need = 2 ** (L + P + ps + kvh + d) * 2 * 4  # K and V, float32
                        if need > 1 << 24 and need < 1 << 62:
                            continue  # would really allocate (MemoryError, or an ASan abort): skip
                        try:
                            c = mk.PagedKVCache(2**L, 2**P, 2**ps, 2**kvh, 2**d)
                        except ValueError as e:
                            assert need >= 1 << 62, (L, P, ps, kvh, d, e)
                            continue
                        assert c.stats()["pool_bytes"] == need, (L, P, ps, kvh, d)


# ---- the committed corpora (and any crash reproducers added to them) replayed ----------------------

@pytest.mark.parametrize("name", ["quant", "sparse_bytes", "sparse_scipy", "paged", "weight_store"])
def test_fuzz_corpus_replays_cleanly(name):
    pytest.importorskip("atheris")  # the structured harnesses use its FuzzedDataProvider
    sys.path.insert(0, FUZZ_DIR)
    try:
        common = importlib.import_module("fuzz_common")
        harness = common.guarded(importlib.import_module(f"fuzz_{name}").one_input)
    finally:
        sys.path.remove(FUZZ_DIR)
    files = sorted(glob.glob(os.path.join(FUZZ_DIR, "corpus", name, "*")))
    assert files, f"no corpus for {name}"
    for f in files:
        with open(f, "rb") as fh:
            harness(fh.read())  # raises on anything but success or a documented error
