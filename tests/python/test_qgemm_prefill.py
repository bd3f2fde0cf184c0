"""qgemm prefill (issue 14): the dequantize-once GEMM that serves many tokens.

From 8-32 tokens (see cpu/qgemm_prefill.cpp for the thresholds) each block of weight rows is
dequantized once per call and multiplied with every token: in bf16 (vdpbf16ps) on CPUs with
AVX512-BF16 when approximate activations are allowed (the Python default), in fp32 otherwise and for
exact=True. Checked against the float64 product of dequantize(qm) on random data, poisoned outputs,
every ISA the machine has, with the error bounds documented in memkernels/quant.h.
"""
import zlib

import numpy as np
import pytest

import memkernels as mk

from conftest import BF16, int8_path_bound

CPU_FLAGS = open("/proc/cpuinfo").read().split()
HAS_BF16 = "avx512_bf16" in CPU_FLAGS
HAS_VNNI = "avx512_vnni" in CPU_FLAGS
INT8_FORMATS = ("int4", "int4_sym", "int4_min", "int8", "int3", "int3_sym", "int2", "int2_sym", "nf4")
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)
U_F32 = 2.0 ** -24

# (format, group) pairs: every code width, zero points, mins, NF4 with and without double-quantised scales
FORMATS = [("int4", 128), ("int4", 32), ("int4_sym", 64), ("int4_min", 32), ("nf4", 64), ("nf4dq", 64),
           ("int8", None), ("int8", 32), ("int3", 128), ("int2", 64), ("int3_sym", 32), ("int2_sym", 32)]


def make(fmt, n, k, group, seed):
    r = np.random.default_rng(seed)
    w = (r.standard_normal((n, k)) * r.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    dq = fmt == "nf4dq"
    qm = mk.quantize(w, "nf4" if dq else fmt, group_size=group, double_quant=dq)
    return qm, mk.dequantize(qm).astype(np.float64)


def prefill_kind(isa, fmt, tokens, exact):
    """Which kernel serves the call: 'bf16', 'fp32' (the dequantize-once kernels) or None (the
    decode paths), as documented in memkernels/quant.h and cpu/qgemm_prefill.cpp."""
    base = fmt  # nf4dq (double-quantised scales) keeps the documented layout: no int8 path
    int8_format = base in INT8_FORMATS
    fp32_min = 12 if isa == "avx512" else 8
    if exact:
        return "fp32" if tokens >= fp32_min else None
    if isa == "avx512" and HAS_BF16:
        return "bf16" if tokens >= (32 if int8_format else 12) else None
    int8_path = isa == "avx2" or (isa == "avx512" and HAS_VNNI)
    need = 65 if int8_format and int8_path else fp32_min
    return "fp32" if tokens >= need else None


def bound(kind, d, x64, out_dtype):
    """Per-element error bound against the float64 product (rows: tokens)."""
    k = d.shape[1]
    mag = np.abs(x64) @ np.abs(d).T  # sum_k |w x|
    summation = k * U_F32 * mag * 1.01
    if kind == "bf16":
        b = (2 * U_BF16 + U_BF16 ** 2) * mag + summation
    else:
        b = summation
    return b, mag


def out_rounding(ref, dtype):
    return np.abs(ref) * {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[np.dtype(dtype).name] * 1.01


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("exact", [False, True])
def test_prefill_formats(isa, fmt, group, exact):
    n, k = 53, 640 if group in (128, None) else 576
    if group == 128:
        k = 768
    qm, d = make(fmt, n, k, group, seed=zlib.crc32(f"{fmt}{group}".encode()) % 1000)
    r = np.random.default_rng(5)
    bias = r.standard_normal(n).astype(np.float32)
    for tokens in (16, 33, 70):
        x = (r.standard_normal((tokens, k)) * r.uniform(0.1, 3.0, (tokens, 1))).astype(np.float32)
        out = np.full((tokens, n), np.nan, np.float32)
        y = mk.qgemm(x, qm, bias, out=out, exact=exact)
        assert y is out or np.shares_memory(y, out)
        x64 = x.astype(np.float64)
        ref = x64 @ d.T + bias
        kind = prefill_kind(isa, fmt, tokens, exact) or "fp32"
        b, mag = bound(kind, d, x64, np.float32)
        if kind == "fp32" and prefill_kind(isa, fmt, tokens, exact) is None:
            # a decode path (int8 activations): its own documented bound
            b = int8_path_bound(qm, d, x) * 1.001 + 1e-4 * mag
        err = np.abs(out - ref)
        assert np.isfinite(out).all()
        assert (err <= b + out_rounding(ref, np.float32) + 1e-30).all(), (fmt, tokens, exact, (err / mag).max())


@pytest.mark.parametrize("tokens", [16, 17, 31, 32, 47, 64, 65, 100, 129, 300])
@pytest.mark.parametrize("n", [1, 7, 49, 97])
def test_prefill_shapes(isa, tokens, n):
    """Odd row counts (partial row blocks), odd token counts (partial token blocks), K not a multiple
    of the 256-weight slice; both kernels."""
    k = 832  # 3 whole slices of 256 and a 64-weight tail
    qm, d = make("int4", n, k, 64, seed=n * 1000 + tokens)
    r = np.random.default_rng(tokens)
    x = r.standard_normal((tokens, k)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 @ d.T
    for exact in (False, True):
        out = np.full((tokens, n), np.nan, np.float32)
        mk.qgemm(x, qm, out=out, exact=exact)
        kind = prefill_kind(isa, "int4", tokens, exact)
        if kind is None:
            continue  # the decode paths: tests/python/test_quant.py
        b, mag = bound(kind, d, x64, np.float32)
        assert (np.abs(out - ref) <= b + 1e-30).all(), (kind, tokens, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float16] + ([BF16] if BF16 is not None else []))
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("nf4", 64), ("int8", None)])
def test_prefill_dtypes_and_bias(isa, dtype, fmt, group):
    """fp16 / bf16 x, bias and out: x as given is the input of the bound, out is rounded once."""
    n, k, tokens = 61, 768, 40
    qm, d = make(fmt, n, k, group, seed=11)
    r = np.random.default_rng(12)
    x = r.standard_normal((tokens, k)).astype(dtype)
    bias = r.standard_normal(n).astype(dtype)
    x64 = x.astype(np.float64)
    ref = x64 @ d.T + bias.astype(np.float64)
    for exact in (False, True):
        out = np.full((tokens, n), np.nan, dtype)
        mk.qgemm(x, qm, bias, out=out, exact=exact)
        kind = prefill_kind(isa, fmt, tokens, exact)
        got = out.astype(np.float64)
        b, mag = bound(kind or "fp32", d, x64, dtype)
        if kind is None:  # the int8 decode path below its threshold
            b = int8_path_bound(qm, d, x64) * 1.001 + 1e-4 * mag
        # out rounding: of the fp32 result, whose distance to ref is at most b
        assert (np.abs(got - ref) <= b * 1.01 + out_rounding(np.abs(ref) + b, dtype) + 1e-30).all(), (dtype, exact)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4_sym", 32), ("int4_min", 32), ("nf4", 64), ("nf4dq", 64),
                                       ("int8", None), ("int3", 128)])
