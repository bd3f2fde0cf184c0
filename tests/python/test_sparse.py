"""SparseMatrix / spmm / prune against NumPy float64 references, and bad input raising clearly."""
import struct

import numpy as np
import pytest

import memkernels as mk

ml_dtypes = pytest.importorskip("ml_dtypes")
sps = pytest.importorskip("scipy.sparse")

BF16 = np.dtype(ml_dtypes.bfloat16)
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
# |error| <= TOL * (|x| @ |w|.T): fp32 accumulation, then rounding of the output to x's dtype.
TOL = {"float32": 2e-6, "float16": 1.5e-3, "bfloat16": 1e-2}
ISAS = [i for i in ("generic", "avx2", "avx512")
        if ["generic", "avx2", "avx512"].index(i) <= ["generic", "avx2", "avx512"].index(mk.info()["best_cpu_isa"])]


def random_sparse(rng, rows, cols, sparsity, dtype="float32"):
    w = rng.uniform(0.5, 1.5, (rows, cols)) * rng.choice([-1.0, 1.0], (rows, cols))  # never accidental zeros
    w[rng.random((rows, cols)) < sparsity] = 0.0
    return w.astype(NP_DTYPES[dtype])


def check_spmm(sp, x, out):
    """out == x @ W.T with W as stored (values already rounded to the value dtype)."""
    wd = sp.to_dense("float32").astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 @ wd.T
    bound = np.abs(x64) @ np.abs(wd).T
    err = np.abs(out.astype(np.float64) - ref)
    tol = TOL[x.dtype.name if x.dtype != BF16 else "bfloat16"]
    assert np.all(np.isfinite(out.astype(np.float64)))
    assert np.all(err <= tol * bound + 1e-30), f"max err {np.max(err - tol * bound)}"


@pytest.fixture(autouse=True)
def restore_isa():
    yield
    mk.set_cpu_isa(mk.info()["best_cpu_isa"])


@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "csr"])
@pytest.mark.parametrize("vdtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("xdtype", ["float32", "float16", "bfloat16"])
def test_spmm_formats_dtypes(fmt, vdtype, xdtype):
    rng = np.random.default_rng(hash((fmt, vdtype, xdtype)) % 2**32)
    for rows, cols, tokens, sparsity in [(37, 131, 1, 0.7), (64, 128, 9, 0.5), (5, 66, 17, 0.9), (70, 200, 3, 0.3)]:
        w = random_sparse(rng, rows, cols, sparsity)
        if fmt == "2:4":
            w = mk.prune(w, method="2:4")
        sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype=vdtype)
        assert sp.shape == (rows, cols) and sp.format == fmt and sp.dtype == vdtype
        if vdtype == "int8":  # per-row symmetric quantisation: error <= half a step
            step = np.abs(w.astype(np.float32)).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(sp.to_dense() - w) <= step * 0.5001)
            assert np.all((sp.to_dense() == 0) | (w != 0))
        else:
            np.testing.assert_array_equal(sp.to_dense("float32"), w.astype(NP_DTYPES[vdtype]).astype(np.float32))
        x = rng.standard_normal((tokens, cols)).astype(NP_DTYPES[xdtype])
        out = np.full((tokens, rows), np.nan, dtype=NP_DTYPES[xdtype])  # poisoned
        res = mk.spmm(sp, x, out=out)
        assert res is out
        check_spmm(sp, x, out)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_spmm_sparsities_every_isa(isa, sparsity):
    mk.set_cpu_isa(isa)
    rng = np.random.default_rng(int(sparsity * 100))
    for rows, cols in [(1, 1), (3, 65), (130, 200), (17, 64), (96, 1000)]:
        w = random_sparse(rng, rows, cols, sparsity)
        for fmt in ("bitmap", "csr"):
            sp = mk.SparseMatrix.from_dense(w, format=fmt)
            for tokens in (1, 2, 5, 8, 9, 16, 20, 40):
                x = rng.standard_normal((tokens, cols)).astype(np.float32)
                out = mk.spmm(sp, x, out=np.full((tokens, rows), np.nan, np.float32))
                check_spmm(sp, x, out)


