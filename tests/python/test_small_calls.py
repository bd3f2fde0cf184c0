"""Small (decode-sized) attention calls take a single-threaded path that keeps its scratch buffers
between calls, and a cheaper argument path in the wrappers and bindings: results must not depend on
what ran before on the thread, and every argument form the wrappers accept must still work (or
fail with the same clear error). Timing lives in bench/attention.py, not here."""
import threading

import numpy as np
import pytest
from conftest import assert_close, poisoned, random_array
from test_attention_padding import reference

import memkernels as mk
from memkernels import PagedKVCache, paged_attention, paged_attention_raw

# (seq_q, seq_k, heads, kv_heads, head_dim, dtype): head dims and lengths grow and shrink from one
# call to the next, so a buffer kept from a previous call is sometimes too small, sometimes larger.
SEQUENCE = [(1, 1, 1, 1, 8, np.float32), (1, 70, 4, 2, 64, np.float16), (3, 5, 2, 2, 7, np.float32),
            (1, 130, 2, 1, 40, np.float32), (2, 2, 1, 1, 128, np.float16), (1, 9, 2, 2, 16, np.float32),
            (1, 64, 8, 1, 80, np.float32), (1, 1, 1, 1, 512, np.float32), (1, 33, 2, 1, 8, np.float32)]


def _one(rng, sq, sk, h, hkv, d, dtype):
    q = random_array(rng, (2, sq, h, d), dtype)
    k, v = random_array(rng, (2, sk, hkv, d), dtype), random_array(rng, (2, sk, hkv, d), dtype)
    keep = rng.random((2, sk)) < 0.8
    got = mk.flash_attention(q, k, v, causal=True, key_mask=keep, out=poisoned(q.shape, dtype))
    for b in range(2):
        assert_close(got[b], reference(q[b], k[b], v[b], causal=True, keep=keep[b])[0], dtype, f"{(sq, sk, h, d)}")


def test_flash_attention_sequence_of_small_calls(isa, rng):
    for case in SEQUENCE + SEQUENCE[::-1]:
        _one(rng, *case)


def test_flash_attention_small_calls_from_many_threads(rng):
    """Each thread keeps its own buffers: concurrent small calls give their own results."""
    cases = [(rng, *c) for c in SEQUENCE]
    inputs = []
    for _, sq, sk, h, hkv, d, dtype in cases:
        q = random_array(rng, (1, sq, h, d), dtype)
        k, v = random_array(rng, (1, sk, hkv, d), dtype), random_array(rng, (1, sk, hkv, d), dtype)
        inputs.append((q, k, v, reference(q[0], k[0], v[0], causal=True)[0], dtype))
    errors = []

    def worker(order):
        try:
            for _ in range(20):
                for i in order:
                    q, k, v, want, dtype = inputs[i]
                    assert_close(mk.flash_attention(q, k, v, causal=True)[0], want, dtype, f"case {i}")
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(list(np.random.default_rng(t).permutation(len(inputs))),))
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _cache(rng, lengths, d=16, kvh=2, dtype="float32"):
    cache = PagedKVCache(num_layers=2, num_pages=64, page_size=8, kv_heads=kvh, head_dim=d, dtype=dtype)
    seqs, ks, vs = [], [], []
    for n in lengths:
        s = cache.add_sequence()
        k, v = random_array(rng, (n, kvh, d)), random_array(rng, (n, kvh, d))
        for layer in (0, 1):
            cache.append([s], layer, k, v, counts=[n])
        seqs.append(s), ks.append(k), vs.append(v)
    return cache, seqs, ks, vs


def test_paged_decode_sequence_of_small_calls(isa, rng):
    for d, lengths in ((16, [1, 5]), (64, [30, 2, 17]), (8, [9]), (128, [3, 40]), (16, [1])):
        cache, seqs, ks, vs = _cache(rng, lengths, d)
        q = random_array(rng, (len(seqs), 4, d))
        got = paged_attention(q, cache, 1, seqs, out=poisoned(q.shape, np.float32))
        for i in range(len(seqs)):
            assert_close(got[i], reference(q[i:i + 1], ks[i], vs[i])[0][0], np.float32, f"d {d} seq {i}")


