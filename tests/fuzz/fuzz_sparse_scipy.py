"""Fuzzes SparseMatrix.from_scipy with CSR arrays (indptr / indices / data) built from fuzz bytes.

The arrays are set on a scipy csr_array directly, past SciPy's own checks, as a careless caller
could. Accepted input must be a valid CSR matrix: the harness then densifies it in Python
(duplicates summed) and compares with to_dense(); an index that Python finds out of range after
memkernels accepted it is a finding.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sps  # noqa: E402

import memkernels as mk  # noqa: E402
from fuzz_common import feature, finite_close, main  # noqa: E402

EXTREME = [-1, -(2**31), 2**31 - 1, 2**31, 2**32 + 1, 2**40, -(2**40)]
TOL = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2, "int8": 1e-2}


def _int(fdp, lo, hi, wide):
    if fdp.ConsumeProbability() < 0.05:
        v = EXTREME[fdp.ConsumeIntInRange(0, len(EXTREME) - 1)]
        return v if wide or -(2**31) <= v < 2**31 else -1
    return fdp.ConsumeIntInRange(lo, hi)


def build(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    rows, cols = fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 130)
    itype = np.int64 if fdp.ConsumeBool() else np.int32
    wide = itype == np.int64
    nnz = fdp.ConsumeIntInRange(0, 40)
    n_ptr = rows + 1 + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeProbability() < 0.1 else 0)
    if fdp.ConsumeProbability() < 0.7:  # mostly monotonic row pointers ending at nnz
        cuts = sorted(fdp.ConsumeIntInRange(0, nnz) for _ in range(max(n_ptr - 2, 0)))
        indptr = ([0] + cuts + [nnz])[:max(n_ptr, 0)]
        if indptr and fdp.ConsumeProbability() < 0.3:
            indptr[fdp.ConsumeIntInRange(0, len(indptr) - 1)] = _int(fdp, -2, nnz + 2, wide)
    else:
        indptr = [_int(fdp, -2, nnz + 2, wide) for _ in range(max(n_ptr, 0))]
    n_idx = nnz + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeProbability() < 0.1 else 0)
    indices = [_int(fdp, -1, cols, wide) if fdp.ConsumeProbability() < 0.2 else fdp.ConsumeIntInRange(0, max(cols - 1, 0))
               for _ in range(max(n_idx, 0))]
    n_val = nnz + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeProbability() < 0.1 else 0)
    vdt = [np.float64, np.float32, np.float16, np.int32][fdp.ConsumeIntInRange(0, 3)]
    vals = [float(fdp.ConsumeIntInRange(-8, 8)) for _ in range(max(n_val, 0))]
    if vals and fdp.ConsumeProbability() < 0.05:
        vals[0] = [np.nan, np.inf, 1e30][fdp.ConsumeIntInRange(0, 2)]
    fmt = mk.sparse.FORMATS[fdp.ConsumeIntInRange(0, 2)]
    dtype = [None, "float32", "float16", "bfloat16", "int8"][fdp.ConsumeIntInRange(0, 4)]
    m = sps.csr_array((np.array([1.0]), np.array([0]), np.array([0, 1])), shape=(1, 1))
    with np.errstate(all="ignore"):
        data_arr = np.array(vals, np.float64).astype(vdt) if vdt != np.int32 else np.array(vals, np.float64).astype(
            np.int64).astype(np.int32, casting="unsafe")
    m.indptr = np.array(indptr, np.int64).astype(itype)
    m.indices = np.array(indices, np.int64).astype(itype)
    m.data = data_arr
    m._shape = (rows, cols)
    return m, fmt, dtype


def one_input(data: bytes) -> None:
    m, fmt, dtype = build(data)
    indptr, indices, vals = (np.asarray(a) for a in (m.indptr, m.indices, m.data))
    sp = mk.SparseMatrix.from_scipy(m, format=fmt, dtype=dtype)
    feature(f"ok {sp.format} {sp.dtype} {sp.nnz > 0}")
    rows, cols = m.shape
    if sp.shape != (rows, cols):
        raise AssertionError(f"shape {sp.shape} != {(rows, cols)}")
    # memkernels accepted the arrays: they must describe a valid CSR matrix.
    ref = np.zeros((rows, cols), np.float64)
    if len(indptr) != rows + 1 or len(indices) != len(vals) or indptr[0] != 0 or indptr[-1] != len(indices):
        raise AssertionError("accepted CSR arrays of inconsistent lengths")
    for r in range(rows):
        if indptr[r + 1] < indptr[r]:
            raise AssertionError("accepted a decreasing indptr")
        for k in range(int(indptr[r]), int(indptr[r + 1])):
            if not 0 <= indices[k] < cols:
                raise AssertionError(f"accepted column index {indices[k]} outside [0, {cols})")
            ref[r, indices[k]] += float(vals[k])
    vd = sp.dtype
    if vd in ("float16", "bfloat16", "int8") and not np.all(np.abs(ref) <= 60000):
        return  # rounding/overflow of huge values is not this oracle's business
    finite_close(sp.to_dense("float32"), ref, TOL[vd], "from_scipy vs Python densify")


if __name__ == "__main__":
    main(one_input)
