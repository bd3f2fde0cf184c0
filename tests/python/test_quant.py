"""Quantization + qgemm against NumPy float64 references, every format, dtype and CPU ISA."""
import functools
import os

import numpy as np
import pytest

import memkernels as mk

from conftest import check_int8_outlier_bound, int8_path_bound, int8_rounded_x

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
FORMATS = ["int8", "int4", "int4_sym", "int4_min", "int3", "int3_sym", "int2", "int2_sym", "nf4"]
GROUPED = [f for f in FORMATS if f != "int8"]
ISAS = [i for i in ("generic", "avx2", "avx512") if ["generic", "avx2", "avx512"].index(i) <=
        ["generic", "avx2", "avx512"].index(mk.info()["best_cpu_isa"])]
NF4_HALF_GAP = 0.152  # half the widest gap between NF4 levels (between -1 and -0.696)


@pytest.fixture(params=ISAS)
def isa(request):
    old = mk.cpu_isa()
    mk.set_cpu_isa(request.param)
    yield request.param
    mk.set_cpu_isa(old)


def rng(seed):
    return np.random.default_rng(seed)


def qm_and_ref(fmt, n, k, group=None, seed=0, dq=False):
    w = rng(seed).standard_normal((n, k)).astype(np.float32)
    qm = mk.quantize(w, fmt, group_size=group, double_quant=dq)
    return w, qm, mk.dequantize(qm).astype(np.float64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_error_bound(fmt, group):
    if fmt == "int8":
        group = None
    w, qm, d = qm_and_ref(fmt, 19, 256, group, seed=1)
    s = qm.scales().astype(np.float64)
    g = qm.group_size
    assert s.shape == (19, 256 // g)
    rel = NF4_HALF_GAP if fmt == "nf4" else 0.5
    bound = np.repeat(s, g, axis=1) * rel * (1 + 1e-5) + 1e-7
    err = np.abs(d - w)
    assert (err <= bound).all(), f"{fmt}: max excess {(err - bound).max()}"
    # and quantization is not trivially coarse: error shrinks with more bits
    expected_rel = {8: 0.01, 4: 0.15, 3: 0.3, 2: 0.8}[qm.bits]
    assert np.linalg.norm(d - w) / np.linalg.norm(w) < expected_rel


def test_nf4_double_quant_bound_and_size():
    w, qm, d = qm_and_ref("nf4", 40, 512, 64, seed=2, dq=True)
    _, qm1, d1 = qm_and_ref("nf4", 40, 512, 64, seed=2, dq=False)
    assert qm.double_quant and not qm1.double_quant
    assert qm.bits_per_weight < qm1.bits_per_weight - 0.3
    # scale error adds to the level error; stays close to the single-quant result
    assert np.linalg.norm(d - w) <= 1.05 * np.linalg.norm(d1 - w)
    assert np.abs(d - w).max() <= 0.2 * np.abs(w).max()


def test_bits_per_weight():
    w = rng(3).standard_normal((64, 1024)).astype(np.float32)
    assert mk.quantize(w, "int4", group_size=128).bits_per_weight == pytest.approx(4 + 32 / 128 + 8 / 128)
    assert mk.quantize(w, "int4_sym", group_size=128).bits_per_weight == pytest.approx(4 + 32 / 128)
    assert mk.quantize(w, "int8").bits_per_weight == pytest.approx(8 + 32 / 1024)
    assert mk.quantize(w, "int3", group_size=64).bits_per_weight == pytest.approx(3 + 40 / 64)
    assert mk.quantize(w, "int2", group_size=32).bits_per_weight == pytest.approx(2 + 40 / 32)


def reference(x, d, bias):
    y = x.astype(np.float64) @ d.T
    return y if bias is None else y + bias.astype(np.float64)


def tol_for(dtype):
    return {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3, BF16: 1.6e-2}[np.dtype(dtype)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 9])
def test_qgemm_matches_reference(isa, fmt, tokens):
    n, k = 37, 384
    group = None if fmt == "int8" else 64
    _, qm, d = qm_and_ref(fmt, n, k, group, seed=tokens)
    x = rng(100 + tokens).standard_normal((tokens, k)).astype(np.float32)
    bias = rng(7).standard_normal(n).astype(np.float32)
    out = np.full((tokens, n), np.nan, np.float32)
    y = mk.qgemm(x, qm, bias, out=out, exact=True)
    assert y is out
    ref = reference(x, d, bias)
    mag = np.abs(x).astype(np.float64) @ np.abs(d).T + np.abs(bias)
    assert np.all(np.abs(y - ref) <= 2e-5 * mag + 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("fmt", ["int4", "nf4", "int2_sym", "int8"])
def test_qgemm_dtypes(dtype, tokens, fmt):
    n, k = 29, 256
    _, qm, d = qm_and_ref(fmt, n, k, None if fmt == "int8" else 128, seed=5)
    x = rng(6).standard_normal((tokens, k)).astype(dtype)
    bias = rng(8).standard_normal(n).astype(dtype)
    out = np.full((tokens, n), np.nan, dtype)
    mk.qgemm(x, qm, bias, out=out, exact=True)
    assert out.dtype == np.dtype(dtype)
    ref = reference(x.astype(np.float64), d, bias.astype(np.float64))
    mag = np.abs(x.astype(np.float64)) @ np.abs(d).T + np.abs(bias.astype(np.float64))
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err <= tol_for(dtype) * np.maximum(np.abs(ref), 1e-3 * mag) + 1e-4 * mag)


@pytest.mark.parametrize("n,k,tokens", [(1, 128, 1), (1, 128, 6), (5, 32, 2), (130, 640, 1), (67, 1152, 12),
                                        (300, 128, 33)])
def test_qgemm_shapes(n, k, tokens):
    for fmt, group in (("int4", 32), ("int3", 32), ("nf4", 32), ("int8", None)):
        _, qm, d = qm_and_ref(fmt, n, k, group, seed=n + k)
        x = rng(tokens).standard_normal((tokens, k)).astype(np.float32)
        y = mk.qgemm(x, qm, exact=True)
        mag = np.abs(x).astype(np.float64) @ np.abs(d).T
        assert np.all(np.abs(y - reference(x, d, None)) <= 2e-5 * mag + 1e-6), fmt


def test_qgemm_vector_and_strided_rows():
    _, qm, d = qm_and_ref("int4", 50, 256, 128, seed=9)
    x = rng(10).standard_normal(256).astype(np.float32)
    y = mk.qgemm(x, qm, exact=True)
    assert y.shape == (50,)
    np.testing.assert_allclose(y, d @ x, rtol=1e-4, atol=1e-4)
    big = rng(11).standard_normal((6, 300)).astype(np.float32)
    xs = big[:, 10:266]  # rows strided, last dim contiguous
    np.testing.assert_allclose(mk.qgemm(xs, qm, exact=True), xs.astype(np.float64) @ d.T, rtol=1e-4, atol=1e-4)


def test_dequantize_dtypes():
    _, qm, d = qm_and_ref("int4", 9, 128, 32, seed=12)
    for dt, tol in ((np.float16, 1e-3), (BF16, 8e-3)):
        out = mk.dequantize(qm, np.dtype(dt).name)
        assert out.dtype == np.dtype(dt)
        np.testing.assert_allclose(out.astype(np.float64), d, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("wdtype", [np.float16, BF16])
def test_quantize_low_precision_input(wdtype):
    w = rng(13).standard_normal((8, 128)).astype(wdtype)
    qm = mk.quantize(w, "int8")
    d = mk.dequantize(qm)
    assert np.abs(d - w.astype(np.float32)).max() <= np.abs(w.astype(np.float32)).max() / 127 * 0.51


# ---- serialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,dq", [(f, False) for f in FORMATS] + [("nf4", True)])
def test_serialise_round_trip(fmt, dq, tmp_path):
    _, qm, d = qm_and_ref(fmt, 11, 256, None if fmt == "int8" else 64, seed=14, dq=dq)
    b = qm.to_bytes()
    r = mk.from_bytes(b)
    assert (r.format, r.shape, r.group_size, r.double_quant) == (fmt, (11, 256), qm.group_size, dq)
    np.testing.assert_array_equal(mk.dequantize(r), d.astype(np.float32))
    assert r.to_bytes() == b
    path = tmp_path / "w.mkq"
    qm.save(str(path))
    np.testing.assert_array_equal(mk.dequantize(mk.load_quantized(path)), d.astype(np.float32))


def test_corrupted_bytes_raise():
    _, qm, _ = qm_and_ref("int4", 7, 128, 32, seed=15)
    b = bytearray(qm.to_bytes())
    for pos in (0, 4, 8, 9, 16, 24, 32, 36, 40, 64, 100, len(b) // 2, len(b) - 9, len(b) - 1):
        bad = bytearray(b)
        bad[pos] ^= 0x5A
        with pytest.raises(mk.CorruptDataError):
            mk.from_bytes(bytes(bad))
    for cut in (0, 10, 63, 64, 72, len(b) - 1):
        with pytest.raises(mk.CorruptDataError):
            mk.from_bytes(bytes(b[:cut]))
    with pytest.raises(mk.CorruptDataError, match="padded|truncated"):
        mk.from_bytes(bytes(b) + b"\0")
    bad = bytearray(b)
    bad[4] = 99  # version
    with pytest.raises(mk.CorruptDataError, match="version"):
        mk.from_bytes(bytes(bad))
    with pytest.raises(mk.CorruptDataError, match="magic"):
        mk.from_bytes(b"XXXX" + bytes(b[4:]))
    assert issubclass(mk.CorruptDataError, ValueError)


def test_random_garbage_never_crashes():
    r = rng(16)
    for n in (0, 1, 64, 80, 200, 5000):
        with pytest.raises(mk.CorruptDataError):
            mk.from_bytes(r.integers(0, 256, n, dtype=np.uint8).tobytes())


def test_load_missing_file(tmp_path):
    with pytest.raises(OSError):
        mk.load_quantized(tmp_path / "nope.mkq")


# ---- bad input --------------------------------------------------------------------------------------

def test_bad_quantize_args():
    w = rng(17).standard_normal((8, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        mk.quantize(w, "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        mk.quantize(w, "int4", group_size=0)
    with pytest.raises(ValueError, match="per output channel"):
        mk.quantize(w, "int8", group_size=48)
    with pytest.raises(ValueError, match="unknown quantization format"):
        mk.quantize(w, "int5")
    with pytest.raises(ValueError, match="double_quant applies to nf4"):
        mk.quantize(w, "int4", double_quant=True)
    with pytest.raises(ValueError, match="2 dimensions|ndim|dimension"):
        mk.quantize(w[0], "int4")
    with pytest.raises(TypeError):
        mk.quantize(w.astype(np.int32), "int4")
    bad = w.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mk.quantize(bad, "nf4")
    with pytest.raises(ValueError, match="contiguous"):
        mk.quantize(np.asfortranarray(w), "int4")


def test_bad_qgemm_args():
    _, qm, _ = qm_and_ref("int4", 16, 256, 128, seed=18)
    x = rng(19).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="in_features 256"):
        mk.qgemm(x[:, :128], qm)
    with pytest.raises(TypeError):
        mk.qgemm(x.astype(np.float64), qm)
    with pytest.raises(TypeError):
        mk.qgemm(x.astype(np.int32), qm)
    with pytest.raises(ValueError, match="bias"):
        mk.qgemm(x, qm, np.zeros(15, np.float32))
    with pytest.raises(TypeError, match="bias"):
        mk.qgemm(x, qm, np.zeros(16, np.int32))
    with pytest.raises(TypeError, match="bias"):
        mk.qgemm(x, qm, np.zeros(16, np.float64))
    with pytest.raises(ValueError, match="out"):
        mk.qgemm(x, qm, out=np.zeros((2, 15), np.float32))
    with pytest.raises(TypeError, match="out"):
        mk.qgemm(x, qm, out=np.zeros((2, 16), np.float16))
    with pytest.raises(ValueError, match="contiguous"):
        mk.qgemm(np.asfortranarray(x), qm)
    with pytest.raises(TypeError):
        mk.qgemm(x, "not a matrix")
    with pytest.raises(ValueError, match="device"):
        qm.to("tpu")


def test_repr_and_properties():
    _, qm, _ = qm_and_ref("nf4", 8, 128, 64, seed=20, dq=True)
    assert qm.shape == (8, 128) and qm.in_features == 128 and qm.out_features == 8
    assert qm.format == "nf4" and qm.bits == 4 and qm.device == "cpu"
    assert "nf4" in repr(qm) and "double_quant=True" in repr(qm)
    assert qm.to("cpu").shape == qm.shape


# ---- CUDA (runs on a GPU machine only) ---------------------------------------------------------------

cuda = pytest.mark.skipif(not mk.info()["cuda_available"], reason="no CUDA device")


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


@cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 33])
def test_cuda_qgemm(fmt, tokens):
    torch = _torch_cuda()
    n, k = 200, 512
    _, qm, d = qm_and_ref(fmt, n, k, None if fmt == "int8" else 64, seed=21)
    g = qm.to("cuda")
    assert g.device.startswith("cuda")
    # fp16/bf16 x takes the tensor-core path for tokens > 4: weights are rounded to x's dtype there
    # (relative eps / 2 each), and the output is rounded once more.
    for dt, eps in ((torch.float32, 1e-6), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)):
        x = torch.randn(tokens, k, device="cuda").to(dt)
        bias = torch.randn(n, device="cuda").to(dt)
        y = mk.qgemm(x, g, bias, exact=True)
        xr = x.double().cpu().numpy()
        ref = xr @ d.T + bias.double().cpu().numpy()
        mag = np.abs(xr) @ np.abs(d).T
        err = np.abs(y.double().cpu().numpy() - ref)
        assert np.all(err <= eps * (np.abs(ref) + 0.51 * mag) + 3e-5 * mag), (fmt, dt, tokens)
    dd = mk.dequantize(g, like=torch.empty(1, device="cuda"))
    np.testing.assert_allclose(dd.cpu().numpy(), d, rtol=1e-6, atol=1e-6)
    assert mk.from_bytes(g.to_bytes()).to_bytes() == qm.to_bytes()


@cuda
def test_cuda_nf4_double_quant():
    # the int8-coded scales (scale_offset + step * code) are decoded on the GPU too
    torch = _torch_cuda()
    n, k = 70, 256
    _, qm, d = qm_and_ref("nf4", n, k, 32, seed=22, dq=True)
    g = qm.to("cuda")
    for tokens in (1, 9):  # gemv and tensor-core paths
        x = torch.randn(tokens, k, device="cuda").to(torch.float16)
        y = mk.qgemm(x, g, exact=True)
        xr = x.double().cpu().numpy()
        ref = xr @ d.T
        mag = np.abs(xr) @ np.abs(d).T
        assert np.all(np.abs(y.double().cpu().numpy() - ref) <= 2.0**-11 * (np.abs(ref) + 0.51 * mag) + 3e-5 * mag)
    dd = mk.dequantize(g, like=torch.empty(1, device="cuda"))
    np.testing.assert_allclose(dd.cpu().numpy(), d, rtol=1e-6, atol=1e-6)


# ---- pack_quantized and GPTQ --------------------------------------------------------------------------

def test_pack_quantized_matches_formula():
    r = rng(30)
    n, k, g = 6, 128, 32
    codes = r.integers(0, 16, (n, k), dtype=np.uint8)
    scales = r.uniform(0.01, 1.0, (n, k // g)).astype(np.float32)
    zeros = r.integers(0, 16, (n, k // g), dtype=np.uint8)
    qm = mk.pack_quantized("int4", codes, scales, zeros, group_size=g)
    expect = np.repeat(scales.astype(np.float64), g, 1) * (codes - np.repeat(zeros, g, 1).astype(np.float64))
    np.testing.assert_allclose(mk.dequantize(qm), expect, rtol=1e-6, atol=1e-7)
    qs = mk.pack_quantized("nf4", codes, scales, group_size=g)
    levels = np.asarray(mk._C.nf4_codebook(), np.float64)
    np.testing.assert_allclose(mk.dequantize(qs), np.repeat(scales, g, 1) * levels[codes], rtol=1e-6, atol=1e-7)
    s8 = r.integers(-127, 128, (n, k), dtype=np.int8)
    q8 = mk.pack_quantized("int8", s8, scales[:, :1].copy())
    np.testing.assert_allclose(mk.dequantize(q8), scales[:, :1] * s8.astype(np.float64), rtol=1e-6)


def test_pack_quantized_bad_input():
    codes = np.zeros((4, 64), np.uint8)
    scales = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="codes must be < 2\\^3"):
        mk.pack_quantized("int3_sym", np.full((4, 64), 8, np.uint8), scales, group_size=32)
    with pytest.raises(ValueError, match="needs zeros"):
        mk.pack_quantized("int4", codes, scales, group_size=32)
    with pytest.raises(ValueError, match="symmetric"):
        mk.pack_quantized("int4_sym", codes, scales, np.zeros((4, 2), np.uint8), group_size=32)
    with pytest.raises(ValueError, match="scales"):
        mk.pack_quantized("nf4", codes, np.ones((4, 3), np.float32), group_size=32)
    with pytest.raises(ValueError, match="scales must be finite"):
        mk.pack_quantized("nf4", codes, np.full((4, 2), np.nan, np.float32), group_size=32)
    with pytest.raises(ValueError, match="zeros must be < 2\\^2"):
        mk.pack_quantized("int2", codes, scales, np.full((4, 2), 4, np.uint8), group_size=32)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int3", 64), ("nf4", 64), ("int4_sym", 32), ("int8", None)])
def test_gptq_beats_rtn_on_calibration_data(fmt, group):
    r = rng(31)
    n, k, m = 48, 256, 768
    mix = r.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated features, as in real activations
    X = r.standard_normal((m, k)) @ mix
    W = r.standard_normal((n, k)).astype(np.float32)
    rtn = mk.dequantize(mk.quantize(W, fmt, group_size=group)).astype(np.float64)
    qg = mk.quantize_gptq(W, fmt, group_size=group, activations=X)
    assert (qg.format, qg.shape) == (fmt, (n, k))
    gq = mk.dequantize(qg).astype(np.float64)
    e_rtn = np.linalg.norm(X @ (W - rtn).T)
    e_gptq = np.linalg.norm(X @ (W - gq).T)
    assert e_gptq < 0.85 * e_rtn
    # same Hessian given directly gives the same matrix; qgemm agrees with its dequantization
    qh = mk.quantize_gptq(W, fmt, group_size=group, hessian=X.T @ X / m)
    assert qh.to_bytes() == qg.to_bytes()
    x = r.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(mk.qgemm(x, qg, exact=True), x.astype(np.float64) @ gq.T, rtol=1e-4, atol=1e-4)


def test_gptq_bad_input():
    W = rng(32).standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="exactly one"):
        mk.quantize_gptq(W, "int4", group_size=32)
    with pytest.raises(ValueError, match="hessian"):
        mk.quantize_gptq(W, "int4", group_size=32, hessian=np.eye(63))
    with pytest.raises(ValueError, match="activations"):
        mk.quantize_gptq(W, "int4", group_size=32, activations=np.ones((5, 10)))
    with pytest.raises(ValueError, match="group_size"):
        mk.quantize_gptq(W[:, :48], "int4", group_size=48, hessian=np.eye(48))


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 64), ("int4", 32), ("int4_sym", 128), ("int4_sym", 32),
                                       ("nf4", 64), ("int3", 64), ("int3_sym", 32), ("int2", 128), ("int2_sym", 32)])
@pytest.mark.parametrize("k", [128, 96, 4160])
def test_int8_activations_error_bound(fmt, group, k):
    if k % group:
        pytest.skip("k not a multiple of the group")
    n = 45
    _, qm, d = qm_and_ref(fmt, n, k, group, seed=k)
    x = rng(k + 1).standard_normal(k).astype(np.float32)
    bias = rng(3).standard_normal(n).astype(np.float32)
    y = mk.qgemm(x, qm, bias, int8_activations=True)
    ref = d @ x.astype(np.float64) + bias
    bound = int8_path_bound(qm, d, x)[0] * 1.001 + 1e-4 * (np.abs(d) @ np.abs(x))
    assert np.all(np.abs(y - ref) <= bound)
    exact = mk.qgemm(x, qm, bias, exact=True)
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    if mk.cpu_isa() == "avx2" or (mk.cpu_isa() == "avx512" and vnni):
        assert not np.array_equal(y, exact)  # the int8 path really ran
    else:
        np.testing.assert_array_equal(y, exact)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 32), ("int4_sym", 64), ("int3", 32), ("int2_sym", 64)])
