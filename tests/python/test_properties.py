"""Hypothesis property tests: random shapes and dtypes for flash_attention, qgemm and spmm against
float64 NumPy references (poisoned outputs, dtype-relative error bounds). Bounded example counts
keep this file well under a minute."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memkernels as mk
from conftest import BF16, FLOAT_DTYPES, assert_close

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = [d.name for d in FLOAT_DTYPES]


def _dt(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _rand(seed, shape, dtype, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(_dt(dtype))


def attention_ref(q, k, v, causal, softcap):
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, KVH = k.shape[1], k.shape[2]
    k, v = np.repeat(k, H // KVH, axis=2), np.repeat(v, H // KVH, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if causal:
        s = np.where(np.arange(Sk)[None, :] > np.arange(Sq)[:, None] + Sk - Sq, -np.inf, s)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", np.divide(p, l, out=np.zeros_like(p), where=l > 0), v)


@SETTINGS
@given(batch=st.integers(1, 2), sq=st.integers(1, 40), sk=st.integers(1, 40), kvh=st.integers(1, 2),
       group=st.sampled_from([1, 2, 4]), d=st.sampled_from([1, 7, 16, 32, 64, 80, 128]),
       dtype=st.sampled_from(DTYPE_NAMES), causal=st.booleans(), softcap=st.sampled_from([None, 5.0]),
       seed=st.integers(0, 2**16))
def test_flash_attention_shapes_dtypes(batch, sq, sk, kvh, group, d, dtype, causal, softcap, seed):
    q = _rand(seed, (batch, sq, kvh * group, d), dtype)
    k = _rand(seed + 1, (batch, sk, kvh, d), dtype)
    v = _rand(seed + 2, (batch, sk, kvh, d), dtype)
    out = np.full(q.shape, np.nan, dtype=q.dtype)
    got = mk.flash_attention(q, k, v, causal=causal, softcap=softcap, out=out)
    assert got is out and got.dtype == q.dtype
    assert_close(got, attention_ref(q, k, v, causal, softcap), dtype, "flash_attention")


@SETTINGS
@given(fmt=st.sampled_from(["int8", "int8_g", "int4", "int4_sym", "int4_min", "int3", "int3_sym", "int2", "int2_sym",
                           "nf4"]),
       n=st.integers(1, 37), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]),
       tokens=st.integers(1, 9), dtype=st.sampled_from(DTYPE_NAMES), bias=st.booleans(), vector=st.booleans(),
       seed=st.integers(0, 2**16))
def test_qgemm_shapes_dtypes(fmt, n, groups, group, tokens, dtype, bias, vector, seed):
    k = groups * group
    w = _rand(seed, (n, k), "float32")
    if fmt == "int8_g":  # int8 in groups (GGUF Q8_0 is group 32) rather than per channel
        qm = mk.quantize(w, "int8", group_size=group)
    else:
        qm = mk.quantize(w, fmt, group_size=None if fmt == "int8" else group)
    wq = mk.dequantize(qm).astype(np.float64)  # the exact weights qgemm multiplies by
    x = _rand(seed + 1, (tokens, k), dtype)
    b = _rand(seed + 2, (n,), dtype) if bias else None
    ref = x.astype(np.float64) @ wq.T + (0.0 if b is None else b.astype(np.float64))
    if vector:
        got = mk.qgemm(x[0], qm, b, exact=True)
        assert got.shape == (n,) and got.dtype == x.dtype
        assert_close(got, ref[0], dtype, "qgemm 1-D")
    else:
        out = np.full((tokens, n), np.nan, dtype=x.dtype)
        got = mk.qgemm(x, qm, b, out=out, exact=True)
        assert got is out
        # Accumulation over k terms: allow for the rounding of the dot products in fp32.
        assert_close(got, ref, dtype, "qgemm")


@SETTINGS
@given(fmt=st.sampled_from(["bitmap", "2:4", "csr"]), rows=st.integers(1, 40), cols=st.integers(1, 150),
       tokens=st.integers(1, 9), sparsity=st.floats(0.0, 1.0), vdtype=st.sampled_from(["float32", "float16",
                                                                                        "bfloat16", "int8"]),
       xdtype=st.sampled_from(DTYPE_NAMES), seed=st.integers(0, 2**16))
def test_spmm_shapes_dtypes(fmt, rows, cols, tokens, sparsity, vdtype, xdtype, seed):
    w = mk.prune(_rand(seed, (rows, cols), "float32"), sparsity, method="2:4" if fmt == "2:4" else "magnitude")
    sp = mk.SparseMatrix.from_dense(w, format=fmt, dtype=vdtype)
    assert sp.shape == (rows, cols)
    ws = sp.to_dense("float32").astype(np.float64)  # the stored (rounded) weights
    nz = w != 0
    assert np.all(ws[~nz] == 0), "an entry appeared where w is 0"
    x = _rand(seed + 1, (tokens, cols), xdtype)
    out = np.full((tokens, rows), np.nan, dtype=x.dtype)
    got = mk.spmm(sp, x, out=out)
    assert got is out
    assert_close(got, x.astype(np.float64) @ ws.T, xdtype, "spmm")
    # The stored weights themselves are w rounded to the value dtype.
    tol = {"float32": 1e-7, "float16": 1e-3, "bfloat16": 8e-3, "int8": 1.0 / 127}[vdtype]
    err = np.abs(ws - w.astype(np.float64))
    bound = tol * np.maximum(np.abs(w), np.abs(w).max(axis=1, keepdims=True) if vdtype == "int8" else 0)
    assert np.all(err <= bound + 1e-30), f"stored values off by up to {err.max()}"


@SETTINGS
@given(n=st.integers(0, 6), dtype=st.sampled_from(DTYPE_NAMES + ["float64", "int32", "uint8"]),
       ndim=st.integers(1, 5))
def test_flash_attention_rejects_bad_shapes_and_dtypes(n, dtype, ndim):
    """Any rank other than 4 or any dtype other than the three float types raises ValueError/TypeError."""
    shape = (1,) * (ndim - 1) + (max(n, 1),)
    a = np.ones(shape, dtype=_dt(dtype))
    if ndim == 4 and dtype in DTYPE_NAMES:
        mk.flash_attention(a, a, a)  # valid: must work
        return
    with pytest.raises((ValueError, TypeError)):
        mk.flash_attention(a, a, a)
