"""flash_attention's padded-batch inputs (seqused_k, key_mask) against a float64 NumPy reference.

Padding keys hold NaN in every test (real padding is often garbage): a kernel that read them, or
weighted them by 0 instead of skipping them, would turn rows NaN.
"""
import numpy as np
import pytest
from conftest import BF16, FLOAT_DTYPES, assert_close, poisoned, random_array

import memkernels as mk


def reference(q, k, v, causal=False, window=(-1, -1), softcap=None, used=None, keep=None, scale=None):
    """float64 attention of one batch element: q (Sq, H, D), k/v (Sk, Hkv, D); sequence uses keys
    [0, used) (default all) and, of those, the ones where keep is True. Positions: query i sits at
    i + used - Sq. Rows without a visible key give 0 and lse -inf. Returns (out, lse (H, Sq))."""
    sk = k.shape[0]
    used = sk if used is None else int(used)
    keep = np.ones(sk, bool) if keep is None else np.asarray(keep, bool)
    q = np.asarray(q, np.float64)
    k, v, keep = np.asarray(k[:used], np.float64), np.asarray(v[:used], np.float64), keep[:used]
    k = np.where(keep[:, None, None], k, 0.0)  # dropped keys may hold NaN: never let them in
    v = np.where(keep[:, None, None], v, 0.0)
    sq, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[1], axis=1), np.repeat(v, h // v.shape[1], axis=1)
    s = np.einsum("ihd,jhd->hij", q, k) * (scale or 1.0 / np.sqrt(d))
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(sq)[:, None] + (used - sq)
    j = np.arange(used)[None, :]
    left, right = window
    right = 0 if causal else right
    visible = np.broadcast_to(keep[None, :], (sq, used)).copy()
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hij,jhd->ihd", p / np.where(l > 0, l, 1.0), v)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    return out, lse


def make_mask(rng, batch, sk, kind):
    """A (batch, sk) keep-mask: 'left' / 'right' padding of random lengths (one row fully padded,
    one not at all), or 'holes' (random keys dropped)."""
    keep = np.ones((batch, sk), bool)
    for b in range(batch):
        if kind == "holes":
            keep[b] = rng.random(sk) < 0.7
            continue
        n = [0, sk, int(rng.integers(1, sk + 1))][b % 3]  # real tokens in this row
        if kind == "left":
            keep[b, : sk - n] = False
        else:
            keep[b, n:] = False
    return keep


def nan_padding(k, v, keep=None, used=None):
    """k, v with NaN in every key the kernel must ignore."""
    k, v = k.copy(), v.copy()
    for b in range(k.shape[0]):
        drop = np.zeros(k.shape[1], bool)
        if keep is not None:
            drop |= ~keep[b]
        if used is not None:
            drop[used[b]:] = True
        k[b, drop] = np.nan
        v[b, drop] = np.nan
    return k, v


def check(rng, batch, sq, sk, h, hkv, d, dtype=np.float32, mask_kind=None, with_used=False, **opts):
    q = random_array(rng, (batch, sq, h, d), dtype)
    k = random_array(rng, (batch, sk, hkv, d), dtype)
    v = random_array(rng, (batch, sk, hkv, d), dtype)
    keep = make_mask(rng, batch, sk, mask_kind) if mask_kind else None
    used = None
    if with_used:
        used = rng.integers(0, sk + 1, size=batch).astype(np.int32)
        used[0], used[-1] = sk, 0 if batch > 1 else used[-1]  # the full length and an empty sequence
    k, v = nan_padding(k, v, keep, used)
    out = poisoned(q.shape, dtype)
    got, lse = mk.flash_attention(q, k, v, out=out, return_lse=True, seqused_k=used, key_mask=keep, **opts)
    assert got is out
    window = opts.get("window")
    window = (-1, -1) if window is None else (window, window) if isinstance(window, int) else window
    for b in range(batch):
        ref, ref_lse = reference(q[b], k[b], v[b], opts.get("causal", False), window, opts.get("softcap"),
                                 None if used is None else used[b], None if keep is None else keep[b],
                                 opts.get("scale"))
        assert_close(got[b], ref, dtype, f"out[{b}]")
        assert_close(lse[b], ref_lse, np.float32 if dtype == np.float32 else dtype, f"lse[{b}]")
    return got, lse


SHAPES = [  # (batch, seq_q, seq_k, heads, kv_heads, head_dim)
    (3, 1, 1, 1, 1, 8),       # the smallest decode step
    (3, 1, 37, 4, 2, 64),     # decode, GQA
    (3, 9, 13, 2, 2, 7),      # head_dim not a multiple of the vector width
    (3, 37, 53, 4, 1, 64),    # MQA, odd lengths (one thread)
    (4, 70, 130, 4, 2, 80),   # several key blocks, multithreaded
    (2, 66, 66, 2, 2, 128),   # prefill, seq_q == seq_k
    # short queries with GQA: the heads of a group share a task ((position, head) rows)
    (2, 5, 40, 14, 2, 16),    # 7 heads x 5 positions in one task
    (2, 30, 47, 10, 2, 24),   # 2 heads x 32 positions per task, the last task one head
    (2, 3, 600, 16, 2, 64),   # multithreaded, grouped
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["left", "right", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask(isa, rng, shape, kind, causal):
    check(rng, *shape, mask_kind=kind, causal=causal)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k(isa, rng, shape, causal):
    check(rng, *shape, with_used=True, causal=causal)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["left", "holes"])
def test_dtypes(isa, rng, dtype, kind):
    check(rng, 3, 21, 75, 4, 2, 64, dtype, mask_kind=kind, with_used=True, causal=True)


@pytest.mark.parametrize("window", [3, (5, 0), (0, 4), (17, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(isa, rng, window, causal):
    check(rng, 3, 40, 90, 2, 1, 32, mask_kind="holes", with_used=True, causal=causal, window=window)
    check(rng, 3, 6, 50, 8, 2, 32, mask_kind="left", with_used=True, causal=causal, window=window)  # grouped heads


def test_softcap_and_scale(isa, rng):
    check(rng, 3, 17, 50, 4, 2, 64, mask_kind="left", with_used=True, causal=True, softcap=5.0, scale=0.3)
    check(rng, 3, 17, 50, 2, 2, 48, mask_kind="holes", softcap=2.0)


def test_all_true_mask_and_full_lengths_change_nothing(isa, rng):
    q, k, v = (random_array(rng, (2, 45, 4, 64)) for _ in range(3))
    want, want_lse = mk.flash_attention(q, k, v, causal=True, return_lse=True)
    for kw in (dict(key_mask=np.ones((2, 45), bool)), dict(seqused_k=np.array([45, 45], np.int32))):
        got, lse = mk.flash_attention(q, k, v, causal=True, return_lse=True, **kw)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(lse, want_lse)


def test_rows_without_a_visible_key_are_zero(isa, rng):
    """Defined as FlashAttention-2 does: output 0, lse -inf; never NaN, even with NaN padding."""
    q = random_array(rng, (3, 5, 2, 16))
    k = random_array(rng, (3, 7, 2, 16))
    keep = np.ones((3, 7), bool)
    keep[0] = False                 # batch 0: every key padding
    keep[1, 3:] = False             # batch 1, causal: the first two queries (positions 2, 3) still see keys
    k, v = nan_padding(k, k, keep)
    out, lse = mk.flash_attention(q, k, v, causal=True, window=(0, 0), key_mask=keep, return_lse=True,
                                  out=poisoned(q.shape, np.float32))
    # window (0, 0) + causal: query i sees only key i + 2; batch 1's real keys are 0..2 -> only query 0
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(lse[1, :, 0])) and np.all(np.isneginf(lse[1, :, 1:]))
    assert np.all(out[1, 1:] == 0) and np.all(np.isfinite(out))
    used = np.array([0, 3, 7], np.int32)    # seqused_k 0: nothing to see
    out, lse = mk.flash_attention(q, k, v, seqused_k=used, key_mask=keep, return_lse=True)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    ref, ref_lse = reference(q[1], k[1], v[1], used=3, keep=keep[1])
    assert_close(out[1], ref, np.float32)


def test_strided_and_broadcast_masks(isa, rng):
    q, k, v = (random_array(rng, (3, 20, 2, 32)) for _ in range(3))
    wide = rng.random((3, 50)) < 0.6
    wide[:, :4] = True
    sliced = wide[:, 3:43:2]                       # non-contiguous view, shape (3, 20)
    got = mk.flash_attention(q, k, v, key_mask=sliced, causal=True)
    np.testing.assert_array_equal(got, mk.flash_attention(q, k, v, key_mask=sliced.copy(), causal=True))
    one = np.broadcast_to(sliced[1], (3, 20))       # stride 0 over the batch
    got = mk.flash_attention(q, k, v, key_mask=one)
    for b in range(3):
        assert_close(got[b], reference(q[b], k[b], v[b], keep=one[b])[0], np.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(isa, rng, causal):
    lens_q = [5, 0, 64, 1, 3]
    lens_k = [9, 3, 80, 100, 3]
    used = np.array([9, 0, 41, 57, 2], np.int32)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = random_array(rng, (cu_q[-1], 4, 32))
    k, v = random_array(rng, (cu_k[-1], 2, 32)), random_array(rng, (cu_k[-1], 2, 32))
    keep = rng.random(cu_k[-1]) < 0.8
    for b in range(len(lens_k)):  # NaN in everything the kernel must skip
        rows = np.arange(cu_k[b], cu_k[b + 1])
        drop = ~keep[rows] | (rows - cu_k[b] >= used[b])
        k[rows[drop]] = np.nan
        v[rows[drop]] = np.nan
    out, lse = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, window=(20, -1), seqused_k=used,
                                         key_mask=keep, return_lse=True, out=poisoned(q.shape, np.float32))
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = reference(q[sq], k[sk], v[sk], causal, (20, -1), used=used[b], keep=keep[sk])
        assert_close(out[sq], ref, np.float32, f"batch {b}")
        assert_close(lse[:, sq], ref_lse, np.float32, f"lse {b}")


def test_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (random_array(rng, (2, 9, 2, 32)) for _ in range(3))
    keep = make_mask(rng, 2, 9, "left")
    used = np.array([9, 6], np.int32)
    want = mk.flash_attention(q, k, v, causal=True, key_mask=keep, seqused_k=used)
    got = mk.flash_attention(*(torch.from_numpy(a) for a in (q, k, v)), causal=True,
                             key_mask=torch.from_numpy(keep), seqused_k=torch.from_numpy(used))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), want)


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_seqused_k(rng):
    q, k, v = (random_array(rng, (2, 6, 2, 16)) for _ in range(3))
    with pytest.raises(TypeError, match="seqused_k: expected dtype int32, got int64"):
        mk.flash_attention(q, k, v, seqused_k=np.array([1, 2]))
    with pytest.raises(TypeError, match="seqused_k: expected dtype int32, got float32"):
        mk.flash_attention(q, k, v, seqused_k=np.array([1, 2], np.float32))
    with pytest.raises(ValueError, match=r"seqused_k: expected shape \(2,\), got \(3,\)"):
        mk.flash_attention(q, k, v, seqused_k=np.array([1, 2, 3], np.int32))
    with pytest.raises(ValueError, match="seqused_k: expected 1 dimensions"):
        mk.flash_attention(q, k, v, seqused_k=np.array([[1, 2]], np.int32))
    with pytest.raises(ValueError, match=r"seqused_k\[1\] = 7 is outside \[0, 6\]"):
        mk.flash_attention(q, k, v, seqused_k=np.array([1, 7], np.int32))
    with pytest.raises(ValueError, match=r"seqused_k\[0\] = -1 is outside \[0, 6\]"):
        mk.flash_attention(q, k, v, seqused_k=np.array([-1, 2], np.int32))
    with pytest.raises(ValueError, match="seqused_k: expected a C-contiguous array"):
        mk.flash_attention(q, k, v, seqused_k=np.array([1, 0, 2, 0], np.int32)[::2])
    with pytest.raises(TypeError, match="seqused_k"):
        mk.flash_attention(q, k, v, seqused_k=[1, 2])
    cu = np.array([0, 4, 6], np.int32)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] = 3 is outside \[0, 2\] \(the keys of sequence 1\)"):
        mk.flash_attention_varlen(q[0], k[0], v[0], cu, cu, seqused_k=np.array([4, 3], np.int32))


def test_bad_key_mask(rng):
    q, k, v = (random_array(rng, (2, 6, 2, 16)) for _ in range(3))
    with pytest.raises(TypeError, match="key_mask: expected dtype bool, got uint8"):
        mk.flash_attention(q, k, v, key_mask=np.ones((2, 6), np.uint8))
    with pytest.raises(TypeError, match="key_mask: expected dtype bool, got float32"):
        mk.flash_attention(q, k, v, key_mask=np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"key_mask: expected shape \(2, 6\), got \(2, 5\)"):
        mk.flash_attention(q, k, v, key_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="key_mask: expected 2 dimensions"):
        mk.flash_attention(q, k, v, key_mask=np.ones(12, bool))
    with pytest.raises(TypeError, match="key_mask"):
        mk.flash_attention(q, k, v, key_mask=[[True] * 6] * 2)
    cu = np.array([0, 4, 6], np.int32)
    with pytest.raises(ValueError, match=r"key_mask: expected shape \(6,\), got \(2, 6\)|key_mask: expected 1"):
        mk.flash_attention_varlen(q[0], k[0], v[0], cu, cu, key_mask=np.ones((2, 6), bool))


def test_bad_inputs_on_the_wrong_device(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put one argument elsewhere")
    q, k, v = (random_array(rng, (2, 6, 2, 16)) for _ in range(3))
    with pytest.raises(ValueError, match="key_mask is on cuda:0 but q is on cpu"):
        mk.flash_attention(q, k, v, key_mask=torch.ones((2, 6), dtype=torch.bool, device="cuda"))
    with pytest.raises(ValueError, match="seqused_k is on cuda:0 but q is on cpu"):
        mk.flash_attention(q, k, v, seqused_k=torch.ones(2, dtype=torch.int32, device="cuda"))


def test_bf16_mask(rng):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    check(rng, 2, 5, 9, 2, 2, 16, BF16, mask_kind="right", with_used=True)
