"""Generates tests/BAD_INPUTS.md: calls every public API with bad inputs (those of the test files'
pytest.raises cases and the classes of input the fuzzers in tests/fuzz produce) and records the
exception each actually raises. Run: python tests/make_bad_inputs_table.py > tests/BAD_INPUTS.md
(with memkernels importable). A call that does not raise, or raises an undocumented type, is
marked in the table with "UNEXPECTED" and makes the script exit with status 1."""
import os
import struct
import sys
import tempfile

import numpy as np
import scipy.sparse as sps

import memkernels as mk

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DOCUMENTED = (ValueError, TypeError, MemoryError, OSError)
rng = np.random.default_rng(0)
f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
i32 = lambda a: np.array(a, np.int32)  # noqa: E731
rows, bad = [], [False]
TMPDIRS = []


def case(api, what, fn):
    try:
        fn()
    except DOCUMENTED as e:
        msg = str(e).replace("|", "\\|").replace("\n", " ")
        for d in TMPDIRS:
            msg = msg.replace(d, "<dir>")
        rows.append((api, what, type(e).__name__, msg[:110] + ("…" if len(msg) > 110 else "")))
        return
    except Exception as e:  # noqa: BLE001
        rows.append((api, what, f"UNEXPECTED {type(e).__name__}", str(e)[:110]))
    else:
        rows.append((api, what, "UNEXPECTED: no error", ""))
    bad[0] = True


FUZZERS = """## Fuzzed entry points (tests/fuzz, run by tests/run_fuzz.sh)

| fuzzer | entry point | inputs | oracle for accepted input | findings (fixed) |
|---|---|---|---|---|
| fuzz_quant | `memkernels.from_bytes` | mutated `to_bytes()` of 5 formats, checksum re-sealed or not | dequantize, qgemm vs float64, round trip | a re-sealed header with a huge shape made it allocate and zero that shape (1.1 GB from 328 bytes): now `CorruptDataError` first |
| fuzz_sparse_bytes | `SparseMatrix.from_bytes` | mutated `to_bytes()` of bitmap / 2:4 / CSR, 4 value dtypes, re-sealed or not | spmm vs to_dense, to_scipy, round trip | none |
| fuzz_sparse_scipy | `SparseMatrix.from_scipy` | CSR indptr / indices / data arrays past SciPy's checks, int32/int64, extreme values | Python densify (an out-of-range index it accepted is a finding) | empty index arrays with zero strides were refused as non-contiguous (now accepted; NumPy calls them contiguous) |
| fuzz_paged | `paged_attention_raw` | page tables: kv_indptr, kv_indices, kv_last_page_len, qo_indptr with bad / extreme entries and lengths, 4 dtypes incl. int8 pages | gather + float64 attention, lse | empty q (zero strides) refused as non-contiguous: fixed with the above |
| fuzz_weight_store | `WeightStore.open` + get / get_rows / prefetch | mutated store files, header + directory CRCs re-sealed or not; budget, max_read_bytes, io_threads from the last byte | shapes, memory held vs budget and file size | max_read_bytes >= 2^62 overflowed the staging arithmetic (allocation of ~2^62 bytes); a budget far above the file sized the neuron arena to the budget (int32 slot ids could overflow): both fixed |

Found by hand while probing extreme arguments (the same classes of input): `PagedKVCache` geometries whose
pool size overflows int64 wrapped to a 0-byte pool that `append` wrote past (segfault); now ValueError.
Found by UBSan (tests/run_sanitized.sh): `WeightStore.open` of a store holding an empty tensor passed a null
pointer to memcpy (0 bytes; undefined behaviour); now skipped.
Found by the adversarial probe of issue 13 (regression tests in tests/python/test_reliability.py and
tests/cpp/test_parallel_errors.cpp): paths with NUL, FIFOs and devices as store paths, sources or
destinations, a destination that is the source, Python ints beyond the C types, NumPy integers,
`cudaXYZ` devices, read-only and big-endian arrays, scales that round to 0.0f, stride-0 views with
dimensions beyond 2^31 (the rows above). Without a row here: cu_seqlens changed by another thread
during flash_attention_varlen, a failed allocation inside an OpenMP region, os.fork after a kernel ran,
NaN/Inf hidden by flash attention, odd chunk_bytes with non-contiguous tensors, a stale rename errno.
"""