def test_empty_rows_all_zero_and_dense():
    rng = np.random.default_rng(1)
    w = random_sparse(rng, 50, 150, 0.6)
    w[::3] = 0.0  # empty rows
    w[:, 64:128] = 0.0  # an empty tile in every row
    zero = np.zeros((20, 70), np.float32)
    dense = random_sparse(rng, 20, 70, 0.0)
    for m in (w, zero, dense):
        for fmt in ("bitmap", "csr", "2:4"):
            mm = mk.prune(m, method="2:4") if fmt == "2:4" else m
            sp = mk.SparseMatrix.from_dense(mm, format=fmt)
            x = rng.standard_normal((6, m.shape[1])).astype(np.float32)
            out = mk.spmm(sp, x, out=np.full((6, m.shape[0]), np.nan, np.float32))
            check_spmm(sp, x, out)
    assert mk.SparseMatrix.from_dense(zero).nnz == 0
    assert mk.SparseMatrix.from_dense(dense).nnz == dense.size


def test_prefill_tokens_and_strided_x():
    rng = np.random.default_rng(2)
    w = random_sparse(rng, 200, 320, 0.7)
    sp = mk.SparseMatrix.from_dense(w, dtype="float16")
    x = rng.standard_normal((300, 320)).astype(np.float32)  # > one token chunk of the CPU kernel
    check_spmm(sp, x, mk.spmm(sp, x))
    xs = rng.standard_normal((20, 640)).astype(np.float32)[::2, :320]  # row stride 640
    check_spmm(sp, xs, mk.spmm(sp, xs))
    v = rng.standard_normal(320).astype(np.float32)  # 1-D x
    y = mk.spmm(sp, v)
    assert y.shape == (200,)
    check_spmm(sp, v[None], y[None])
    assert sp(v).shape == (200,)


def test_zero_tokens_and_zero_cols():
    sp = mk.SparseMatrix.from_dense(np.zeros((4, 0), np.float32))
    out = mk.spmm(sp, np.zeros((3, 0), np.float32), out=np.full((3, 4), np.nan, np.float32))
    np.testing.assert_array_equal(out, 0.0)
    sp = mk.SparseMatrix.from_dense(random_sparse(np.random.default_rng(0), 4, 9, 0.5))
    assert mk.spmm(sp, np.zeros((0, 9), np.float32)).shape == (0, 4)


def test_threshold_and_float64_input():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((30, 40))
    sp = mk.SparseMatrix.from_dense(w, threshold=0.8)
    assert sp.dtype == "float32"
    expect = np.where(np.abs(w) <= 0.8, 0.0, w).astype(np.float32)
    np.testing.assert_array_equal(sp.to_dense(), expect)
    assert sp.nnz == np.count_nonzero(expect)


