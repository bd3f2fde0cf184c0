"""Issue 13 #11-#13: qgemm with `out` overlapping an input, N-D x with a non-contiguous out, and
NaN / inf in x on the default int8-activation path."""
import numpy as np
import pytest

import memkernels as mk


def _reference(x, qm):
    return x.astype(np.float64) @ np.asarray(mk.dequantize(qm), np.float64).T


@pytest.fixture(scope="module")
def qm():
    rng = np.random.default_rng(13)
    return mk.quantize(rng.standard_normal((96, 96)).astype(np.float32), "int4", group_size=32)


@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_out_aliasing_x_is_refused(qm, tokens):
    x = np.random.default_rng(tokens).standard_normal((tokens, 96)).astype(np.float32)
    with pytest.raises(ValueError, match="out: overlaps x"):
        mk.qgemm(x, qm, out=x)
    with pytest.raises(ValueError, match="out: overlaps x"):
        mk.qgemm(x, qm, out=x[:, :96])


def test_out_aliasing_bias_is_refused(qm):
    x = np.random.default_rng(1).standard_normal((1, 96)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal(96).astype(np.float32)
    with pytest.raises(ValueError, match="out: overlaps bias"):
        mk.qgemm(x, qm, b, out=b[None])


@pytest.mark.parametrize("exact", [False, True])
def test_nd_x_with_non_contiguous_out_is_written(qm, exact):
    x = np.random.default_rng(3).standard_normal((2, 3, 96)).astype(np.float32)
    big = np.full((2, 4, 96), np.nan, np.float32)
    out = big[:, :3, :]  # (2, 3, 96) with a row gap: not reshapeable to 2-D without a copy
    got = mk.qgemm(x, qm, out=out, exact=exact)
    assert got is out
    ref = _reference(x.reshape(-1, 96), qm).reshape(2, 3, 96)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    assert np.isnan(big[:, 3, :]).all()  # nothing written beside out


def test_nd_x_with_non_contiguous_torch_out_is_written(qm):
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 3, 96)
    big = torch.full((2, 4, 96), float("nan"))
    out = big[:, :3, :]
    mk.qgemm(x, qm, out=out, exact=True)
    ref = _reference(x.numpy().reshape(-1, 96), qm).reshape(2, 3, 96)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tokens", [1, 5])
def test_non_finite_x_propagates_on_the_default_path(qm, bad, tokens):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    x[0, 17] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        ref = _reference(x, qm)
    got = mk.qgemm(x, qm)  # default: int8 activations where the CPU has the integer dots
    # NaN stays NaN; an infinite x gives non-finite outputs (the group-sum form of the kernels turns
    # inf - inf into NaN where float64 may give +-inf: non-finite either way, never a finite value)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    if np.isnan(bad):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    finite = np.isfinite(ref)
    if finite.any():  # the other tokens keep their (int8-activation) accuracy
        np.testing.assert_allclose(got[finite], ref[finite], rtol=3e-2, atol=3e-2 * np.abs(ref[finite]).max())
