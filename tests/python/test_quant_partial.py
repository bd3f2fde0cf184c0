"""qgemm / quantize / pack_quantized with any in_features (a partial last group) and a bias of any
float dtype (issue 16), against NumPy float64 references, every format, group size and CPU ISA."""
import numpy as np
import pytest

import memkernels as mk
from conftest import BF16, CUDA_AVAILABLE, int8_path_bound, int8_rounded_x

FORMATS = ["int8", "int4", "int4_sym", "int4_min", "int3", "int3_sym", "int2", "int2_sym", "nf4"]
KS = [1, 31, 33, 100, 688, 1000]
GROUPS = [None, 32, 64, 128]  # None: the format's default (per channel for int8, 128 otherwise)
TOKENS = [1, 2, 3, 5, 8, 9, 17, 33, 64, 65, 70]
INT8_PATH = ("int8", "int4", "int4_sym", "int4_min")  # formats with the int8-activation path
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
NF4_HALF_GAP = 0.152


def cases():
    for fmt in FORMATS:
        for g in GROUPS:
            yield fmt, g
    yield "nf4-dq", 64


def split(fmt):
    return ("nf4", True) if fmt == "nf4-dq" else (fmt, False)


def make(fmt, n, k, group, seed):
    f, dq = split(fmt)
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return w, mk.quantize(w, f, group_size=group, double_quant=dq)


def group_of(qm):
    return qm.group_size  # per-channel int8: in_features


def padded(k, g, per_channel):
    unit = 32 if per_channel else g
    return -(-k // unit) * unit


# ---- quantize / dequantize ---------------------------------------------------------------------

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("fmt,group", list(cases()))
def test_partial_quantize_dequantize(fmt, group, k):
    n = 7
    w, qm = make(fmt, n, k, group, seed=k)
    g = group_of(qm)
    per_channel = split(fmt)[0] == "int8" and group is None
    assert qm.shape == (n, k) and qm.in_features == k
    assert g == (k if per_channel else (group or 128))
    G = -(-k // g)
    s = qm.scales().astype(np.float64)
    assert s.shape == (n, G)
    d = mk.dequantize(qm).astype(np.float64)
    assert d.shape == (n, k) and np.isfinite(d).all()
    # per-weight bound from the group's own scale
    rel = NF4_HALF_GAP if split(fmt)[0] == "nf4" else 0.5
    sw = np.repeat(np.abs(s), g, axis=1)[:, :k]
    if split(fmt)[1]:  # double-quantized: d = s_eff * NF4[q] with q picked for s = the group absmax
        wp = np.zeros((n, G * g))
        wp[:, :k] = np.abs(w)
        st = np.repeat(wp.reshape(n, G, g).max(axis=2), g, axis=1)[:, :k]  # real weights only
        bound = st * NF4_HALF_GAP * (1 + 1e-5) + np.abs(sw - st) + 1e-7
    else:
        bound = sw * rel * (1 + 1e-5) + 1e-7
    assert (np.abs(d - w) <= bound).all()
    if split(fmt)[1] or per_channel:
        return
    # the last group's parameters come from its real weights only: quantizing the columns of the
    # whole groups and those of the last group apart gives the same values, bit for bit
    f = split(fmt)[0]
    cut = (G - 1) * g
    parts = []
    if cut:
        head = mk.quantize(np.ascontiguousarray(w[:, :cut]), f, group_size=g)
        np.testing.assert_array_equal(head.scales(), qm.scales()[:, :G - 1])
        parts.append(mk.dequantize(head))
    tail = mk.quantize(np.ascontiguousarray(w[:, cut:]), f, group_size=g)
    np.testing.assert_array_equal(tail.scales(), qm.scales()[:, G - 1:])
    if f == "int4_min":
        np.testing.assert_array_equal(tail.mins(), qm.mins()[:, G - 1:])
    parts.append(mk.dequantize(tail))
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), mk.dequantize(qm))


