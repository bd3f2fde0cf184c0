"""PagedKVCache and paged attention against a float64 NumPy reference over the same contiguous K/V."""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memkernels as mk
from memkernels import CacheFullError, PagedKVCache, paged_attention, paged_attention_raw

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16}
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}  # relative to max |ref|


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(np.float32).astype(DTYPES[dtype])


def reference(q, k, v, causal=True, scale=None, softcap=0.0, window=None):
    """q (nq, H, D), k/v (nk, KVH, D) -> out (nq, H, D), lse (H, nq), float64; causal aligned to the end.
    window: None, w (w keys each side) or (left, right), -1 unbounded; causal forces right = 0."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    nq, H, D = q.shape
    nk, KVH = k.shape[:2]
    g = H // KVH
    if nk == 0:
        return np.zeros((nq, H, D)), np.full((H, nq), -np.inf)
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    left, right = (-1, -1) if window is None else (window, window) if np.ndim(window) == 0 else window
    if causal:
        right = 0
    pos, j = np.arange(nq)[:, None] + nk - nq, np.arange(nk)[None, :]
    visible = np.ones((nq, nk), dtype=bool)
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", np.divide(p, l, out=np.zeros_like(p), where=l > 0), v)
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] > 0, np.log(l[..., 0]) + m[..., 0], -np.inf)
    return out, lse


def assert_close(got, ref, dtype, what=""):
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{what}: non-finite output"
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    bound = TOL[dtype] * max(1.0, np.max(np.abs(ref)) if ref.size else 1.0)
    assert err <= bound, f"{what}: max error {err} > {bound}"


def fill(cache, rng, lens, dtype, layers=None):
    """New sequences with random K/V of the given lengths in every layer; returns ids and the K/V."""
    layers = range(cache.num_layers) if layers is None else layers
    ids, data = [], {}
    for n in lens:
        sid = cache.add_sequence()
        ids.append(sid)
        for layer in layers:
            k = rand(rng, (n, cache.kv_heads, cache.head_dim), dtype)
            v = rand(rng, (n, cache.kv_heads, cache.head_dim), dtype)
            cache.append([sid], layer, k, v, counts=[n])
            data[sid, layer] = (k, v)
    return ids, data


def gather(cache, sid, layer):
    """K/V of a sequence read back through its page table (checks the scatter and the layout)."""
    n = cache.length(sid, layer)
    pt = cache.page_table(sid)
    k = np.asarray(cache.k_pages(layer))[pt].reshape(-1, cache.kv_heads, cache.head_dim)[:n]
    v = np.asarray(cache.v_pages(layer))[pt].reshape(-1, cache.kv_heads, cache.head_dim)[:n]
    return k, v


# --- attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("heads,kvh,D,ps", [(8, 2, 64, 16), (4, 4, 80, 3), (8, 1, 128, 1), (32, 1, 32, 7),
                                            (6, 3, 48, 64)])
def test_decode_matches_reference(dtype, heads, kvh, D, ps):
    rng = np.random.default_rng(heads * 1000 + D + ps)
    lens = [1, 0, int(rng.integers(2, 200)), ps, ps + 1, 333]
    cache = PagedKVCache(2, sum((n + ps - 1) // ps for n in lens) + 3, ps, kvh, D, dtype)
    ids, data = fill(cache, rng, lens, dtype)
    q = rand(rng, (len(ids), heads, D), dtype)
    out = np.full(q.shape, np.nan, dtype=q.dtype)
    got, lse = paged_attention(q, cache, 1, ids, return_lse=True, out=out)
    assert got is out
    for i, sid in enumerate(ids):
        k, v = data[sid, 1]
        ref, ref_lse = reference(q[i:i + 1], k, v)
        assert_close(got[i:i + 1], ref, dtype, f"seq {i} len {lens[i]}")
        np.testing.assert_allclose(lse[:, i], ref_lse[:, 0], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(gather(cache, sid, 1)[0], dtype=np.float32),
                                      np.asarray(k, dtype=np.float32))
    assert np.all(got[1] == 0) and np.all(np.isneginf(lse[:, 1]))  # empty sequence: 0 and -inf


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("splits", [0, 1, 3, 8])
def test_split_kv_long_context(dtype, splits):
    rng = np.random.default_rng(splits)
    heads, kvh, D, ps = 8, 2, 64, 16
    lens = [3000, 17]
    cache = PagedKVCache(1, 200, ps, kvh, D, dtype)
    ids, data = fill(cache, rng, lens, dtype)
    q = rand(rng, (2, heads, D), dtype)
    got, lse = paged_attention(q, cache, 0, ids, num_splits=splits, return_lse=True)
    for i, sid in enumerate(ids):
        ref, ref_lse = reference(q[i:i + 1], *data[sid, 0])
        assert_close(got[i:i + 1], ref, dtype, f"splits {splits}")
        np.testing.assert_allclose(lse[:, i], ref_lse[:, 0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_prefill(dtype, causal):
    """Prefill in chunks: append a chunk, attend with its queries over everything cached so far."""
    rng = np.random.default_rng(7)
    heads, kvh, D, ps = 4, 2, 64, 8
    cache = PagedKVCache(1, 120, ps, kvh, D, dtype)
    a, b = cache.add_sequence(), cache.add_sequence()
    full = {a: ([], []), b: ([], [])}
    for chunk_a, chunk_b in [(13, 1), (1, 40), (29, 0), (5, 7)]:
        ks = [rand(rng, (n, kvh, D), dtype) for n in (chunk_a, chunk_b)]
        vs = [rand(rng, (n, kvh, D), dtype) for n in (chunk_a, chunk_b)]
        cache.append([a, b], 0, np.concatenate(ks), np.concatenate(vs), counts=[chunk_a, chunk_b])
        for sid, k, v in zip((a, b), ks, vs):
            full[sid][0].append(k)
            full[sid][1].append(v)
        q = rand(rng, (chunk_a + chunk_b, heads, D), dtype)
        got, lse = paged_attention(q, cache, 0, [a, b], q_lens=[chunk_a, chunk_b], causal=causal, return_lse=True)
        for sid, rows in ((a, slice(0, chunk_a)), (b, slice(chunk_a, chunk_a + chunk_b))):
            ref, ref_lse = reference(q[rows], np.concatenate(full[sid][0]), np.concatenate(full[sid][1]), causal)
            assert_close(got[rows], ref, dtype, f"chunk causal={causal}")
            np.testing.assert_allclose(lse[:, rows], ref_lse, rtol=1e-3, atol=1e-3)


def test_matches_flash_attention():
    rng = np.random.default_rng(3)
    heads, kvh, D, ps, n = 8, 2, 64, 16, 300
    cache = PagedKVCache(1, 40, ps, kvh, D, "float32")
    ids, data = fill(cache, rng, [n], "float32")
    q = rand(rng, (20, heads, D), "float32")
    got = paged_attention(q, cache, 0, ids, q_lens=[20], causal=True)
    k, v = data[ids[0], 0]
    flash = mk.flash_attention(q[None], k[None], v[None], causal=True)[0]
    np.testing.assert_allclose(got, flash, rtol=1e-4, atol=1e-5)


def test_scale_and_softcap():
    rng = np.random.default_rng(4)
    cache = PagedKVCache(1, 10, 16, 2, 32, "float32")
    ids, data = fill(cache, rng, [50], "float32")
    q = rand(rng, (1, 4, 32), "float32") * 3
    got = paged_attention(q, cache, 0, ids, scale=0.5, softcap=5.0)
    ref, _ = reference(q, *data[ids[0], 0], scale=0.5, softcap=5.0)
    assert_close(got, ref, "float32", "softcap")


def test_raw_with_own_pages():
    """paged_attention_raw on a caller-owned page pool with a shuffled page order."""
    rng = np.random.default_rng(5)
    P, ps, kvh, D, heads = 30, 5, 2, 64, 4
    kp = rand(rng, (P, ps, kvh, D), "float32")
    vp = rand(rng, (P, ps, kvh, D), "float32")
    perm = rng.permutation(P).astype(np.int32)
    lens = [7, 23, 1]
    npages = [(n + ps - 1) // ps for n in lens]
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = perm[:indptr[-1]]
    last = np.array([n - (p - 1) * ps for n, p in zip(lens, npages)], dtype=np.int32)
    q = rand(rng, (3, heads, D), "float32")
    got = paged_attention_raw(q, kp, vp, indptr, indices, last)
    for b, n in enumerate(lens):
        pages = indices[indptr[b]:indptr[b + 1]]
        k = kp[pages].reshape(-1, kvh, D)[:n]
        v = vp[pages].reshape(-1, kvh, D)[:n]
        assert_close(got[b:b + 1], reference(q[b:b + 1], k, v)[0], "float32", "raw")


def test_raw_rejects_bad_arrays():
    rng = np.random.default_rng(6)
    kp = rand(rng, (4, 4, 1, 16), "float32")
    q = rand(rng, (1, 1, 16), "float32")
    ok = dict(kv_indptr=np.array([0, 1], np.int32), kv_indices=np.array([2], np.int32),
              kv_last_page_len=np.array([2], np.int32))
    paged_attention_raw(q, kp, kp, **ok)
    with pytest.raises(ValueError, match="kv_indices"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_indices": np.array([4], np.int32)})
    with pytest.raises(ValueError, match="kv_indices"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_indices": np.array([-1], np.int32)})
    with pytest.raises(ValueError, match="kv_last_page_len"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_last_page_len": np.array([5], np.int32)})
    with pytest.raises(ValueError, match="non-decreasing"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_indptr": np.array([1, 0], np.int32)})
    with pytest.raises(ValueError, match="kv_indptr"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_indptr": np.array([0, 2], np.int32)})
    with pytest.raises(TypeError, match="kv_indices"):
        paged_attention_raw(q, kp, kp, **{**ok, "kv_indices": np.array([2], np.int64)})
    with pytest.raises(TypeError, match="dtype"):
        paged_attention_raw(q.astype(np.float16), kp, kp, **ok)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_raw(rand(rng, (1, 3, 16), "float32"), rand(rng, (4, 4, 2, 16), "float32"),
                            rand(rng, (4, 4, 2, 16), "float32"), **ok)
    with pytest.raises(ValueError, match="qo_indptr"):
        paged_attention_raw(q, kp, kp, qo_indptr=np.array([0, 2], np.int32), **ok)


# --- sliding window -------------------------------------------------------------------------------

def raw_pool(rng, lens, ps, kvh, D, dtype, spare=2):
    """A caller-owned pool (pages in shuffled order) holding sequences of the given lengths:
    (k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len)."""
    npages = [(n + ps - 1) // ps for n in lens]
    total = sum(npages) + spare
    kp, vp = rand(rng, (total, ps, kvh, D), dtype), rand(rng, (total, ps, kvh, D), dtype)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = rng.permutation(total).astype(np.int32)[:indptr[-1]]
    last = np.array([n - (p - 1) * ps if p else 0 for n, p in zip(lens, npages)], dtype=np.int32)
    return kp, vp, indptr, indices, last


def seq_kv(pages, indptr, indices, b, n):
    """Sequence b's first n tokens of a page pool, contiguous."""
    return pages[indices[indptr[b]:indptr[b + 1]]].reshape(-1, *pages.shape[2:])[:n]