def test_paged_seq_ids_and_q_lens_forms(rng):
    """Plain ints and lists are read by the binding; NumPy integers, tuples, arrays and integral
    floats go through the Python validators: same results."""
    cache, seqs, _, _ = _cache(rng, [6, 11])
    q = random_array(rng, (2, 4, 16))
    want = paged_attention(q, cache, 0, seqs)
    for form in (tuple(seqs), np.array(seqs), [np.int64(s) for s in seqs], [float(s) for s in seqs]):
        np.testing.assert_array_equal(paged_attention(q, cache, 0, form), want, err_msg=repr(form))
    np.testing.assert_array_equal(paged_attention(q[:1], cache, 0, seqs[0]), want[:1])
    np.testing.assert_array_equal(paged_attention(q[:1], cache, 0, np.int32(seqs[0])), want[:1])
    q3 = random_array(rng, (3, 4, 16))
    want3 = paged_attention(q3, cache, 0, seqs, q_lens=[1, 2], causal=True)
    for form in ((1, 2), np.array([1, 2]), [np.int8(1), 2.0]):
        np.testing.assert_array_equal(paged_attention(q3, cache, 0, seqs, q_lens=form, causal=True), want3)
    np.testing.assert_array_equal(paged_attention(q, cache, np.int64(0), seqs, num_splits=np.int32(2)),
                                  paged_attention(q, cache, 0, seqs, num_splits=2))


def test_paged_bad_ids_and_counts_keep_their_messages(rng):
    cache, seqs, _, _ = _cache(rng, [6, 11])
    q = random_array(rng, (2, 4, 16))
    with pytest.raises(TypeError, match=r"seq_ids\[1\]: expected an integer, got True"):
        paged_attention(q, cache, 0, [seqs[0], True])
    with pytest.raises(TypeError, match=r"seq_ids\[0\]: expected an integer, got float 1.5"):
        paged_attention(q, cache, 0, [1.5, seqs[1]])
    with pytest.raises(ValueError, match=r"seq_ids\[1\] = 18446744073709551616 is out of range"):
        paged_attention(q, cache, 0, [seqs[0], 2**64])
    with pytest.raises(ValueError, match="unknown sequence id 12345"):
        paged_attention(q, cache, 0, [seqs[0], 12345])
    with pytest.raises(TypeError, match="seq_id"):
        paged_attention(q, cache, 0, "ab")
    with pytest.raises(ValueError, match=r"q_lens\[1\] = -1 is out of range"):
        paged_attention(q, cache, 0, seqs, q_lens=[3, -1])
    with pytest.raises(ValueError, match=r"q_lens\[0\] = 2147483648: more query rows"):
        paged_attention(q, cache, 0, seqs, q_lens=[2**31, 0])
    with pytest.raises(TypeError, match=r"q_lens\[0\]: expected an integer"):
        paged_attention(q, cache, 0, seqs, q_lens=[True, 1])
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        paged_attention(q, cache, 5, seqs)
    with pytest.raises(ValueError, match="layer"):
        paged_attention(q, cache, 2**40, seqs)
    with pytest.raises(TypeError, match="num_splits"):
        paged_attention(q, cache, 0, seqs, num_splits=True)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention(q, cache, 0, seqs, num_splits=-1)


def test_paged_raw_small_calls(isa, rng):
    cache, seqs, ks, vs = _cache(rng, [1, 13])
    q = random_array(rng, (2, 4, 16))
    ind = cache.build_indices(seqs, 0)
    got = paged_attention_raw(q, cache.k_pages(0), cache.v_pages(0), *ind, out=poisoned(q.shape, np.float32))
    for i in range(2):
        assert_close(got[i], reference(q[i:i + 1], ks[i], vs[i])[0][0], np.float32, f"seq {i}")
    with pytest.raises(TypeError, match="max_q_len"):
        paged_attention_raw(q, cache.k_pages(0), cache.v_pages(0), *ind, max_q_len=1.5)