@pytest.mark.parametrize("k", [33, 100, 688])
@pytest.mark.parametrize("fmt,group", [(f, g) for f, g in cases() if f not in ("int4_min", "nf4-dq")])
def test_partial_is_the_zero_padded_matrix(fmt, group, k):
    # Except int4_min (whose range is the group's own [min, max]), quantizing W padded with zero
    # columns gives the same groups: the stored bytes and every qgemm result must be identical.
    w, qm = make(fmt, 9, k, group, seed=3 * k)
    per_channel = fmt == "int8" and group is None
    kp = padded(k, group_of(qm), per_channel)
    wp = np.zeros((9, kp), np.float32)
    wp[:, :k] = w
    qp = mk.quantize(wp, fmt, group_size=group) if not per_channel else mk.quantize(wp, fmt)
    assert qm.to_bytes()[64:-8] == qp.to_bytes()[64:-8]
    np.testing.assert_array_equal(mk.dequantize(qm), mk.dequantize(qp)[:, :k])
    for t in (1, 5, 33):
        x = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
        xp = np.zeros((t, kp), np.float32)
        xp[:, :k] = x
        for exact in (True, False):
            np.testing.assert_array_equal(mk.qgemm(x, qm, exact=exact), mk.qgemm(xp, qp, exact=exact))


# ---- qgemm --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("fmt,group", list(cases()))
def test_partial_qgemm_matches_reference(isa, fmt, group, k):
    n = 13
    _, qm = make(fmt, n, k, group, seed=k + 1)
    d = mk.dequantize(qm).astype(np.float64)
    rng = np.random.default_rng(k + 2)
    bias = rng.standard_normal(n).astype(np.float32)
    absd = np.abs(d)
    for t in TOKENS:
        x = rng.standard_normal((t, k)).astype(np.float32)
        ref = x.astype(np.float64) @ d.T + bias
        mag = np.abs(x).astype(np.float64) @ absd.T + np.abs(bias)
        out = np.full((t, n), np.nan, np.float32)
        mk.qgemm(x, qm, bias, out=out, exact=True)
        assert np.all(np.abs(out - ref) <= 2e-5 * mag + 1e-6), (t, np.abs(out - ref).max())
        # the default path (int8 activations where the format, token count and ISA allow it)
        out = np.full((t, n), np.nan, np.float32)
        mk.qgemm(x, qm, bias, out=out)
        bound = int8_path_bound(qm, d, x) * 1.001 + 2e-5 * mag + 1e-6
        if t >= 12:  # from 12 (32 for the int8-activation formats) tokens the default may be bf16 prefill
            bound = np.maximum(bound, (2.0 ** -7 + 2.0 ** -16) * mag + k * 2.0 ** -24 * mag * 1.01 + 1e-6)
        assert np.all(np.abs(out - ref) <= bound), (t, (np.abs(out - ref) - bound).max())


@pytest.mark.parametrize("k", [31, 100, 1000])
@pytest.mark.parametrize("fmt", INT8_PATH)
def test_partial_int8_path_runs(isa, fmt, k):
    # The int8-activation path really runs on the padded matrix (where it exists): results differ
    # from the exact ones, and match a float64 model of what it computes.
    if isa == "generic":
        pytest.skip("no int8-activation path on the generic ISA")
    group = 32 if fmt != "int8" else None
    _, qm = make(fmt, 11, k, group, seed=k + 7)
    d = mk.dequantize(qm).astype(np.float64)
    x = np.random.default_rng(k).standard_normal((4, k)).astype(np.float32)
    y = mk.qgemm(x, qm)
    exact = mk.qgemm(x, qm, exact=True)
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    if isa == "avx2" or vnni:
        assert not np.array_equal(y, exact)
    # x as the int8 path sees it: codes times one scale per token and x block
    xr = int8_rounded_x(qm, x)
    ref = xr @ d.T
    assert np.all(np.abs(y - ref) <= 1e-4 * (np.abs(xr) @ np.abs(d).T) + 1e-5)