def window_left(window):
    return window if np.ndim(window) == 0 else window[0]


BIG = 2**31 - 2
DECODE_WINDOWS = [0, 1, 6, 31, 32, 33, 100, (5, 3), (-1, 2), (BIG, 0)]


def check_window_decode(rng, dtype, D, splits, windows=DECODE_WINDOWS, causal_modes=(True, False)):
    """Decode with a sliding window (GQA, odd page size, an empty and a one-token sequence). Every key
    outside a sequence's window, the unused slots of last pages and the spare pages are NaN, so
    reading any of them (even masked) turns the output into NaN: the kernel must skip them."""
    heads, kvh, ps = 6, 2, 7
    lens = [0, 1, 6, 7, 50, 333]
    kp0, vp0, indptr, indices, last = raw_pool(rng, lens, ps, kvh, D, dtype)
    q = rand(rng, (len(lens), heads, D), dtype)
    for window in windows:
        left = window_left(window)
        kp, vp = np.full_like(kp0, np.nan), np.full_like(vp0, np.nan)
        for b, n in enumerate(lens):
            pages = indices[indptr[b]:indptr[b + 1]]
            tok = np.arange(max(0, n - 1 - left) if left >= 0 else 0, n)  # the window of the last token
            kp[pages[tok // ps], tok % ps] = kp0[pages[tok // ps], tok % ps]
            vp[pages[tok // ps], tok % ps] = vp0[pages[tok // ps], tok % ps]
        for causal in causal_modes:
            out = np.full(q.shape, np.nan, dtype=q.dtype)
            got, lse = paged_attention_raw(q, kp, vp, indptr, indices, last, window=window, causal=causal,
                                           num_splits=splits, return_lse=True, out=out)
            assert got is out
            for b, n in enumerate(lens):
                k, v = seq_kv(kp0, indptr, indices, b, n), seq_kv(vp0, indptr, indices, b, n)
                ref, ref_lse = reference(q[b:b + 1], k, v, causal, window=window)
                what = f"window {window} causal={causal} splits {splits} len {n}"
                assert_close(got[b:b + 1], ref, dtype, what)
                np.testing.assert_allclose(lse[:, b], ref_lse[:, 0], rtol=1e-3, atol=1e-3, err_msg=what)


PREFILL_WINDOWS = [(0, None), (3, None), (17, 4.0), ((5, 2), None), ((-1, 6), None), ((12, -1), 2.5),
                   ((40, 40), None), (200, None)]


def check_window_prefill(rng, dtype, causal, splits, windows=PREFILL_WINDOWS, D=48):
    """Chunked prefill of two sequences through the cache, each chunk attending with a window (and
    softcap) over everything cached so far."""
    heads, kvh, ps = 8, 2, 6
    cache = PagedKVCache(1, 200, ps, kvh, D, dtype)
    a, b = cache.add_sequence(), cache.add_sequence()
    full = {a: ([], []), b: ([], [])}
    for chunk_a, chunk_b in [(13, 1), (1, 70), (45, 0), (5, 7)]:
        ks = [rand(rng, (n, kvh, D), dtype) for n in (chunk_a, chunk_b)]
        vs = [rand(rng, (n, kvh, D), dtype) for n in (chunk_a, chunk_b)]
        cache.append([a, b], 0, np.concatenate(ks), np.concatenate(vs), counts=[chunk_a, chunk_b])
        for sid, k, v in zip((a, b), ks, vs):
            full[sid][0].append(k)
            full[sid][1].append(v)
        q = rand(rng, (chunk_a + chunk_b, heads, D), dtype)
        for window, softcap in windows:
            out = np.full(q.shape, np.nan, dtype=q.dtype)
            got, lse = paged_attention(q, cache, 0, [a, b], q_lens=[chunk_a, chunk_b], causal=causal, window=window,
                                       softcap=softcap, num_splits=splits, return_lse=True, out=out)
            for sid, rows in ((a, slice(0, chunk_a)), (b, slice(chunk_a, chunk_a + chunk_b))):
                ref, ref_lse = reference(q[rows], np.concatenate(full[sid][0]), np.concatenate(full[sid][1]), causal,
                                         softcap=softcap, window=window)
                what = f"window {window} softcap {softcap} causal={causal} splits {splits}"
                assert_close(got[rows], ref, dtype, what)
                np.testing.assert_allclose(lse[:, rows], ref_lse, rtol=1e-3, atol=1e-3, err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 40])  # 40: not a multiple of the vector width (staging path)
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_window_decode_reads_only_the_window(dtype, D, splits):
    check_window_decode(np.random.default_rng(D * 10 + splits), dtype, D, splits)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_window_chunked_prefill(dtype, causal, splits):
    check_window_prefill(np.random.default_rng(splits * 2 + causal), dtype, causal, splits)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_window_every_cpu_isa(isa):
    levels = ["generic", "avx2", "avx512"]
    if levels.index(isa) > levels.index(mk.info()["best_cpu_isa"]):
        pytest.skip(f"CPU lacks {isa}")
    before = mk.cpu_isa()
    mk.set_cpu_isa(isa)
    try:
        rng = np.random.default_rng(50)
        for dtype, D in (("float32", 64), ("float16", 40), ("bfloat16", 64)):
            check_window_decode(rng, dtype, D, 3, windows=[0, 6, 33, (5, 3)], causal_modes=(True,))
        check_window_prefill(rng, "float32", True, 3, windows=[(3, None), (17, 4.0)], D=40)
        check_window_prefill(rng, "float16", False, 0, windows=[((5, 2), None), ((12, -1), 2.5)])
    finally:
        mk.set_cpu_isa(before)


def test_window_rows_that_see_no_key():
    """q_len > kv_len (raw arrays): the first rows sit before key 0; with a window whose right side
    ends before key 0 (non-causal) or causal, they see nothing: output 0 and lse -inf, also split."""
    rng = np.random.default_rng(51)
    kp, vp, indptr, indices, last = raw_pool(rng, [5, 40], 4, 1, 32, "float32")
    q = rand(rng, (12, 2, 32), "float32")
    qo = np.array([0, 9, 12], np.int32)
    for causal, window in ((True, 2), (False, (1, 1)), (False, (-1, 0)), (True, (BIG, 5))):
        for splits in (1, 3):
            got, lse = paged_attention_raw(q, kp, vp, indptr, indices, last, qo, causal=causal, window=window,
                                           num_splits=splits, return_lse=True, out=np.full_like(q, np.nan))
            for b, rows, n in ((0, slice(0, 9), 5), (1, slice(9, 12), 40)):
                k, v = seq_kv(kp, indptr, indices, b, n), seq_kv(vp, indptr, indices, b, n)
                ref, ref_lse = reference(q[rows], k, v, causal, window=window)
                assert_close(got[rows], ref, "float32", f"window {window} causal={causal}")
                np.testing.assert_allclose(lse[:, rows], ref_lse, rtol=1e-4, atol=1e-4)
            assert np.all(got[:3] == 0) and np.all(np.isneginf(lse[:, :3]))


@pytest.mark.parametrize("causal", [True, False])
def test_window_near_int_max(causal):
    """Window bounds near INT_MAX (and Python ints past it) must not overflow the position arithmetic:
    they mean "unbounded" (issue 13 #9, issue 15 #1)."""
    rng = np.random.default_rng(52)
    kp, vp, indptr, indices, last = raw_pool(rng, [5, 40, 3, 0], 4, 2, 64, "float32")
    q = rand(rng, (18, 4, 64), "float32")
    qo = np.array([0, 8, 12, 15, 18], np.int32)  # 8 rows over 5 keys: positions below 0
    cases = [(BIG, -1), ((BIG, 3), (-1, 3)), ((3, BIG), (3, -1)), ((2**31 - 1, 2**31 - 1), -1),
             (2**40, -1), ((np.int64(BIG), BIG + 1), -1)]
    for splits in (1, 3, 0):
        for window, same in cases:
            kw = dict(causal=causal, num_splits=splits, return_lse=True)
            got, lse = paged_attention_raw(q, kp, vp, indptr, indices, last, qo, window=window, **kw)
            want, want_lse = paged_attention_raw(q, kp, vp, indptr, indices, last, qo, window=same, **kw)
            np.testing.assert_array_equal(got, want, err_msg=f"window {window}")
            np.testing.assert_array_equal(lse, want_lse, err_msg=f"window {window}")
            for b, n in enumerate([5, 40, 3, 0]):
                rows = slice(qo[b], qo[b + 1])
                k, v = seq_kv(kp, indptr, indices, b, n), seq_kv(vp, indptr, indices, b, n)
                assert_close(got[rows], reference(q[rows], k, v, causal, window=same)[0], "float32", f"{window}")
    cache = PagedKVCache(1, 20, 16, 2, 64, "float32")
    ids, data = fill(cache, rng, [70], "float32")
    q = rand(rng, (6, 4, 64), "float32")
    got = paged_attention(q, cache, 0, ids, q_lens=[6], causal=causal, window=BIG)
    assert_close(got, reference(q, *data[ids[0], 0], causal)[0], "float32", "cache, window 2^31 - 2")


def test_window_bad_values():
    rng = np.random.default_rng(53)
    cache = PagedKVCache(1, 4, 4, 1, 16, "float32")
    ids, _ = fill(cache, rng, [5], "float32")
    q = rand(rng, (1, 2, 16), "float32")
    for bad in (-2, (3, -5), "wide", (1, 2, 3), 2.5j):
        with pytest.raises(ValueError, match="window"):
            paged_attention(q, cache, 0, ids, window=bad)
    kp, vp, indptr, indices, last = raw_pool(rng, [5], 4, 1, 16, "float32")
    with pytest.raises(ValueError, match="window"):
        paged_attention_raw(q, kp, vp, indptr, indices, last, window=(-3, 0))
    # np.int64 is an int here, as in a config read with NumPy
    paged_attention(q, cache, 0, ids, window=np.int64(2))


# --- the cache ------------------------------------------------------------------------------------

def test_fork_copy_on_write_and_attention():
    rng = np.random.default_rng(8)
    ps, kvh, D, heads = 4, 2, 32, 4
    cache = PagedKVCache(2, 20, ps, kvh, D, "float32")
    (a,), data = fill(cache, rng, [10], "float32")
    b = cache.fork(a)
    assert list(cache.page_table(a)) == list(cache.page_table(b))
    assert cache.stats()["pages_shared"] == 3
    kb = {layer: rand(rng, (3, kvh, D), "float32") for layer in range(2)}
    vb = {layer: rand(rng, (3, kvh, D), "float32") for layer in range(2)}
    for layer in range(2):
        cache.append([b], layer, kb[layer], vb[layer], counts=[3])
    pa, pb = cache.page_table(a), cache.page_table(b)
    assert pa[0] == pb[0] and pa[1] == pb[1] and pa[2] != pb[2]  # only the partly filled page was copied
    assert cache.length(a) == 10 and cache.length(b) == 13
    q = rand(rng, (2, heads, D), "float32")
    got = paged_attention(q, cache, 1, [a, b])
    ka, va = data[a, 1]
    assert_close(got[:1], reference(q[:1], ka, va)[0], "float32", "parent after fork")
    kfull, vfull = np.concatenate([ka, kb[1]]), np.concatenate([va, vb[1]])
    assert_close(got[1:], reference(q[1:], kfull, vfull)[0], "float32", "child after fork")
    cache.check_invariants()
    cache.free(a)
    cache.free(b)
    assert cache.stats()["pages_free"] == 20
    cache.check_invariants()


def test_swap_out_in():
    rng = np.random.default_rng(9)
    cache = PagedKVCache(2, 12, 8, 2, 32, "float16")
    ids, data = fill(cache, rng, [30, 20], "float16")
    free_before = cache.stats()["pages_free"]
    cache.swap_out(ids[0])
    assert cache.is_swapped(ids[0]) and cache.stats()["pages_free"] == free_before + 4
    with pytest.raises(ValueError, match="swapped out"):
        paged_attention(rand(rng, (1, 4, 32), "float16"), cache, 0, [ids[0]])
    # fill the freed pages with someone else, then swapping in must fail and change nothing
    (c,), _ = fill(cache, rng, [free_before * 8 + 4 * 8 - 7], "float16")
    with pytest.raises(CacheFullError):
        cache.swap_in(ids[0])
    assert cache.is_swapped(ids[0])
    cache.free(c)
    cache.swap_in(ids[0])
    for layer in range(2):
        k, v = gather(cache, ids[0], layer)
        np.testing.assert_array_equal(k, data[ids[0], layer][0])
        np.testing.assert_array_equal(v, data[ids[0], layer][1])
    q = rand(rng, (2, 4, 32), "float16")
    got = paged_attention(q, cache, 0, ids)
    for i, sid in enumerate(ids):
        assert_close(got[i:i + 1], reference(q[i:i + 1], *data[sid, 0])[0], "float16", "after swap")
    cache.check_invariants()


def test_cache_full_changes_nothing():
    rng = np.random.default_rng(10)
    cache = PagedKVCache(1, 6, 4, 1, 16, "float32")
    ids, data = fill(cache, rng, [9, 5], "float32")  # 3 + 2 pages, 1 free
    b2 = cache.fork(ids[1])
    before = (cache.stats(), [list(cache.page_table(s)) for s in cache.sequences()],
              [cache.length(s) for s in cache.sequences()], np.array(cache.pool()))
    k = rand(rng, (5, 1, 16), "float32")
    # ids[0] needs 1 new page; b2's partly filled page needs a copy: 2 > 1 free
    with pytest.raises(CacheFullError, match="nothing was appended"):
        cache.append([ids[0], b2], 0, k, k, counts=[4, 1])
    with pytest.raises(MemoryError):  # CacheFullError is a MemoryError
        cache.append([ids[0]], 0, rand(rng, (8, 1, 16), "float32"), rand(rng, (8, 1, 16), "float32"), counts=[8])
    after = (cache.stats(), [list(cache.page_table(s)) for s in cache.sequences()],
             [cache.length(s) for s in cache.sequences()], np.array(cache.pool()))
    assert before[:3] == after[:3]
    np.testing.assert_array_equal(before[3], after[3])
    cache.append([ids[0]], 0, k[:4], k[:4], counts=[4])  # fits exactly
    assert cache.stats()["pages_free"] == 0
    cache.check_invariants()


def test_truncate_then_append():
    rng = np.random.default_rng(11)
    cache = PagedKVCache(1, 10, 4, 1, 16, "float32")
    (a,), data = fill(cache, rng, [13], "float32")
    cache.truncate(a, 6)
    assert cache.length(a) == 6 and len(cache.page_table(a)) == 2
    k, v = rand(rng, (5, 1, 16), "float32"), rand(rng, (5, 1, 16), "float32")
    cache.append([a], 0, k, v, counts=[5])
    kk, vv = gather(cache, a, 0)
    np.testing.assert_array_equal(kk, np.concatenate([data[a, 0][0][:6], k]))
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(a, 12)
    cache.check_invariants()


def test_prefix_sharing_and_lru_eviction():
    rng = np.random.default_rng(12)
    ps, L = 4, 2
    cache = PagedKVCache(L, 8, ps, 1, 16, "float32")
    prompt = np.arange(100, 111, dtype=np.int32)  # 11 tokens: 2 full pages
    a = cache.add_sequence(prefix_tokens=prompt)
    assert cache.length(a) == 0
    kv = {layer: (rand(rng, (11, 1, 16), "float32"), rand(rng, (11, 1, 16), "float32")) for layer in range(L)}
    cache.append([a], 0, *kv[0], counts=[11])
    b0 = cache.add_sequence(prefix_tokens=prompt)  # layer 1 not written yet: nothing to reuse
    assert cache.length(b0) == 0
    cache.append([a], 1, *kv[1], counts=[11])
    b = cache.add_sequence(prefix_tokens=np.concatenate([prompt[:9], [7, 7]]))
    assert cache.length(b) == 8 and list(cache.page_table(b)) == list(cache.page_table(a)[:2])
    c = cache.add_sequence(prefix_tokens=np.concatenate([[1], prompt[1:]]))  # first page differs
    assert cache.length(c) == 0
    for layer in range(L):  # the reused pages hold a's K/V in every layer
        np.testing.assert_array_equal(gather(cache, b, layer)[0], kv[layer][0][:8])
    # b writes its own tail: the shared full pages stay untouched
    cache.append([b], 0, rand(rng, (3, 1, 16), "float32"), rand(rng, (3, 1, 16), "float32"), counts=[3])
    np.testing.assert_array_equal(gather(cache, a, 0)[0], kv[0][0])
    for s in (a, b, b0, c):
        cache.free(s)
    st = cache.stats()
    assert st["pages_cached"] == 2 and st["pages_used"] == 0 and st["prefix_hits"] == 2
    d = cache.add_sequence(prefix_tokens=prompt)  # hits the unreferenced cached pages
    assert cache.length(d) == 8
    cache.free(d)
    # fill the whole cache: the cached pages are evicted (LRU) instead of failing
    (e,), _ = fill(cache, rng, [8 * ps], "float32")
    st = cache.stats()
    assert st["evictions"] == 2 and st["pages_cached"] == 0 and st["pages_free"] == 0
    assert cache.length(cache.add_sequence(prefix_tokens=prompt)) == 0
    cache.check_invariants()


def test_stats_fragmentation():
    rng = np.random.default_rng(13)
    cache = PagedKVCache(2, 50, 16, 2, 32, "float16")
    fill(cache, rng, [1, 16, 17, 40], "float16")
    st = cache.stats()
    assert st["pages_used"] == 1 + 1 + 2 + 3
    assert st["tokens"] == 74
    assert st["wasted_slots"] == 7 * 16 - 74
    assert st["fragmentation"] == pytest.approx((7 * 16 - 74) / (7 * 16))
    assert st["bytes_per_token"] == 2 * 2 * 2 * 32 * 2
    assert st["pool_bytes"] == 50 * 16 * st["bytes_per_token"]


def test_bad_arguments():
    rng = np.random.default_rng(14)
    cache = PagedKVCache(2, 8, 4, 2, 16, "float32")
    a = cache.add_sequence()
    k = rand(rng, (1, 2, 16), "float32")
    with pytest.raises(ValueError, match="unknown sequence id 99"):
        cache.append([99], 0, k, k)
    with pytest.raises(ValueError, match="layer 2"):
        cache.append([a], 2, k, k)
    with pytest.raises(TypeError, match="float16"):
        cache.append([a], 0, k.astype(np.float16), k.astype(np.float16))
    with pytest.raises(ValueError, match="kv_heads=2"):
        cache.append([a], 0, rand(rng, (1, 3, 16), "float32"), rand(rng, (1, 3, 16), "float32"))
    with pytest.raises(ValueError, match="counts add up"):
        cache.append([a], 0, k, k, counts=[2])
    with pytest.raises(ValueError, match="more than once"):
        cache.append([a, a], 0, np.concatenate([k, k]), np.concatenate([k, k]))
    with pytest.raises(ValueError, match="contiguous"):
        big = rand(rng, (1, 2, 32), "float32")
        cache.append([a], 0, big[:, :, ::2], big[:, :, ::2])
    assert cache.length(a) == 0
    cache.free(a)
    with pytest.raises(ValueError, match="already freed"):
        cache.free(a)
    with pytest.raises(ValueError, match="unknown sequence"):
        paged_attention(rand(rng, (1, 4, 16), "float32"), cache, 0, [a])
    b = cache.add_sequence()
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(rand(rng, (1, 4, 8), "float32"), cache, 0, [b])
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(rand(rng, (1, 3, 16), "float32"), cache, 0, [b])
    with pytest.raises(ValueError, match="q_lens"):
        paged_attention(rand(rng, (2, 4, 16), "float32"), cache, 0, [b], q_lens=[1, 1])
    with pytest.raises(ValueError, match="qo_indptr"):
        paged_attention(rand(rng, (2, 4, 16), "float32"), cache, 0, [b], q_lens=[1])
    with pytest.raises(ValueError, match="> 0"):
        PagedKVCache(1, 0, 4, 1, 16)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 4, 4, 1, 16, "int16")
    cache.check_invariants()


def test_threads():
    """Several Python threads add, append, fork and free at once; the allocator stays consistent."""
    cache = PagedKVCache(1, 400, 4, 1, 16, "float32")
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                s = cache.add_sequence()
                n = int(rng.integers(1, 20))
                k = rand(rng, (n, 1, 16), "float32")
                try:
                    cache.append([s], 0, k, k, counts=[n])
                    f = cache.fork(s)
                    cache.append([f], 0, k[:1], k[:1])
                    np.testing.assert_array_equal(gather(cache, s, 0)[0], k)
                    cache.free(f)
                except CacheFullError:
                    pass
                cache.free(s)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache.check_invariants()
    assert cache.stats()["pages_free"] == 400


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "free", "truncate", "swap"]),
                          st.integers(0, 7), st.integers(0, 9)), min_size=1, max_size=40),
       st.sampled_from([1, 3, 4]))
