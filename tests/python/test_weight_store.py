"""Weight store: data read equals data written, cache budget, statistics, converters, bad files."""
import json
import os
import struct

import numpy as np
import pytest

import memkernels as mk
from memkernels.weight_store import read_safetensors

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])


def rand(rng, shape, dtype):
    return (rng.standard_normal(shape) + 0.1).astype(dtype)


def make_model(rng, n_layers=3, d_ff=333, d_model=48, dtype=np.float32, gate=True):
    layers = {}
    for layer in range(n_layers):
        p = {"up": rand(rng, (d_ff, d_model), dtype), "down": rand(rng, (d_model, d_ff), dtype)}
        if gate:
            p["gate"] = rand(rng, (d_ff, d_model), dtype)
        layers[layer * 2 + 1] = p  # non-contiguous layer ids
    return layers


def expected_rows(p, ids):
    parts = ([p["gate"][ids]] if "gate" in p else []) + [p["up"][ids], p["down"][:, ids].T]
    return np.stack(parts, axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("gate", [True, False])
def test_rows_round_trip_random_sets(tmp, dtype, gate):
    rng = np.random.default_rng(1)
    layers = make_model(rng, dtype=dtype, gate=gate)
    path = os.path.join(tmp, "m.mkws")
    mk.write_weight_store(path, {"emb": rand(rng, (17, 5), dtype)}, layers)
    with mk.WeightStore.open(path, 256 << 10, window_tokens=2) as ws:
        assert [lay["layer"] for lay in ws.layers()] == [1, 3, 5]
        for _ in range(25):
            layer = int(rng.choice([1, 3, 5]))
            k = int(rng.integers(0, 120))
            ids = rng.integers(0, 333, size=k)
            out = np.full((k, 3 if gate else 2, 48), np.nan, dtype=dtype)
            r = ws.get_rows(layer, ids, out=out)
            assert r is out
            np.testing.assert_array_equal(out, expected_rows(layers[layer], ids))
            ws.next_token()
        got = ws.get_rows(1, np.array([332, 0]))
        np.testing.assert_array_equal(got, expected_rows(layers[1], [332, 0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64, np.float64] +
                         ([BF16] if BF16 is not None else []), ids=lambda d: np.dtype(d).name)
def test_tensors_round_trip(tmp, dtype):
    rng = np.random.default_rng(2)
    big = (rng.standard_normal((300, 129)) * 50).astype(dtype)  # several 4 KiB chunks, odd sizes
    tensors = {
        "big": big,
        "strided": big[::3, ::2],  # non-contiguous input
        "scalar": np.array(7, dtype=dtype),
        "empty": np.zeros((0, 4), dtype=dtype),
    }
    path = os.path.join(tmp, "t.mkws")
    mk.write_weight_store(path, tensors, chunk_bytes=4096)
    with mk.WeightStore.open(path, 1 << 20) as ws:
        assert "big" in ws and "nope" not in ws
        for name, a in tensors.items():
            out = ws.get(name)
            assert out.dtype == a.dtype and out.shape == a.shape
            np.testing.assert_array_equal(out, a)
        out = np.full(big.shape, 0, dtype=dtype)
        ws.get("big", out=out)
        np.testing.assert_array_equal(out, big)
        s = ws.stats()
        assert s["reads_issued"] >= big.nbytes // 4096


def test_budget_never_exceeded_and_stats_add_up(tmp):
    rng = np.random.default_rng(3)
    layers = make_model(rng, n_layers=4, d_ff=2000, d_model=64, dtype=np.float16)
    path = os.path.join(tmp, "b.mkws")
    mk.write_weight_store(path, None, layers)
    bundle = 3 * 64 * 2
    budget = 400 << 10  # far below the 4 * 2000 * 384 B = 3 MB of FFN weights
    with mk.WeightStore.open(path, budget, io_threads=2, window_tokens=3, max_read_bytes=64 << 10) as ws:
        s0 = ws.stats()
        assert s0["cache_capacity_bytes"] + s0["staging_bytes"] <= budget
        requested = 0
        active = {lay: rng.choice(2000, 200, replace=False) for lay in layers}
        for _ in range(12):
            for lay in layers:
                # correlated across tokens: most of the active set stays, a few neurons change
                keep = active[lay][rng.random(active[lay].size) > 0.1]
                fresh = rng.choice(np.setdiff1d(np.arange(2000), keep), 200 - keep.size, replace=False)
                active[lay] = np.concatenate([keep, fresh])
                if rng.random() < 0.5:
                    ws.prefetch(lay, active[lay])
                rows = ws.get_rows(lay, active[lay])
                requested += active[lay].size
                np.testing.assert_array_equal(rows, expected_rows(layers[lay], active[lay]))
                s = ws.stats()
                assert s["resident_bytes"] <= s["cache_capacity_bytes"]
                assert s["peak_resident_bytes"] + s["staging_bytes"] <= budget
            ws.next_token()
        ws.wait_prefetch()
        s = ws.stats()
        assert s["neuron_hits"] + s["neuron_misses"] == requested
        assert 0 < s["hit_rate"] < 1
        loaded = s["neuron_misses"] + s["prefetched"]  # every miss and every prefetch is read exactly once
        assert s["reads_issued"] <= loaded  # each read brings at least one neuron
        assert loaded * bundle <= s["bytes_read"] <= s["reads_issued"] * ((64 << 10) + 8192)
        assert s["tokens"] == 12
        assert s["peak_resident_bytes"] <= s["cache_capacity_bytes"]


def test_window_hits_and_eviction(tmp):
    rng = np.random.default_rng(4)
    layers = make_model(rng, n_layers=1, d_ff=500, d_model=32)
    path = os.path.join(tmp, "w.mkws")
    mk.write_weight_store(path, None, layers)
    ids = np.arange(100, 150)
    with mk.WeightStore.open(path, 1 << 20, window_tokens=2) as ws:
        ws.get_rows(1, ids)
        s = ws.stats()
        assert (s["neuron_misses"], s["neuron_hits"]) == (50, 0)
        assert s["reads_issued"] == 1  # 50 adjacent neurons: one coalesced read
        assert s["resident_bytes"] == 50 * 3 * 32 * 4
        ws.next_token()
        ws.get_rows(1, ids[:10])
        s = ws.stats()
        assert (s["neuron_misses"], s["neuron_hits"]) == (50, 10)
        ws.next_token()  # ids[10:] were last used 2 tokens ago: evicted; ids[:10] stay
        s = ws.stats()
        assert s["resident_bytes"] == 10 * 3 * 32 * 4 and s["evictions"] == 40
        ws.reset_stats()
        ws.get_rows(1, ids)
        s = ws.stats()
        assert (s["neuron_misses"], s["neuron_hits"]) == (40, 10)
        ws.clear_cache()
        assert ws.stats()["resident_bytes"] == 0


def test_prefetch_makes_hits(tmp):
    rng = np.random.default_rng(5)
    layers = make_model(rng, n_layers=2, d_ff=800, d_model=40)
    path = os.path.join(tmp, "p.mkws")
    mk.write_weight_store(path, None, layers)
    with mk.WeightStore.open(path, 2 << 20) as ws:
        ids = rng.choice(800, 80, replace=False)
        ws.prefetch(3, ids)  # layer-ahead: next layer while "computing" this one
        ws.get_rows(1, ids)
        ws.wait_prefetch()
        s = ws.stats()
        assert s["prefetched"] == 80
        rows = ws.get_rows(3, ids)
        np.testing.assert_array_equal(rows, expected_rows(layers[3], ids))
        s2 = ws.stats()
        assert s2["neuron_hits"] - s["neuron_hits"] == 80
        assert s2["bytes_read"] == s["bytes_read"]


def test_direct_io_mode_and_tmpfs_fallback(tmp):
    rng = np.random.default_rng(6)
    layers = make_model(rng, n_layers=1, d_ff=100, d_model=16)
    path = os.path.join(tmp, "d.mkws")
    mk.write_weight_store(path, None, layers)
    with mk.WeightStore.open(path, 1 << 20, direct_io=False) as ws:
        assert ws.io_mode == "buffered"
        np.testing.assert_array_equal(ws.get_rows(1, [5]), expected_rows(layers[1], [5]))
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        shm = f"/dev/shm/mk_ws_{os.getpid()}.mkws"
        try:
            mk.write_weight_store(shm, None, layers)
            with mk.WeightStore.open(shm, 1 << 20) as ws:
                assert ws.io_mode in ("buffered", "direct")  # tmpfs refuses O_DIRECT on most kernels
                np.testing.assert_array_equal(ws.get_rows(1, [7, 8]), expected_rows(layers[1], [7, 8]))
        finally:
            os.remove(shm)


def test_reads_are_aligned_to_the_read_granularity(tmp):
    """One small neuron costs one aligned block of the read granularity (512 B where O_DIRECT takes
    512-byte reads, as on most disks; 4096 otherwise), not a whole 4 KiB page, and the data is right."""
    rng = np.random.default_rng(9)
    layers = make_model(rng, n_layers=1, d_ff=400, d_model=40)  # 3 x 40 x 4 = 480 B per neuron
    path = os.path.join(tmp, "g.mkws")
    mk.write_weight_store(path, None, layers)
    for direct in (True, False):
        with mk.WeightStore.open(path, 1 << 20, direct_io=direct, merge_gap_bytes=0) as ws:
            g = ws.stats()["read_granularity"]
            assert g in (512, 4096)
            if not direct or ws.io_mode == "buffered":
                assert g == 4096
            ids = [3, 200, 399]  # far apart: one read each
            np.testing.assert_array_equal(ws.get_rows(1, ids), expected_rows(layers[1], ids))
            st = ws.stats()
            assert st["reads_issued"] == 3
            # each neuron (480 B) spans at most two blocks of the granularity
            assert 3 * g <= st["bytes_read"] <= 3 * 2 * g


def test_file_replaced_while_open_keeps_old_data(tmp):
    rng = np.random.default_rng(7)
    a, b = rand(rng, (64, 64), np.float32), rand(rng, (64, 64), np.float32)
    path = os.path.join(tmp, "r.mkws")
    mk.write_weight_store(path, {"x": a})
    with mk.WeightStore.open(path, 1 << 20) as ws:
        mk.write_weight_store(path, {"x": b})  # written aside, then renamed over: never in place
        np.testing.assert_array_equal(ws.get("x"), a)
    with mk.WeightStore.open(path, 1 << 20) as ws:
        np.testing.assert_array_equal(ws.get("x"), b)
    assert not os.path.exists(path + ".partial")


# ---- bad input -------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp):
    rng = np.random.default_rng(8)
    layers = make_model(rng, n_layers=1, d_ff=200, d_model=32)
    path = os.path.join(tmp, "g.mkws")
    mk.write_weight_store(path, {"t": rand(rng, (1000,), np.float32)}, layers, chunk_bytes=4096)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    return path, data, layers


def rewrite(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_budget_too_small(good_file):
    path, _, _ = good_file
    with pytest.raises(ValueError, match="largest single read"):
        mk.WeightStore.open(path, 5000)
    with pytest.raises(ValueError, match="dram_budget_bytes must be > 0"):
        mk.WeightStore.open(path, 0)


def test_truncated_files(good_file):
    path, data, _ = good_file
    for n in (0, 10, 63, 4096, len(data) // 2, len(data) - 1):
        rewrite(path, data[:n])
        with pytest.raises(mk.CorruptDataError, match="truncated|bad magic"):
            mk.WeightStore.open(path, 1 << 20)


def test_bad_header_version_and_directory(good_file):
    path, data, _ = good_file
    bad = bytearray(data)
    bad[0:8] = b"NOTSTORE"
    rewrite(path, bad)
    with pytest.raises(mk.CorruptDataError, match="bad magic"):
        mk.WeightStore.open(path, 1 << 20)
    bad = bytearray(data)
    bad[8:12] = struct.pack("<I", 99)
    bad[60:64] = struct.pack("<I", mk._C.crc32c(bytes(bad[:60])))
    rewrite(path, bad)
    with pytest.raises(mk.CorruptDataError, match="version 99"):
        mk.WeightStore.open(path, 1 << 20)
    bad = bytearray(data)
    bad[20] ^= 1  # dir_offset, header CRC now wrong
    rewrite(path, bad)
    with pytest.raises(mk.CorruptDataError, match="header checksum"):
        mk.WeightStore.open(path, 1 << 20)
    dir_offset = struct.unpack_from("<Q", data, 16)[0]
    bad = bytearray(data)
    bad[dir_offset + 9] ^= 0xFF
    rewrite(path, bad)
    with pytest.raises(mk.CorruptDataError, match="directory checksum"):
        mk.WeightStore.open(path, 1 << 20)
    # A directory with a consistent CRC but impossible contents: tensor offset past the data.
    bad = bytearray(data)
    name_len = struct.unpack_from("<I", data, dir_offset + 8)[0]
    off_pos = dir_offset + 8 + 4 + name_len + 4 + 8 * 1  # u8 dtype, u8 ndim, u16, 1 dim
    bad[off_pos:off_pos + 8] = struct.pack("<Q", 1 << 40)
    dir_bytes = struct.unpack_from("<Q", data, 24)[0]
    bad[48:52] = struct.pack("<I", mk._C.crc32c(bytes(bad[dir_offset:dir_offset + dir_bytes])))
    bad[60:64] = struct.pack("<I", mk._C.crc32c(bytes(bad[:60])))
    rewrite(path, bad)
    with pytest.raises(mk.CorruptDataError, match="inconsistent entry for tensor 't'"):
        mk.WeightStore.open(path, 1 << 20)


def test_checksum_mismatch_in_data(good_file):
    path, data, layers = good_file
    bad = bytearray(data)
    bad[4096 + 100] ^= 0x10  # tensor 't', chunk 0
    layer_off = 4096 + 4096  # 't' is 4000 bytes: the layer starts on the next page
    bad[layer_off + 3 * 32 * 4 * 7 + 2] ^= 0x10  # layer 1, neuron 7
    rewrite(path, bad)
    with mk.WeightStore.open(path, 1 << 20) as ws:
        with pytest.raises(mk.CorruptDataError, match="checksum mismatch in tensor 't'"):
            ws.get("t")
        with pytest.raises(mk.CorruptDataError, match="layer 1, neuron 7"):
            ws.get_rows(1, [5, 6, 7, 8])
        with pytest.raises(mk.CorruptDataError, match="neuron 7"):  # not cached as good
            ws.get_rows(1, [7])
        ws.prefetch(1, [7])
        ws.wait_prefetch()
        with pytest.raises(mk.CorruptDataError):
            ws.get_rows(1, [7])
        np.testing.assert_array_equal(ws.get_rows(1, [5, 6, 8]), expected_rows(layers[1], [5, 6, 8]))


def test_argument_errors(good_file, tmp):
    path, _, _ = good_file
    with pytest.raises(OSError):
        mk.WeightStore.open(os.path.join(tmp, "missing.mkws"), 1 << 20)
    with pytest.raises(ValueError, match="device"):
        mk.WeightStore.open(path, 1 << 20, device="tpu")
    if not mk.info()["cuda_available"]:
        with pytest.raises(RuntimeError, match="CUDA"):
            mk.WeightStore.open(path, 1 << 20, device="cuda")
    ws = mk.WeightStore.open(path, 1 << 20)
    with pytest.raises(ValueError, match="out of range"):
        ws.get_rows(1, [0, 200])
    with pytest.raises(ValueError, match="out of range"):
        ws.get_rows(1, [-1])
    with pytest.raises(ValueError, match="out of range"):
        ws.prefetch(1, [1000])
    with pytest.raises(ValueError, match="no FFN layer 2"):
        ws.get_rows(2, [0])
    with pytest.raises(ValueError, match="no tensor named 'zzz'"):
        ws.get("zzz")
    with pytest.raises(TypeError, match="out"):
        ws.get("t", out=np.empty(1000, np.float16))
    with pytest.raises(ValueError, match="out has shape"):
        ws.get("t", out=np.empty(999, np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        ws.get_rows(1, [1, 2], out=np.empty((2, 2, 32), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        ws.get_rows(1, [1], out=np.empty((1, 3, 64), np.float32)[:, :, ::2])
    with pytest.raises(TypeError, match="integers"):
        ws.get_rows(1, [0.5])
    ws.close()
    with pytest.raises(ValueError, match="closed"):
        ws.get("t")
    w = mk._C.WeightStoreWriter(os.path.join(tmp, "dup.mkws"))
    w.add_tensor("a", np.zeros(3, np.float32), 4096)
    with pytest.raises(ValueError, match="already added"):
        w.add_tensor("a", np.zeros(3, np.float32), 4096)
    w.abort()
    assert not os.path.exists(os.path.join(tmp, "dup.mkws"))
    bad_layers = {0: {"up": np.zeros((10, 4), np.float32), "down": np.zeros((10, 4), np.float32)}}
    with pytest.raises(ValueError, match="down must be"):
        mk.write_weight_store(os.path.join(tmp, "x.mkws"), None, bad_layers)
    bad_layers = {0: {"up": np.zeros((10, 4), np.float32), "down": np.zeros((4, 10), np.float16)}}
    with pytest.raises(TypeError, match="dtype"):
        mk.write_weight_store(os.path.join(tmp, "x.mkws"), None, bad_layers)
    for f in os.listdir(tmp):  # failed writes leave nothing behind
        assert not f.endswith(".partial")


# ---- converters ------------------------------------------------------------------------------
def write_safetensors_by_hand(path, arrays):
    header, blobs, off = {}, [], 0
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8"}
    if BF16 is not None:
        names[BF16] = "BF16"
    for k, a in arrays.items():
        b = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def hf_like(rng, dtype, n_layers=2, d_ff=96, d_model=32):
    arrays = {"model.embed_tokens.weight": rand(rng, (50, d_model), dtype),
              "model.norm.weight": rand(rng, (d_model,), dtype)}
    for i in range(n_layers):
        pre = f"model.layers.{i}.mlp."
        arrays[pre + "gate_proj.weight"] = rand(rng, (d_ff, d_model), dtype)
        arrays[pre + "up_proj.weight"] = rand(rng, (d_ff, d_model), dtype)
        arrays[pre + "down_proj.weight"] = rand(rng, (d_model, d_ff), dtype)
        arrays[f"model.layers.{i}.self_attn.q_proj.weight"] = rand(rng, (d_model, d_model), dtype)
    return arrays


def check_converted(store_path, arrays, n_layers=2):
    with mk.WeightStore.open(store_path, 1 << 20) as ws:
        assert sorted(lay["layer"] for lay in ws.layers()) == list(range(n_layers))
        for name, a in arrays.items():
            if ".mlp." in name:
                continue
            np.testing.assert_array_equal(ws.get(name), a)
        ids = np.array([0, 5, 95, 6])
        for i in range(n_layers):
            pre = f"model.layers.{i}.mlp."
            p = {"gate": arrays[pre + "gate_proj.weight"], "up": arrays[pre + "up_proj.weight"],
                 "down": arrays[pre + "down_proj.weight"]}
            np.testing.assert_array_equal(ws.get_rows(i, ids), expected_rows(p, ids))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_convert_safetensors(tmp, dtype):
    rng = np.random.default_rng(9)
    arrays = hf_like(rng, dtype)
    src = os.path.join(tmp, "model.safetensors")
    try:
        from safetensors.numpy import save_file

        if dtype is BF16:
            raise ImportError  # safetensors.numpy has no ml_dtypes bfloat16
        save_file(arrays, src)
    except ImportError:
        write_safetensors_by_hand(src, arrays)
    parsed = read_safetensors(src)
    for k, a in arrays.items():
        np.testing.assert_array_equal(parsed[k], a)
    dst = os.path.join(tmp, "model.mkws")
    info = mk.convert_to_weight_store(src, dst)
    assert info["ffn_layers"] == [0, 1]
    assert "model.embed_tokens.weight" in info["tensors"]
    check_converted(dst, arrays)


def test_convert_sharded_safetensors_and_numpy(tmp):
    rng = np.random.default_rng(10)
    arrays = hf_like(rng, np.float32)
    names = sorted(arrays)
    s1, s2 = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
    write_safetensors_by_hand(s1, {k: arrays[k] for k in names[::2]})
    write_safetensors_by_hand(s2, {k: arrays[k] for k in names[1::2]})
    dst = os.path.join(tmp, "s.mkws")
    mk.convert_to_weight_store([s1, s2], dst)
    check_converted(dst, arrays)
    npz = os.path.join(tmp, "m.npz")
    np.savez(npz, **arrays)
    mk.convert_to_weight_store(npz, dst)
    check_converted(dst, arrays)
    npy = os.path.join(tmp, "codes.npy")
    codes = rng.integers(-8, 8, size=(33, 7)).astype(np.int8)  # quantized weights stored as codes
    np.save(npy, codes)
    mk.convert_to_weight_store(npy, dst)
    with mk.WeightStore.open(dst, 1 << 20) as ws:
        np.testing.assert_array_equal(ws.get("codes"), codes)
    # Without bundling every tensor is stored whole.
    info = mk.convert_to_weight_store(npz, dst, ffn_pattern=None)
    assert info["ffn_layers"] == [] and len(info["tensors"]) == len(arrays)


def test_convert_checkpoint_directory(tmp):
    # a Hugging Face style directory: config.json + shards, converted in one call
    rng = np.random.default_rng(11)
    arrays = hf_like(rng, np.float32)
    names = sorted(arrays)
    ckpt = os.path.join(tmp, "ckpt")
    os.mkdir(ckpt)
    write_safetensors_by_hand(os.path.join(ckpt, "model-00001-of-00002.safetensors"), {k: arrays[k] for k in names[::2]})
    write_safetensors_by_hand(os.path.join(ckpt, "model-00002-of-00002.safetensors"), {k: arrays[k] for k in names[1::2]})
    config = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
    with open(os.path.join(ckpt, "config.json"), "wb") as f:
        f.write(config)
    dst = os.path.join(tmp, "d.mkws")
    info = mk.convert_to_weight_store(ckpt, dst)
    assert info["ffn_layers"] == [0, 1] and "config.json" in info["tensors"]
    check_converted(dst, arrays)
    with mk.WeightStore.open(dst, 1 << 20) as ws:
        assert ws.get("config.json").tobytes() == config
    os.remove(os.path.join(ckpt, "model-00001-of-00002.safetensors"))
    os.remove(os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="needs \\*.safetensors files"):
        mk.convert_to_weight_store(ckpt, dst)


def test_corrupt_safetensors(tmp):
    src = os.path.join(tmp, "bad.safetensors")
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(mk.CorruptDataError, match="header length"):
        mk.convert_to_weight_store(src, os.path.join(tmp, "o.mkws"))
    h = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"\0" * 16)
    with pytest.raises(mk.CorruptDataError, match="data_offsets"):
        mk.convert_to_weight_store(src, os.path.join(tmp, "o.mkws"))
    with pytest.raises(ValueError, match="expected a .safetensors"):
        mk.convert_to_weight_store(os.path.join(tmp, "x.bin"), os.path.join(tmp, "o.mkws"))


# ---- CUDA ------------------------------------------------------------------------------------
@pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")
def test_cuda_outputs(tmp):
    rng = np.random.default_rng(11)
    layers = make_model(rng, n_layers=2, d_ff=300, d_model=64, dtype=np.float16)
    t = rand(rng, (123, 77), np.float32)
    path = os.path.join(tmp, "c.mkws")
    mk.write_weight_store(path, {"t": t}, layers, chunk_bytes=8192)
    with mk.WeightStore.open(path, 4 << 20, device="cuda") as ws:
        def host(a):
            if hasattr(a, "get"):
                return a.get()
            if hasattr(a, "cpu"):
                return a.cpu().numpy()
            return np.from_dlpack(a)  # pragma: no cover

        np.testing.assert_array_equal(host(ws.get("t")), t)
        for _ in range(5):
            ids = rng.choice(300, 40, replace=False)
            ws.prefetch(3, ids)
            rows = ws.get_rows(1, ids)
            mk._C.synchronize(0, 0)
            np.testing.assert_array_equal(host(rows), expected_rows(layers[1], ids))
            rows3 = ws.get_rows(3, ids)
            mk._C.synchronize(0, 0)
            np.testing.assert_array_equal(host(rows3), expected_rows(layers[3], ids))
            ws.next_token()
        s = ws.stats()
        assert s["peak_resident_bytes"] + s["staging_bytes"] <= 4 << 20


@pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")
def test_cuda_copy_stream_ordering(tmp):
    # The store copies on its own stream (issue 15 #6): the caller's stream waits on an event after
    # the copies, and the copies wait for the caller's stream's earlier work (out may be in use).
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(13)
    layers = make_model(rng, n_layers=1, d_ff=3000, d_model=64)
    path = os.path.join(tmp, "s.mkws")
    mk.write_weight_store(path, None, layers)
    with mk.WeightStore.open(path, 1 << 20, device="cuda") as ws:  # small gather buffers: several chunks
        side = torch.cuda.Stream()
        for _ in range(3):
            ids = rng.choice(3000, 800, replace=False)
            with torch.cuda.stream(side):
                out = torch.full((800, 3, 64), float("nan"), device="cuda")
                torch.cuda._sleep(20_000_000)  # the side stream is busy ...
                out.zero_()                    # ... then writes out: the copies must come after this
                ws.get_rows(1, ids, out=out)   # the current (side) stream
                got = out.clone()              # on the side stream: must see the rows
            side.synchronize()
            np.testing.assert_array_equal(got.cpu().numpy(), expected_rows(layers[1], ids))
            ws.next_token()


def test_request_larger_than_cache(tmp):
    rng = np.random.default_rng(12)
    layers = make_model(rng, n_layers=1, d_ff=3000, d_model=64)
    path = os.path.join(tmp, "big.mkws")
    mk.write_weight_store(path, None, layers)
    budget = 300 << 10  # ~350 neurons of 768 B fit; ask for 1500 at once
    with mk.WeightStore.open(path, budget, io_threads=2, max_read_bytes=16 << 10) as ws:
        ids = rng.permutation(3000)[:1500]
        ws.prefetch(1, rng.permutation(3000)[:900])
        np.testing.assert_array_equal(ws.get_rows(1, ids), expected_rows(layers[1], ids))
        ws.wait_prefetch()
        s = ws.stats()
        assert s["cache_capacity_bytes"] < 1500 * 768 and s["evictions"] > 0
        assert s["peak_resident_bytes"] + s["staging_bytes"] <= budget


def test_crc32c_matches_bitwise_reference():
    def ref(data, crc=0):
        crc ^= 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        return crc ^ 0xFFFFFFFF

    rng = np.random.default_rng(13)
    assert mk._C.crc32c(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 8, 9, 31, 64, 257):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert mk._C.crc32c(data) == ref(data)
        assert mk._C.crc32c(data[n // 2:], mk._C.crc32c(data[: n // 2])) == ref(data)
