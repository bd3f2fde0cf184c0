"""The CPU row-interleaved layout of int4 / int4_sym / int4_min / int8 / int3 / int3_sym / int2 / int2_sym /
nf4 (quant.h, issue 14): the int8-
activation kernels and the exact paths on it, row counts that leave a partial last block of 16, and
the bytes written by to_bytes() staying in the documented (version 1) layout."""
import numpy as np
import pytest

import memkernels as mk
from conftest import int8_path_bound, int8_rounded_x

VNNI = "avx512_vnni" in open("/proc/cpuinfo").read()
CASES = [("int4", 32), ("int4", 128), ("int4_sym", 32), ("int4_sym", 64), ("int4_min", 32), ("int4_min", 128),
         ("int8", 32), ("int8", None), ("int3", 32), ("int3", 128), ("int3_sym", 64), ("int2", 64), ("int2", 128),
         ("int2_sym", 32), ("nf4", 64), ("nf4", 32)]
BITS = {"int3": 3, "int3_sym": 3, "int2": 2, "int2_sym": 2}
NF4 = np.asarray(mk._C.nf4_codebook(), np.float64)
NF4_INT8 = np.rint(127 * NF4.astype(np.float32)) / 127  # the levels the integer path uses (quant.h)


def rng(seed):
    return np.random.default_rng(seed)


def random_codes(fmt, n, k, group, seed):
    """Codes, scales (both signs, some 0), zeros, mins and the float64 matrix from the formula."""
    r = rng(seed)
    g = k if group is None else group
    groups = k // g
    scales = (r.standard_normal((n, groups)) * 0.1).astype(np.float32)
    scales[r.random((n, groups)) < 0.1] = 0.0
    s = np.repeat(scales.astype(np.float64), g, 1)
    zeros = mins = None
    if fmt == "int8":
        codes = r.integers(-128, 128, (n, k), dtype=np.int8).view(np.uint8)
        d = s * codes.view(np.int8)
    elif fmt in BITS:
        b = BITS[fmt]
        codes = r.integers(0, 2 ** b, (n, k), dtype=np.uint8)
        if fmt.endswith("_sym"):
            d = s * (codes.astype(np.float64) - 2 ** (b - 1))
        else:
            zeros = r.integers(0, 2 ** b, (n, groups), dtype=np.uint8)
            d = s * (codes.astype(np.float64) - np.repeat(zeros, g, 1))
    elif fmt == "nf4":
        codes = r.integers(0, 16, (n, k), dtype=np.uint8)
        d = s * NF4[codes]
    else:
        codes = r.integers(0, 16, (n, k), dtype=np.uint8)
        if fmt == "int4":
            zeros = r.integers(0, 16, (n, groups), dtype=np.uint8)
            d = s * (codes.astype(np.float64) - np.repeat(zeros, g, 1))
        elif fmt == "int4_sym":
            d = s * (codes.astype(np.float64) - 8)
        else:
            mins = r.standard_normal((n, groups)).astype(np.float32)
            d = (np.repeat(scales, g, 1) * codes.astype(np.float32)).astype(np.float64) + np.repeat(mins, g, 1)
    qm = mk.pack_quantized(fmt, codes, scales, zeros=zeros, mins=mins, group_size=group)
    return qm, d, (codes, scales, zeros, mins)


def int8_levels(qm, d, group):
    """nf4 on the integer path: each level L as round(127 L) / 127, times the group scale."""
    s = np.repeat(qm.scales().astype(np.float64), group, 1)
    lev = np.divide(d, s, out=np.zeros_like(d), where=s != 0)
    idx = np.abs(lev[..., None] - NF4).argmin(-1)
    return s * NF4_INT8[idx]




@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("n", [1, 7, 16, 17, 40])
def test_int8_path_partial_row_blocks(isa, fmt, group, n):
    k = 160 if group in (32, None) else 384 if group == 128 else 192
    qm, d, _ = random_codes(fmt, n, k, group, seed=n * 7 + k)
    bias = rng(n).standard_normal(n).astype(np.float32)
    integer_path = isa == "avx2" or (isa == "avx512" and VNNI)
    for tokens in (1, 2, 3, 4, 5, 8, 9, 11, 13):
        X = (rng(tokens + n).standard_normal((tokens, k)) * np.linspace(0.5, 2, tokens)[:, None]).astype(np.float32)
        out = np.full((tokens, n), np.nan, np.float32)
        Y = mk.qgemm(X, qm, bias, out=out)  # the default: int8 activations
        E = mk.qgemm(X, qm, bias, exact=True)
        di = d if fmt != "nf4" else int8_levels(qm, d, group)  # the weights the integer dots use
        for t in range(tokens):
            ref = d @ X[t].astype(np.float64) + bias
            np.testing.assert_allclose(E[t], ref, rtol=1e-5, atol=1e-5 * (np.abs(d) @ np.abs(X[t])).max())
            if integer_path:
                xq = int8_rounded_x(qm, X[t])[0]
                np.testing.assert_allclose(Y[t], di @ xq + bias, rtol=2e-5,
                                           atol=2e-5 * (np.abs(di) @ np.abs(xq)).max() + 1e-6, err_msg=str(t))
            else:
                np.testing.assert_array_equal(Y[t], E[t])
        # no bias and an fp32 out: the kernel writes out directly, strided rows included
        big = np.full((tokens, n + 5), np.nan, np.float32)
        Y2 = mk.qgemm(X, qm, out=big[:, :n])
        np.testing.assert_array_equal(Y2 + bias, Y)  # the same sums, the bias added in fp32 either way
        assert np.isnan(big[:, n:]).all()