def test_allocator_property(ops, ps):
    """Random operation sequences against a model: invariants hold, every sequence reads back its tokens."""
    cache = PagedKVCache(2, 12, ps, 1, 8, "float32")
    model = {}  # seq -> list of per-layer token value lists
    counter = [0.0]

    def rows(n):
        vals = np.arange(counter[0], counter[0] + n, dtype=np.float32)
        counter[0] += n
        return vals, np.repeat(vals[:, None, None], 8, axis=2)

    for op, pick, n in ops:
        live = sorted(model)
        sid = live[pick % len(live)] if live else None
        if op == "add" or sid is None:
            model[cache.add_sequence()] = [[], []]
        elif op == "append":
            layer = pick % 2
            vals, k = rows(n)
            try:
                cache.append([sid], layer, k, -k, counts=[n]) if not cache.is_swapped(sid) else None
                if not cache.is_swapped(sid):
                    model[sid][layer] += list(vals)
            except CacheFullError:
                pass
        elif op == "fork" and not cache.is_swapped(sid):
            model[cache.fork(sid)] = [list(x) for x in model[sid]]
        elif op == "free":
            cache.free(sid)
            del model[sid]
        elif op == "truncate" and not cache.is_swapped(sid):
            length = min(n, cache.length(sid))
            cache.truncate(sid, length)
            model[sid] = [x[:length] for x in model[sid]]
        elif op == "swap":
            try:
                cache.swap_in(sid) if cache.is_swapped(sid) else cache.swap_out(sid)
            except CacheFullError:
                pass
        cache.check_invariants()
        for s, layers in model.items():
            if cache.is_swapped(s):
                continue
            for layer in range(2):
                assert cache.length(s, layer) == len(layers[layer])
                k, v = gather(cache, s, layer)
                np.testing.assert_array_equal(k[:, 0, 0], np.array(layers[layer], dtype=np.float32))
                np.testing.assert_array_equal(v[:, 0, 0], -np.array(layers[layer], dtype=np.float32))


