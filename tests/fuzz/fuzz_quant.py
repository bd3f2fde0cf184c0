"""Fuzzes QuantizedMatrix deserialisation (memkernels.from_bytes) with mutated to_bytes() output.

Control byte bit 0: re-seal the trailing FNV-1a checksum after the mutation (reaches the header and
size checks behind it). Accepted matrices are dequantized and multiplied (qgemm) and the product
is compared with x @ dequantize(qm).T in float64; they must also survive a to_bytes round trip.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import memkernels as mk  # noqa: E402
from fuzz_common import feature, finite_close, fnv1a64, main, reseal_tail64, split_control  # noqa: E402

_X = np.random.default_rng(0).standard_normal((3, 4096)).astype(np.float32)


def one_input(data: bytes) -> None:
    ctl, payload = split_control(data)
    if ctl & 1:
        payload = reseal_tail64(payload, fnv1a64)
    qm = mk.from_bytes(payload)
    feature(f"ok {qm.format} {qm.double_quant} {qm.group_size}")
    if qm.nbytes > 1 << 22:  # a valid header can describe a big matrix only with that many bytes
        raise AssertionError(f"accepted {len(payload)} bytes as a {qm.nbytes}-byte matrix")
    w = mk.dequantize(qm)
    if w.shape != qm.shape:
        raise AssertionError(f"dequantize shape {w.shape} != {qm.shape}")
    n, k = qm.shape
    if k <= _X.shape[1]:
        x = _X[:, :k]
        with np.errstate(all="ignore"):
            ref = x.astype(np.float64) @ w.astype(np.float64).T
        # exact=True: the default int8-activation path has its own (looser) bound, tested in test_quant.py
        finite_close(mk.qgemm(x, qm, exact=True), ref, 1e-4, "qgemm vs dequantize")
    back = mk.dequantize(mk.from_bytes(qm.to_bytes()))
    if not np.array_equal(back, w, equal_nan=True):
        raise AssertionError("to_bytes/from_bytes round trip changed the matrix")


if __name__ == "__main__":
    main(one_input)
