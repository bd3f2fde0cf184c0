"""Flash attention against a float64 NumPy reference: shapes, dtypes, masks, varlen, bad input."""
import numpy as np
import pytest
from conftest import BF16, FLOAT_DTYPES, assert_close, poisoned, random_array, requires_cuda

import memkernels as mk


def reference_attention(q, k, v, causal=False, scale=None, window=(-1, -1), softcap=None):
    """softmax(q k^T) v in float64 for one batch element: q (Sq, H, D), k/v (Sk, Hkv, D).
    Returns (out (Sq, H, D), lse (H, Sq)); rows that see no key give 0 and -inf."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    sq, h, d = q.shape
    sk, hkv, _ = k.shape
    k = np.repeat(k, h // hkv, axis=1)
    v = np.repeat(v, h // hkv, axis=1)
    s = np.einsum("ihd,jhd->hij", q, k) * (scale if scale else 1.0 / np.sqrt(d))
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(sq)[:, None] + (sk - sq)
    j = np.arange(sk)[None, :]
    left, right = window
    if causal:
        right = 0
    visible = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hij,jhd->ihd", p / np.where(l > 0, l, 1.0), v)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    return out, lse


def run_and_check(rng, b, sq, sk, h, hkv, d, dtype=np.float32, **opts):
    q = random_array(rng, (b, sq, h, d), dtype)
    k = random_array(rng, (b, sk, hkv, d), dtype)
    v = random_array(rng, (b, sk, hkv, d), dtype)
    out = poisoned(q.shape, dtype)
    got, lse = mk.flash_attention(q, k, v, out=out, return_lse=True, **opts)
    assert got is out and got.dtype == np.dtype(dtype)
    window = opts.get("window")
    window = (-1, -1) if window is None else (window, window) if isinstance(window, int) else window
    for bi in range(b):
        ref, ref_lse = reference_attention(q[bi], k[bi], v[bi], opts.get("causal", False), opts.get("scale"), window,
                                           opts.get("softcap"))
        assert_close(got[bi], ref, dtype, f"out[{bi}]")
        assert_close(lse[bi], ref_lse, np.float32 if dtype == np.float32 else dtype, f"lse[{bi}]")


SHAPES = [  # (batch, seq_q, seq_k, heads, kv_heads, head_dim)
    (1, 1, 1, 1, 1, 64),
    (2, 37, 53, 4, 2, 64),      # GQA, odd lengths
    (1, 64, 64, 2, 2, 128),     # exactly one tile
    (1, 65, 129, 3, 1, 80),     # MQA, one past the tile
    (2, 100, 100, 2, 2, 96),
    (1, 33, 200, 2, 1, 256),
    (1, 7, 11, 2, 2, 7),        # head_dim not a multiple of the vector width
    (1, 130, 40, 2, 1, 33),     # seq_q > seq_k
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_fp32(rng, shape, causal):
    run_and_check(rng, *shape, causal=causal)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(rng, dtype, causal):
    run_and_check(rng, 2, 70, 90, 4, 2, 128, dtype, causal=causal)


@pytest.mark.parametrize("window", [3, (5, 0), (0, 4), (17, 9), (70, -1)])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(rng, window, causal):
    run_and_check(rng, 1, 150, 170, 2, 1, 64, window=window, causal=causal)


INT_MAX = 2**31 - 1
# (window, the window it must act as): bounds near INT_MAX are unbounded in effect
HUGE_WINDOWS = [(INT_MAX - 1, (-1, -1)), ((INT_MAX - 1, 3), (-1, 3)), ((3, INT_MAX - 1), (3, -1)),
                ((INT_MAX, INT_MAX), (-1, -1))]


@pytest.mark.parametrize("window,same", HUGE_WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(37, 53), (70, 20)])  # sq > sk: negative positions
def test_window_near_int_max(rng, window, same, causal, sq, sk):
    """i + off + window overflowed int and masked every key (issue 13 #9, issue 15 #1)."""
    q = random_array(rng, (1, sq, 2, 64))
    k, v = random_array(rng, (1, sk, 1, 64)), random_array(rng, (1, sk, 1, 64))
    got, lse = mk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True, out=poisoned(q.shape, q.dtype))
    want, want_lse = mk.flash_attention(q, k, v, causal=causal, window=same, return_lse=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(lse, want_lse)
    ref, _ = reference_attention(q[0], k[0], v[0], causal, window=same)
    assert_close(got[0], ref, np.float32)


def test_softcap_and_scale(rng):
    run_and_check(rng, 1, 50, 77, 2, 2, 64, softcap=5.0, scale=0.3)
    run_and_check(rng, 1, 50, 77, 2, 2, 64, softcap=2.0, causal=True)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_isa(rng, isa):
    levels = ["generic", "avx2", "avx512"]
    if levels.index(isa) > levels.index(mk.info()["best_cpu_isa"]):
        pytest.skip(f"CPU lacks {isa}")
    before = mk.cpu_isa()
    mk.set_cpu_isa(isa)
    try:
        run_and_check(rng, 1, 70, 90, 2, 1, 80, causal=True)
        run_and_check(rng, 1, 19, 23, 2, 2, 13, np.float16)
    finally:
        mk.set_cpu_isa(before)


def test_thread_counts_agree(rng):
    q, k, v = (random_array(rng, (1, 200, 4, 64)) for _ in range(3))
    before = mk.num_threads()
    try:
        mk.set_num_threads(1)
        one = mk.flash_attention(q, k, v, causal=True)
        mk.set_num_threads(3)
        three = mk.flash_attention(q, k, v, causal=True)
    finally:
        mk.set_num_threads(0)
    assert mk.num_threads() == before
    np.testing.assert_array_equal(one, three)


def test_fully_masked_rows_give_zero_and_minus_inf(rng):
    # seq_q > seq_k with causal: the first seq_q - seq_k queries see no key.
    q = random_array(rng, (1, 10, 1, 16))
    k = random_array(rng, (1, 4, 1, 16))
    out, lse = mk.flash_attention(q, k, k, causal=True, return_lse=True)
    assert np.all(out[0, :6] == 0) and np.all(np.isneginf(lse[0, 0, :6]))
    assert np.all(np.isfinite(lse[0, 0, 6:]))


def test_strided_inputs(rng):
    # q, k, v as views into one fused (batch, seq, 3, heads, dim) buffer: only the last dim is contiguous.
    qkv = random_array(rng, (2, 45, 3, 4, 64))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    got = mk.flash_attention(q, k, v, causal=True)
    for b in range(2):
        ref, _ = reference_attention(q[b], k[b], v[b], causal=True)
        assert_close(got[b], ref, np.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_varlen(rng, causal, dtype):
    lens_q = [5, 0, 64, 77, 1]
    lens_k = [9, 3, 64, 100, 130]
    h, hkv, d = 4, 2, 64
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = random_array(rng, (cu_q[-1], h, d), dtype)
    k = random_array(rng, (cu_k[-1], hkv, d), dtype)
    v = random_array(rng, (cu_k[-1], hkv, d), dtype)
    out, lse = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                                         out=poisoned(q.shape, dtype))
    assert lse.shape == (h, cu_q[-1])
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = reference_attention(q[sq], k[sk], v[sk], causal=causal)
        assert_close(out[sq], ref, dtype, f"batch {b}")
        assert_close(lse[:, sq], ref_lse, dtype, f"lse {b}")


def test_bf16_output_type(rng):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    q = random_array(rng, (1, 8, 2, 64), BF16)
    assert mk.flash_attention(q, q, q).dtype == BF16


# ---- bad input ---------------------------------------------------------------------------------

def _qkv(rng, sq=8, sk=8, h=4, hkv=2, d=64, dtype=np.float32):
    return (random_array(rng, (1, sq, h, d), dtype), random_array(rng, (1, sk, hkv, d), dtype),
            random_array(rng, (1, sk, hkv, d), dtype))


def test_bad_input(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        mk.flash_attention(q, random_array(rng, (1, 8, 3, 64)), random_array(rng, (1, 8, 3, 64)))
    with pytest.raises(ValueError, match="head_dim"):
        mk.flash_attention(q, random_array(rng, (1, 8, 2, 32)), random_array(rng, (1, 8, 2, 32)))
    with pytest.raises(ValueError, match="same shape"):
        mk.flash_attention(q, k, random_array(rng, (1, 9, 2, 64)))
    with pytest.raises(ValueError, match="batch"):
        mk.flash_attention(q, random_array(rng, (2, 8, 2, 64)), random_array(rng, (2, 8, 2, 64)))
    with pytest.raises(ValueError, match="4 dimensions"):
        mk.flash_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtype"):
        mk.flash_attention(q, k.astype(np.float16), v)
    with pytest.raises(TypeError, match="q: expected dtype"):
        mk.flash_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    with pytest.raises(TypeError, match="q: expected dtype"):
        mk.flash_attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="head_dim must be > 0"):
        z = np.zeros((1, 8, 2, 0), np.float32)
        mk.flash_attention(z, z, z)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        mk.flash_attention(np.asfortranarray(q), k, v)
    with pytest.raises(ValueError, match="out: expected shape"):
        mk.flash_attention(q, k, v, out=np.empty((1, 8, 4, 63), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype"):
        mk.flash_attention(q, k, v, out=np.empty(q.shape, np.float16))
    with pytest.raises(ValueError, match="window"):
        mk.flash_attention(q, k, v, window=(-5, 2))
    with pytest.raises(ValueError, match="scale"):
        mk.flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        mk.flash_attention(q, k, v, softcap=float("nan"))
    with pytest.raises(TypeError, match="expected a NumPy or DLPack-capable array"):
        mk.flash_attention("q", k, v)


def test_bad_varlen_offsets(rng):
    q = random_array(rng, (10, 2, 16))
    k = random_array(rng, (12, 2, 16))
    ok_q = np.array([0, 4, 10], np.int32)
    ok_k = np.array([0, 5, 12], np.int32)
    mk.flash_attention_varlen(q, k, k, ok_q, ok_k)
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.flash_attention_varlen(q, k, k, np.array([0, 6, 4], np.int32), ok_k)
    with pytest.raises(ValueError, match="exceeds"):
        mk.flash_attention_varlen(q, k, k, ok_q, np.array([0, 5, 13], np.int32))
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        mk.flash_attention_varlen(q, k, k, np.array([1, 4, 10], np.int32), ok_k)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype int32"):
        mk.flash_attention_varlen(q, k, k, ok_q.astype(np.int64), ok_k)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        mk.flash_attention_varlen(q, k, k, ok_q, ok_k[:2])


def test_torch_cpu_tensors_run_zero_copy(rng):
    torch = pytest.importorskip("torch")
    # torch CPU tensors go through DLPack and run on the CPU backend, zero-copy
    q = torch.from_numpy(random_array(rng, (1, 9, 2, 32)))
    out = mk.flash_attention(q, q, q, causal=True)
    assert isinstance(out, torch.Tensor)
    ref, _ = reference_attention(q[0].numpy(), q[0].numpy(), q[0].numpy(), causal=True)
    assert_close(out[0].numpy(), ref, np.float32)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(2, 37, 53, 4, 2, 64), (1, 130, 130, 2, 1, 128), (1, 65, 200, 2, 2, 80),
                                   (1, 64, 64, 2, 2, 256), (1, 19, 23, 2, 1, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_reference(rng, dtype, shape, causal):
    torch = pytest.importorskip("torch")
    b, sq, sk, h, hkv, d = shape
    tdt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, device="cuda").to(tdt)
    k = torch.randn(b, sk, hkv, d, device="cuda").to(tdt)
    v = torch.randn(b, sk, hkv, d, device="cuda").to(tdt)
    out = torch.full_like(q, float("nan"))
    got, lse = mk.flash_attention(q, k, v, causal=causal, return_lse=True, out=out)
    torch.cuda.synchronize()
    assert got.device.type == "cuda"
    for bi in range(b):
        qn, kn, vn = (t[bi].float().cpu().numpy() for t in (q, k, v))
        ref, ref_lse = reference_attention(qn, kn, vn, causal=causal)
        tol_dtype = {"float16": np.float16, "bfloat16": BF16 or np.float16, "float32": np.float32}[dtype]
        assert_close(got[bi].float().cpu().numpy(), ref, tol_dtype, "cuda out")
        assert_close(lse[bi].cpu().numpy(), ref_lse, tol_dtype, "cuda lse")


@requires_cuda
def test_cuda_varlen_and_window(rng):
    torch = pytest.importorskip("torch")
    lens = [5, 0, 64, 77]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), 4, 64, device="cuda", dtype=torch.float16)
    out = mk.flash_attention_varlen(q, q, q, cu, cu, causal=True, window=9)
    torch.cuda.synchronize()
    qn = q.float().cpu().numpy()
    c = cu.cpu().numpy()
    for b in range(len(lens)):
        s = slice(c[b], c[b + 1])
        ref, _ = reference_attention(qn[s], qn[s], qn[s], causal=True, window=(9, 9))
        assert_close(out[s].float().cpu().numpy(), ref, np.float16)


@requires_cuda
@pytest.mark.parametrize("dtype,d", [("float32", 40), ("float32", 64), ("float16", 64), ("float16", 40)])
@pytest.mark.parametrize("causal,window", [(False, (7, 3)), (True, 5)])
def test_cuda_softcap_and_window(rng, dtype, d, causal, window):
    # softcap and sliding windows on both CUDA kernels (mma: fp16 d=64; generic: fp32, d=40), no varlen
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    q = torch.randn(2, 45, 4, d, device="cuda").to(tdt)
    k = torch.randn(2, 70, 2, d, device="cuda").to(tdt)
    v = torch.randn(2, 70, 2, d, device="cuda").to(tdt)
    got, lse = mk.flash_attention(q, k, v, causal=causal, window=window, softcap=5.0, return_lse=True)
    torch.cuda.synchronize()
    win = (window, window) if isinstance(window, int) else window
    tol_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    for bi in range(2):
        qn, kn, vn = (t[bi].float().cpu().numpy() for t in (q, k, v))
        ref, ref_lse = reference_attention(qn, kn, vn, causal=causal, window=win, softcap=5.0)
        assert_close(got[bi].float().cpu().numpy(), ref, tol_dtype, "cuda softcap/window out")
        assert_close(lse[bi].cpu().numpy(), ref_lse, tol_dtype, "cuda softcap/window lse")


@requires_cuda
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("float32", 40)])  # mma and generic kernels
@pytest.mark.parametrize("window,same", HUGE_WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_window_near_int_max(rng, dtype, d, window, same, causal):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    q = torch.randn(1, 70, 2, d, device="cuda").to(tdt)
    k = torch.randn(1, 90, 1, d, device="cuda").to(tdt)
    v = torch.randn(1, 90, 1, d, device="cuda").to(tdt)
    got = mk.flash_attention(q, k, v, causal=causal, window=window)
    torch.cuda.synchronize()
    qn, kn, vn = (t[0].float().cpu().numpy() for t in (q, k, v))
    ref, _ = reference_attention(qn, kn, vn, causal=causal, window=same)
    assert_close(got[0].float().cpu().numpy(), ref, np.float16 if dtype == "float16" else np.float32)
