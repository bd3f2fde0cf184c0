"""K-quant super-block formats (q4_k, q5_k, q6_k): GGUF import bit for bit against the gguf package's
dequantizer, quantize() error bounds, qgemm (exact and int8-activation paths, every ISA) against
float64 references, serialisation, the documented layout, and bad input."""
import functools
import struct

import numpy as np
import pytest

import memkernels as mk
from conftest import (BF16, ISAS, TOLERANCE, check_int8_outlier_bound, int8_path_bound, int8_rounded_x, poisoned,
                      requires_cuda)

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

KFORMATS = ("q4_k", "q5_k", "q6_k")
GGUF_TYPE = {"q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
BITS = {"q4_k": 4, "q5_k": 5, "q6_k": 6}


def int8_path_runs(isa):
    """Whether qgemm's default takes the integer path on this ISA (AVX2, or AVX-512 with VNNI;
    AVX-512 without VNNI runs the AVX2 kernel)."""
    return isa in ("avx2", "avx512")


def random_blocks(rng, fmt, rows, cols, scale=1.0):
    """Valid random GGUF blocks: random bits with finite fp16 d (and dmin) of both signs."""
    bb = BLOCK_BYTES[fmt]
    raw = rng.integers(0, 256, size=(rows, cols // 256, bb), dtype=np.uint8)

    def put_f16(off):
        v = (rng.uniform(1e-3, 2e-2, raw.shape[:2]) * scale * rng.choice([-1, 1], raw.shape[:2])).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(*raw.shape[:2], 2)

    if fmt == "q6_k":
        put_f16(208)
    else:
        put_f16(0)
        put_f16(2)
    return raw.reshape(rows, -1)


def gguf_values(fmt, raw):
    return np.asarray(gguf.quants.dequantize(raw, T[GGUF_TYPE[fmt]]), np.float32)


# ---- GGUF import --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("rows,cols", [(1, 256), (7, 512), (33, 1280)])
def test_gguf_import_bit_exact(fmt, rows, cols):
    rng = np.random.default_rng(rows * 7 + cols + len(fmt))
    raw = random_blocks(rng, fmt, rows, cols)
    qm = mk.pack_gguf_blocks(GGUF_TYPE[fmt], raw, cols)
    assert qm.format == fmt and qm.shape == (rows, cols) and qm.group_size == 256 and qm.bits == BITS[fmt]
    want = gguf_values(fmt, raw)
    for isa in ISAS:  # dequantize on every ISA
        old = mk.info()["cpu_isa"]
        mk.set_cpu_isa(isa)
        try:
            got = mk.dequantize(qm)
        finally:
            mk.set_cpu_isa(old)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=isa)
    # our own names are accepted too; half-precision outputs are the float32 values rounded
    qm2 = mk.pack_gguf_blocks(fmt, raw, cols)
    np.testing.assert_array_equal(mk.dequantize(qm2), want)
    np.testing.assert_array_equal(mk.dequantize(qm, "float16"), want.astype(np.float16))
    # the super-block scale d is what scales() reports
    d_off = 208 if fmt == "q6_k" else 0
    d = raw.reshape(rows, cols // 256, -1)[..., d_off:d_off + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    np.testing.assert_array_equal(qm.scales(), d)


def test_gguf_file_round_trip(tmp_path):
    """Q4_K / Q5_K / Q6_K tensors written by gguf.GGUFWriter load natively, with no warning."""
    from memkernels.models.gguf import _GGUFFile
    rng = np.random.default_rng(3)
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raws = {}
    for fmt, (rows, cols) in zip(KFORMATS, [(5, 512), (3, 256), (9, 768)]):
        raws[fmt] = random_blocks(rng, fmt, rows, cols)
        w.add_tensor(f"t_{fmt}", raws[fmt], raw_dtype=T[GGUF_TYPE[fmt]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _GGUFFile(str(path))
    for t in f.tensors:
        fmt = t.name[2:]
        np.testing.assert_array_equal(np.asarray(t.data), raws[fmt])
        qm = mk.pack_gguf_blocks(t.tensor_type.name, np.asarray(t.data), int(t.shape[0]))
        np.testing.assert_array_equal(mk.dequantize(qm), gguf_values(fmt, raws[fmt]))


# ---- quantize -----------------------------------------------------------------------------------------
def layout_sections(qm):
    """(codes (N, row_bytes), sub-scales (N, SB, 16) uint8, super-scales (N, SB, 2) fp16) read from the
    serialised bytes with the layout documented in quant.h."""
    raw = qm.to_bytes()[64:-8]
    n, k = qm.shape
    sb = k // 256
    rb = k * qm.bits // 8
    al = lambda x: (x + 63) // 64 * 64  # noqa: E731
    codes = np.frombuffer(raw, np.uint8, n * rb, 0).reshape(n, rb)
    o = al(n * rb)
    sub = np.frombuffer(raw, np.uint8, n * sb * 16, o).reshape(n, sb, 16)
    o = al(o + n * sb * 16)
    sup = np.frombuffer(raw, np.float16, n * sb * 2, o).reshape(n, sb, 2)
    assert al(o + n * sb * 4) == len(raw)
    return codes, sub, sup


def unpack_codes(fmt, codes):
    """Weight-order codes (N, K) from our packed code bytes (quant.h)."""
    n, rb = codes.shape
    per = 32 * BITS[fmt]
    c = codes.reshape(n, -1, per)
    nib = c[..., :128].reshape(n, -1, 8, 16)
    q = np.concatenate([nib & 15, nib >> 4], axis=-1).reshape(n, -1, 256).astype(np.uint8)
    if fmt == "q5_k":
        hb = c[..., 128:160].reshape(n, -1, 2, 2, 8)  # half, part (low / high nibbles), 8 bytes
        bits = np.unpackbits(hb, axis=-1, bitorder="little").reshape(n, -1, 2, 2, 4, 16)  # bit j: chunk j/16
        # weight 32 * (4h + j // 16) + 16 * part + j % 16
        q5 = bits.transpose(0, 1, 2, 4, 3, 5).reshape(n, -1, 256)
        q |= q5 << 4
    elif fmt == "q6_k":
        hb = c[..., 128:192].reshape(n, -1, 2, 32)
        for h in range(2):
            for j in range(32):
                c0, i = 4 * h + j // 16, j % 16
                c1 = c0 + 2
                v = hb[:, :, h, j]
                q[:, :, 32 * c0 + i] |= (v & 3) << 4
                q[:, :, 32 * c1 + i] |= ((v >> 2) & 3) << 4
                q[:, :, 32 * c0 + 16 + i] |= ((v >> 4) & 3) << 4
                q[:, :, 32 * c1 + 16 + i] |= ((v >> 6) & 3) << 4
    return q.reshape(n, -1)


def values_from_layout(fmt, qm):
    """float32 values from the documented layout and formula (independent of the C++ dequantizer)."""
    codes, sub, sup = layout_sections(qm)
    q = unpack_codes(fmt, codes).astype(np.float32)
    n, k = qm.shape
    d = sup[..., 0].astype(np.float32)
    if fmt == "q6_k":
        sc = sub.view(np.int8).astype(np.float32)  # (n, sb, 16)
        a = np.repeat((d[..., None] * sc).reshape(n, -1), 16, axis=1)
        return a * (q - np.float32(32))
    dmin = sup[..., 1].astype(np.float32)
    a = np.repeat((d[..., None] * sub[..., :8].astype(np.float32)).reshape(n, -1), 32, axis=1)
    b = np.repeat((dmin[..., None] * sub[..., 8:].astype(np.float32)).reshape(n, -1), 32, axis=1)
    return a * q - b


@pytest.mark.parametrize("fmt", KFORMATS)
def test_quantize_layout_and_error_bound(fmt):
    rng = np.random.default_rng(11 + len(fmt))
    n, k = 13, 768
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2, (n, 1))).astype(np.float32)
    w[0, :256] = np.abs(w[0, :256])  # a super-block of non-negative weights (dmin = 0)
    w[1, 256:512] = 0.0              # an all-zero super-block
    w[2, :32] += 3.0                 # a sub-block far from 0
    qm = mk.quantize(w, fmt)
    assert qm.format == fmt and qm.group_size == 256
    deq = mk.dequantize(qm)
    np.testing.assert_array_equal(deq, values_from_layout(fmt, qm))
    assert np.all(deq[1, 256:512] == 0)
    codes, sub, sup = layout_sections(qm)
    d = sup[..., 0].astype(np.float64)
    err = (w.astype(np.float64) - deq).reshape(n, k // 256, -1, 16 if fmt == "q6_k" else 32)
    rms = np.sqrt((err ** 2).mean(-1))
    wg = w.astype(np.float64).reshape(err.shape)
    if fmt == "q6_k":
        bound = (np.abs(wg).max(-1) / 31 + d[..., None]) / 2
    else:
        qmax = 15 if fmt == "q4_k" else 31
        dmin = sup[..., 1].astype(np.float64)
        rng_j = wg.max(-1) - np.minimum(wg.min(-1), 0)
        bound = ((rng_j + dmin[..., None]) / qmax + d[..., None]) / 2
        assert np.all(sub < 64)
    assert np.all(rms <= bound * (1 + 1e-6) + 1e-12), float((rms / np.maximum(bound, 1e-30)).max())
    # and the search beats plain rounding on normal weights: RMS well under the bound on average
    assert rms.mean() < 0.8 * bound.mean()


@pytest.mark.parametrize("fmt", KFORMATS)
def test_quantize_beats_plain_rtn(fmt):
    """Per sub-block, the squared error is at most that of the plain choice on the same d / dmin."""
    rng = np.random.default_rng(21 + len(fmt))
    n, k = 9, 512
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    qm = mk.quantize(w, fmt)
    deq = mk.dequantize(qm).astype(np.float64)
    _, sub, sup = layout_sections(qm)
    sz = 16 if fmt == "q6_k" else 32
    wg = w.astype(np.float64).reshape(n, k // 256, -1, sz)
    d = sup[..., 0].astype(np.float32)[..., None, None]
    ours = ((w - deq).reshape(wg.shape) ** 2).sum(-1)
    if fmt == "q6_k":
        amax = np.abs(wg).max(-1, keepdims=True)
        sc = np.minimum(127, np.ceil(amax / (31 * d.astype(np.float64))))
        a = (d * sc.astype(np.float32)).astype(np.float64)
        qv = np.clip(np.rint(wg / a), -32, 31)
        plain = ((wg - a * qv) ** 2).sum(-1)
    else:
        qmax = 15 if fmt == "q4_k" else 31
        dmin = sup[..., 1].astype(np.float32)[..., None, None]
        lo = np.minimum(wg.min(-1, keepdims=True), 0)
        hi = wg.max(-1, keepdims=True)
        m = np.where(dmin > 0, np.minimum(63, np.ceil(-lo / np.where(dmin > 0, dmin, 1))), 0)
        sc = np.minimum(63, np.ceil((hi + dmin * m) / (qmax * d.astype(np.float64))))
        a = (d * sc.astype(np.float32)).astype(np.float64)
        b = (dmin * m.astype(np.float32)).astype(np.float64)
        qv = np.clip(np.rint((wg + b) / a), 0, qmax)
        plain = ((wg - (a * qv - b)) ** 2).sum(-1)
    assert np.all(ours <= plain * (1 + 1e-9) + 1e-15)
    assert ours.sum() < 0.9 * plain.sum()


@pytest.mark.parametrize("wdtype", [np.float16, "bf16"])
def test_quantize_low_precision_input(wdtype):
    if wdtype == "bf16":
        if BF16 is None:
            pytest.skip("ml_dtypes missing")
        wdtype = BF16
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 256)).astype(wdtype)
    a = mk.dequantize(mk.quantize(w, "q4_k"))
    b = mk.dequantize(mk.quantize(w.astype(np.float32), "q4_k"))
    np.testing.assert_array_equal(a, b)


# ---- qgemm --------------------------------------------------------------------------------------------
def reference(x, w, bias=None):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if bias is None else y + bias.astype(np.float64)


def int8_emulation(qm, x, w):
    """float64 result of the int8-activation path: x rounded per token and super-block to multiples
    of its max|x| / 127."""
    return int8_rounded_x(qm, x) @ w.astype(np.float64).T


def make_matrix(fmt, rng, n, k, imported):
    if imported:
        raw = random_blocks(rng, fmt, n, k, scale=4.0)
        qm = mk.pack_gguf_blocks(GGUF_TYPE[fmt], raw, k)
    else:
        qm = mk.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
    return qm, mk.dequantize(qm)


@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("n,k,tokens", [(1, 256, 1), (7, 512, 3), (33, 768, 8), (19, 1280, 9), (50, 256, 17),
                                        (5, 512, 64), (3, 256, 65),
                                        # whole and partial blocks of 16 rows of the CPU interleaved
                                        # layout, rows longer than the prefetch distance
                                        (16, 2048, 1), (45, 2048, 8), (17, 4096, 2), (32, 512, 11)])
def test_qgemm_exact_and_int8(isa, fmt, n, k, tokens):
    rng = np.random.default_rng(n * 131 + k + tokens + len(fmt))
    for imported in (False, True):
        qm, w = make_matrix(fmt, rng, n, k, imported)
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        x[:, ::7] *= 5  # uneven magnitudes
        bias = rng.standard_normal(n).astype(np.float32)
        ref = reference(x, w, bias)
        mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
        out = poisoned((tokens, n), np.float32)
        got = mk.qgemm(x, qm, bias, out=out, exact=True)
        assert got is out
        assert np.all(np.abs(got - ref) <= 1e-5 * mag + 1e-6), f"exact path, imported={imported}"
        got8 = mk.qgemm(x, qm, bias)
        # the documented bound against the exact product
        bound = int8_path_bound(qm, w, x)
        assert np.all(np.abs(got8 - ref) <= bound + 1e-5 * mag + 1e-6), f"int8 path bound, imported={imported}"
        if int8_path_runs(isa) and tokens <= 64:
            # the integer kernel is the product of the rounded x, to fp32 accuracy
            emu = int8_emulation(qm, x, w) + bias
            assert np.all(np.abs(got8 - emu) <= 2e-6 * mag + 1e-6), f"int8 path, imported={imported}"
            assert not np.array_equal(got8, got)
        else:
            np.testing.assert_array_equal(got8, got)


@functools.lru_cache(maxsize=None)
def large_kquant_matrix(fmt):
    """4099 x 4096: 16.8 M multiply-adds at one token, just past the threshold (quantized once)."""
    return make_matrix(fmt, np.random.default_rng(55 + len(fmt)), 4099, 4096, False)


@pytest.mark.parametrize("fmt", KFORMATS)
def test_qgemm_large_calls_split_over_threads(isa, fmt):
    """From 16 million multiply-adds a call splits its rows over the OpenMP team: bit for bit the
    one-thread result, within the documented bound (4099 rows: 256 whole blocks of 16 and a partial one)."""
    qm, w = large_kquant_matrix(fmt)
    n, k = w.shape
    rng = np.random.default_rng(56 + len(fmt))
    old = mk.num_threads()
    for tokens, exact in ((1, False), (3, True)):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        try:
            mk.set_num_threads(1)
            y1 = mk.qgemm(x, qm, out=poisoned((tokens, n), np.float32), exact=exact)
            mk.set_num_threads(2)
            y2 = mk.qgemm(x, qm, out=poisoned((tokens, n), np.float32), exact=exact)
        finally:
            mk.set_num_threads(old)
        np.testing.assert_array_equal(y1, y2)
        ref = reference(x, w, None)
        mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
        bound = (0 if exact else int8_path_bound(qm, w, x)) + 1e-5 * mag + 1e-6
        assert np.all(np.abs(y2 - ref) <= bound)


@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("exact", [True, False])
def test_qgemm_half_precision(fmt, dtype, exact):
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(len(fmt) + len(dtype))
    n, k, t = 21, 512, 5
    qm, w = make_matrix(fmt, rng, n, k, False)
    x = rng.standard_normal((t, k)).astype(dt)
    bias = rng.standard_normal(n).astype(dt)
    out = poisoned((t, n), dt)
    got = mk.qgemm(x, qm, bias, out=out, exact=exact).astype(np.float64)
    ref = reference(x.astype(np.float32), w, bias.astype(np.float32))
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    bound = 0 if exact else int8_path_bound(qm, w, x.astype(np.float32))
    tol = TOLERANCE[dtype] * (np.abs(ref) + 1e-5 * mag) + bound + 1e-5 * mag
    assert np.all(np.abs(got - ref) <= tol)


def test_qgemm_nonfinite_x_propagates():
    rng = np.random.default_rng(9)
    qm, _ = make_matrix("q4_k", rng, 4, 256, False)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    x[1, 3] = np.nan
    y = mk.qgemm(x, qm)
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1]))