def test_int8_activations_several_tokens(isa, fmt, group):
    n, k = 29, 640 if group != 128 else 768
    _, qm, d = qm_and_ref(fmt, n, k, group, seed=90)
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    for tokens in (3, 7, 8):
        X = rng(91 + tokens).standard_normal((tokens, k)).astype(np.float32)
        out = np.full((tokens, n), np.nan, np.float32)
        Y = mk.qgemm(X, qm, out=out, int8_activations=True)
        if not (isa == "avx2" or (isa == "avx512" and vnni)):
            np.testing.assert_array_equal(Y, mk.qgemm(X, qm, exact=True))
            continue
        for t in range(tokens):
            xq = int8_rounded_x(qm, X[t])[0]
            np.testing.assert_allclose(Y[t], d @ xq, rtol=2e-5, atol=2e-5 * (np.abs(d) @ np.abs(xq)).max())


def test_qgemm_nd_input():
    _, qm, d = qm_and_ref("nf4", 24, 128, 64, seed=40)
    x = rng(41).standard_normal((2, 3, 128)).astype(np.float32)
    y = mk.qgemm(x, qm, exact=True)
    assert y.shape == (2, 3, 24)
    np.testing.assert_allclose(y, x.astype(np.float64) @ d.T, rtol=1e-4, atol=1e-4)
    out = np.full((2, 3, 24), np.nan, np.float32)
    assert mk.qgemm(x, qm, out=out, exact=True) is not None
    np.testing.assert_allclose(out, x.astype(np.float64) @ d.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out"):
        mk.qgemm(x, qm, out=np.zeros((6, 24), np.float32))


# ---- group-wise int8 and int4_min (the GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K import targets) -----------------

NEW = [("int8", 32), ("int8", 64), ("int8", 128), ("int4_min", 32), ("int4_min", 64), ("int4_min", 128)]


def packed_case(fmt, n, k, group, seed, raw=False):
    """Random codes, scales of both signs with some exactly 0 (as GGUF blocks have), and mins: the
    packed matrix and its float64 value computed here from the formula, not by the library
    (raw=True: also the float32 codes, scales, mins given)."""
    r = rng(seed)
    groups = k // group
    scales = (r.standard_normal((n, groups)) * 0.1).astype(np.float32)
    scales[r.random((n, groups)) < 0.1] = 0.0
    if fmt == "int8":
        codes = r.integers(-128, 128, (n, k), dtype=np.int8)
        qm = mk.pack_quantized("int8", codes.view(np.uint8), scales, group_size=group)
        d = np.repeat(scales.astype(np.float64), group, 1) * codes
        return (qm, d, (codes, scales, None)) if raw else (qm, d)
    codes = r.integers(0, 16, (n, k), dtype=np.uint8)
    mins = r.standard_normal((n, groups)).astype(np.float32)
    qm = mk.pack_quantized("int4_min", codes, scales, mins=mins, group_size=group)
    d = (np.repeat(scales, group, 1) * codes.astype(np.float32)).astype(np.float64) + np.repeat(mins, group, 1)
    return (qm, d, (codes, scales, mins)) if raw else (qm, d)


@pytest.mark.parametrize("fmt,group", NEW)
def test_new_formats_quantize_error_bound(fmt, group):
    w, qm, d = qm_and_ref(fmt, 23, 384, group, seed=50)
    assert (qm.format, qm.group_size) == (fmt, group)
    s = np.repeat(qm.scales().astype(np.float64), group, axis=1)
    err = np.abs(d - w)
    assert (err <= s * 0.5 * (1 + 1e-5) + 1e-6).all()
    assert np.linalg.norm(d - w) / np.linalg.norm(w) < (0.01 if fmt == "int8" else 0.12)
    if fmt == "int4_min":
        m = qm.mins()
        assert m.shape == (23, 384 // group) and m.dtype == np.float32
        # m is the group minimum, and s = (max - min) / 15
        wg = w.reshape(23, -1, group)
        np.testing.assert_array_equal(m, wg.min(axis=2))
        np.testing.assert_allclose(qm.scales(), (wg.max(axis=2) - wg.min(axis=2)) / 15, rtol=1e-6)
    else:
        assert qm.mins() is None


def test_int4_min_constant_group_is_exact():
    w = rng(51).standard_normal((3, 64)).astype(np.float32)
    w[1, :32] = 0.75
    w[2, 32:] = -2.5
    d = mk.dequantize(mk.quantize(w, "int4_min", group_size=32))
    assert (d[1, :32] == 0.75).all() and (d[2, 32:] == -2.5).all()


def test_int4_min_huge_range_stays_finite():
    # weights near the float32 range: scale, codes and dequantized values stay finite and in bound
    w = np.tile(np.array([-1.6e38, 1.6e38, 0.0, 1e30] * 8, np.float32), (2, 1))
    qm = mk.quantize(w, "int4_min", group_size=32)
    assert np.isfinite(qm.scales()).all()
    d = mk.dequantize(qm).astype(np.float64)
    assert np.isfinite(d).all()
    assert np.abs(d - w).max() <= 0.5 * qm.scales().max() * 1.001


def test_bits_per_weight_new_formats():
    w = rng(52).standard_normal((64, 1024)).astype(np.float32)
    assert mk.quantize(w, "int8", group_size=32).bits_per_weight == pytest.approx(8 + 32 / 32)
    assert mk.quantize(w, "int4_min", group_size=32).bits_per_weight == pytest.approx(4 + 64 / 32)
    assert mk.quantize(w, "int4_min", group_size=128).bits_per_weight == pytest.approx(4 + 64 / 128)


@pytest.mark.parametrize("fmt,group", NEW + [("int4_sym", 32)])
def test_pack_quantized_round_trip_exact(fmt, group):
    """dequantize(pack_quantized(...)) is the formula evaluated in float32, bit for bit, with
    negative and zero scales (GGUF's d), int8 codes -128..127 and mins of any sign."""
    n, k = 13, 4 * group
    if fmt == "int4_sym":  # GGUF Q4_0: w = d * (q - 8)
        r = rng(53)
        codes = r.integers(0, 16, (n, k), dtype=np.uint8)
        scales = r.standard_normal((n, k // group)).astype(np.float32)
        scales[0, 0] = 0.0
        scales[1, :] = -np.abs(scales[1, :])
        qm = mk.pack_quantized("int4_sym", codes, scales, group_size=group)
        expect = np.repeat(scales, group, 1) * (codes.astype(np.float32) - np.float32(8))
    else:
        qm, _, (codes, scales, mins) = packed_case(fmt, n, k, group, seed=54, raw=True)
        assert (scales < 0).any() and (scales == 0).any() and (scales > 0).any()
        if fmt == "int8":
            expect = np.repeat(scales, group, 1) * codes.astype(np.float32)
        else:  # float32 product, then float32 sum: what GGUF readers compute
            expect = np.repeat(scales, group, 1) * codes.astype(np.float32) + np.repeat(mins, group, 1)
            np.testing.assert_array_equal(qm.mins(), mins)
    assert expect.dtype == np.float32
    for isa in ISAS:
        old = mk.cpu_isa()
        mk.set_cpu_isa(isa)
        try:
            out = np.full((n, k), np.nan, np.float32)
            got = mk.dequantize(qm, out=out)
            np.testing.assert_array_equal(got, expect, err_msg=isa)
        finally:
            mk.set_cpu_isa(old)
    np.testing.assert_array_equal(qm.scales(), scales)


def test_int8_pack_accepts_int8_and_uint8_bits():
    r = rng(55)
    codes = r.integers(-128, 128, (5, 64), dtype=np.int8)
    codes[0, 0] = -128
    scales = r.standard_normal((5, 2)).astype(np.float32)
    a = mk.pack_quantized("int8", codes, scales, group_size=32)
    b = mk.pack_quantized("int8", codes.view(np.uint8), scales, group_size=32)
    assert a.to_bytes() == b.to_bytes()
    assert mk.dequantize(a)[0, 0] == np.float32(-128) * scales[0, 0]


@pytest.mark.parametrize("fmt,group", NEW)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 9, 17])
def test_new_formats_qgemm_matches_reference(isa, fmt, group, tokens):
    n, k = 41, 3 * 128 + (128 if group == 128 else 64)  # odd N; K not a multiple of 128 unless g128
    qm, d = packed_case(fmt, n, k, group, seed=60 + tokens + group)
    x = rng(61 + tokens).standard_normal((tokens, k)).astype(np.float32)
    bias = rng(62).standard_normal(n).astype(np.float32)
    out = np.full((tokens, n), np.nan, np.float32)
    y = mk.qgemm(x, qm, bias, out=out, exact=True)
    assert y is out
    ref = reference(x, d, bias)
    mag = np.abs(x).astype(np.float64) @ np.abs(d).T + np.abs(bias)
    assert np.all(np.abs(y - ref) <= 2e-5 * mag + 1e-6), np.abs(y - ref).max()
    # a quantize()d matrix of the format too (non-negative scales, the usual path)
    _, qq, dq = qm_and_ref(fmt, n, k, group, seed=63)
    out = np.full((tokens, n), np.nan, np.float32)
    mk.qgemm(x, qq, out=out, exact=True)
    mag = np.abs(x).astype(np.float64) @ np.abs(dq).T
    assert np.all(np.abs(out - reference(x, dq, None)) <= 2e-5 * mag + 1e-6)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4_min", 32), ("int4_min", 128)])
def test_new_formats_half_precision(dtype, fmt, group):
    n, k = 19, 256
    qm, d = packed_case(fmt, n, k, group, seed=64)
    for tokens in (1, 6):
        x = rng(65).standard_normal((tokens, k)).astype(dtype)
        out = np.full((tokens, n), np.nan, dtype)
        mk.qgemm(x, qm, out=out, exact=True)
        ref = reference(x.astype(np.float64), d, None)
        mag = np.abs(x.astype(np.float64)) @ np.abs(d).T
        err = np.abs(out.astype(np.float64) - ref)
        assert np.all(err <= tol_for(dtype) * np.maximum(np.abs(ref), 1e-3 * mag) + 1e-4 * mag)
    out = mk.dequantize(qm, np.dtype(dtype).name)
    np.testing.assert_allclose(out.astype(np.float64), d, rtol=tol_for(dtype), atol=1e-6)


@pytest.mark.parametrize("fmt,group", NEW)
@pytest.mark.parametrize("k", [128, 384, 4224])
def test_new_formats_int8_activations(isa, fmt, group, k):
    if k % group:
        pytest.skip("k not a multiple of the group")
    n = 37
    qm, d = packed_case(fmt, n, k, group, seed=k + group)
    x = rng(k + 1).standard_normal(k).astype(np.float32)
    bias = rng(3).standard_normal(n).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    y = mk.qgemm(x, qm, bias, out=out, int8_activations=True)
    ref = d @ x.astype(np.float64) + bias
    bound = int8_path_bound(qm, d, x)[0] * 1.001 + 1e-4 * (np.abs(d) @ np.abs(x)) + 1e-5
    assert np.all(np.abs(y - ref) <= bound)
    exact = mk.qgemm(x, qm, bias, exact=True)
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    integer_path = isa == "avx2" or (isa == "avx512" and vnni)

    def rounded(xt):  # x as the integer path sees it: int8 codes times one scale per token and x block
        return int8_rounded_x(qm, xt)[0]

    if integer_path:
        assert not np.array_equal(y, exact)  # the int8 path really ran
        # and it is an integer dot product of the rounded x, not an approximation of one
        xq = rounded(x)
        np.testing.assert_allclose(y, d @ xq + bias, rtol=2e-5, atol=2e-5 * (np.abs(d) @ np.abs(xq)).max())
    else:
        np.testing.assert_array_equal(y, exact)
    # 2 to 8 tokens share each weight load (each token its own scale), up to 64 in passes of 8;
    # 65 and more: the fp32 prefill kernel, as exact=True; from 32 on AVX512-BF16: the bf16 prefill
    # kernel (tests/python/test_qgemm_prefill.py), within its own bound
    bf16 = isa == "avx512" and "avx512_bf16" in open("/proc/cpuinfo").read()
    for tokens in (2, 5, 8, 9, 27, 64, 65):
        X = (rng(k + tokens).standard_normal((tokens, k)) * np.linspace(0.5, 2, tokens)[:, None]).astype(np.float32)
        out = np.full((tokens, n), np.nan, np.float32)
        Y = mk.qgemm(X, qm, bias, out=out, int8_activations=True)
        if bf16 and tokens >= 32:
            mag = np.abs(X.astype(np.float64)) @ np.abs(d).T
            err = np.abs(Y - (X.astype(np.float64) @ d.T + bias))
            assert np.all(err <= (2.0 ** -8 + 2.0 ** -16 + k * 2.0 ** -24) * mag + 1e-5), tokens
            continue
        if tokens > 64 or not integer_path:
            np.testing.assert_array_equal(Y, mk.qgemm(X, qm, bias, exact=True))
            continue
        for t in range(tokens):
            ref = d @ X[t].astype(np.float64) + bias
            bound = int8_path_bound(qm, d, X[t])[0] * 1.001 + 1e-4 * (np.abs(d) @ np.abs(X[t])) + 1e-5
            assert np.all(np.abs(Y[t] - ref) <= bound), (tokens, t)
            xq = rounded(X[t])
            np.testing.assert_allclose(Y[t], d @ xq + bias, rtol=2e-5, atol=2e-5 * (np.abs(d) @ np.abs(xq)).max())


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int8", 128), ("int4_min", 32), ("int4_min", 64)])
def test_new_formats_serialise_round_trip(fmt, group, tmp_path):
    qm, d = packed_case(fmt, 9, 256, group, seed=70)
    b = qm.to_bytes()
    r = mk.from_bytes(b)
    assert (r.format, r.shape, r.group_size) == (fmt, (9, 256), group)
    np.testing.assert_array_equal(mk.dequantize(r), mk.dequantize(qm))
    assert r.to_bytes() == b
    if fmt == "int4_min":
        np.testing.assert_array_equal(r.mins(), qm.mins())
    path = tmp_path / "w.mkq"
    qm.save(str(path))
    np.testing.assert_array_equal(mk.dequantize(mk.load_quantized(path)), mk.dequantize(qm))
    # every flipped byte (header, codes, scales, mins, checksum) and every truncation is refused
    for pos in list(range(0, 64)) + list(range(64, len(b), 37)) + [len(b) - 200, len(b) - 9, len(b) - 1]:
        bad = bytearray(b)
        bad[pos] ^= 0x21
        with pytest.raises(mk.CorruptDataError):
            mk.from_bytes(bytes(bad))
    for cut in (0, 63, 64, 65, len(b) // 2, len(b) - 8, len(b) - 1):
        with pytest.raises(mk.CorruptDataError):
            mk.from_bytes(bytes(b[:cut]))


def test_per_channel_int8_bytes_unchanged():
    # files written before group-wise int8 existed are per-channel int8 with group_size == cols:
    # the same header and layout still load (version 1)
    w = rng(71).standard_normal((6, 96)).astype(np.float32)
    qm = mk.quantize(w, "int8")
    b = qm.to_bytes()
    assert b[:4] == b"MKQM" and int.from_bytes(b[4:8], "little") == 1
    assert int.from_bytes(b[32:36], "little") == 96  # group_size field = in_features
    assert mk.from_bytes(b).group_size == 96


def test_new_formats_bad_input():
    codes = np.zeros((4, 64), np.uint8)
    scales = np.ones((4, 2), np.float32)
    mins = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="needs mins"):
        mk.pack_quantized("int4_min", codes, scales, group_size=32)
    with pytest.raises(ValueError, match="mins"):
        mk.pack_quantized("int4_min", codes, scales, mins=np.zeros((4, 3), np.float32), group_size=32)
    with pytest.raises(ValueError, match="mins"):
        mk.pack_quantized("int4_min", codes, scales, mins=np.zeros(8, np.float32), group_size=32)
    with pytest.raises(TypeError, match="mins"):
        mk.pack_quantized("int4_min", codes, scales, mins=np.zeros((4, 2), np.int32), group_size=32)
    with pytest.raises(TypeError, match="scales"):
        mk.pack_quantized("int4_min", codes, np.ones((4, 2), np.int64), mins=mins, group_size=32)
    bad = mins.copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"mins must be finite; mins\[2, 1\]"):
        mk.pack_quantized("int4_min", codes, scales, mins=bad, group_size=32)
    for v in (np.nan, np.inf, -np.inf):
        s = scales.copy()
        s[3, 0] = v
        for fmt in ("int8", "int4_sym", "nf4"):
            with pytest.raises(ValueError, match=r"scales must be finite; scales\[3, 0\]"):
                mk.pack_quantized(fmt, codes, s, group_size=32)
    with pytest.raises(ValueError, match="mins apply to int4_min only"):
        mk.pack_quantized("int4_sym", codes, scales, mins=mins, group_size=32)
    with pytest.raises(ValueError, match="no zero points"):
        mk.pack_quantized("int4_min", codes, scales, np.zeros((4, 2), np.uint8), mins=mins, group_size=32)
    with pytest.raises(ValueError, match="codes must be < 2\\^4"):
        mk.pack_quantized("int4_min", np.full((4, 64), 16, np.uint8), scales, mins=mins, group_size=32)
    with pytest.raises(ValueError, match="mins"):  # a partial last group still needs its min: (4, 2)
        mk.pack_quantized("int4_min", np.zeros((4, 48), np.uint8), scales, mins=mins[:, :1], group_size=32)
    with pytest.raises(ValueError, match="scales"):  # 96 columns in groups of 64: (4, 2) scales
        mk.pack_quantized("int8", np.zeros((4, 96), np.uint8), np.ones((4, 1), np.float32), group_size=64)
    with pytest.raises(ValueError, match="scales"):  # int8 g32 wants (N, K / 32) scales
        mk.pack_quantized("int8", codes, np.ones((4, 1), np.float32), group_size=32)
    w = rng(72).standard_normal((4, 96)).astype(np.float32)
    with pytest.raises(ValueError, match="in groups of 32, 64 or 128"):
        mk.quantize(w, "int8", group_size=16)
    with pytest.raises(ValueError, match="double_quant applies to nf4"):
        mk.quantize(w, "int4_min", group_size=32, double_quant=True)


def test_gptq_int4_min_and_int8_groups():
    r = rng(73)
    n, k, m = 24, 128, 512
    X = r.standard_normal((m, k)) @ (r.standard_normal((k, k)) * 0.3 + np.eye(k))
    W = r.standard_normal((n, k)).astype(np.float32)
    for fmt, group in (("int4_min", 32), ("int8", 32)):
        rtn = mk.dequantize(mk.quantize(W, fmt, group_size=group)).astype(np.float64)
        qg = mk.quantize_gptq(W, fmt, group_size=group, activations=X)
        assert (qg.format, qg.group_size) == (fmt, group)
        gq = mk.dequantize(qg).astype(np.float64)
        assert np.linalg.norm(X @ (W - gq).T) < 0.9 * np.linalg.norm(X @ (W - rtn).T), fmt


@cuda
@pytest.mark.parametrize("fmt,group", NEW)
@pytest.mark.parametrize("tokens", [1, 3, 5, 16, 33])
def test_cuda_new_formats(fmt, group, tokens):
    torch = _torch_cuda()
    n, k = 131, 512
    qm, d = packed_case(fmt, n, k, group, seed=80 + tokens)
    g = qm.to("cuda")
    for dt, eps in ((torch.float32, 1e-6), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)):
        x = torch.randn(tokens, k, device="cuda").to(dt)
        bias = torch.randn(n, device="cuda").to(dt)
        out = torch.full((tokens, n), float("nan"), device="cuda", dtype=dt)
        mk.qgemm(x, g, bias, out=out, exact=True)
        xr = x.double().cpu().numpy()
        ref = xr @ d.T + bias.double().cpu().numpy()
        mag = np.abs(xr) @ np.abs(d).T
        err = np.abs(out.double().cpu().numpy() - ref)
        assert np.all(err <= eps * (np.abs(ref) + 0.51 * mag) + 3e-5 * mag), (fmt, dt, tokens)
    dd = mk.dequantize(g, like=torch.empty(1, device="cuda"))
    np.testing.assert_array_equal(dd.cpu().numpy(), mk.dequantize(qm))  # bit for bit, never fused
    assert g.to_bytes() == qm.to_bytes()


