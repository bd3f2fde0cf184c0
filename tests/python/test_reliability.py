"""Regression tests for issue 13 (reliability round 2): each test failed before its fix."""
import os
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import memkernels as mk
from memkernels import _memkernels as _C


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _attention_ref(q, k, v, scale=None):
    """float64 reference for (batch, seq, heads, dim) inputs, no mask."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bihd,bjhd->bhij", q, k) * scale
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        return np.einsum("bhij,bjhd->bihd", p, v)


def _run_script(body, timeout=120):
    """Runs `body` in a fresh interpreter; a hang fails the test instead of hanging the suite."""
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script hung for more than {timeout} s")
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


@pytest.fixture
def restore_threads():
    n = mk.num_threads()
    yield
    mk.set_num_threads(n)


# ---- 3: flash_attention_varlen copies cu_seqlens before validating them ----
def test_varlen_cu_seqlens_changed_by_another_thread_cannot_move_writes_outside_out(rng):
    total, heads, dim, guard = 256, 2, 32, 256
    qbig = _f32(rng, total + guard, heads, dim)
    kbig = _f32(rng, total + guard, heads, dim)
    vbig = _f32(rng, total + guard, heads, dim)
    q, k, v = qbig[:total], kbig[:total], vbig[:total]
    cu = np.array([0, 64, total], np.int32)
    # Same lengths per sequence (the kernel's tiling is sized from the validated ones), but the second
    # sequence starts at row `total`: read after the checks, it moves writes past the end of out.
    evil = np.array([0, total, 2 * total - 64], np.int32)
    stop = threading.Event()

    def flip():  # keeps rewriting the array the caller passed while kernels run
        while not stop.is_set():
            cu[:] = evil
            cu[:] = [0, 64, total]

    t = threading.Thread(target=flip)
    outbig = np.zeros((total + guard, heads, dim), np.float32)
    sentinel = np.float32(12345.0)
    t.start()
    try:
        for _ in range(300):
            outbig[total:] = sentinel
            try:
                mk.flash_attention_varlen(q, k, v, cu, cu.copy(), out=outbig[:total])
            except ValueError:
                pass  # the snapshot saw the bad offsets: refused, fine
            assert np.all(outbig[total:] == sentinel), "the kernel wrote outside out"
    finally:
        stop.set()
        t.join()


# ---- 4: set_num_threads is bounded ----
@pytest.mark.parametrize("n", [100000, 2**31 - 1, 1025])
def test_set_num_threads_rejects_absurd_counts(n, restore_threads, rng):
    before = mk.num_threads()
    with pytest.raises(ValueError, match="set_num_threads"):
        mk.set_num_threads(n)
    assert mk.num_threads() == before
    q = _f32(rng, 1, 8, 2, 16)
    out = mk.flash_attention(q, q, q)
    np.testing.assert_allclose(out, _attention_ref(q, q, q), rtol=1e-4, atol=1e-5)


def test_set_num_threads_accepts_the_maximum(restore_threads, rng):
    mk.set_num_threads(64)
    assert mk.num_threads() == 64
    q = _f32(rng, 1, 130, 4, 16)
    out = mk.flash_attention(q, q, q)
    np.testing.assert_allclose(out, _attention_ref(q, q, q), rtol=1e-4, atol=1e-5)


# ---- 5: see tests/cpp/test_parallel_errors.cpp (a failing allocation inside OpenMP regions) ----


# ---- 6: a FIFO (or any non-regular file) never blocks open(2) ----
def _fifo(tmp_path, name):
    p = tmp_path / name
    os.mkfifo(p)
    return p


def test_weight_store_open_of_a_fifo_is_refused_without_blocking(tmp_path):
    p = _fifo(tmp_path, "store.mkws")
    _run_script(f"""
        import memkernels as mk
        try:
            mk.WeightStore.open({str(p)!r}, 1 << 24)
        except OSError as e:
            assert "regular file" in str(e), e
        else:
            raise SystemExit("no error")
    """, timeout=60)


def test_convert_from_a_fifo_source_is_refused_without_blocking(tmp_path):
    for name in ("src.safetensors", "src.npy", "src.npz"):
        p = _fifo(tmp_path, name)
        _run_script(f"""
            import memkernels as mk
            try:
                mk.convert_to_weight_store({str(p)!r}, {str(tmp_path / 'out.mkws')!r})
            except (OSError, ValueError) as e:
                assert "regular file" in str(e), e
            else:
                raise SystemExit("no error")
        """, timeout=60)


def test_writer_refuses_a_fifo_as_partial_file_without_blocking(tmp_path):
    _fifo(tmp_path, "out.mkws.partial")
    _run_script(f"""
        import numpy as np, memkernels as mk
        try:
            mk.write_weight_store({str(tmp_path / 'out.mkws')!r}, {{"a": np.ones(4, np.float32)}})
        except OSError as e:
            assert "regular file" in str(e), e
        else:
            raise SystemExit("no error")
    """, timeout=60)
    assert stat.S_ISFIFO(os.stat(tmp_path / "out.mkws.partial").st_mode)


# ---- 7: kernels and weight stores after os.fork ----
_FORK_PRELUDE = """
    import os, sys, time
    import numpy as np
    import memkernels as mk

    def wait_child(pid, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise SystemExit("the forked child hung")

    def attention_ok():
        rng = np.random.default_rng(1)
        q = rng.standard_normal((1, 300, 4, 32)).astype(np.float32)
        out = mk.flash_attention(q, q, q, causal=True)
        return bool(np.all(np.isfinite(out)))

    mk.set_num_threads(4)
    assert attention_ok()   # the parent's OpenMP pool now exists
"""


def test_kernels_run_in_a_child_made_by_os_fork():
    _run_script(_FORK_PRELUDE + """
    pid = os.fork()
    if pid == 0:
        ok = attention_ok() and attention_ok()
        os._exit(0 if ok else 3)
    assert wait_child(pid) == 0
    assert attention_ok()   # the parent still runs multithreaded
    """)


def test_kernels_run_in_multiprocessing_fork_workers():
    _run_script(_FORK_PRELUDE + """
    import multiprocessing as mp

    def work(i):
        return attention_ok()

    if __name__ == "__main__":
        with mp.get_context("fork").Pool(2) as pool:
            assert all(pool.map_async(work, range(4)).get(timeout=60))
    """)


def test_weight_store_in_a_forked_child_fails_clearly(tmp_path):
    path = tmp_path / "w.mkws"
    _run_script(_FORK_PRELUDE + f"""
    rng = np.random.default_rng(0)
    up = rng.standard_normal((64, 32)).astype(np.float32)
    mk.write_weight_store({str(path)!r}, {{"t": up}}, {{0: {{"up": up, "down": up.T.copy()}}}})
    ws = mk.WeightStore.open({str(path)!r}, 1 << 24, io_threads=2, direct_io=False)
    ws.prefetch(0, [1, 2, 3])
    ws.wait_prefetch()
    pid = os.fork()
    if pid == 0:
        try:
            ws.prefetch(0, [4, 5])
            ws.wait_prefetch()
            os._exit(4)      # no error: the child must not use the parent's I/O threads
        except ValueError as e:
            if "fork" not in str(e):
                os._exit(5)
        ws2 = mk.WeightStore.open({str(path)!r}, 1 << 24, io_threads=2, direct_io=False)
        ok = np.array_equal(ws2.get_rows(0, [4, 5])[:, 0], up[[4, 5]])
        ws.close()           # closing the inherited handle must not hang either
        ws2.close()
        os._exit(0 if ok else 6)
    assert wait_child(pid) == 0
    assert np.array_equal(ws.get_rows(0, [7])[:, 0], up[[7]])
    """)


# ---- 10: NaN and Inf propagate through CPU flash attention as in float64 ----
# `isa` (every CPU ISA this machine has) is the fixture in conftest.py


def _causal_ref(q, k, v, causal, softcap=None):
    """float64 attention; scores that overflow float32 (the accumulation type) are inf/NaN here too."""
    sq, sk = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    with np.errstate(invalid="ignore", over="ignore"):
        s32 = np.einsum("bihd,bjhd->bhij", q, k)
        q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
        s = np.einsum("bihd,bjhd->bhij", q, k)
        s = np.where(np.isfinite(s32), s, s32) / np.sqrt(q.shape[-1])
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if causal:
            i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
            s = np.where(j <= i + sk - sq, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        l = p.sum(axis=-1, keepdims=True)
        out = np.einsum("bhij,bjhd->bihd", p / l, v)
        lse = (m + np.log(l))[..., 0]
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["key", "query", "overflow", "inf_query"])
def test_flash_attention_nan_and_inf_propagate(isa, rng, causal, where):
    b, sq, sk, h, hk, d = 2, 150, 150, 4, 2, 40
    q, k, v = _f32(rng, b, sq, h, d), _f32(rng, b, sk, hk, d), _f32(rng, b, sk, hk, d)
    if where == "key":
        k[0, 70, 1, 3] = np.nan          # rows of heads 2, 3 that see key 70 become NaN
    elif where == "query":
        q[1, 5, 0, 7] = np.nan           # only that row
    elif where == "overflow":
        q[0, 100, 2] = 3e19              # q.k overflows float32 -> +-inf scores
        k[0, 20, 1] = 3e19
    else:
        q[1, 33, 3, 0] = np.inf
    out = np.full_like(q, 7.0)
    out, lse = mk.flash_attention(q, k, v, causal=causal, return_lse=True, out=out)
    ref, ref_lse = _causal_ref(q, k, v, causal)
    bad = ~np.isfinite(ref)
    assert bad.any()
    np.testing.assert_array_equal(np.isnan(out), bad, err_msg="NaN pattern differs from float64")
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse), err_msg="lse NaN pattern differs")
    np.testing.assert_allclose(out[~bad], ref[~bad], rtol=1e-4, atol=1e-4)


def test_flash_attention_softcap_keeps_infinite_scores_finite(isa, rng):
    q, k, v = _f32(rng, 1, 70, 2, 16), _f32(rng, 1, 70, 2, 16), _f32(rng, 1, 70, 2, 16)
    q[0, 3, 1] = 3e19
    k[0, 9, 1] = 3e19                   # score +inf, softcap*tanh(inf) = softcap: finite in float64
    out = mk.flash_attention(q, k, v, softcap=30.0)
    ref, _ = _causal_ref(q, k, v, False, softcap=30.0)
    assert np.all(np.isfinite(ref))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_flash_attention_nan_in_a_masked_key_stays_hidden(isa, rng):
    q, k, v = _f32(rng, 1, 100, 2, 16), _f32(rng, 1, 100, 2, 16), _f32(rng, 1, 100, 2, 16)
    k[0, 99, 0, 0] = np.nan             # only the last query row sees it under the causal mask
    out = mk.flash_attention(q, k, v, causal=True)
    assert np.all(np.isnan(out[0, 99, 0])) and np.all(np.isfinite(out[0, :99]))
    assert np.all(np.isfinite(out[0, :, 1]))


# ---- 15: sizes beyond 32 bits are refused instead of truncated ----
def test_flash_attention_rejects_dims_beyond_int(rng):
    q = _f32(rng, 1, 4, 2, 8)
    huge = np.lib.stride_tricks.as_strided(q, shape=(2**32 + 1, 4, 2, 8), strides=(0,) + q.strides[1:])
    out = np.lib.stride_tricks.as_strided(np.zeros_like(q), shape=huge.shape, strides=huge.strides)
    with pytest.raises(ValueError, match="batch"):
        mk.flash_attention(huge, huge, huge, out=out)
    heads = np.lib.stride_tricks.as_strided(q, shape=(1, 4, 2**32 + 2, 8), strides=(0, q.strides[1], 0, 4))
    outh = np.lib.stride_tricks.as_strided(np.zeros_like(q), shape=heads.shape, strides=heads.strides)
    kv = q[:, :, :2]
    with pytest.raises(ValueError, match="heads"):
        mk.flash_attention(heads, kv, kv, out=outh)


# ---- 16: a positive scale or softcap that rounds to 0.0f is refused ----
@pytest.mark.parametrize("arg", ["scale", "softcap"])
def test_tiny_positive_scale_or_softcap_is_refused(arg, rng):
    q = _f32(rng, 1, 4, 2, 8)
    with pytest.raises(ValueError, match=arg):
        mk.flash_attention(q, q, q, **{arg: 1e-50})
    cu = np.array([0, 4], np.int32)
    with pytest.raises(ValueError, match=arg):
        mk.flash_attention_varlen(q[0], q[0], q[0], cu, cu, **{arg: 1e-46})
    out = mk.flash_attention(q, q, q, **{arg: 1e-30})  # small but representable: used as given
    assert np.all(np.isfinite(out))


# ---- 18: non-contiguous tensors with chunk_bytes not a multiple of the item size ----
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8])
@pytest.mark.parametrize("chunk", [4097, 4099, 5000, 4096])
def test_write_weight_store_non_contiguous_odd_chunks(tmp_path, rng, dtype, chunk):
    a = (rng.standard_normal((3000, 7)) * 50).astype(dtype)
    views = {"t": a.T, "strided": a[::3, 1:6], "f": np.asfortranarray(a)}
    path = tmp_path / "s.mkws"
    mk.write_weight_store(path, views, chunk_bytes=chunk)
    with mk.WeightStore.open(path, 1 << 24, direct_io=False) as ws:
        for name, v in views.items():
            np.testing.assert_array_equal(ws.get(name), v)


def test_convert_fortran_order_npy(tmp_path, rng):
    a = np.asfortranarray(rng.standard_normal((2000, 3)).astype(np.float32))
    np.save(tmp_path / "w.npy", a)
    mk.convert_to_weight_store(tmp_path / "w.npy", tmp_path / "w.mkws", chunk_bytes=4098)
    with mk.WeightStore.open(tmp_path / "w.mkws", 1 << 24, direct_io=False) as ws:
        np.testing.assert_array_equal(ws.get("w"), a)


# ---- 19: NUL in a path ----
def test_paths_with_nul_are_refused(tmp_path):
    victim = tmp_path / "victim.mkws"
    mk.write_weight_store(victim, {"a": np.arange(5, dtype=np.float32)})
    before = victim.read_bytes()
    bad = str(victim) + "\0.tmp"
    with pytest.raises(ValueError, match="NUL"):
        _C.WeightStoreWriter(bad)
    with pytest.raises(ValueError, match="NUL"):
        mk.write_weight_store(bad, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="NUL"):
        _C.WeightStore.open(bad, 1 << 24, "cpu", 0, 1, 0, False, 0, 1 << 20)
    with pytest.raises(ValueError, match="NUL"):
        mk.WeightStore.open(bad, 1 << 24)
    assert victim.read_bytes() == before


# ---- 20: non-regular destinations and destination == source ----
def test_write_refuses_non_regular_destination(tmp_path):
    fifo = tmp_path / "fifo.mkws"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="regular file"):
        mk.write_weight_store(fifo, {"a": np.ones(3, np.float32)})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    d = tmp_path / "dir.mkws"
    d.mkdir()
    with pytest.raises(OSError, match="regular file"):
        mk.write_weight_store(d, {"a": np.ones(3, np.float32)})
    assert d.is_dir()
    if os.path.exists("/dev/null"):
        with pytest.raises(OSError, match="regular file"):
            _C.WeightStoreWriter("/dev/null")
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_convert_refuses_destination_that_is_the_source(tmp_path, rng):
    a = rng.standard_normal((10, 4)).astype(np.float32)
    src = tmp_path / "x.npy"
    np.save(src, a)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="source"):
        mk.convert_to_weight_store(src, src)
    link = tmp_path / "link.npy"
    os.link(src, link)  # another name for the same file
    with pytest.raises(ValueError, match="source"):
        mk.convert_to_weight_store(src, link)
    assert src.read_bytes() == before


# ---- 21: read-only inputs work, read-only outputs are refused by name, big-endian by byte order ----
def _readonly_variants(a, tmp_path, tag="a"):
    np.save(tmp_path / f"ro_{tag}.npy", a)
    mm = np.load(tmp_path / f"ro_{tag}.npy", mmap_mode="r")
    fb = np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)
    ro = a.copy()
    ro.flags.writeable = False
    return {"mmap_r": mm, "frombuffer": fb, "flag": ro}


def test_read_only_inputs_work_in_flash_attention(tmp_path, rng):
    q = _f32(rng, 1, 20, 2, 16)
    ref = mk.flash_attention(q, q, q)
    for name, ro in _readonly_variants(q, tmp_path).items():
        assert not ro.flags.writeable
        np.testing.assert_array_equal(mk.flash_attention(ro, ro, ro), ref, err_msg=name)
    b = np.broadcast_to(q[:, :, :1], (1, 20, 2, 16))  # read-only, stride 0 on heads
    np.testing.assert_allclose(mk.flash_attention(b, b, b), mk.flash_attention(*[b.copy()] * 3), rtol=1e-6)
    cu = np.array([0, 20], np.int32)
    cu.flags.writeable = False
    np.testing.assert_array_equal(mk.flash_attention_varlen(q[0], q[0], q[0], cu, cu), ref[0])


def test_read_only_inputs_work_in_spmm_and_weight_store(tmp_path, rng):
    w = _f32(rng, 40, 64)
    w[np.abs(w) < 0.8] = 0
    x = _f32(rng, 3, 64)
    xs = _readonly_variants(x, tmp_path, "x")
    for name, ro in _readonly_variants(w, tmp_path, "w").items():
        sp = mk.SparseMatrix.from_dense(ro)
        xr = xs[name]
        np.testing.assert_allclose(mk.spmm(sp, xr), x @ w.T, rtol=1e-5, atol=1e-5, err_msg=name)
        mk.write_weight_store(tmp_path / "ro.mkws", {"w": ro})
        with mk.WeightStore.open(tmp_path / "ro.mkws", 1 << 24, direct_io=False) as ws:
            np.testing.assert_array_equal(ws.get("w"), w)


def test_read_only_out_is_refused_by_name(rng):
    q = _f32(rng, 1, 8, 2, 16)
    out = np.empty_like(q)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out.*read-only"):
        mk.flash_attention(q, q, q, out=out)
    with pytest.raises(ValueError, match="out.*read-only"):  # the binding refuses it by name too
        _C.flash_attention(q, q, q, out, None, False, 0.0, -1, -1, 0.0, 0)


def test_big_endian_arrays_get_a_byte_order_message(rng):
    q = _f32(rng, 1, 8, 2, 16)
    be = q.astype(q.dtype.newbyteorder(">"))
    with pytest.raises(TypeError, match="q.*(big-endian|byte order)"):
        mk.flash_attention(be, q, q)


# ---- 22: a failed rename reports its own errno ----
def test_failed_rename_reports_the_real_error(tmp_path):
    dst = tmp_path / "d.mkws"
    w = _C.WeightStoreWriter(str(dst))
    w.add_tensor("a", np.ones(4, np.float32), 4096)
    dst.mkdir()
    (dst / "keep").write_text("x")  # rename(file, non-empty dir) fails with EISDIR
    with pytest.raises(OSError) as e:
        w.finish()
    assert "Success" not in str(e.value)
    assert "directory" in str(e.value).lower()
    w.abort()


# ---- 24: integers out of range, NumPy integers, device strings ----
def test_huge_python_ints_give_a_clear_value_error(rng):
    q = _f32(rng, 1, 8, 2, 16)
    for window in (2**40, (1, 2**63), -2**40):
        with pytest.raises(ValueError, match="window"):
            mk.flash_attention(q, q, q, window=window)
    cu = np.array([0, 8], np.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        mk.flash_attention_varlen(q[0], q[0], q[0], cu, cu, max_seqlen_q=2**40)
    with pytest.raises(ValueError, match="n"):
        mk.set_num_threads(2**70)


def test_weight_store_huge_ints_give_value_errors(tmp_path):
    path = tmp_path / "s.mkws"
    with pytest.raises(ValueError, match="chunk_bytes"):
        mk.write_weight_store(path, {"a": np.ones(3, np.float32)}, chunk_bytes=2**40)
    mk.write_weight_store(path, {"a": np.ones(3, np.float32)})
    for kw in ({"io_threads": 2**40}, {"window_tokens": 2**40}, {"dram_budget_bytes": 2**70},
               {"merge_gap_bytes": 2**70}):
        args = {"dram_budget_bytes": 1 << 24, **kw}
        with pytest.raises(ValueError, match=next(iter(kw))):
            mk.WeightStore.open(path, **args)
    with mk.WeightStore.open(path, 1 << 24, direct_io=False) as ws:
        with pytest.raises(ValueError, match="layer"):
            ws.get_rows(2**70, [0])


def test_numpy_integers_are_accepted(rng):
    q = _f32(rng, 1, 30, 2, 16)
    np.testing.assert_array_equal(mk.flash_attention(q, q, q, window=np.int64(4)),
                                  mk.flash_attention(q, q, q, window=4))
    np.testing.assert_array_equal(mk.flash_attention(q, q, q, window=(np.int32(3), np.uint8(2))),
                                  mk.flash_attention(q, q, q, window=(3, 2)))
    with pytest.raises(ValueError, match="window"):
        mk.flash_attention(q, q, q, window=4.5)
    with pytest.raises(ValueError, match="window"):
        mk.flash_attention(q, q, q, window=True)


@pytest.mark.parametrize("device", ["cudaXYZ", "cuda:", "cuda:x", "cuda:-1", "cuda:1.5", "gpu", " cuda", "cpu:0"])
def test_device_strings_are_parsed_strictly(tmp_path, device):
    w = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="device"):
        mk.SparseMatrix.from_dense(w).to(device)
    mk.write_weight_store(tmp_path / "s.mkws", {"a": w})
    with pytest.raises(ValueError, match="device"):
        mk.WeightStore.open(tmp_path / "s.mkws", 1 << 24, device=device)