@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
@pytest.mark.parametrize("bdtype", DTYPES, ids=str)
def test_bias_any_float_dtype(isa, xdtype, bdtype):
    n, k = 21, 100
    _, qm = make("int4", n, k, 32, seed=5)
    d = mk.dequantize(qm).astype(np.float64)
    rng = np.random.default_rng(6)
    bias = (rng.standard_normal(n) * 4).astype(bdtype)
    for t in (1, 3, 17, 70):
        x = rng.standard_normal((t, k)).astype(xdtype)
        out = np.full((t, n), np.nan, xdtype)
        mk.qgemm(x, qm, bias, out=out, exact=True)
        # the bias is converted to x's dtype once: the same result as passing it converted
        same = mk.qgemm(x, qm, bias.astype(xdtype), exact=True)
        np.testing.assert_array_equal(out.view(np.uint8), same.view(np.uint8))
        ref = x.astype(np.float64) @ d.T + bias.astype(np.float64)
        mag = np.abs(x.astype(np.float64)) @ np.abs(d).T + np.abs(bias.astype(np.float64))
        eps = {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3, BF16: 1.6e-2}[np.dtype(xdtype)]
        assert np.all(np.abs(out.astype(np.float64) - ref) <= eps * mag + 1e-5), (t, xdtype, bdtype)
        # and with int8 activations
        y8 = mk.qgemm(x, qm, bias)
        assert np.all(np.abs(y8.astype(np.float64) - ref) <= eps * mag + int8_path_bound(
            qm, d, x.astype(np.float64)) * 1.001 + 1e-5)


def test_bias_bad_dtype_and_strided_x():
    _, qm = make("int4_sym", 6, 33, 32, seed=9)
    x = np.random.default_rng(1).standard_normal((3, 80)).astype(np.float32)
    with pytest.raises(TypeError, match="bias"):
        mk.qgemm(x[:, :33], qm, np.zeros(6, np.int8))
    with pytest.raises(ValueError, match="in_features 33"):
        mk.qgemm(x[:, :32], qm)
    # rows of x with a stride (a column slice): the padded copy reads only the K real columns
    d = mk.dequantize(qm).astype(np.float64)
    xs = x[:, 10:43]
    y = mk.qgemm(xs, qm, exact=True)
    ref = xs.astype(np.float64) @ d.T
    assert np.all(np.abs(y - ref) <= 2e-5 * (np.abs(xs) @ np.abs(d).T) + 1e-6)
    # the caller's x is not modified (the padding goes to a copy)
    before = x.copy()
    mk.qgemm(xs, qm)
    np.testing.assert_array_equal(x, before)


# ---- pack_quantized / serialisation / GPTQ ----------------------------------------------------------

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("fmt,group", [(f, g) for f, g in cases() if f != "nf4-dq"])
def test_partial_pack_quantized_formula(fmt, group, k):
    n = 5
    per_channel = fmt == "int8" and group is None
    g = k if per_channel else (group or 128)
    G = -(-k // g)
    rng = np.random.default_rng(k + 11)
    bits = {"int8": 8, "int3": 3, "int3_sym": 3, "int2": 2, "int2_sym": 2}.get(fmt, 4)
    codes = rng.integers(0, 256 if bits == 8 else 2 ** bits, (n, k)).astype(np.uint8)
    scales = (rng.standard_normal((n, G)) * 0.1).astype(np.float32)
    zeros = mins = None
    if fmt in ("int4", "int3", "int2"):
        zeros = rng.integers(0, 2 ** bits, (n, G)).astype(np.uint8)
    if fmt == "int4_min":
        mins = rng.standard_normal((n, G)).astype(np.float32)
    qm = mk.pack_quantized(fmt, codes, scales, zeros, mins=mins, group_size=group)
    assert qm.shape == (n, k)
    np.testing.assert_array_equal(qm.scales(), scales)
    sg = np.repeat(scales.astype(np.float64), g, axis=1)[:, :k]
    if fmt == "int8":
        ref = sg * codes.view(np.int8)
    elif fmt == "nf4":
        ref = sg * np.asarray(mk._memkernels.nf4_codebook(), np.float64)[codes]
    elif fmt == "int4_min":
        prod = (np.repeat(scales, g, axis=1)[:, :k] * codes.astype(np.float32)).astype(np.float32)
        ref = (prod + np.repeat(mins, g, axis=1)[:, :k]).astype(np.float64)
    elif zeros is not None:
        ref = sg * (codes - np.repeat(zeros, g, axis=1)[:, :k].astype(np.float64))
    else:
        ref = sg * (codes - 2.0 ** (bits - 1))
    out = np.full((n, k), np.nan, np.float32)
    mk.dequantize(qm, out=out)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    # and qgemm uses them: a float64 product
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = mk.qgemm(x, qm, exact=True)
    np.testing.assert_allclose(y, x.astype(np.float64) @ ref.T, rtol=1e-4,
                               atol=2e-5 * float((np.abs(x) @ np.abs(ref).T).max()) + 1e-6)
    with pytest.raises(ValueError, match="scales"):
        mk.pack_quantized(fmt, codes, np.ones((n, G + 1), np.float32), zeros, mins=mins, group_size=group)


def _fnv1a(b: bytes) -> int:
    h = 0xcbf29ce484222325
    for c in b:
        h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def _reseal(b: bytearray) -> bytes:
    b[-8:] = _fnv1a(bytes(b[:-8])).to_bytes(8, "little")
    return bytes(b)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None), ("int8", 32), ("int4_min", 64), ("nf4-dq", 64),
                                       ("int3_sym", 32), ("int2", 64)])
