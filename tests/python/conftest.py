"""Shared test helpers: seeded random inputs, poisoned outputs, dtype tolerances, CUDA detection."""
import os
import shutil

import numpy as np
import pytest

import memkernels

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float16)] + ([BF16] if BF16 is not None else [])

# Relative error bounds per dtype, for results accumulated in fp32 from inputs of that dtype.
TOLERANCE = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}

# The CPU ISAs this machine can run, lowest first; the `isa` fixture runs a test once under each.
_ALL_ISAS = ("generic", "avx2", "avx512")
ISAS = list(_ALL_ISAS[:_ALL_ISAS.index(memkernels.info()["best_cpu_isa"]) + 1])


@pytest.fixture(params=ISAS)
def isa(request):
    old = memkernels.info()["cpu_isa"]
    memkernels.set_cpu_isa(request.param)
    yield request.param
    memkernels.set_cpu_isa(old)


CUDA_AVAILABLE = memkernels.info()["cuda_available"]
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so every test is reproducible on its own."""
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def random_array(rng, shape, dtype=np.float32, scale=1.0):
    """Normal random values rounded to `dtype` (never zeros)."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def poisoned(shape, dtype):
    """An output buffer filled with NaN, so unwritten elements fail the comparison."""
    return np.full(shape, np.nan, dtype=dtype)


def assert_close(actual, expected, dtype, what=""):
    """max |a - e| <= tol * max(1, max |e|), and every element finite where expected is."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual) == np.isfinite(expected)), f"{what}: non-finite mismatch"
    finite = np.isfinite(expected)
    err = np.max(np.abs(actual[finite] - expected[finite]), initial=0.0)
    bound = TOLERANCE[np.dtype(dtype).name] * max(1.0, np.max(np.abs(expected[finite]), initial=0.0))
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({np.dtype(dtype).name})"


# nf4 on the int8-activation path uses each level L as round(127 L) / 127 (memkernels/quant.h)
NF4_LEVELS = np.asarray(memkernels._C.nf4_codebook(), np.float64)
NF4_INT8_ERR = float(np.abs(np.rint(127 * NF4_LEVELS.astype(np.float32)) / 127 - NF4_LEVELS).max())


def int8_x_block(qm):
    """Weights per int8 scale of x on the int8-activation path (memkernels/quant.h): the group of a
    grouped format (32, 64, 128), 256 for per-channel int8, the 256-weight super-block for the K-quants."""
    if qm.format in ("q4_k", "q5_k", "q6_k"):
        return 256
    return min(int(qm.group_size), 256)


def int8_rounded_x(qm, x):
    """x (tokens, K) as the int8-activation path sees it, in float64: per token and x block
    (int8_x_block) the int8 codes rint(x * (1 / dx)) (fp32, as the kernels compute them) times
    dx = max|x| of the block / 127 (1 for a block of zeros)."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    T, K = x.shape
    blk = int8_x_block(qm)
    out = np.empty((T, K))
    for k0 in range(0, K, blk):
        xb = x[:, k0:k0 + blk]
        amax = np.abs(xb).max(1, keepdims=True)
        dx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        out[:, k0:k0 + blk] = np.rint(xb * (np.float32(1) / dx)).astype(np.float64) * dx.astype(np.float64)
    return out


def int8_path_bound(qm, d, x):
    """The documented bound (memkernels/quant.h) of the int8-activation path against the exact
    product, per (token, output): sum over x blocks B of sum_{k in B} |w_k| * max_{k in B} |x_k| / 254,
    plus for nf4 (levels rounded to round(127 L) / 127, at most NF4_INT8_ERR away)
    NF4_INT8_ERR * sum_k |s_k| * (|x_k| + max_{B(k)} |x| / 254)."""
    ax = np.atleast_2d(np.abs(np.asarray(x, np.float64)))
    K, blk = ax.shape[1], int8_x_block(qm)
    nb = -(-K // blk)
    pad = np.zeros((ax.shape[0], nb * blk))
    pad[:, :K] = ax
    bmax = pad.reshape(ax.shape[0], nb, blk).max(2)            # (T, blocks)
    xmax_k = np.repeat(bmax, blk, 1)[:, :K]                     # each x's block maximum
    wpad = np.zeros((d.shape[0], nb * blk))
    wpad[:, :K] = np.abs(np.asarray(d, np.float64))
    wsum = wpad.reshape(d.shape[0], nb, blk).sum(2)             # (N, blocks)
    b = bmax @ wsum.T / 254
    if qm.format == "nf4":
        s = np.abs(np.repeat(np.asarray(qm.scales(), np.float64), qm.group_size, 1))[:, :d.shape[1]]
        b = b + NF4_INT8_ERR * ((ax + xmax_k / 254) @ s.T)
    return b


def check_int8_outlier_bound(qm, d, X, Y, mag_tol, median_below):
    """Y, the int8 path's X @ d.T for X with outlier channels, is within the per-block bound
    (int8_path_bound), and that bound is below `median_below` times (median over outputs) what one x
    scale per token would give: only the outliers' blocks are coarse. Returns (ref, mag)."""
    ref = X.astype(np.float64) @ d.T
    mag = np.abs(X).astype(np.float64) @ np.abs(d).T
    bound = int8_path_bound(qm, d, X)
    assert np.all(np.abs(Y - ref) <= bound * 1.001 + mag_tol * mag + 1e-5)
    per_token = np.abs(d).sum(1)[None, :] * np.abs(X).max(1, keepdims=True) / 254
    assert np.all(bound <= per_token * 1.0001) and np.median(bound / per_token) < median_below
    return ref, mag


@pytest.fixture
def tmp(tmp_path_factory):
    """A fresh directory on disk: /var/tmp here, where O_DIRECT and Linux AIO work (pytest's tmp_path
    may be on tmpfs, which refuses O_DIRECT)."""
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else str(tmp_path_factory.getbasetemp())
    d = os.path.join(base, f"mk_test_{os.getpid()}_{np.random.randint(1 << 30)}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d)


def flip_byte(path, offset, mask):
    """Corrupts one byte of a file in place (byte ^= mask), as a bad sector would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))
        f.flush()
        os.fsync(f.fileno())  # on disk before an O_DIRECT read looks