# ---- default path (issue 14): int8 activations where they apply, exact=True keeps fp32 ----------------

@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4_sym", 32), ("int4_min", 32), ("int8", 32), ("int8", None),
                                       ("int4", 128), ("nf4", 64), ("int3", 128), ("int3_sym", 32), ("int2", 64),
                                       ("int2_sym", 128)])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 33, 65])
def test_qgemm_default_is_the_documented_path(isa, fmt, group, tokens):
    n, k = 45, 640  # a small-model size: the single-thread branch of the kernels
    w = rng(7).standard_normal((n, k)).astype(np.float32)
    qm = mk.quantize(w, fmt, group_size=group)
    d = mk.dequantize(qm).astype(np.float64)
    X = rng(8 + tokens).standard_normal((tokens, k)).astype(np.float32)
    bias = rng(9).standard_normal(n).astype(np.float32)
    y = mk.qgemm(X, qm, bias)
    # the default is the int8_activations path, exact=True the fp32 one, bit for bit
    np.testing.assert_array_equal(y, mk.qgemm(X, qm, bias, out=np.full((tokens, n), np.nan, np.float32),
                                              int8_activations=True))
    exact = mk.qgemm(X, qm, bias, exact=True)
    np.testing.assert_array_equal(exact, mk.qgemm(X, qm, bias, int8_activations=False))
    ref = X.astype(np.float64) @ d.T + bias
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-4 * (np.abs(X) @ np.abs(d).T).max())
    # the bound documented in quant.h, against the float64 product
    bound = int8_path_bound(qm, d, X) * 1.001 + 1e-4 * (np.abs(X) @ np.abs(d).T) + 1e-5
    assert np.all(np.abs(y - ref) <= bound)
    # 1-D x takes the same path as a 1-token batch
    np.testing.assert_array_equal(mk.qgemm(X[0], qm, bias), mk.qgemm(X[:1], qm, bias)[0])
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    int8_format = fmt in ("int4", "int4_sym", "int4_min", "int8", "int3", "int3_sym", "int2", "int2_sym", "nf4")
    # from 32 tokens (12 for formats without an int8 path) on AVX512-BF16: the bf16 prefill kernel
    bf16_path = (isa == "avx512" and "avx512_bf16" in open("/proc/cpuinfo").read()
                 and tokens >= (32 if int8_format else 12))
    integer_path = (not bf16_path and int8_format and tokens <= 64
                    and (isa == "avx2" or (isa == "avx512" and vnni)))
    assert np.array_equal(y, exact) != (integer_path or bf16_path)


