"""Shared test helpers: seeded random inputs, poisoned outputs, dtype tolerances, CUDA detection."""
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