def test_int8_values():
    rng = np.random.default_rng(11)
    w = random_sparse(rng, 40, 300, 0.7)
    w[3] = 0.0  # an empty row (scale 0)
    w[5, 7] = 1e-4  # rounds to 0 at int8: dropped
    for fmt in ("bitmap", "csr"):
        sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype="int8")
        assert sp.dtype == "int8" and sp.to_dense().dtype == np.float32
        assert sp.nnz == np.count_nonzero(w) - 1
        back = mk.SparseMatrix.from_bytes(sp.to_bytes())
        np.testing.assert_array_equal(back.to_dense(), sp.to_dense())
        np.testing.assert_array_equal(sp.to_scipy().toarray(), sp.to_dense())
        for isa in ISAS:
            mk.set_cpu_isa(isa)
            x = rng.standard_normal((9, 300)).astype(np.float32)
            check_spmm(sp, x, mk.spmm(sp, x, out=np.full((9, 40), np.nan, np.float32)))
    big = random_sparse(rng, 256, 1024, 0.7)
    assert 0.42 < mk.SparseMatrix.from_dense(big, dtype="int8").bytes_per_weight < 0.45
    w[1, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        mk.SparseMatrix.from_dense(w, dtype="int8")


def test_bytes_per_weight():
    rng = np.random.default_rng(4)
    w = random_sparse(rng, 256, 1024, 0.7)
    sp16 = mk.SparseMatrix.from_dense(w, dtype="float16")
    nnz = np.count_nonzero(w)
    assert sp16.nbytes == nnz * 2 + 256 * 16 * 8 + 257 * 8
    assert 0.7 < sp16.bytes_per_weight < 0.76
    csr = mk.SparseMatrix.from_dense(w, format="csr")
    assert csr.nbytes == nnz * 8 + 257 * 8


def test_scipy_round_trip_duplicates_unsorted():
    rng = np.random.default_rng(5)
    w = random_sparse(rng, 40, 90, 0.8)
    for fmt in ("bitmap", "csr", "2:4"):
        m = mk.prune(w, method="2:4") if fmt == "2:4" else w
        sp = mk.SparseMatrix.from_scipy(sps.csr_array(m), format=fmt)
        np.testing.assert_array_equal(sp.to_dense(), m)
        back = sp.to_scipy()
        assert back.has_sorted_indices
        np.testing.assert_array_equal(back.toarray(), m)
    # COO with duplicates (summed) and unsorted CSR indices
    coo = sps.coo_array((np.array([1.0, 2.0, 3.0, 4.0]), (np.array([0, 0, 2, 1]), np.array([5, 5, 0, 3]))),
                        shape=(3, 7))
    sp = mk.SparseMatrix.from_scipy(coo)
    np.testing.assert_array_equal(sp.to_dense(), coo.toarray().astype(np.float32))
    csr = sps.csr_array((np.array([1.0, 2.0]), np.array([4, 1]), np.array([0, 2])), shape=(1, 6))
    np.testing.assert_array_equal(mk.SparseMatrix.from_scipy(csr, format="csr").to_dense(), csr.toarray())
    # int64 indices and integer data
    m = sps.csr_array(np.array([[0, 3], [4, 0]], dtype=np.int64))
    m.indices = m.indices.astype(np.int64)
    m.indptr = m.indptr.astype(np.int64)
    np.testing.assert_array_equal(mk.SparseMatrix.from_scipy(m).to_dense(), [[0, 3], [4, 0]])


def corrupt_csr(indptr, indices, data, shape):
    m = sps.csr_array((np.array([1.0]), np.array([0]), np.array([0, 1])), shape=(1, 1))
    m.indptr, m.indices, m.data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
    m._shape = shape
    return m


@pytest.mark.parametrize("fmt", ["bitmap", "csr", "2:4"])
@pytest.mark.parametrize("case,fragment", [
    (([0, 2, 1, 3], [0, 1, 2], [1.0, 2, 3], (3, 4)), "non-decreasing"),
    (([0, 1, 2, 3], [0, 4, 1], [1.0, 2, 3], (3, 4)), "out of range"),
    (([0, 1, 2, 3], [0, -1, 1], [1.0, 2, 3], (3, 4)), "out of range"),
    (([0, 1, 2], [0, 1, 2], [1.0, 2, 3], (3, 4)), "rows + 1"),
    (([0, 1, 2, 3], [0, 1, 2], [1.0, 2], (3, 4)), "must match"),
    (([0, 1, 2, 9], [0, 1, 2], [1.0, 2, 3], (3, 4)), "indptr[-1]"),
    (([1, 1, 2, 3], [0, 1, 2], [1.0, 2, 3], (3, 4)), "indptr[0]"),
    (([0, 1, 2, 2**40], [0, 1, 2], [1.0, 2, 3], (3, 4)), "indptr[-1]"),
])
def test_corrupt_scipy_raises_value_error(fmt, case, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("+", r"\+")):
        mk.SparseMatrix.from_scipy(corrupt_csr(*case), format=fmt)


def test_bad_arguments():
    rng = np.random.default_rng(6)
    w = random_sparse(rng, 8, 16, 0.5)
    sp = mk.SparseMatrix.from_dense(w)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="in_features = 16"):
        mk.spmm(sp, np.zeros((3, 15), np.float32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        mk.spmm(sp, x.astype(np.int32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        mk.spmm(sp, x.astype(np.float64))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        mk.spmm(sp, x, out=np.zeros((3, 8), np.float16))
    with pytest.raises(ValueError, match="out: expected shape"):
        mk.spmm(sp, x, out=np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        mk.spmm(sp, rng.standard_normal((3, 32)).astype(np.float32)[:, ::2])
    with pytest.raises(ValueError, match="tokens, in_features"):
        mk.spmm(sp, np.zeros((1, 3, 16), np.float32))
    with pytest.raises(TypeError, match="SparseMatrix"):
        mk.spmm(w, x)
    with pytest.raises(ValueError, match="w: expected 2 dimensions"):
        mk.SparseMatrix.from_dense(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="w: expected dtype"):
        mk.SparseMatrix.from_dense(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="format"):
        mk.SparseMatrix.from_dense(w, format="coo")
    with pytest.raises(TypeError, match="dtype"):
        mk.SparseMatrix.from_dense(w, dtype="int4")
    with pytest.raises(ValueError, match="threshold"):
        mk.SparseMatrix.from_dense(w, threshold=-1)
    with pytest.raises(ValueError, match="2:4 allows at most 2"):
        mk.SparseMatrix.from_dense(np.ones((2, 8), np.float32), format="2:4")
    with pytest.raises(TypeError, match="SciPy sparse"):
        mk.SparseMatrix.from_scipy(w)
    with pytest.raises(ValueError, match="device"):
        sp.to("tpu")
    with pytest.raises(ValueError, match="sparsity"):
        mk.prune(w, 1.5)
    with pytest.raises(ValueError, match="method"):
        mk.prune(w, 0.5, method="random")


def _checksum(b: bytes) -> int:
    """The serialisation's checksum (word-wise FNV-1a variant), re-implemented to forge headers."""
    mask = (1 << 64) - 1
    h = 1469598103934665603
    n8 = len(b) // 8 * 8
    for (w,) in struct.iter_unpack("<Q", b[:n8]):
        h = ((h ^ w) * 1099511628211) & mask
        h ^= h >> 29
    for c in b[n8:]:
        h = ((h ^ c) * 1099511628211) & mask
    return h


def _reseal(b: bytes) -> bytes:
    body = b[:-8]
    return body + struct.pack("<Q", _checksum(body))


@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "csr"])
@pytest.mark.parametrize("vdtype", ["float32", "float16", "bfloat16", "int8"])
def test_bytes_round_trip(fmt, vdtype):
    rng = np.random.default_rng(7)
    w = random_sparse(rng, 33, 70, 0.6)
    if fmt == "2:4":
        w = mk.prune(w, method="2:4")
    sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype=vdtype)
    b = sp.to_bytes()
    assert _reseal(b) == b  # the Python checksum matches the C++ one
    back = mk.SparseMatrix.from_bytes(b)
    assert (back.shape, back.format, back.dtype, back.nnz) == (sp.shape, fmt, vdtype, sp.nnz)
    np.testing.assert_array_equal(back.to_dense("float32"), sp.to_dense("float32"))


def test_bytes_damage_raises_corrupt_data():
    rng = np.random.default_rng(8)
    sp = mk.SparseMatrix.from_dense(random_sparse(rng, 20, 100, 0.7))
    b = bytearray(sp.to_bytes())
    for pos in (0, 9, 20, 60, len(b) // 2, len(b) - 3):
        bad = bytearray(b)
        bad[pos] ^= 0x04
        with pytest.raises(mk.CorruptDataError):
            mk.SparseMatrix.from_bytes(bytes(bad))
    for n in (0, 10, 47, 56, len(b) - 1):
        with pytest.raises(mk.CorruptDataError):
            mk.SparseMatrix.from_bytes(bytes(b[:n]))
    assert issubclass(mk.CorruptDataError, ValueError)
    with pytest.raises(mk.CorruptDataError, match="magic"):
        mk.SparseMatrix.from_bytes(b"X" * 100)
    v2 = bytearray(b)
    v2[8] = 2
    with pytest.raises(mk.CorruptDataError, match="version 2"):
        mk.SparseMatrix.from_bytes(_reseal(bytes(v2)))
    # Correct checksum but inconsistent structure: still caught, never read out of bounds.
    rp = bytearray(b)
    struct.pack_into("<q", rp, 48 + 8 * 5, 10**9)  # row_ptr[5]
    with pytest.raises(mk.CorruptDataError, match="row_ptr"):
        mk.SparseMatrix.from_bytes(_reseal(bytes(rp)))
    mask = bytearray(b)
    mask[48 + 21 * 8 + 7] ^= 0x80  # a bit of the first mask word of row 0 flipped
    with pytest.raises(mk.CorruptDataError, match="popcount|beyond"):
        mk.SparseMatrix.from_bytes(_reseal(bytes(mask)))
    csr = bytearray(mk.SparseMatrix.from_dense(random_sparse(rng, 4, 10, 0.5), format="csr").to_bytes())
    struct.pack_into("<i", csr, 48 + 5 * 8, 99)  # first column index out of range
    with pytest.raises(mk.CorruptDataError, match="out of range|increasing"):
        mk.SparseMatrix.from_bytes(_reseal(bytes(csr)))
    nnz = bytearray(b)
    struct.pack_into("<q", nnz, 32, 2**62)
    with pytest.raises(mk.CorruptDataError):
        mk.SparseMatrix.from_bytes(_reseal(bytes(nnz)))


def test_prune_methods():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 200)).astype(np.float32)
    p = mk.prune(w, 0.7)
    assert np.all(np.count_nonzero(p, axis=1) == 60)
    kept_min = np.min(np.where(p != 0, np.abs(w), np.inf), axis=1)
    dropped_max = np.max(np.where(p == 0, np.abs(w), -np.inf), axis=1)
    assert np.all(kept_min >= dropped_max)
    np.testing.assert_array_equal(p[p != 0], w[p != 0])
    g = mk.prune(w, 0.9, method="global")
    assert np.count_nonzero(g) == w.size - round(0.9 * w.size)
    assert np.min(np.abs(g[g != 0])) >= np.max(np.abs(w[g == 0]))
    s = mk.prune(w[:, :198], method="2:4")
    groups = np.pad(s, ((0, 0), (0, 2))).reshape(64, -1, 4)
    assert np.all(np.count_nonzero(groups, axis=2) <= 2)
    assert np.count_nonzero(s) == 64 * (49 * 2 + 2)
    mk.SparseMatrix.from_dense(s, format="2:4")  # accepted
    assert np.count_nonzero(mk.prune(w, 0.0)) == w.size and np.count_nonzero(mk.prune(w, 1.0)) == 0
    b = mk.prune(w.astype(BF16), 0.5)
    assert b.dtype == BF16 and np.count_nonzero(b.astype(np.float32)) == w.size // 2


CUDA = mk.info()["cuda_available"]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "csr"])
@pytest.mark.parametrize("xdtype", ["float32", "float16", "bfloat16"])
def test_spmm_cuda(fmt, xdtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(10)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[xdtype]
    for rows, cols, tokens in [(37, 131, 1), (256, 512, 4), (300, 1000, 8), (64, 128, 33)]:
        w = random_sparse(rng, rows, cols, 0.7)
        if fmt == "2:4":
            w = mk.prune(w, method="2:4")
        sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype="float16")
        spg = sp.to("cuda")
        assert spg.device == "cuda:0"
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        xg = torch.from_numpy(x).to("cuda", tdt)
        out = torch.full((tokens, rows), float("nan"), device="cuda", dtype=tdt)
        mk.spmm(spg, xg, out=out)
        torch.cuda.synchronize()
        check_spmm(sp, xg.float().cpu().numpy().astype(NP_DTYPES[xdtype]), out.float().cpu().numpy().astype(NP_DTYPES[xdtype]))
    with pytest.raises(ValueError, match="sparse matrix is on cpu"):
        mk.spmm(sp, xg)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "csr"])