@functools.lru_cache(maxsize=None)
def large_matrix(fmt, group):
    """A 4099 x 4096 matrix: 16.8 M multiply-adds at one token, just past the threshold (quantized once)."""
    qm = mk.quantize(rng(30).standard_normal((4099, 4096)).astype(np.float32), fmt, group_size=group)
    return qm, mk.dequantize(qm).astype(np.float64)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None), ("nf4", 64)])
@pytest.mark.parametrize("exact", [False, True])
def test_qgemm_large_calls_split_over_threads(isa, fmt, group, exact):
    """From 16 million multiply-adds a call splits its rows over the OpenMP team (runtime_internal.h):
    the split result equals the one-thread result bit for bit and stays within the documented bound;
    rows that do not fill a task (4099 = 256 tasks of 16 and 3) included."""
    qm, d = large_matrix(fmt, group)
    n, k = d.shape
    old = mk.num_threads()
    for tokens in (1, 5):
        X = rng(31 + tokens).standard_normal((tokens, k)).astype(np.float32)
        try:
            mk.set_num_threads(1)
            y1 = mk.qgemm(X, qm, exact=exact, out=np.full((tokens, n), np.nan, np.float32))
            mk.set_num_threads(2)
            y2 = mk.qgemm(X, qm, exact=exact, out=np.full((tokens, n), np.nan, np.float32))
        finally:
            mk.set_num_threads(old)
        np.testing.assert_array_equal(y1, y2)
        ref = X.astype(np.float64) @ d.T
        mag = np.abs(X).astype(np.float64) @ np.abs(d).T
        bound = 1e-4 * mag + 1e-5 if exact else int8_path_bound(qm, d, X) * 1.001 + 1e-4 * mag + 1e-5
        assert np.all(np.abs(y2 - ref) <= bound)