@pytest.mark.parametrize("fmt,group", CASES)
def test_dequantize_and_half_precision_on_the_layout(isa, fmt, group):
    n, k = 35, 256
    qm, d, _ = random_codes(fmt, n, k, group, seed=5)
    np.testing.assert_allclose(mk.dequantize(qm), d, rtol=1e-6, atol=1e-7)
    x = rng(6).standard_normal((4, k)).astype(np.float16)
    y = mk.qgemm(x, qm, exact=True)
    ref = x.astype(np.float64) @ d.T
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def documented_payload(fmt, n, k, group, codes, scales, zeros, mins):
    """The version-1 payload of quant.h built here from the codes: chunks of 32, rows after each other,
    then 64-byte aligned scales [N][G], zeros [N][G], mins [N][G]."""
    def align(b):
        return b + bytes(-len(b) % 64)

    if fmt == "int8":
        body = codes.tobytes()
    elif fmt in BITS:  # 2-bit: byte i of a chunk holds weights i, i + 8, i + 16, i + 24; 3-bit: + uint32 of bit 2
        c = codes.reshape(n, k // 32, 4, 8).astype(np.uint32)
        low = ((c[:, :, 0] & 3) | ((c[:, :, 1] & 3) << 2) | ((c[:, :, 2] & 3) << 4) | ((c[:, :, 3] & 3) << 6))
        low = low.astype(np.uint8)
        if BITS[fmt] == 2:
            body = low.tobytes()
        else:
            hi = ((codes.reshape(n, k // 32, 32).astype(np.uint32) >> 2) << np.arange(32, dtype=np.uint32)).sum(
                axis=2, dtype=np.uint32).astype("<u4")
            body = np.concatenate([low, hi.view(np.uint8).reshape(n, k // 32, 4)], axis=2).tobytes()
    else:
        c = codes.reshape(n, k // 32, 2, 16)
        body = (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).tobytes()
    out = align(body) + align(scales.tobytes())
    if zeros is not None:
        out += align(zeros.tobytes())
    if mins is not None:
        out += align(mins.tobytes())
    return out


@pytest.mark.parametrize("fmt,group", CASES)
def test_to_bytes_writes_the_documented_layout(fmt, group):
    n, k = 21, 96 if group in (32, None) else 256
    qm, d, (codes, scales, zeros, mins) = random_codes(fmt, n, k, group, seed=11)
    b = qm.to_bytes()
    assert int.from_bytes(b[4:8], "little") == 1  # still version 1
    payload = b[64:-8]
    assert payload == documented_payload(fmt, n, k, group, codes, scales, zeros, mins)
    # and the documented bytes (a file written before the interleaved layout) load and compute right
    r = mk.from_bytes(b)
    np.testing.assert_array_equal(mk.dequantize(r), mk.dequantize(qm))
    x = rng(12).standard_normal(k).astype(np.float32)
    np.testing.assert_array_equal(mk.qgemm(x, r), mk.qgemm(x, qm))
    np.testing.assert_array_equal(r.scales(), scales)
    if mins is not None:
        np.testing.assert_array_equal(r.mins(), mins)


@pytest.mark.parametrize("fmt", ["int3", "int3_sym", "int2", "int2_sym"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_low_bit_non_finite_x_propagates(isa, fmt, bad):
    """NaN / inf in x: int8 codes cannot carry them, so the default path hands the call to the exact one."""
    n, k = 33, 192
    qm, d, _ = random_codes(fmt, n, k, 64, seed=31)
    for tokens in (1, 6):
        X = rng(tokens).standard_normal((tokens, k)).astype(np.float32)
        X[-1, 100] = bad
        out = np.full((tokens, n), np.nan, np.float32)
        Y = mk.qgemm(X, qm, out=out)
        np.testing.assert_array_equal(Y, mk.qgemm(X, qm, exact=True))
        with np.errstate(invalid="ignore", over="ignore"):
            ref = X.astype(np.float64) @ d.T
        np.testing.assert_array_equal(np.isfinite(Y), np.isfinite(ref))


@pytest.mark.parametrize("fmt,group", [("int3", 64), ("int2_sym", 128)])
def test_low_bit_many_tokens_and_long_rows(isa, fmt, group):
    """9-64 tokens (passes of 8 / 4 tokens plus a remainder) and K = 4096 + 256 on the int8 path:
    the integer sums of a whole row, the bound of quant.h (per x block: sum |w| * max|x| / 254) holds."""
    n, k = 23, 4352
    qm, d, _ = random_codes(fmt, n, k, group, seed=41)
    for tokens in (9, 31, 64):
        X = rng(tokens).standard_normal((tokens, k)).astype(np.float32) * 3
        out = np.full((tokens, n), np.nan, np.float32)
        Y = mk.qgemm(X, qm, out=out)
        ref = X.astype(np.float64) @ d.T
        bound = (int8_path_bound(qm, d, X) * 1.001
                 + 1e-5 * np.abs(X).astype(np.float64) @ np.abs(d).T + 1e-6)
        assert np.all(np.abs(Y - ref) <= bound)