@pytest.mark.parametrize("vdtype", ["int8", "float32", "bfloat16"])
def test_spmm_cuda_value_dtypes(fmt, vdtype):
    # int8 values (per-row scale applied after the sum) and the other value dtypes; 3 tokens (NT = 2)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(13)
    w = random_sparse(rng, 45, 150, 0.6)
    if fmt == "2:4":
        w = mk.prune(w, method="2:4")
    sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype=vdtype)
    x = rng.standard_normal((3, 150)).astype(np.float32)
    out = torch.full((3, 45), float("nan"), device="cuda")
    mk.spmm(sp.to("cuda"), torch.from_numpy(x).to("cuda"), out=out)
    torch.cuda.synchronize()
    check_spmm(sp, x, out.cpu().numpy())


def test_fuzz_corrupt_csr_and_bytes_never_crash():
    """Random damage to CSR arrays and to (re-checksummed) bytes: a clear error or a valid matrix."""
    rng = np.random.default_rng(12)
    w = random_sparse(rng, 12, 70, 0.7)
    m = sps.csr_array(w)
    for it in range(300):
        indptr, indices, data = m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.copy()
        kind = it % 4
        if kind == 0:
            indptr[rng.integers(0, len(indptr))] += int(rng.integers(-5, 6))
        elif kind == 1:
            indices[rng.integers(0, len(indices))] = int(rng.integers(-100, 200))
        elif kind == 2:
            indices = indices[: int(rng.integers(0, len(indices)))]
        else:
            indptr = indptr[: int(rng.integers(1, len(indptr) + 1))]
        bad = corrupt_csr(indptr, indices, data[: len(indices)] if kind == 2 else data, (12, 70))
        try:
            sp = mk.SparseMatrix.from_scipy(bad, format=("bitmap", "csr", "2:4")[it % 3])
        except ValueError:
            continue
        d = sp.to_dense()  # accepted: then it must be exactly what the arrays say
        assert d.shape == (12, 70)
    b = mk.SparseMatrix.from_dense(w, format="csr").to_bytes()
    b2 = mk.SparseMatrix.from_dense(w).to_bytes()
    for it in range(300):
        src = b if it % 2 else b2
        bad = bytearray(src)
        for _ in range(int(rng.integers(1, 4))):
            bad[int(rng.integers(0, len(bad) - 8))] = int(rng.integers(0, 256))
        try:
            sp = mk.SparseMatrix.from_bytes(_reseal(bytes(bad)))
        except mk.CorruptDataError:
            continue
        if sp.shape[1] > 10_000:  # a damaged CSR header may still describe a valid (wider) matrix
            continue
        x = rng.standard_normal((3, sp.shape[1])).astype(np.float32)
        mk.spmm(sp, x)  # structurally valid: runs in bounds (ASan build checks this)


@pytest.mark.skipif(CUDA, reason="checks the error without a usable GPU")
def test_cuda_unavailable_raises_runtime_error():
    sp = mk.SparseMatrix.from_dense(np.eye(4, dtype=np.float32))
    with pytest.raises(RuntimeError, match="CUDA|cuda"):
        sp.to("cuda")