def test_prefill_bf16_error_is_bf16_rounding(fmt, group):
    """The bf16 kernel computes the fp32 sum of products of bf16-rounded weights and x (so its error
    is the bf16 one, not worse: the 4-bit formats build their bf16 weights from a per-group table,
    the others convert dequantized floats), and the documented bound holds with a margin that is
    not vacuous."""
    if not HAS_BF16 or mk.info()["best_cpu_isa"] != "avx512":
        pytest.skip("no AVX512-BF16 on this CPU")
    import ml_dtypes

    n, k, tokens = 67, 1024, 48
    qm, d = make(fmt, n, k, group, seed=21)
    x = np.random.default_rng(22).standard_normal((tokens, k)).astype(np.float32)
    y = mk.qgemm(x, qm)
    xb = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    db = d.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    mag = np.abs(xb) @ np.abs(db).T
    np.testing.assert_allclose(y, xb @ db.T, rtol=0, atol=float((k * U_F32 * mag).max()))
    ref = x.astype(np.float64) @ d.T
    b, mag = bound("bf16", d, x.astype(np.float64), np.float32)
    err = np.abs(y - ref)
    assert (err <= b).all()
    assert err.max() > 1e-2 * (2 * U_BF16 * mag).max()  # really rounded to bf16: not the exact path
    # exact=True: fp32 activations
    ye = mk.qgemm(x, qm, exact=True)
    assert (np.abs(ye - ref) <= k * U_F32 * mag).all()


@pytest.mark.parametrize("exact", [False, True])
def test_prefill_thread_count_does_not_change_results(exact):
    """Threads split the rows: each output is computed in one order whatever the thread count."""
    qm, _ = make("nf4", 301, 1280, 64, seed=31)
    x = np.random.default_rng(32).standard_normal((50, 1280)).astype(np.float32)
    old = mk.num_threads()
    try:
        mk.set_num_threads(1)
        y1 = mk.qgemm(x, qm, exact=exact)
        mk.set_num_threads(2)
        y2 = mk.qgemm(x, qm, exact=exact)
    finally:
        mk.set_num_threads(old)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("exact", [False, True])
def test_prefill_nonfinite_x_stays_in_its_token(isa, exact):
    """NaN / inf in one token's x makes that token's outputs non-finite and leaves the others exact."""
    n, k, tokens = 40, 512, 36
    qm, d = make("nf4", n, k, 64, seed=41)
    x = np.random.default_rng(42).standard_normal((tokens, k)).astype(np.float32)
    x[5, 100] = np.nan
    x[20, 7] = np.inf
    out = np.full((tokens, n), 0.0, np.float32)
    mk.qgemm(x, qm, out=out, exact=exact)
    assert np.isnan(out[5]).all()
    assert not np.isfinite(out[20]).any()
    keep = [t for t in range(tokens) if t not in (5, 20)]
    x64 = x[keep].astype(np.float64)
    kind = prefill_kind(isa, "nf4", tokens, exact)
    b, _ = bound(kind, d, x64, np.float32)
    assert (np.abs(out[keep] - x64 @ d.T) <= b).all()


def test_prefill_strided_x_and_out():
    """x and out rows apart by more than their length (views of bigger arrays)."""
    n, k, tokens = 50, 512, 24
    qm, d = make("int3", n, k, 128, seed=51)
    big = np.random.default_rng(52).standard_normal((tokens, k + 96)).astype(np.float32)
    x = big[:, 32:32 + k]
    outbig = np.full((tokens, n + 13), np.nan, np.float32)
    out = outbig[:, 5:5 + n]
    mk.qgemm(x, qm, out=out, exact=True)
    x64 = x.astype(np.float64)
    b, _ = bound("fp32", d, x64, np.float32)
    assert (np.abs(out - x64 @ d.T) <= b).all()
    assert np.isnan(outbig[:, :5]).all() and np.isnan(outbig[:, 5 + n:]).all()  # nothing written outside
