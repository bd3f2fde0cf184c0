"""Weight store read engines: Linux native AIO (a call's reads in one io_submit, completions reaped by
one thread) and the pread I/O threads (the fallback) return the same bytes, count the same reads and
raise the same errors; the engine is chosen as documented (async_io, MEMKERNELS_STORE_IO, buffered
files)."""
import os
import threading

import numpy as np
import pytest

import memkernels as mk
from memkernels import _memkernels as _C
from conftest import flip_byte

ENGINES = ["aio", "threads"]
STAT_KEYS = ["bytes_read", "reads_issued", "neuron_hits", "neuron_misses", "prefetched", "evictions",
             "resident_bytes", "peak_resident_bytes", "pinned_neurons", "cache_slots", "staging_bytes"]


def open_store(path, budget, engine, **kw):
    ws = mk.WeightStore.open(path, budget, async_io=(engine == "aio"), **kw)
    if ws.io_mode != "direct":
        ws.close()
        pytest.skip("the filesystem refuses O_DIRECT: both engines are the I/O threads")
    if engine == "aio" and ws.io_engine != "aio":
        ws.close()
        pytest.skip("the kernel refuses Linux AIO here (seccomp or fs.aio-max-nr)")
    assert ws.io_engine == engine
    return ws


def make_store(tmp, rng, n_layers=3, d_ff=700, d_model=40, name="m.mkws", with_emb=True):
    layers = {}
    for L in range(n_layers):
        layers[L] = {"up": rng.standard_normal((d_ff, d_model)).astype(np.float32) + 0.1,
                     "down": rng.standard_normal((d_model, d_ff)).astype(np.float32) + 0.1}
    emb = rng.standard_normal((300, 1000)).astype(np.float32)  # 1.2 MB: several 64 KiB chunks
    path = os.path.join(tmp, name)
    mk.write_weight_store(path, {"emb": emb} if with_emb else {}, layers, chunk_bytes=64 << 10)
    return path, layers, emb


def expected_rows(p, ids):
    return np.stack([p["up"][ids], p["down"][:, ids].T], axis=1)


def test_engine_selection(tmp, monkeypatch):
    rng = np.random.default_rng(0)
    path, _, _ = make_store(tmp, rng, n_layers=1, d_ff=50)
    ws = open_store(path, 4 << 20, "aio")
    assert ws.stats()["io_engine"] == "aio"
    ws.close()
    with mk.WeightStore.open(path, 4 << 20, async_io=False) as ws:
        assert ws.io_engine == "threads"
    monkeypatch.setenv("MEMKERNELS_STORE_IO", "threads")
    with mk.WeightStore.open(path, 4 << 20) as ws:
        assert ws.io_engine == "threads"
    monkeypatch.delenv("MEMKERNELS_STORE_IO")
    with mk.WeightStore.open(path, 4 << 20, direct_io=False) as ws:  # buffered reads: the threads
        assert ws.io_mode == "buffered" and ws.io_engine == "threads"


