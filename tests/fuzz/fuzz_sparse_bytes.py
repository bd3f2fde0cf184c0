"""Fuzzes SparseMatrix.from_bytes with mutated to_bytes() output of every format.

Control byte bit 0: re-seal the trailing checksum after the mutation (reaches the structural
validation: row_ptr, masks, CSR indices, sizes). Accepted matrices must multiply (spmm) to
x @ to_dense().T and convert to SciPy and back.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import memkernels as mk  # noqa: E402
from fuzz_common import feature, finite_close, main, reseal_tail64, sparse_checksum, split_control  # noqa: E402

_X = np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)


def one_input(data: bytes) -> None:
    ctl, payload = split_control(data)
    if ctl & 1:
        payload = reseal_tail64(payload, sparse_checksum)
    sp = mk.SparseMatrix.from_bytes(payload)
    feature(f"ok {sp.format} {sp.dtype}")
    rows, cols = sp.shape
    if sp.nbytes > 8 * len(payload) + (1 << 16):
        raise AssertionError(f"accepted {len(payload)} bytes as a {sp.nbytes}-byte matrix")
    if rows * cols > 1 << 22:
        return  # valid but too big to densify cheaply (an empty matrix of a huge shape)
    dense = sp.to_dense("float32")
    if cols <= _X.shape[1]:
        x = _X[:, :cols]
        with np.errstate(all="ignore"):
            ref = x.astype(np.float64) @ dense.astype(np.float64).T
        finite_close(mk.spmm(sp, x), ref, 1e-4, "spmm vs to_dense")
    csr = sp.to_scipy()
    if csr.shape != sp.shape:
        raise AssertionError("to_scipy changed the shape")
    back = mk.SparseMatrix.from_bytes(sp.to_bytes())
    if not np.array_equal(back.to_dense("float32"), dense, equal_nan=True):
        raise AssertionError("to_bytes/from_bytes round trip changed the matrix")


if __name__ == "__main__":
    main(one_input)