def test_partial_serialise_round_trip(fmt, group, tmp_path):
    _, qm = make(fmt, 6, 100, group, seed=12)
    b = qm.to_bytes()
    assert int.from_bytes(b[4:8], "little") == 2  # a partial last group: version 2
    assert int.from_bytes(b[16:24], "little") == 6 and int.from_bytes(b[24:32], "little") == 100  # logical K
    back = mk.from_bytes(b)
    assert back.shape == (6, 100) and back.group_size == qm.group_size
    assert back.to_bytes() == b
    np.testing.assert_array_equal(mk.dequantize(back), mk.dequantize(qm))
    qm.save(str(tmp_path / "m.mkq"))
    np.testing.assert_array_equal(mk.dequantize(mk.load_quantized(tmp_path / "m.mkq")), mk.dequantize(qm))
    # a version-1 header cannot describe a partial group: refused as corrupt, not misread
    v1 = bytearray(b)
    v1[4:8] = (1).to_bytes(4, "little")
    with pytest.raises(mk.CorruptDataError, match="version 1"):
        mk.from_bytes(_reseal(v1))
    v3 = bytearray(b)
    v3[4:8] = (3).to_bytes(4, "little")
    with pytest.raises(mk.CorruptDataError, match="version 3"):
        mk.from_bytes(_reseal(v3))
    # whole groups are still written as version 1, as before
    _, whole = make(fmt, 6, 128, group, seed=12)
    assert int.from_bytes(whole.to_bytes()[4:8], "little") == 1


def test_gptq_partial_group():
    rng = np.random.default_rng(13)
    W = rng.standard_normal((8, 100)).astype(np.float32)
    X = rng.standard_normal((64, 100)).astype(np.float32)
    for fmt, group in (("int4", 32), ("int4_min", 64), ("int8", None), ("nf4", 128)):
        qm = mk.quantize_gptq(W, fmt, group_size=group, activations=X)
        assert qm.shape == (8, 100)
        rtn = mk.quantize(W, fmt, group_size=group)
        err = np.linalg.norm(X @ (mk.dequantize(qm) - W).T)
        err_rtn = np.linalg.norm(X @ (mk.dequantize(rtn) - W).T)
        assert err <= err_rtn * 1.02, fmt


# ---- CUDA (a GPU machine only; the emulation build runs the same cases in C++) ------------------

@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
@pytest.mark.parametrize("k", [1, 33, 100, 688, 1000])
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None), ("int8", 32), ("int4_min", 32), ("nf4", 64),
                                       ("int3", 64), ("int2_sym", 32)])
def test_cuda_partial(fmt, group, k):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    n = 19
    _, qm = make(fmt, n, k, group, seed=k)
    d = mk.dequantize(qm).astype(np.float64)
    gq = qm.to("cuda")
    dg = mk.dequantize(gq, like=torch.empty(1, device="cuda"))
    np.testing.assert_array_equal(dg.cpu().numpy(), mk.dequantize(qm))
    for t in (1, 5, 17, 70):
        for xdt, bdt in ((torch.float32, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
            x = torch.randn(t, k, dtype=torch.float32).to(xdt)
            bias = torch.randn(n).to(bdt)
            out = torch.full((t, n), float("nan"), dtype=xdt, device="cuda")
            mk.qgemm(x.cuda(), gq, bias.cuda(), out=out)
            ref = x.double().numpy() @ d.T + bias.double().numpy()
            mag = np.abs(x.double().numpy()) @ np.abs(d).T + np.abs(bias.double().numpy())
            eps = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdt]
            assert np.all(np.abs(out.double().cpu().numpy() - ref) <= eps * mag + 1e-4)