# --- int8 pages -----------------------------------------------------------------------------------

def dequant(cache, sid, layer):
    n = cache.length(sid, layer)
    pt = cache.page_table(sid)
    kvh, D = cache.kv_heads, cache.head_dim
    k = np.asarray(cache.k_pages(layer))[pt].astype(np.float64) * np.asarray(cache.k_scales(layer))[pt][..., None]
    v = np.asarray(cache.v_pages(layer))[pt].astype(np.float64) * np.asarray(cache.v_scales(layer))[pt][..., None]
    return k.reshape(-1, kvh, D)[:n], v.reshape(-1, kvh, D)[:n]


@pytest.mark.parametrize("qdtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("heads,kvh,D,ps", [(8, 2, 64, 16), (4, 4, 40, 5), (32, 8, 128, 16)])
def test_int8_pages(qdtype, heads, kvh, D, ps):
    rng = np.random.default_rng(D + ps)
    lens = [1, 77, 300]
    cache = PagedKVCache(2, sum((n + ps - 1) // ps for n in lens) + 2, ps, kvh, D, "int8")
    ids, data = [], {}
    for n in lens:
        s = cache.add_sequence()
        ids.append(s)
        for layer in range(2):
            k, v = rand(rng, (n, kvh, D), qdtype), rand(rng, (n, kvh, D), qdtype)
            cache.append([s], layer, k, v, counts=[n])
            data[s, layer] = (k, v)
    q = rand(rng, (len(ids), heads, D), qdtype)
    got, lse = paged_attention(q, cache, 1, ids, return_lse=True)
    assert got.dtype == q.dtype
    for i, s in enumerate(ids):
        kq, vq = dequant(cache, s, 1)
        k, v = (np.asarray(x, dtype=np.float64) for x in data[s, 1])
        # quantization error: per token and head, at most max|x| / 254 per element
        assert np.max(np.abs(kq - k)) <= np.max(np.abs(k)) / 254 * 1.001
        ref_q, lse_q = reference(q[i:i + 1], kq, vq)  # the kernel over the dequantized values: exact up to fp
        assert_close(got[i:i + 1], ref_q, qdtype, "int8 vs dequantized")
        np.testing.assert_allclose(lse[:, i], lse_q[:, 0], rtol=1e-3, atol=1e-3)
        ref, _ = reference(q[i:i + 1], k, v)  # vs the unquantized K/V: the stated bound
        err = np.max(np.abs(np.asarray(got[i:i + 1], dtype=np.float64) - ref))
        assert err <= 3e-2 * max(1.0, np.max(np.abs(ref))), f"int8 error {err}"
    # the same pages through the raw kernel
    indptr, indices, last = cache.build_indices(ids, 1)
    raw = paged_attention_raw(q, cache.k_pages(1), cache.v_pages(1), indptr, indices, last,
                              k_scales=cache.k_scales(1), v_scales=cache.v_scales(1))
    np.testing.assert_array_equal(np.asarray(raw, np.float32), np.asarray(got, np.float32))
    with pytest.raises(ValueError, match="k_scales"):
        paged_attention_raw(q, cache.k_pages(1), cache.v_pages(1), indptr, indices, last)


def test_int8_fork_swap_prefill():
    rng = np.random.default_rng(30)
    cache = PagedKVCache(1, 30, 8, 2, 32, "int8")
    (a,), _ = fill(cache, rng, [21], "float32")
    b = cache.fork(a)
    cache.append([b], 0, rand(rng, (5, 2, 32), "float32"), rand(rng, (5, 2, 32), "float32"), counts=[5])
    before = [dequant(cache, s, 0) for s in (a, b)]
    cache.swap_out(b)
    cache.swap_in(b)
    after = [dequant(cache, s, 0) for s in (a, b)]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    np.testing.assert_array_equal(after[0][0], after[1][0][:21])
    q = rand(rng, (9, 4, 32), "float32")
    got = paged_attention(q, cache, 0, [a, b], q_lens=[4, 5])
    assert_close(got[:4], reference(q[:4], *after[0])[0], "float32", "int8 prefill a")
    assert_close(got[4:], reference(q[4:], *after[1])[0], "float32", "int8 prefill b")
    assert cache.stats()["bytes_per_token"] == 2 * 2 * (32 + 4)
    cache.check_invariants()


# --- KIVI pages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,bound", [(4, 0.15), (2, 0.6)])
@pytest.mark.parametrize("heads,kvh,D,ps", [(8, 2, 64, 16), (4, 1, 40, 7)])
def test_kivi_pages(bits, bound, heads, kvh, D, ps):
    rng = np.random.default_rng(bits * 100 + D)
    lens = [1, ps, 3 * ps + 2, 150]
    cache = PagedKVCache(2, sum((n + ps - 1) // ps for n in lens) + 2, ps, kvh, D, f"kivi{bits}")
    ids, data = fill(cache, rng, lens, "float32")
    q = rand(rng, (len(ids), heads, D), "float32")
    got, lse = paged_attention(q, cache, 1, ids, return_lse=True)
    for i, s in enumerate(ids):
        k, v = data[s, 1]
        kq, vq = cache.read_kv(s, 1)
        n_full = lens[i] // ps * ps
        np.testing.assert_array_equal(kq[n_full:], k[n_full:])  # recent window kept exactly
        np.testing.assert_array_equal(vq[n_full:], v[n_full:])
        if n_full:  # keys per channel: error <= half a step of that channel's range over the page
            kp = k[:n_full].reshape(-1, ps, kvh, D)
            step = (kp.max(1) - kp.min(1)) / (2 ** bits - 1)
            assert np.all(np.abs(kq[:n_full].reshape(-1, ps, kvh, D) - kp) <= step[:, None] * 0.5001 + 1e-6)
        ref_q, lse_q = reference(q[i:i + 1], kq, vq)  # the kernel over the dequantized values
        assert_close(got[i:i + 1], ref_q, "float32", f"kivi{bits} vs dequantized")
        np.testing.assert_allclose(lse[:, i], lse_q[:, 0], rtol=1e-4, atol=1e-4)
        ref, _ = reference(q[i:i + 1], k, v)
        err = np.max(np.abs(got[i:i + 1] - ref))
        assert err <= bound * max(1.0, np.max(np.abs(ref))), f"kivi{bits} error {err}"
    st = cache.stats()
    assert st["bytes_per_token"] < 2 * 2 * kvh * D * 4 * (bits / 8 + 0.6)


def test_kivi_prefill_fork_truncate():
    rng = np.random.default_rng(40)
    ps, kvh, D = 8, 2, 32
    cache = PagedKVCache(1, 40, ps, kvh, D, "kivi4")
    (a,), data = fill(cache, rng, [29], "float32")
    b = cache.fork(a)
    kb, vb = rand(rng, (6, kvh, D), "float32"), rand(rng, (6, kvh, D), "float32")
    cache.append([b], 0, kb, vb, counts=[6])  # fills b's window: quantized into a copied page
    ka, va = cache.read_kv(a, 0)
    np.testing.assert_array_equal(ka[24:], data[a, 0][0][24:])  # a's window untouched by b
    kbq, vbq = cache.read_kv(b, 0)
    np.testing.assert_array_equal(kbq[:24], ka[:24])  # shared quantized pages
    q = rand(rng, (9, 4, D), "float32")
    got = paged_attention(q, cache, 0, [a, b], q_lens=[4, 5])
    assert_close(got[:4], reference(q[:4], ka, va)[0], "float32", "kivi prefill a")
    assert_close(got[4:], reference(q[4:], kbq, vbq)[0], "float32", "kivi prefill b")
    cache.truncate(b, 19)  # inside a quantized page: kept tokens back to the window
    kt, vt = cache.read_kv(b, 0)
    np.testing.assert_allclose(kt, kbq[:19], rtol=1e-6, atol=1e-6)
    cache.append([b], 0, kb[:5], vb[:5], counts=[5])  # refills the window and quantizes again
    k2, _ = cache.read_kv(b, 0)
    assert k2.shape[0] == 24 and np.max(np.abs(k2[19:] - kb[:5])) < 0.2 * np.max(np.abs(kb))
    cache.swap_out(a)
    cache.swap_in(a)
    np.testing.assert_array_equal(cache.read_kv(a, 0)[0], ka)
    cache.check_invariants()
    with pytest.raises(ValueError, match="KIVI"):
        cache.k_pages(0)


@pytest.mark.parametrize("kind", ["int8", "kivi4", "kivi2"])
def test_window_quantized_pages(kind):
    """Sliding window over int8 and KIVI pages (KIVI: quantized pages and the float32 recent window
    both inside it), decode and chunked prefill, split and not, against the dequantized values."""
    rng = np.random.default_rng(60)
    heads, kvh, D, ps = 8, 2, 40, 8
    lens = [1, 9, 100, 333]
    cache = PagedKVCache(1, sum((n + ps - 1) // ps for n in lens) + 2, ps, kvh, D, kind)
    ids, _ = fill(cache, rng, lens, "float32")
    kv = [dequant(cache, s, 0) if kind == "int8" else cache.read_kv(s, 0) for s in ids]
    q = rand(rng, (len(ids), heads, D), "float32")
    for window in (0, 5, 30, (BIG, 0)):
        for splits in (1, 3, 0):
            got, lse = paged_attention(q, cache, 0, ids, window=window, num_splits=splits, return_lse=True,
                                       out=np.full_like(q, np.nan))
            for i in range(len(ids)):
                ref, ref_lse = reference(q[i:i + 1], *kv[i], window=window)
                assert_close(got[i:i + 1], ref, "float32", f"{kind} window {window} splits {splits}")
                np.testing.assert_allclose(lse[:, i], ref_lse[:, 0], rtol=1e-4, atol=1e-4)
    q_lens = [1, 5, 20, 3]
    q = rand(rng, (sum(q_lens), heads, D), "float32")
    rows = np.concatenate([[0], np.cumsum(q_lens)])
    for causal, window, softcap in ((True, 7, None), (False, (7, 3), 3.0), (True, (BIG, 0), 2.0)):
        for splits in (1, 3):
            got = paged_attention(q, cache, 0, ids, q_lens=q_lens, causal=causal, window=window, softcap=softcap,
                                  num_splits=splits, out=np.full_like(q, np.nan))
            for i in range(len(ids)):
                r = slice(rows[i], rows[i + 1])
                ref, _ = reference(q[r], *kv[i], causal, softcap=softcap, window=window)
                assert_close(got[r], ref, "float32", f"{kind} prefill window {window} causal={causal}")


@pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")
def test_cuda_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(20)
    heads, kvh, D, ps = 32, 8, 128, 16
    lens = [1, 100, 1000, 4097]
    for dtype, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        gpu = PagedKVCache(1, 400, ps, kvh, D, dtype, device="cuda")
        ids, data = [], {}
        for n in lens:
            s = gpu.add_sequence()
            k = torch.randn(n, kvh, D, dtype=tdt, device="cuda")
            v = torch.randn(n, kvh, D, dtype=tdt, device="cuda")
            gpu.append([s], 0, k, v, counts=[n])
            ids.append(s)
            data[s] = (k.float().cpu().numpy(), v.float().cpu().numpy())
        q = torch.randn(len(lens), heads, D, dtype=tdt, device="cuda")
        out, lse = paged_attention(q, gpu, 0, ids, return_lse=True)
        torch.cuda.synchronize()
        qn = q.float().cpu().numpy()
        for i, s in enumerate(ids):
            ref, ref_lse = reference(qn[i:i + 1], *data[s])
            assert_close(out[i:i + 1].float().cpu().numpy(), ref, dtype if dtype != "float32" else "float16", "cuda")
            np.testing.assert_allclose(lse[:, i].cpu().numpy(), ref_lse[:, 0], rtol=2e-3, atol=2e-3)
        # prefill with causal mask
        q2 = torch.randn(37, heads, D, dtype=tdt, device="cuda")
        out2 = paged_attention(q2, gpu, 0, [ids[2]], q_lens=[37])
        ref2, _ = reference(q2.float().cpu().numpy(), *data[ids[2]])
        assert_close(out2.float().cpu().numpy(), ref2, dtype if dtype != "float32" else "float16", "cuda prefill")


@pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_softcap_splits_and_odd_head_dim(num_splits):
    # head_dim 80 (scalar, non-vector loads), softcap, non-causal prefill, and the single-split path
    # that writes out/lse directly (automatic splitting rarely picks 1 on a large GPU)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(21)
    heads, kvh, D, ps = 6, 2, 80, 8
    gpu = PagedKVCache(1, 64, ps, kvh, D, "float16", device="cuda")
    ids, data = [], {}
    for n in (13, 150):
        s = gpu.add_sequence()
        k = torch.randn(n, kvh, D, dtype=torch.float16, device="cuda")
        v = torch.randn(n, kvh, D, dtype=torch.float16, device="cuda")
        gpu.append([s], 0, k, v, counts=[n])
        ids.append(s)
        data[s] = (k.float().cpu().numpy(), v.float().cpu().numpy())
    for causal in (True, False):
        q = torch.randn(9, heads, D, dtype=torch.float16, device="cuda")
        out, lse = paged_attention(q, gpu, 0, ids, q_lens=[4, 5], causal=causal, softcap=3.0, num_splits=num_splits,
                                   return_lse=True)
        torch.cuda.synchronize()
        qn = q.float().cpu().numpy()
        for rows, s in ((slice(0, 4), ids[0]), (slice(4, 9), ids[1])):
            ref, ref_lse = reference(qn[rows], *data[s], causal=causal, softcap=3.0)
            assert_close(out[rows].float().cpu().numpy(), ref, "float16", f"cuda causal={causal}")
            np.testing.assert_allclose(lse[:, rows].cpu().numpy(), ref_lse, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_cuda_window(dtype, num_splits):
    """The CPU window cases on the GPU: decode and chunked prefill, GQA, causal and not, softcap,
    head dims 128 (vector loads) and 40 (scalar), bounds near INT_MAX, rows that see no key."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    tdt = getattr(torch, dtype)
    tol = dtype if dtype != "float32" else "float16"
    rng = np.random.default_rng(22)
    for heads, kvh, D, ps in ((8, 2, 128, 16), (6, 3, 40, 7)):
        lens = [1, 6, 50, 333, 2000]
        gpu = PagedKVCache(1, sum((n + ps - 1) // ps for n in lens) + 2, ps, kvh, D, dtype, device="cuda")
        ids, data = [], {}
        for n in lens:
            s = gpu.add_sequence()
            k = torch.from_numpy(rand(rng, (n, kvh, D), "float32")).to("cuda", tdt)
            v = torch.from_numpy(rand(rng, (n, kvh, D), "float32")).to("cuda", tdt)
            gpu.append([s], 0, k, v, counts=[n])
            ids.append(s)
            data[s] = (k.float().cpu().numpy(), v.float().cpu().numpy())
        q = torch.from_numpy(rand(rng, (len(ids), heads, D), "float32")).to("cuda", tdt)
        qn = q.float().cpu().numpy()
        for window in (0, 1, 31, 200, (5, 3), (BIG, 0), 2**40):
            out, lse = paged_attention(q, gpu, 0, ids, window=window, num_splits=num_splits, return_lse=True,
                                       out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
            for i, s in enumerate(ids):
                ref, ref_lse = reference(qn[i:i + 1], *data[s], window=window)
                assert_close(out[i:i + 1].float().cpu().numpy(), ref, tol, f"cuda decode window {window}")
                np.testing.assert_allclose(lse[:, i].cpu().numpy(), ref_lse[:, 0], rtol=2e-3, atol=2e-3)
        q_lens = [1, 6, 37, 100, 9]
        q = torch.from_numpy(rand(rng, (sum(q_lens), heads, D), "float32")).to("cuda", tdt)
        qn = q.float().cpu().numpy()
        rows = np.concatenate([[0], np.cumsum(q_lens)])
        for causal, window, softcap in ((True, 9, None), (True, 64, 4.0), (False, (7, 3), None),
                                        (False, (-1, 5), 2.5), (True, (BIG, 0), None), (False, (3, BIG), None)):
            out, lse = paged_attention(q, gpu, 0, ids, q_lens=q_lens, causal=causal, window=window, softcap=softcap,
                                       num_splits=num_splits, return_lse=True, out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
            for i, s in enumerate(ids):
                r = slice(rows[i], rows[i + 1])
                ref, ref_lse = reference(qn[r], *data[s], causal, softcap=softcap, window=window)
                what = f"cuda prefill window {window} causal={causal}"
                assert_close(out[r].float().cpu().numpy(), ref, tol, what)
                np.testing.assert_allclose(lse[:, r].cpu().numpy(), ref_lse, rtol=2e-3, atol=2e-3, err_msg=what)
    # q_len > kv_len through raw arrays: rows before key 0 see nothing (0 and -inf)
    kp, vp, indptr, indices, last = raw_pool(rng, [5, 40], 4, 1, 32, dtype)
    qh = rand(rng, (12, 2, 32), dtype)
    qo = np.array([0, 9, 12], np.int32)
    dev = [torch.from_numpy(np.asarray(x, np.float32)).to("cuda", tdt) for x in (qh, kp, vp)]
    idx = [torch.from_numpy(x).to("cuda") for x in (indptr, indices, last, qo)]
    for causal, window in ((True, 2), (False, (1, 1))):
        out, lse = paged_attention_raw(dev[0], dev[1], dev[2], *idx[:3], idx[3], causal=causal, window=window,
                                       num_splits=num_splits, max_q_len=9, return_lse=True)
        torch.cuda.synchronize()
        got = out.float().cpu().numpy()
        for b, r, n in ((0, slice(0, 9), 5), (1, slice(9, 12), 40)):
            k = seq_kv(np.asarray(kp, np.float32), indptr, indices, b, n)
            v = seq_kv(np.asarray(vp, np.float32), indptr, indices, b, n)
            ref, _ = reference(np.asarray(qh[r], np.float32), k, v, causal, window=window)
            assert_close(got[r], ref, tol, f"cuda raw window {window}")
        assert np.all(got[:3] == 0) and np.all(np.isneginf(lse[:, :3].cpu().numpy()))