def test_qgemm_vector_and_strided_x():
    rng = np.random.default_rng(10)
    qm, w = make_matrix("q6_k", rng, 6, 512, True)
    xs = rng.standard_normal((4, 1024)).astype(np.float32)[:, :512]  # rows with stride 1024
    y = mk.qgemm(np.ascontiguousarray(xs), qm, exact=True)
    np.testing.assert_array_equal(mk.qgemm(xs[0], qm, exact=True), y[0])


@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("n", [3, 16, 21, 35])
def test_to_bytes_keeps_the_documented_layout(fmt, n):
    """The CPU keeps K-quants row-interleaved (quant.h), but to_bytes() writes the documented layout
    (version 1, the bytes a build without the interleaved layout wrote) and reading them back gives the
    same matrix, byte for byte."""
    rng = np.random.default_rng(n + len(fmt))
    k = 768
    raw = random_blocks(rng, fmt, n, k)
    qm = mk.pack_gguf_blocks(GGUF_TYPE[fmt], raw, k)
    b = qm.to_bytes()
    assert struct.unpack("<I", b[4:8])[0] == 1
    # the documented sections decode (independently of the C++ dequantizer) to GGUF's values
    np.testing.assert_array_equal(values_from_layout(fmt, qm), gguf_values(fmt, raw))
    codes, sub, sup = layout_sections(qm)
    if fmt != "q6_k":  # the 6-bit scales and mins of GGUF's 12-byte packing, as documented
        s = raw.reshape(n, k // 256, -1)[..., 4:16]
        np.testing.assert_array_equal(sub[..., :4], s[..., :4] & 63)
        np.testing.assert_array_equal(sub[..., 8:12], s[..., 4:8] & 63)
    back = mk.from_bytes(b)
    assert back.to_bytes() == b
    np.testing.assert_array_equal(mk.dequantize(back), gguf_values(fmt, raw))
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(mk.qgemm(x, back), mk.qgemm(x, qm))


# ---- serialisation ------------------------------------------------------------------------------------
def fnv1a(b):
    h = 0xcbf29ce484222325
    for c in b:
        h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


@pytest.mark.parametrize("fmt", KFORMATS)
def test_serialise_round_trip(fmt, tmp_path):
    rng = np.random.default_rng(12)
    qm, w = make_matrix(fmt, rng, 3, 512, True)
    b = qm.to_bytes()
    assert b[8] == {"q4_k": 9, "q5_k": 10, "q6_k": 11}[fmt]  # the format id in the header
    assert struct.unpack("<I", b[4:8])[0] == 1  # version unchanged
    back = mk.from_bytes(b)
    assert back.format == fmt and back.shape == qm.shape
    np.testing.assert_array_equal(mk.dequantize(back), w)
    qm.save(str(tmp_path / "m.mkq"))
    np.testing.assert_array_equal(mk.dequantize(mk.load_quantized(tmp_path / "m.mkq")), w)
    # bytes per weight: codes + 16 sub-scale bytes + 4 super-scale bytes per 256 (+ alignment)
    al = lambda v: (v + 63) // 64 * 64  # noqa: E731
    assert qm.nbytes == al(3 * 512 * BITS[fmt] // 8) + al(3 * 2 * 16) + al(3 * 2 * 4)


def test_corrupt_payload_refused():
    rng = np.random.default_rng(13)
    qm, _ = make_matrix("q4_k", rng, 2, 256, True)
    b = bytearray(qm.to_bytes())
    payload = b[64:-8]
    sub_off = 64 + (2 * 128 + 63) // 64 * 64
    b[sub_off] = 64  # a sub-block scale past 6 bits, checksum resealed
    b[-8:] = struct.pack("<Q", fnv1a(bytes(b[:-8])))
    with pytest.raises(mk.CorruptDataError, match="6-bit"):
        mk.from_bytes(bytes(b))
    b = bytearray(qm.to_bytes())
    sup_off = sub_off + 64
    b[sup_off:sup_off + 2] = np.array([np.inf], np.float16).tobytes()
    b[-8:] = struct.pack("<Q", fnv1a(bytes(b[:-8])))
    with pytest.raises(mk.CorruptDataError, match="non-finite"):
        mk.from_bytes(bytes(b))
    del payload


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_input():
    rng = np.random.default_rng(14)
    w = rng.standard_normal((4, 300)).astype(np.float32)
    with pytest.raises(ValueError, match=r"q4_k needs in_features to be a multiple of 256.*300"):
        mk.quantize(w, "q4_k")
    with pytest.raises(ValueError, match="group_size must be 0/None or 256, got 128"):
        mk.quantize(w[:, :256], "q6_k", group_size=128)
    bad = w[:, :256].copy()
    bad[1, 5] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        mk.quantize(bad, "q5_k")
    with pytest.raises(ValueError, match="too large for q4_k"):
        mk.quantize(np.full((1, 256), 1e30, np.float32), "q4_k")
    raw = random_blocks(rng, "q4_k", 2, 512)
    with pytest.raises(ValueError, match=r"blocks: expected \(2, 288\)"):
        mk.pack_gguf_blocks("Q4_K", raw[:, :200], 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        mk.pack_gguf_blocks("Q4_K", raw, 500)
    with pytest.raises(TypeError, match="uint8"):
        mk.pack_gguf_blocks("Q4_K", raw.astype(np.int32), 512)
    with pytest.raises(ValueError, match="Q4_K, Q5_K or Q6_K"):
        mk.pack_gguf_blocks("Q3_K", raw, 512)
    nanb = raw.copy()
    nanb[1, 144:146] = np.frombuffer(np.array([np.nan], np.float16).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="row 1, super-block 1 of q4_k has a non-finite d"):
        mk.pack_gguf_blocks("Q4_K", nanb, 512)
    with pytest.raises(ValueError, match="pack_gguf"):
        mk.pack_quantized("q4_k", np.zeros((2, 256), np.uint8), np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="not supported by GPTQ"):
        mk.quantize_gptq(w[:, :256], "q4_k", activations=rng.standard_normal((8, 256)))
    qm = mk.quantize(w[:, :256], "q4_k")
    with pytest.raises(ValueError, match="in_features 256"):
        mk.qgemm(np.ones((1, 512), np.float32), qm)


# ---- CUDA ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_cuda_matches_cpu(fmt, tokens):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    qm, w = make_matrix(fmt, rng, 37, 768, True)
    g = qm.to("cuda")
    x = rng.standard_normal((tokens, 768)).astype(np.float32)
    bias = rng.standard_normal(37).astype(np.float32)
    y = mk.qgemm(torch.from_numpy(x).cuda(), g, torch.from_numpy(bias).cuda()).cpu().numpy()
    ref = reference(x, w, bias)
    mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-5 * mag + 1e-5)
    dq = mk.dequantize(g, like=torch.empty(1, device="cuda")).cpu().numpy()
    np.testing.assert_array_equal(dq, w)


@pytest.mark.parametrize("fmt", KFORMATS)
@pytest.mark.parametrize("imported", [False, True])
def test_int8_path_outlier_channels(isa, fmt, imported):
    """The K-quants' x scale is per token and 256-weight super-block (quant.h): an outlier channel
    coarsens its own super-block only. The per-block bound holds (4 super-blocks: a quarter of the
    per-token one away from the outliers) and the result is the integer dot of x rounded per block."""
    rng = np.random.default_rng(77 + len(fmt) + imported)
    n, k = 21, 1024
    qm, w = make_matrix(fmt, rng, n, k, imported)
    d = w.astype(np.float64)
    X = rng.standard_normal((6, k)).astype(np.float32)
    X[:, 5] *= 400.0
    X[3, 900] = 700.0
    out = poisoned((6, n), np.float32)
    Y = mk.qgemm(X, qm, out=out)
    _, mag = check_int8_outlier_bound(qm, d, X, Y, 1e-5, 0.6)
    if int8_path_runs(isa):
        np.testing.assert_allclose(Y, int8_emulation(qm, X, w), rtol=0, atol=0 + 2e-6 * mag.max() + 1e-6)
    else:
        np.testing.assert_array_equal(Y, mk.qgemm(X, qm, exact=True))