def test_qgemm_exact_and_int8_activations_conflict():
    qm = mk.quantize(rng(1).standard_normal((8, 32)).astype(np.float32), "int4", group_size=32)
    x = rng(2).standard_normal((1, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="exact=True and int8_activations=True"):
        mk.qgemm(x, qm, exact=True, int8_activations=True)
    with pytest.raises(TypeError, match="qm"):  # the fast path still names a wrong argument
        mk.qgemm(x, "not a matrix")
    with pytest.raises(ValueError, match="features"):
        mk.qgemm(x[:, :16], qm)
    for dt in (np.float16,) + ((mk._arrays.bfloat16,) if mk._arrays.bfloat16 is not None else ()):
        xd = x.astype(dt)
        y = mk.qgemm(xd, qm)
        assert y.dtype == xd.dtype and y.shape == (1, 8)
        np.testing.assert_allclose(y.astype(np.float32), mk.qgemm(xd.astype(np.float32), qm), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4_sym", 128), ("int4_min", 64), ("int8", None),
                                       ("int8", 32), ("int3", 64), ("int2_sym", 32), ("nf4", 64)])
def test_int8_path_outlier_channels(isa, fmt, group):
    """One scale per token and x block (quant.h): a few huge activations (the outlier channels of
    LLM hidden states) coarsen only their own blocks. The per-block bound holds, with the outliers
    in a few blocks it is several times tighter than one scale per token would give, and the int8
    path is an integer dot of x rounded per block."""
    n, k = 37, 1000 if group != 128 else 1024  # per-channel int8: 1000 is 3 blocks of 256 and a partial one
    _, qm, d = qm_and_ref(fmt, n, k, group, seed=123)
    X = rng(124).standard_normal((5, k)).astype(np.float32)
    X[:, 7] *= 300.0  # one outlier channel, in the first block
    X[2, k - 3] = -500.0  # and one in the last block of one token
    out = np.full((5, n), np.nan, np.float32)
    Y = mk.qgemm(X, qm, out=out)
    ref, mag = check_int8_outlier_bound(qm, d, X, Y, 2e-5, 0.5)
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    if isa == "avx2" or (isa == "avx512" and vnni):
        # the integer path ran: its error is well below what one scale per token gives (only the
        # outliers' blocks are coarse: 1 or 2 of 4 for per-channel int8, of 8 to 32 for the groups)
        assert np.abs(Y - ref).mean() < 0.75 * np.abs(int8_rounded_x_per_token(X) @ d.T - ref).mean()
        if fmt != "nf4":
            xq = int8_rounded_x(qm, X)
            np.testing.assert_allclose(Y, xq @ d.T, rtol=2e-5, atol=2e-5 * (np.abs(xq) @ np.abs(d).T).max())
    else:
        np.testing.assert_array_equal(Y, mk.qgemm(X, qm, exact=True))