def main():
    # ---- flash_attention ----
    q, k = f32(1, 8, 4, 64), f32(1, 8, 2, 64)
    fa = "flash_attention"
    case(fa, "heads not a multiple of kv_heads", lambda: mk.flash_attention(q, f32(1, 8, 3, 64), f32(1, 8, 3, 64)))
    case(fa, "head_dim of k differs", lambda: mk.flash_attention(q, f32(1, 8, 2, 32), f32(1, 8, 2, 32)))
    case(fa, "k and v shapes differ", lambda: mk.flash_attention(q, k, f32(1, 9, 2, 64)))
    case(fa, "batch differs", lambda: mk.flash_attention(q, f32(2, 8, 2, 64), f32(2, 8, 2, 64)))
    case(fa, "3-D q", lambda: mk.flash_attention(q[0], k[0], k[0]))
    case(fa, "k float16, q float32", lambda: mk.flash_attention(q, k.astype(np.float16), k))
    case(fa, "float64 arrays", lambda: mk.flash_attention(*(a.astype(np.float64) for a in (q, k, k))))
    case(fa, "int32 q", lambda: mk.flash_attention(q.astype(np.int32), k, k))
    case(fa, "head_dim 0", lambda: mk.flash_attention(*(np.zeros((1, 8, 2, 0), np.float32),) * 3))
    case(fa, "Fortran-order q", lambda: mk.flash_attention(np.asfortranarray(q), k, k))
    case(fa, "negative strides", lambda: mk.flash_attention(q[:, :, :, ::-1], k, k))
    case(fa, "out of the wrong shape", lambda: mk.flash_attention(q, k, k, out=np.empty((1, 8, 4, 63), np.float32)))
    case(fa, "out of the wrong dtype", lambda: mk.flash_attention(q, k, k, out=np.empty(q.shape, np.float16)))
    case(fa, "window (-5, 2)", lambda: mk.flash_attention(q, k, k, window=(-5, 2)))
    case(fa, "scale -1", lambda: mk.flash_attention(q, k, k, scale=-1.0))
    case(fa, "softcap NaN", lambda: mk.flash_attention(q, k, k, softcap=float("nan")))
    case(fa, "a string for q", lambda: mk.flash_attention("q", k, k))
    case(fa, "seqused_k int64", lambda: mk.flash_attention(q, k, k, seqused_k=np.array([4])))
    case(fa, "seqused_k of the wrong length", lambda: mk.flash_attention(q, k, k, seqused_k=np.array([4, 4], np.int32)))
    case(fa, "seqused_k > seq_k", lambda: mk.flash_attention(q, k, k, seqused_k=np.array([9], np.int32)))
    case(fa, "seqused_k negative", lambda: mk.flash_attention(q, k, k, seqused_k=np.array([-1], np.int32)))
    case(fa, "key_mask uint8", lambda: mk.flash_attention(q, k, k, key_mask=np.ones((1, 8), np.uint8)))
    case(fa, "key_mask of the wrong shape", lambda: mk.flash_attention(q, k, k, key_mask=np.ones((1, 7), bool)))
    case(fa, "key_mask a list", lambda: mk.flash_attention(q, k, k, key_mask=[[True] * 8]))
    case(fa, "a list for q", lambda: mk.flash_attention([[1.0]], k, k))
    case(fa, "scale 1e-50 (0.0 in float32)", lambda: mk.flash_attention(q, k, k, scale=1e-50))
    case(fa, "softcap 1e-50 (0.0 in float32)", lambda: mk.flash_attention(q, k, k, softcap=1e-50))
    case(fa, "window 2^40", lambda: mk.flash_attention(q, k, k, window=2**40))
    case(fa, "window 4.5", lambda: mk.flash_attention(q, k, k, window=4.5))
    ro_out = np.empty_like(q)
    ro_out.flags.writeable = False
    case(fa, "read-only out", lambda: mk.flash_attention(q, k, k, out=ro_out))
    case(fa, "big-endian q", lambda: mk.flash_attention(q.astype(">f4"), k, k))
    case(fa, "complex q", lambda: mk.flash_attention(q.astype(np.complex64), k, k))
    huge = np.lib.stride_tricks.as_strided(q, shape=(2**32 + 1,) + q.shape[1:], strides=(0,) + q.strides[1:])
    huge_out = np.lib.stride_tricks.as_strided(np.empty_like(q), huge.shape, huge.strides)
    case(fa, "batch 2^32 + 1 (stride-0 views)", lambda: mk.flash_attention(huge, huge[:, :, :2], huge[:, :, :2],
                                                                             out=huge_out))
    fv = "flash_attention_varlen"
    qv, kv = f32(10, 4, 16), f32(12, 2, 16)
    okq, okk = i32([0, 4, 10]), i32([0, 5, 12])
    case(fv, "cu_seqlens_q decreasing", lambda: mk.flash_attention_varlen(qv, kv, kv, i32([0, 6, 4]), okk))
    case(fv, "cu_seqlens_k[-1] past total_k", lambda: mk.flash_attention_varlen(qv, kv, kv, okq, i32([0, 5, 13])))
    case(fv, "cu_seqlens_q[0] != 0", lambda: mk.flash_attention_varlen(qv, kv, kv, i32([1, 4, 10]), okk))
    case(fv, "int64 cu_seqlens", lambda: mk.flash_attention_varlen(qv, kv, kv, okq.astype(np.int64), okk))
    case(fv, "cu_seqlens of different batch", lambda: mk.flash_attention_varlen(qv, kv, kv, okq, okk[:2]))
    case(fv, "max_seqlen_q 2^40", lambda: mk.flash_attention_varlen(qv, kv, kv, okq, okk, max_seqlen_q=2**40))
    case("set_num_threads", "n = 100000", lambda: mk.set_num_threads(100000))
    case("set_num_threads", "n = 2^70", lambda: mk.set_num_threads(2**70))

    # ---- paged KV cache / paged attention ----
    pr = "paged_attention_raw"
    qd, kp = f32(1, 4, 16), f32(4, 4, 2, 16)
    ok = dict(kv_indptr=i32([0, 1]), kv_indices=i32([2]), kv_last_page_len=i32([3]))
    call = lambda **kw: mk.paged_attention_raw(qd, kp, kp, **{**ok, **kw})  # noqa: E731
    case(pr, "kv_indices entry = num_pages", lambda: call(kv_indices=i32([4])))
    case(pr, "kv_indices entry -1", lambda: call(kv_indices=i32([-1])))
    case(pr, "kv_indices entry INT32_MIN", lambda: call(kv_indices=i32([-2**31])))
    case(pr, "kv_last_page_len > page_size", lambda: call(kv_last_page_len=i32([5])))
    case(pr, "kv_last_page_len 0 on a non-empty sequence", lambda: call(kv_last_page_len=i32([0])))
    case(pr, "kv_indptr decreasing", lambda: call(kv_indptr=i32([1, 0])))
    case(pr, "kv_indptr[-1] past kv_indices", lambda: call(kv_indptr=i32([0, 2])))
    case(pr, "kv_indptr[0] negative", lambda: call(kv_indptr=i32([-1, 1])))
    case(pr, "kv_indptr[-1] = INT32_MAX", lambda: call(kv_indptr=i32([0, 2**31 - 1])))
    case(pr, "kv_last_page_len of the wrong length", lambda: call(kv_last_page_len=i32([3, 3])))
    case(pr, "int64 kv_indices", lambda: call(kv_indices=np.array([2], np.int64)))
    case(pr, "non-contiguous kv_indices", lambda: call(kv_indices=i32([2, 0, 1, 3])[::2]))
    case(pr, "q float16, pages float32", lambda: mk.paged_attention_raw(qd.astype(np.float16), kp, kp, **ok))
    case(pr, "q heads not a multiple of kv_heads", lambda: mk.paged_attention_raw(f32(1, 3, 16), kp, kp, **ok))
    case(pr, "qo_indptr[-1] != rows of q", lambda: call(qo_indptr=i32([0, 2])))
    case(pr, "no qo_indptr, q rows != batch", lambda: mk.paged_attention_raw(f32(2, 4, 16), kp, kp, **ok))
    case(pr, "int8 pages without scales", lambda: mk.paged_attention_raw(
        qd, kp.astype(np.int8), kp.astype(np.int8), **ok))
    case(pr, "pages with a strided head_dim axis", lambda: mk.paged_attention_raw(
        qd, f32(4, 4, 2, 32)[..., ::2], f32(4, 4, 2, 32)[..., ::2], **ok))
    pc = "PagedKVCache"
    cache = mk.PagedKVCache(1, 4, 4, 2, 16)
    a = cache.add_sequence()
    kk = f32(1, 2, 16)
    case(pc, "append to unknown sequence id 99", lambda: cache.append([99], 0, kk, kk))
    case(pc, "append to layer 2 of a 1-layer cache", lambda: cache.append([a], 2, kk, kk))
    case(pc, "append float16 to a float32 cache", lambda: cache.append([a], 0, kk.astype(np.float16),
                                                                       kk.astype(np.float16)))
    case(pc, "append with 3 kv heads (cache has 2)", lambda: cache.append([a], 0, f32(1, 3, 16), f32(1, 3, 16)))
    case(pc, "counts not adding up to the rows", lambda: cache.append([a], 0, kk, kk, counts=[2]))
    case(pc, "the same sequence twice in one append", lambda: cache.append([a, a], 0, f32(2, 2, 16), f32(2, 2, 16)))
    case(pc, "more tokens than free pages hold", lambda: cache.append([a], 0, f32(20, 2, 16), f32(20, 2, 16),
                                                                      counts=[20]))
    case(pc, "truncate beyond the length", lambda: cache.truncate(a, 12))
    case(pc, "fork of an unknown id", lambda: cache.fork(12345))
    case(pc, "free twice", lambda: (cache.free(cache.add_sequence()), cache.free(1)))
    case(pc, "num_pages 0", lambda: mk.PagedKVCache(1, 0, 4, 1, 16))
    case(pc, "dtype int16", lambda: mk.PagedKVCache(1, 4, 4, 1, 16, "int16"))
    case(pc, "device 'tpu'", lambda: mk.PagedKVCache(1, 4, 4, 1, 16, device="tpu"))
    case(pc, "page_size 2^31 - 1", lambda: mk.PagedKVCache(1, 4, 2**31 - 1, 1, 16))
    case(pc, "geometry whose pool size overflows int64 (fixed finding)", lambda: mk.PagedKVCache(2**30, 4, 2**20, 1, 2**13))
    case(pc, "num_pages 2^31 (does not fit the C++ int)", lambda: mk.PagedKVCache(1, 2**31, 4, 1, 16))
    case(pc, "device 'cudaXYZ'", lambda: mk.PagedKVCache(1, 4, 4, 1, 16, device="cudaXYZ"))
    case(pc, "counts adding up past 2^63 (0 rows)", lambda: cache.append([a, cache.add_sequence()], 0, kk[:0], kk[:0],
                                                                         counts=[3 * 2**61, 3 * 2**61]))
    case(pc, "a count of 2^64", lambda: cache.append([a], 0, kk, kk, counts=[2**64]))
    case(pc, "a float layer 0.5", lambda: cache.append([a], 0.5, kk, kk))
    case(pc, "sequence id 2^70", lambda: cache.length(2**70))
    c8 = mk.PagedKVCache(1, 4, 4, 2, 16, "int8")
    case(pc, "int8 k/v into an int8 cache (floats are quantized)", lambda: c8.append(
        [c8.add_sequence()], 0, kk.astype(np.int8), kk.astype(np.int8)))
    ck = mk.PagedKVCache(1, 4, 4, 2, 16, "kivi4")
    case(pc, "uint8 k/v into a KIVI cache", lambda: ck.append([ck.add_sequence()], 0, kk.astype(np.uint8),
                                                               kk.astype(np.uint8)))
    case("paged_attention", "head_dim 8 on a head_dim-16 cache", lambda: mk.paged_attention(f32(1, 4, 8), cache, 0, [a]))
    case("paged_attention", "q_lens not matching q rows", lambda: mk.paged_attention(f32(2, 4, 16), cache, 0, [a],
                                                                                   q_lens=[1]))

    # ---- quantization ----
    w = f32(8, 256)
    qt = "quantize"
    case(qt, "group_size 48", lambda: mk.quantize(w, "int4", group_size=48))
    case(qt, "group_size 0", lambda: mk.quantize(w, "int4", group_size=0))
    case(qt, "int8 with group size 48", lambda: mk.quantize(w, "int8", group_size=48))
    case(qt, "format 'int5'", lambda: mk.quantize(w, "int5"))
    case(qt, "double_quant with int4", lambda: mk.quantize(w, "int4", double_quant=True))
    case(qt, "1-D w", lambda: mk.quantize(w[0], "int4"))
    case(qt, "int32 w", lambda: mk.quantize(w.astype(np.int32), "int4"))
    case(qt, "w with a NaN", lambda: mk.quantize(np.where(w > 2, np.nan, w).astype(np.float32), "nf4"))
    case(qt, "Fortran-order w", lambda: mk.quantize(np.asfortranarray(w), "int4"))
    qm = mk.quantize(f32(16, 256), "int4", group_size=64)
    x = f32(2, 256)
    qg = "qgemm"
    case(qg, "x with 128 in_features (matrix has 256)", lambda: mk.qgemm(x[:, :128], qm))
    case(qg, "float64 x", lambda: mk.qgemm(x.astype(np.float64), qm))
    case(qg, "bias of 15 entries", lambda: mk.qgemm(x, qm, np.zeros(15, np.float32)))
    case(qg, "float64 bias", lambda: mk.qgemm(x, qm, np.zeros(16, np.float64)))
    case(qg, "out of the wrong shape", lambda: mk.qgemm(x, qm, out=np.zeros((2, 15), np.float32)))
    case(qg, "a dense array for qm", lambda: mk.qgemm(x, np.zeros((16, 256), np.float32)))
    case("pack_quantized", "nf4 scales with a NaN", lambda: mk.pack_quantized(
        "nf4", np.zeros((4, 64), np.uint8), np.full((4, 2), np.nan, np.float32), group_size=32))
    case("pack_quantized", "int4_min without mins", lambda: mk.pack_quantized(
        "int4_min", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), group_size=32))
    case("pack_quantized", "int4_min mins of shape (4, 3)", lambda: mk.pack_quantized(
        "int4_min", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), mins=np.zeros((4, 3), np.float32),
        group_size=32))
    case("pack_quantized", "int4_min int32 mins", lambda: mk.pack_quantized(
        "int4_min", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), mins=np.zeros((4, 2), np.int32),
        group_size=32))
    case("pack_quantized", "int4_min mins with an infinity", lambda: mk.pack_quantized(
        "int4_min", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), mins=np.full((4, 2), np.inf, np.float32),
        group_size=32))
    case("pack_quantized", "mins given to int4_sym", lambda: mk.pack_quantized(
        "int4_sym", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), mins=np.zeros((4, 2), np.float32),
        group_size=32))
    case("pack_quantized", "int2 zero points >= 4", lambda: mk.pack_quantized(
        "int2", np.zeros((4, 64), np.uint8), np.ones((4, 2), np.float32), np.full((4, 2), 4, np.uint8), group_size=32))
    b = bytearray(qm.to_bytes())
    fb = "from_bytes (QuantizedMatrix)"
    case(fb, "empty bytes", lambda: mk.from_bytes(b""))
    case(fb, "one flipped payload bit", lambda: mk.from_bytes(bytes(b[:100]) + bytes([b[100] ^ 4]) + bytes(b[101:])))
    case(fb, "truncated by 1 byte", lambda: mk.from_bytes(bytes(b[:-1])))
    case(fb, "one byte appended", lambda: mk.from_bytes(bytes(b) + b"\0"))
    case(fb, "version 99", lambda: mk.from_bytes(bytes(b[:4]) + bytes([99]) + bytes(b[5:])))
    case(fb, "bad magic", lambda: mk.from_bytes(b"XXXX" + bytes(b[4:])))
    case(fb, "5000 random bytes", lambda: mk.from_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz"))
    from fuzz_common import fnv1a64, reseal_tail64, reseal_weight_store, sparse_checksum

    big = bytearray(b)
    struct.pack_into("<q", big, 16, 1 << 24)
    case(fb, "re-sealed header claiming 16M rows (fuzz finding)", lambda: mk.from_bytes(reseal_tail64(bytes(big),
                                                                                                     fnv1a64)))
    fmt = bytearray(b)
    fmt[8] = 17
    case(fb, "re-sealed header with format id 17", lambda: mk.from_bytes(reseal_tail64(bytes(fmt), fnv1a64)))
    case("load_quantized", "missing file", lambda: mk.load_quantized("/nonexistent/w.mkq"))

    # ---- sparse ----
    ws = mk.prune(f32(8, 16), 0.5)
    sp = mk.SparseMatrix.from_dense(ws)
    xs = f32(3, 16)
    sm = "spmm"
    case(sm, "x with 15 in_features", lambda: mk.spmm(sp, np.zeros((3, 15), np.float32)))
    case(sm, "int32 x", lambda: mk.spmm(sp, xs.astype(np.int32)))
    case(sm, "out float16 for float32 x", lambda: mk.spmm(sp, xs, out=np.zeros((3, 8), np.float16)))
    case(sm, "x with a strided last axis", lambda: mk.spmm(sp, f32(3, 32)[:, ::2]))
    case(sm, "3-D x", lambda: mk.spmm(sp, np.zeros((1, 3, 16), np.float32)))
    case(sm, "a dense array for the matrix", lambda: mk.spmm(ws, xs))
    fd = "SparseMatrix.from_dense"
    case(fd, "3-D w", lambda: mk.SparseMatrix.from_dense(np.zeros((2, 3, 4), np.float32)))
    case(fd, "int32 w", lambda: mk.SparseMatrix.from_dense(np.zeros((2, 3), np.int32)))
    case(fd, "format 'coo'", lambda: mk.SparseMatrix.from_dense(ws, format="coo"))
    case(fd, "dtype 'int4'", lambda: mk.SparseMatrix.from_dense(ws, dtype="int4"))
    case(fd, "threshold -1", lambda: mk.SparseMatrix.from_dense(ws, threshold=-1))
    case(fd, "dense rows as '2:4'", lambda: mk.SparseMatrix.from_dense(np.ones((2, 8), np.float32), format="2:4"))
    case(fd, "int8 values from w with inf", lambda: mk.SparseMatrix.from_dense(
        np.array([[np.inf, 1]], np.float32), dtype="int8"))

    def csr(indptr, indices, data, shape):
        m = sps.csr_array((np.array([1.0]), np.array([0]), np.array([0, 1])), shape=(1, 1))
        m.indptr, m.indices, m.data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
        m._shape = shape
        return m

    fs = "SparseMatrix.from_scipy"
    case(fs, "indptr decreasing", lambda: mk.SparseMatrix.from_scipy(csr([0, 2, 1, 3], [0, 1, 2], [1., 2, 3], (3, 4))))
    case(fs, "column index = cols", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2, 3], [0, 4, 1], [1., 2, 3], (3, 4))))
    case(fs, "column index -1", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2, 3], [0, -1, 1], [1., 2, 3], (3, 4))))
    case(fs, "indptr of rows entries", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2], [0, 1, 2], [1., 2, 3], (3, 4))))
    case(fs, "data shorter than indices", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2, 3], [0, 1, 2], [1., 2],
                                                                                 (3, 4))))
    case(fs, "indptr[-1] past nnz", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2, 9], [0, 1, 2], [1., 2, 3], (3, 4))))
    case(fs, "indptr[0] = 1", lambda: mk.SparseMatrix.from_scipy(csr([1, 1, 2, 3], [0, 1, 2], [1., 2, 3], (3, 4))))
    case(fs, "indptr[-1] = 2^40 (int64)", lambda: mk.SparseMatrix.from_scipy(csr([0, 1, 2, 2**40], [0, 1, 2],
                                                                                  [1., 2, 3], (3, 4))))
    case(fs, "a dense array", lambda: mk.SparseMatrix.from_scipy(ws))
    sb = bytearray(sp.to_bytes())
    fsb = "SparseMatrix.from_bytes"
    case(fsb, "one flipped bit", lambda: mk.SparseMatrix.from_bytes(bytes(sb[:60]) + bytes([sb[60] ^ 4]) + bytes(sb[61:])))
    case(fsb, "truncated to 47 bytes", lambda: mk.SparseMatrix.from_bytes(bytes(sb[:47])))
    case(fsb, "100 x 'X'", lambda: mk.SparseMatrix.from_bytes(b"X" * 100))
    rp = bytearray(sb)
    struct.pack_into("<q", rp, 48 + 8, 5)
    case(fsb, "re-sealed, row_ptr[1] changed", lambda: mk.SparseMatrix.from_bytes(reseal_tail64(bytes(rp),
                                                                                              sparse_checksum)))
    nz = bytearray(sb)
    struct.pack_into("<q", nz, 32, 2**62)
    case(fsb, "re-sealed, nnz = 2^62", lambda: mk.SparseMatrix.from_bytes(reseal_tail64(bytes(nz), sparse_checksum)))
    case("SparseMatrix.to", "device 'tpu'", lambda: sp.to("tpu"))
    case("SparseMatrix.to", "device 'cuda:x'", lambda: sp.to("cuda:x"))
    case("SparseMatrix.to", "device 'cudaXYZ'", lambda: sp.to("cudaXYZ"))
    case("prune", "sparsity 1.5", lambda: mk.prune(ws, 1.5))
    case("prune", "method 'random'", lambda: mk.prune(ws, 0.5, method="random"))

    # ---- weight store ----
    tmp = tempfile.mkdtemp()
    TMPDIRS.append(tmp)
    path = os.path.join(tmp, "g.mkws")
    layers = {1: {"gate": f32(200, 32), "up": f32(200, 32), "down": f32(32, 200)}}
    mk.write_weight_store(path, {"t": f32(1000)}, layers, chunk_bytes=4096)
    data = open(path, "rb").read()

    def reopen(content):
        p = os.path.join(tmp, "bad.mkws")
        with open(p, "wb") as f:
            f.write(content)
        mk.WeightStore.open(p, 1 << 20)

    wo = "WeightStore.open"
    case(wo, "budget below the largest read", lambda: mk.WeightStore.open(path, 5000))
    case(wo, "budget 0", lambda: mk.WeightStore.open(path, 0))
    case(wo, "missing file", lambda: mk.WeightStore.open(os.path.join(tmp, "missing.mkws"), 1 << 20))
    case(wo, "a directory", lambda: mk.WeightStore.open(tmp, 1 << 20))
    case(wo, "device 'tpu'", lambda: mk.WeightStore.open(path, 1 << 20, device="tpu"))
    case(wo, "device 'cudaXYZ'", lambda: mk.WeightStore.open(path, 1 << 20, device="cudaXYZ"))
    case(wo, "a path with a NUL byte", lambda: mk.WeightStore.open(path + "\0x", 1 << 20))
    fifo = os.path.join(tmp, "fifo.mkws")
    os.mkfifo(fifo)
    case(wo, "a FIFO", lambda: mk.WeightStore.open(fifo, 1 << 20))
    case(wo, "io_threads 2^40", lambda: mk.WeightStore.open(path, 1 << 20, io_threads=2**40))
    case(wo, "dram_budget_bytes 2^70", lambda: mk.WeightStore.open(path, 2**70))
    case(wo, "truncated to 10 bytes", lambda: reopen(data[:10]))
    case(wo, "truncated by 1 byte", lambda: reopen(data[:-1]))
    case(wo, "bad magic", lambda: reopen(b"NOTSTORE" + data[8:]))
    case(wo, "header byte flipped", lambda: reopen(data[:20] + bytes([data[20] ^ 1]) + data[21:]))
    dir_off = struct.unpack_from("<Q", data, 16)[0]
    case(wo, "directory byte flipped", lambda: reopen(data[:dir_off + 9] + bytes([data[dir_off + 9] ^ 255])
                                                     + data[dir_off + 10:]))
    tb = bytearray(data)
    name_len = struct.unpack_from("<I", data, dir_off + 8)[0]
    struct.pack_into("<Q", tb, dir_off + 8 + 4 + name_len + 4 + 8, 1 << 40)
    case(wo, "re-sealed directory, tensor offset 2^40", lambda: reopen(reseal_weight_store(bytes(tb))))
    s = mk.WeightStore.open(path, 1 << 20)
    wr = "WeightStore reads"
    case(wr, "get_rows neuron 200 of 200", lambda: s.get_rows(1, [0, 200]))
    case(wr, "get_rows neuron -1", lambda: s.get_rows(1, [-1]))
    case(wr, "prefetch neuron 1000", lambda: s.prefetch(1, [1000]))
    case(wr, "get_rows of a missing layer", lambda: s.get_rows(2, [0]))
    case(wr, "get of a missing tensor", lambda: s.get("zzz"))
    case(wr, "get into float16 out", lambda: s.get("t", out=np.empty(1000, np.float16)))
    case(wr, "get_rows with float ids", lambda: s.get_rows(1, [0.5]))
    case(wr, "get_rows with 2-D ids", lambda: s.get_rows(1, [[0, 1]]))
    s.close()
    case(wr, "get after close", lambda: s.get("t"))
    corrupt = bytearray(data)
    corrupt[4096 + 100] ^= 0x10
    p2 = os.path.join(tmp, "c.mkws")
    open(p2, "wb").write(bytes(corrupt))
    s2 = mk.WeightStore.open(p2, 1 << 20)
    case(wr, "get of a tensor with a damaged chunk", lambda: s2.get("t"))
    s2.close()
    case("write_weight_store", "down of the wrong shape", lambda: mk.write_weight_store(
        os.path.join(tmp, "x.mkws"), None, {0: {"up": np.zeros((10, 4), np.float32), "down": np.zeros((10, 4), np.float32)}}))
    case("write_weight_store", "up float32, down float16", lambda: mk.write_weight_store(
        os.path.join(tmp, "x.mkws"), None, {0: {"up": np.zeros((10, 4), np.float32), "down": np.zeros((4, 10), np.float16)}}))
    case("convert_to_weight_store", "a .bin file", lambda: mk.convert_to_weight_store(os.path.join(tmp, "x.bin"),
                                                                                     os.path.join(tmp, "o.mkws")))
    ww = "write_weight_store"
    case(ww, "a path with a NUL byte", lambda: mk.write_weight_store(path + "\0x", {"a": f32(4)}))
    case(ww, "destination a FIFO", lambda: mk.write_weight_store(fifo, {"a": f32(4)}))
    case(ww, "destination a directory", lambda: mk.write_weight_store(tmp, {"a": f32(4)}))
    case(ww, "chunk_bytes 2^40", lambda: mk.write_weight_store(os.path.join(tmp, "y.mkws"), {"a": f32(4)},
                                                               chunk_bytes=2**40))
    npy = os.path.join(tmp, "src.npy")
    np.save(npy, f32(4, 4))
    cv = "convert_to_weight_store"
    case(cv, "destination = source", lambda: mk.convert_to_weight_store(npy, npy))
    fifo_src = os.path.join(tmp, "fifo.npy")
    os.mkfifo(fifo_src)
    case(cv, "a FIFO source", lambda: mk.convert_to_weight_store(fifo_src, os.path.join(tmp, "o.mkws")))

    print("# Bad inputs tried per API, and the error each gets\n")
    print("Generated by `python tests/make_bad_inputs_table.py > tests/BAD_INPUTS.md` from real calls "
          f"(memkernels {mk.__version__}). CorruptDataError is a ValueError, CacheFullError a MemoryError. "
          "The tests (tests/python/test_*.py `pytest.raises` cases) assert these types and message "
          "fragments; the fuzzers (tests/fuzz) check that every other mutated input of these entry "
          "points gets one of ValueError / TypeError / MemoryError / OSError, or succeeds with a result "
          "matching a NumPy reference.\n")
    print(FUZZERS)
    print("## Bad inputs per API\n")
    print("| API | bad input | error | message |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 1 if bad[0] else 0


if __name__ == "__main__":
    sys.exit(main())
