"""Concurrency stress: one PagedKVCache and one WeightStore used from several Python threads at once
for a bounded time, invariants checked during and after; and the long kernels release the GIL.

Each cache thread owns its sequences (it keeps a shadow copy of their K/V and checks every read-back
against it) but all threads share the allocator, the pool and the lock; a monitor thread checks the
allocator invariants and the page budget while they run. Weight-store threads read overlapping
neuron sets under a small DRAM budget (constant eviction) and check every row against the data.
"""
import os
import threading
import time

import numpy as np
import pytest

import memkernels as mk
from memkernels import CacheFullError, PagedKVCache, paged_attention

SECONDS = float(os.environ.get("MK_STRESS_SECONDS", "3"))


def _run_threads(targets, seconds):
    """Runs target(stop_event, errors) threads for `seconds`; returns the errors they recorded."""
    stop, errors = threading.Event(), []

    def wrap(fn):
        def run():
            try:
                fn(stop)
            except BaseException as e:  # noqa: BLE001 - collected and reported by the test
                errors.append(e)
                stop.set()
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a stress thread hangs (deadlock?)"
    return errors


def _attention_ref(q, k, v):
    """Causal decode/prefill reference, float64: q (nq, H, D), k/v (nk, KVH, D)."""
    nq, H, D = q.shape
    nk, KVH = k.shape[:2]
    k, v = np.repeat(k, H // KVH, axis=1).astype(np.float64), np.repeat(v, H // KVH, axis=1).astype(np.float64)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), k) / np.sqrt(D)
    s = np.where((np.arange(nk)[None, :] > np.arange(nq)[:, None] + nk - nq)[None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


def test_paged_cache_many_threads():
    L, P, PS, KVH, D = 2, 96, 4, 2, 8
    cache = PagedKVCache(L, P, PS, KVH, D, "float32")
    counts = {"ops": 0, "full": 0, "checks": 0}
    lock = threading.Lock()

    def worker(seed):
        def run(stop):
            rng = np.random.default_rng(seed)
            seqs = {}  # id -> [K list per layer, V list per layer] (the shadow copy)
            while not stop.is_set():
                op = rng.choice(["add", "append", "append", "fork", "free", "truncate", "check", "attend"])
                ids = list(seqs)
                if op == "add" or not ids:
                    s = cache.add_sequence()
                    seqs[s] = [[np.zeros((0, KVH, D), np.float32)] * L for _ in range(2)]
                elif op == "append":
                    s = ids[rng.integers(len(ids))]
                    n = int(rng.integers(1, 7))
                    kv = [rng.standard_normal((n, KVH, D)).astype(np.float32) for _ in range(2)]
                    layer = int(rng.integers(L))
                    try:
                        cache.append([s], layer, kv[0], kv[1], counts=[n])
                    except CacheFullError:
                        with lock:
                            counts["full"] += 1
                        continue
                    for i in range(2):
                        seqs[s][i][layer] = np.concatenate([seqs[s][i][layer], kv[i]])
                elif op == "fork":
                    s = ids[rng.integers(len(ids))]
                    f = cache.fork(s)
                    seqs[f] = [list(seqs[s][0]), list(seqs[s][1])]
                elif op == "free":
                    s = ids[rng.integers(len(ids))]
                    cache.free(s)
                    del seqs[s]
                elif op == "truncate":
                    s = ids[rng.integers(len(ids))]
                    n = int(rng.integers(0, cache.length(s) + 1))
                    cache.truncate(s, n)
                    for i in range(2):
                        seqs[s][i] = [a[:n] for a in seqs[s][i]]
                elif op == "check":
                    s = ids[rng.integers(len(ids))]
                    pt = cache.page_table(s)
                    for layer in range(L):
                        n = cache.length(s, layer)
                        assert n == len(seqs[s][0][layer]), (n, len(seqs[s][0][layer]))
                        k = np.asarray(cache.k_pages(layer))[pt].reshape(-1, KVH, D)[:n]
                        v = np.asarray(cache.v_pages(layer))[pt].reshape(-1, KVH, D)[:n]
                        np.testing.assert_array_equal(k, seqs[s][0][layer])
                        np.testing.assert_array_equal(v, seqs[s][1][layer])
                    with lock:
                        counts["checks"] += 1
                else:  # attend over layer 0 of a sequence whose layers all have data
                    s = ids[rng.integers(len(ids))]
                    n = len(seqs[s][0][0])
                    if n == 0 or cache.length(s) != n:
                        continue
                    q = rng.standard_normal((1, 2 * KVH, D)).astype(np.float32)
                    out = paged_attention(q, cache, 0, [s])
                    ref = _attention_ref(q, seqs[s][0][0], seqs[s][1][0])
                    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
                with lock:
                    counts["ops"] += 1
            for s in seqs:
                cache.free(s)
        return run

    def monitor(stop):
        while not stop.is_set():
            st = cache.stats()
            assert st["pages_used"] <= P and st["pages_free"] >= 0, st
            cache.check_invariants()
            time.sleep(0.01)

    errors = _run_threads([worker(i) for i in range(4)] + [monitor], SECONDS)
    assert not errors, errors
    cache.check_invariants()
    assert cache.sequences() == []
    assert cache.stats()["pages_used"] == 0
    assert counts["ops"] > 100 and counts["checks"] > 10, counts


def test_weight_store_many_threads(tmp_path):
    rng = np.random.default_rng(5)
    d_ff, d_model = 300, 32
    layers = {i: {"gate": rng.standard_normal((d_ff, d_model)).astype(np.float32),
                  "up": rng.standard_normal((d_ff, d_model)).astype(np.float32),
                  "down": rng.standard_normal((d_model, d_ff)).astype(np.float32)} for i in range(2)}
    emb = rng.standard_normal((50, d_model)).astype(np.float32)
    path = str(tmp_path / "m.mkws")
    mk.write_weight_store(path, {"emb": emb}, layers)
    bundle = 3 * d_model * 4
    # Room for about 60 of the 600 neurons besides the staging buffers: constant eviction.
    probe = mk.WeightStore.open(path, 1 << 24, io_threads=1, max_read_bytes=8 << 10)
    budget = probe.stats()["staging_bytes"] + 60 * bundle
    probe.close()
    ws = mk.WeightStore.open(path, budget, io_threads=2, max_read_bytes=8 << 10, window_tokens=2)
    reads = [0]

    def expected(layer, ids):
        p = layers[layer]
        return np.stack([p["gate"][ids], p["up"][ids], p["down"][:, ids].T], axis=1)

    def reader(seed):
        def run(stop):
            r = np.random.default_rng(seed)
            while not stop.is_set():
                layer = int(r.integers(2))
                ids = np.unique(r.integers(0, d_ff, int(r.integers(1, 40))))
                if r.random() < 0.3:
                    ws.prefetch(layer, r.integers(0, d_ff, 20))
                np.testing.assert_array_equal(ws.get_rows(layer, ids), expected(layer, ids))
                if r.random() < 0.2:
                    ws.next_token()
                if r.random() < 0.1:
                    np.testing.assert_array_equal(ws.get("emb"), emb)
                reads[0] += 1
        return run

    def monitor(stop):
        while not stop.is_set():
            st = ws.stats()
            assert st["resident_bytes"] <= st["cache_capacity_bytes"], st
            assert st["resident_bytes"] + st["staging_bytes"] <= budget, st
            time.sleep(0.005)

    errors = _run_threads([reader(i) for i in range(4)] + [monitor], SECONDS)
    assert not errors, errors
    ws.wait_prefetch()
    st = ws.stats()
    assert st["peak_resident_bytes"] <= st["cache_capacity_bytes"] and st["evictions"] > 0, st
    assert reads[0] > 20
    np.testing.assert_array_equal(ws.get_rows(1, np.arange(d_ff)[::7]), expected(1, np.arange(d_ff)[::7]))
    ws.close()


# ---- the GIL is released while a kernel runs ------------------------------------------------------

def _kernels():
    rng = np.random.default_rng(0)

    def attention(n):
        q = rng.standard_normal((1, n, 4, 64)).astype(np.float32)
        return lambda: mk.flash_attention(q, q, q, causal=True)

    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    qm = mk.quantize(w, "int4", group_size=128)
    sp = mk.SparseMatrix.from_dense(mk.prune(w, 0.7))

    def qgemm(n):  # n tokens
        x = rng.standard_normal((n, 1024)).astype(np.float32)
        return lambda: mk.qgemm(x, qm)

    def spmm(n):
        x = rng.standard_normal((n, 1024)).astype(np.float32)
        return lambda: mk.spmm(sp, x)

    return {"flash_attention": (attention, 512), "qgemm": (qgemm, 256), "spmm": (spmm, 256)}


@pytest.mark.parametrize("name", ["flash_attention", "qgemm", "spmm"])
def test_kernels_release_the_gil(name):
    """A Python thread keeps running in the middle of a long kernel call. With the GIL held it could
    run only before the call starts or after it returns (never in its middle half)."""
    assert _progress_in_middle(*_kernels()[name]), f"{name}: no Python progress during the call; GIL held?"


def test_gil_check_detects_a_held_gil():
    """The check above can fail: a long C call that keeps the GIL (sum over a range) shows no progress."""
    assert not _progress_in_middle(lambda n: (lambda: sum(range(n))), 1 << 22)


def _progress_in_middle(make, n):
    old = mk.num_threads()
    mk.set_num_threads(1)  # leave a core to the Python thread on a small machine
    try:
        call = make(n)
        for _ in range(8):  # grow the problem until one call takes >= 0.2 s
            t = time.perf_counter()
            call()
            if time.perf_counter() - t >= 0.2:
                break
            n *= 2
            call = make(n)
        stamps, stop = [], threading.Event()

        def ticker():
            while not stop.is_set():
                stamps.append(time.perf_counter())
                for _ in range(200):
                    pass

        th = threading.Thread(target=ticker)
        th.start()
        while not stamps:
            time.sleep(0.001)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        stop.set()
        th.join()
    finally:
        mk.set_num_threads(old)
    return any(t0 + 0.25 * (t1 - t0) <= s <= t1 - 0.25 * (t1 - t0) for s in stamps)