def int8_rounded_x_per_token(X):
    """x rounded with one int8 scale per token (the int8 path before per-block scales)."""
    amax = np.abs(X).max(1, keepdims=True).astype(np.float32)
    dx = amax / np.float32(127)
    return np.rint(X * (np.float32(1) / dx)).astype(np.float64) * dx


def test_int8_max_tokens_env_moves_the_prefill_boundary():
    """MEMKERNELS_INT8_MAX_TOKENS=n (read once per process, quant_internal.h): the int8 path serves
    calls of up to n tokens, the prefill kernels only longer ones; a bad value is ignored."""
    import subprocess
    import sys
    cpu = open("/proc/cpuinfo").read()
    # the best ISA runs: its int8 path needs VNNI on AVX-512 CPUs, AVX2 below them
    if not ("avx512_vnni" in cpu or ("avx2" in cpu and "avx512f" not in cpu)):
        pytest.skip("no int8-activation path at this CPU's best ISA")
    code = (
        "import numpy as np, memkernels as mk, sys\n"
        "sys.path.insert(0, %r)\n"
        "from conftest import int8_rounded_x\n"
        "w = np.random.default_rng(1).standard_normal((40, 256)).astype(np.float32)\n"
        "qm = mk.quantize(w, 'int4', group_size=32)\n"
        "d = mk.dequantize(qm).astype(np.float64)\n"
        "x = np.random.default_rng(2).standard_normal((100, 256)).astype(np.float32)\n"
        "y = mk.qgemm(x, qm)\n"
        "xq = int8_rounded_x(qm, x)\n"
        "err = np.abs(y - xq @ d.T).max() / (np.abs(xq) @ np.abs(d).T).max()\n"
        "print('int8' if err < 2e-5 else 'other')\n") % os.path.dirname(os.path.abspath(__file__))
    def run(value):
        env = dict(os.environ)
        env.pop("MEMKERNELS_INT8_MAX_TOKENS", None)
        if value is not None:
            env["MEMKERNELS_INT8_MAX_TOKENS"] = value
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
    assert run("100") == "int8"          # 100 tokens on the int8 path
    assert run("99") == "other"          # one more than n: a prefill kernel
    assert run("many") == "other"        # ignored: the default, int8 up to 64 tokens