def run_workload(ws, layers, emb, seed):
    """get, get_rows of random sets (repeats, any order), prefetch, pin and the token window, with
    every output checked against the data written; returns the outputs and the statistics."""
    rng = np.random.default_rng(seed)
    outs = []
    got = ws.get("emb")
    assert np.array_equal(got, emb)
    outs.append(got)
    d_ff = layers[0]["up"].shape[0]
    for step in range(5):
        for L, p in layers.items():
            k = int(rng.integers(1, d_ff))
            ids = rng.choice(d_ff, size=k, replace=bool(rng.random() < 0.5))
            rows = ws.get_rows(L, ids)
            assert np.array_equal(rows, expected_rows(p, ids)), (step, L)
            outs.append(rows)
        if step == 1:
            ws.prefetch(1, rng.permutation(d_ff)[: d_ff // 3])
            ws.wait_prefetch()
        if step == 2:
            ws.pin(0, np.arange(0, d_ff, 7))
        ws.next_token()
    return outs, {k: ws.stats()[k] for k in STAT_KEYS}


@pytest.mark.parametrize("gap", [0, 160, 64 << 10])
def test_engines_read_the_same_bytes_with_the_same_stats(tmp, gap):
    rng = np.random.default_rng(1)
    path, layers, emb = make_store(tmp, rng)
    res = {}
    for eng in ENGINES:
        with open_store(path, 1 << 20, eng, merge_gap_bytes=gap, max_read_bytes=16 << 10, window_tokens=2) as ws:
            res[eng] = run_workload(ws, layers, emb, seed=7)
    (oa, sa), (ot, st_) = res["aio"], res["threads"]
    assert len(oa) == len(ot) and all(np.array_equal(a, b) for a, b in zip(oa, ot))
    assert sa == st_


@pytest.mark.parametrize("with_emb", [True, False])
def test_more_reads_than_the_queue_and_the_staging_pool_hold(tmp, with_emb):
    """2,000 separate reads in one call: more than the 256 AIO slots (and, without the tensor's 64 KiB
    chunks, than the 8 KiB staging buffers hold: 80 blocks), so most wait in the backlog the reaper
    submits as reads complete; every byte still right."""
    rng = np.random.default_rng(2)
    d_ff = 4000  # up + down float32 rows of 64: 512-byte neurons, one block each
    path, layers, emb = make_store(tmp, rng, n_layers=1, d_ff=d_ff, d_model=64, with_emb=with_emb)
    ids = np.arange(0, d_ff, 2)
    stats = {}
    for eng in ENGINES:
        with open_store(path, 6 << 20, eng, merge_gap_bytes=0, max_read_bytes=4096) as ws:
            rows = ws.get_rows(0, ids)
            assert np.array_equal(rows, expected_rows(layers[0], ids))
            ws.prefetch(0, np.arange(1, d_ff, 2)[:500])  # left in flight: close() waits for it
            stats[eng] = ws.stats()["reads_issued"]
    assert stats["aio"] >= len(ids)


@pytest.mark.parametrize("fmt", ["down_int7", "int4_int8"])
@pytest.mark.parametrize("gap", [0, 1024])
def test_stream_ffn_layer_is_bit_identical_across_engines(tmp, fmt, gap):
    from test_stream import _bundle_store  # the streaming test's store of real bundle formats
    path = os.path.join(tmp, "b.mkws")
    n, d, T, nl = 600, 576, 2, 3
    _bundle_store(path, fmt, nl, n, d, seed=5)
    rng = np.random.default_rng(3)
    hs = [rng.standard_normal((T, d)).astype(np.float32) for _ in range(4)]
    acts = [rng.standard_normal((T, n)).astype(np.float32) for _ in range(4)]
    perm = rng.permutation(n).astype(np.int64)
    res = {}
    for eng in ENGINES:
        outs = []
        with open_store(path, 1 << 20, eng, merge_gap_bytes=gap, max_read_bytes=32 << 10) as ws:
            ws.pin(1, np.arange(0, n, 3))
            for h, a in zip(hs, acts):
                for L in range(nl):
                    out = np.full((T, d), np.nan, np.float32)
                    _C.stream_ffn_layer(ws._h(), L, h, a, perm, None, None, True, 0.7, out, fmt)
                    outs.append(out)
                ws.next_token()
            res[eng] = (outs, {k: ws.stats()[k] for k in STAT_KEYS})
    (oa, sa), (ot, st_) = res["aio"], res["threads"]
    assert all(np.isfinite(o).all() for o in oa)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(oa, ot))  # bit for bit: the visit order is fixed
    assert sa == st_


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_after_open_raises_clearly(tmp, engine):
    """A file cut short under an open store: every read past the end fails with CorruptDataError
    naming the truncation (get, get_rows, a prefetch then get_rows, stream_ffn_layer), never a hang;
    the reads before the cut still work."""
    rng = np.random.default_rng(4)
    path, layers, emb = make_store(tmp, rng, n_layers=2, d_ff=500)
    with open_store(path, 1 << 20, engine, max_read_bytes=16 << 10) as ws:
        info = ws.layers()[1]
        cut = info["offset"] + 200 * info["bundle_bytes"]
        os.truncate(path, cut)
        good = np.arange(0, 150)
        assert np.array_equal(ws.get_rows(1, good), expected_rows(layers[1], good))
        with pytest.raises(mk.CorruptDataError, match="truncated"):
            ws.get_rows(1, np.arange(300, 320))
        ws.prefetch(1, np.arange(400, 420))
        with pytest.raises(mk.CorruptDataError, match="truncated|prefetched read"):
            ws.get_rows(1, np.arange(400, 420))
        assert np.array_equal(ws.get_rows(0, good), expected_rows(layers[0], good))
        assert np.array_equal(ws.get("emb"), emb)  # the tensors lie before the layers
    with pytest.raises(mk.CorruptDataError):
        mk.WeightStore.open(path, 1 << 20)


@pytest.mark.parametrize("engine", ENGINES)
def test_corrupt_byte_after_open_names_the_neuron(tmp, engine):
    rng = np.random.default_rng(5)
    path, layers, emb = make_store(tmp, rng, n_layers=1, d_ff=300)
    with open_store(path, 1 << 20, engine, merge_gap_bytes=0) as ws:
        info = ws.layers()[0]
        flip_byte(path, info["offset"] + 123 * info["bundle_bytes"] + 5, 0x40)
        with pytest.raises(mk.CorruptDataError, match="neuron 123"):
            ws.get_rows(0, np.arange(100, 130))
        ids = np.arange(0, 100)
        assert np.array_equal(ws.get_rows(0, ids), expected_rows(layers[0], ids))


def test_aio_store_shared_by_threads(tmp):
    rng = np.random.default_rng(6)
    path, layers, emb = make_store(tmp, rng, n_layers=3, d_ff=400)
    errors = []
    with open_store(path, 512 << 10, "aio", merge_gap_bytes=0, max_read_bytes=8 << 10) as ws:
        def work(seed):
            r = np.random.default_rng(seed)
            try:
                for _ in range(20):
                    L = int(r.integers(0, 3))
                    ids = r.choice(400, size=int(r.integers(1, 200)), replace=False)
                    if r.random() < 0.3:
                        ws.prefetch(L, ids)
                    assert np.array_equal(ws.get_rows(L, ids), expected_rows(layers[L], ids))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors
