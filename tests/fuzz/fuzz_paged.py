"""Fuzzes paged_attention_raw with page tables (kv_indptr, kv_indices, kv_last_page_len,
qo_indptr) built from fuzz bytes: mostly well-formed tables with some entries replaced by
out-of-range, negative or extreme values, wrong lengths, and q row counts that disagree.

Accepted tables must be valid: the harness then gathers K/V in Python from the same tables and
compares the output with a float64 reference (causal aligned to the end of each sequence).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402
import numpy as np  # noqa: E402

import memkernels as mk  # noqa: E402
from fuzz_common import feature, finite_close, main  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from test_paged import reference  # noqa: E402  (the float64 reference the paged tests use)

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = np.dtype(np.float32)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16, "int8": np.float32}
TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2, "int8": 1e-4}
EXTREME = [-1, -(2**31), 2**31 - 1, 2**30, 1 << 20]


def _idx(fdp, lo, hi):
    if fdp.ConsumeProbability() < 0.04:
        return EXTREME[fdp.ConsumeIntInRange(0, len(EXTREME) - 1)]
    return fdp.ConsumeIntInRange(lo, hi)


def _mutate(fdp, arr, lo, hi):
    if arr and fdp.ConsumeProbability() < 0.3:
        arr[fdp.ConsumeIntInRange(0, len(arr) - 1)] = _idx(fdp, lo, hi)
    if fdp.ConsumeProbability() < 0.05:
        arr = arr[:-1] if fdp.ConsumeBool() else arr + [_idx(fdp, lo, hi)]
    return arr


def build(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    dtype = ["float32", "float16", "bfloat16", "int8"][fdp.ConsumeIntInRange(0, 3)]
    num_pages, ps = fdp.ConsumeIntInRange(0, 6), fdp.ConsumeIntInRange(1, 5)
    kvh, group, D = fdp.ConsumeIntInRange(1, 2), fdp.ConsumeIntInRange(1, 2), fdp.ConsumeIntInRange(1, 9)
    batch = fdp.ConsumeIntInRange(0, 4)
    counts = [fdp.ConsumeIntInRange(0, 3) for _ in range(batch)]
    kv_indptr = list(np.concatenate([[fdp.ConsumeIntInRange(0, 1)], counts]).cumsum())
    nnz = int(kv_indptr[-1]) + fdp.ConsumeIntInRange(-1, 1)
    kv_indptr = _mutate(fdp, [int(v) for v in kv_indptr], -1, nnz + 1)
    kv_indices = _mutate(fdp, [fdp.ConsumeIntInRange(0, max(num_pages - 1, 0)) for _ in range(max(nnz, 0))],
                         -1, num_pages)
    last = _mutate(fdp, [fdp.ConsumeIntInRange(1, ps) for _ in range(batch)], -1, ps + 1)
    qo = None
    if fdp.ConsumeBool():
        qlens = [fdp.ConsumeIntInRange(0, 3) for _ in range(batch)]
        qo = _mutate(fdp, [int(v) for v in np.concatenate([[0], qlens]).cumsum()], -1, 8)
        total_q = (qo[-1] if qo else 0) + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeProbability() < 0.1 else 0)
    else:
        total_q = batch + (fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeProbability() < 0.1 else 0)
    total_q = int(min(max(total_q, 0), 64))
    opts = dict(causal=fdp.ConsumeBool(), num_splits=fdp.ConsumeIntInRange(0, 3),
                softcap=[None, 2.0][fdp.ConsumeIntInRange(0, 1)], return_lse=True)
    rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 1 << 16))
    q = rng.standard_normal((total_q, kvh * group, D)).astype(DTYPES[dtype])
    shape = (num_pages, ps, kvh, D)
    scales = None
    if dtype == "int8":
        kp, vp = (rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2))
        scales = [rng.uniform(0.001, 0.02, shape[:3]).astype(np.float32) for _ in range(2)]
    else:
        kp, vp = (rng.standard_normal(shape).astype(DTYPES[dtype]) for _ in range(2))
    arrays = [np.array(a, np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32) for a in (kv_indptr, kv_indices, last)]
    qo = None if qo is None else np.array(qo, np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
    return dtype, q, kp, vp, scales, arrays, qo, opts


def one_input(data: bytes) -> None:
    dtype, q, kp, vp, scales, (kv_indptr, kv_indices, last), qo, opts = build(data)
    kw = dict(opts)
    if scales is not None:
        kw.update(k_scales=scales[0], v_scales=scales[1])
    out, lse = mk.paged_attention_raw(q, kp, vp, kv_indptr, kv_indices, last, qo, **kw)
    feature(f"ok {dtype} {len(kv_indptr)} {qo is None} {opts}")
    # Accepted: the tables must be valid, and the result must match the reference.
    batch = len(kv_indptr) - 1
    num_pages, ps = kp.shape[:2]
    if scales is not None:
        kf = kp.astype(np.float64) * scales[0][..., None]
        vf = vp.astype(np.float64) * scales[1][..., None]
    else:
        kf, vf = kp.astype(np.float64), vp.astype(np.float64)
    qrows = [(b, b + 1) for b in range(batch)] if qo is None else [(int(qo[b]), int(qo[b + 1])) for b in range(batch)]
    ref_out, ref_lse = np.zeros(q.shape), np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(batch):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        if kv_indptr[b] < 0 or kv_indptr[b + 1] > len(kv_indices) or kv_indptr[b + 1] < kv_indptr[b]:
            raise AssertionError(f"accepted kv_indptr {kv_indptr.tolist()} for {len(kv_indices)} indices")
        if np.any((pages < 0) | (pages >= num_pages)):
            raise AssertionError(f"accepted kv_indices {pages.tolist()} for {num_pages} pages")
        if len(pages) and not 1 <= last[b] <= ps:
            raise AssertionError(f"accepted kv_last_page_len {last[b]} for page_size {ps}")
        r0, r1 = qrows[b]
        if not 0 <= r0 <= r1 <= q.shape[0]:
            raise AssertionError(f"accepted q rows {r0}:{r1} of {q.shape[0]}")
        k = kf[pages].reshape(-1, *kf.shape[2:])
        v = vf[pages].reshape(-1, *vf.shape[2:])
        n = (len(pages) - 1) * ps + int(last[b]) if len(pages) else 0
        o, s = reference(q[r0:r1].astype(np.float64), k[:n], v[:n], causal=opts["causal"], softcap=opts["softcap"])
        ref_out[r0:r1], ref_lse[:, r0:r1] = o, s
    covered = np.zeros(q.shape[0], bool)
    for r0, r1 in qrows:
        covered[r0:r1] = True
    finite_close(np.asarray(out, np.float64)[covered], ref_out[covered], TOL[dtype], "paged_attention_raw out")
    got_lse = np.asarray(lse, np.float64)[:, covered]
    want_lse = ref_lse[:, covered]
    if not np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse)):
        raise AssertionError("lse: -inf rows differ")
    fin = np.isfinite(want_lse)
    finite_close(got_lse[fin], want_lse[fin], TOL[dtype] * 10, "paged_attention_raw lse")


if __name__ == "__main__":
    main(one_input)
