"""Paged KV cache and paged attention (vLLM PagedAttention / FlashInfer style).

A PagedKVCache keeps K and V of many sequences in fixed-size pages of one pool, so sequences of
any length waste at most one partly filled page each, forks share pages (copy-on-write), full
pages of a common token prefix are reused, and attention reads the pages in place.
"""
from __future__ import annotations

import numpy as np

from . import _memkernels as _C
from ._arrays import (INT32, INT64, as_int, bfloat16, empty_like, out_like_and_stream, parse_device,
                      stream_handle)
from .attention import _float32_option, _window_bounds


def _device(device) -> tuple[int, int]:
    if device is None:
        return 0, 0
    kind, index = parse_device(device)  # 'cudaXYZ', 'cuda:x'... are a ValueError naming device
    return (1 if kind == "cuda" else 0), index


def _dtype(dtype) -> str:
    name = getattr(np.dtype(dtype) if not isinstance(dtype, str) else None, "name", None) or str(dtype)
    return name


def _ids(seq_ids) -> list[int]:
    if isinstance(seq_ids, (int, np.integer)):
        return [_id(seq_ids)]
    return [as_int(s, f"seq_ids[{i}]", *INT64) for i, s in enumerate(seq_ids)]


def _id(seq_id, name="seq_id") -> int:
    return as_int(seq_id, name, *INT64)


def _layer(layer) -> int:
    return as_int(layer, "layer", *INT32)


def _q_lens(q_lens) -> list[int]:
    """q_lens as the kernel's per-sequence query counts (the binding reads plain int lists itself)."""
    out = _counts(q_lens, "q_lens")
    for i, n in enumerate(out):
        if n > _INT_MAX:
            raise ValueError(f"q_lens[{i}] = {n}: more query rows than paged_attention takes (2^31 - 1)")
    return out


def _counts(counts, name) -> list[int]:
    """Python/NumPy integers >= 0 whose sum fits int64: checked here, before any work (a sum that
    wrapped around in C++ used to reach the allocator as a bogus CacheFullError)."""
    out = [as_int(c, f"{name}[{i}]", 0, INT64[1]) for i, c in enumerate(counts)]
    if sum(out) > INT64[1]:
        raise ValueError(f"{name} add up to {sum(out)} tokens, more than 2^63 - 1")
    return out


def _scale(scale, softcap):
    scale = _float32_option(scale, "scale")  # as flash_attention: a positive value rounding to 0 is refused
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return scale, _float32_option(softcap, "softcap")


_INT_MAX = 2**31 - 1


def _window(window, causal):
    """(left, right) for the kernel, as flash_attention reads `window`. A bound of INT_MAX keys or
    more covers any sequence (at most 2^31 - 1 keys), so it is clamped to the kernel's C int."""
    def clamp(x):  # before _window_bounds, which refuses bounds past the C int
        if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and int(x) > _INT_MAX:
            return _INT_MAX
        return x

    if isinstance(window, (int, np.integer)):
        window = clamp(window)
    elif isinstance(window, (tuple, list)):
        window = tuple(clamp(x) for x in window)
    return _window_bounds(window, causal)


class PagedKVCache:
    """A KV cache of `num_pages` pages of `page_size` tokens, for every layer at once.

    Pool layout: (num_pages, num_layers, 2, page_size, kv_heads, head_dim), index 0/1 of the third
    axis for K/V; a page holds its tokens for every layer. dtype: float32, float16 or bfloat16;
    or int8 (CPU): K/V quantized on append, symmetric per token and kv head, with float32 scales
    (k_scales/v_scales), read by attention without a dequantized copy; or 'kivi4' / 'kivi2' (CPU):
    KIVI pages, keys quantized per channel over each page and values per token (asymmetric 4 or 2
    bits, float32 scale + zero), when a page of a layer fills; the tokens after the last full page
    (the recent window) stay float32. device: 'cpu' or 'cuda[:N]'.

    Several Python threads may use one cache at once: one lock inside, which attention holds (shared)
    until its kernel has read the pages, so a free, truncate, swap or append from another thread
    waits for running attention calls instead of releasing pages under them.

    Sequences are integer ids. Every layer has its own length (a model appends layer by layer);
    length(seq) is the largest. Running out of pages raises CacheFullError and changes nothing.
    """

    def __init__(self, num_layers, num_pages, page_size, kv_heads, head_dim, dtype="float32", device="cpu"):
        dev_type, dev_index = _device(device)
        dims = [as_int(x, name, *INT32) for x, name in ((num_layers, "num_layers"), (num_pages, "num_pages"),
                                                         (page_size, "page_size"), (kv_heads, "kv_heads"),
                                                         (head_dim, "head_dim"))]
        self._c = _C.PagedKVCache(*dims, _dtype(dtype), dev_type, dev_index)

    # -- geometry ------------------------------------------------------------------------------
    num_layers = property(lambda self: self._c.num_layers)
    num_pages = property(lambda self: self._c.num_pages)
    page_size = property(lambda self: self._c.page_size)
    kv_heads = property(lambda self: self._c.kv_heads)
    head_dim = property(lambda self: self._c.head_dim)
    dtype = property(lambda self: self._c.dtype)

    @property
    def device(self) -> str:
        return "cpu" if self._c.device_type == 0 else f"cuda:{self._c.device_index}"

    def _view(self, a):
        if self._c.dtype == "bfloat16" and isinstance(a, np.ndarray):
            return a.view(bfloat16)
        return a

    def pool(self):
        """The whole pool as a zero-copy array (NumPy on CPU, DLPack array on CUDA)."""
        return self._view(self._c.pool())

    def k_pages(self, layer):
        """K pages of a layer, (num_pages, page_size, kv_heads, head_dim), a strided zero-copy view."""
        return self._view(self._c.k_pages(_layer(layer)))

    def v_pages(self, layer):
        return self._view(self._c.v_pages(_layer(layer)))

    def k_scales(self, layer):
        """int8 caches: float32 scales of the K pages, (num_pages, page_size, kv_heads); K ~= q * scale."""
        return self._c.k_scales(_layer(layer))

    def v_scales(self, layer):
        return self._c.v_scales(_layer(layer))

    # -- sequences -----------------------------------------------------------------------------
    def add_sequence(self, prefix_tokens=None) -> int:
        """A new sequence id. With prefix_tokens (int32 token ids of the prompt), full pages of a
        prefix already in the cache are reused: length(seq) then tells how many tokens are cached
        (a multiple of page_size), and the caller appends only the rest. Full pages of these tokens
        are offered to later sequences as they fill in every layer."""
        if prefix_tokens is not None:
            prefix_tokens = np.ascontiguousarray(prefix_tokens, dtype=np.int32).reshape(-1)
        return self._c.add_sequence(prefix_tokens)

    def append(self, seq_ids, layer, k, v, counts=None, stream=None) -> None:
        """Appends tokens to `layer` of the given sequences.

        k, v: (tokens, kv_heads, head_dim) in the cache's dtype and device, rows packed in seq_ids
        order; counts[i] rows belong to seq_ids[i] (None: one row per sequence, a decode step).
        All or nothing: CacheFullError (or any error) leaves every sequence unchanged."""
        ids = _ids(seq_ids)
        counts = [] if counts is None else _counts(counts, "counts")
        self._c.append(ids, _layer(layer), k, v, counts, stream_handle(stream, k))

    def fork(self, seq_id) -> int:
        """A new sequence sharing every page of seq_id (copy-on-write on the next write)."""
        return self._c.fork(_id(seq_id))

    def free(self, seq_id) -> None:
        self._c.free(_id(seq_id))

    def truncate(self, seq_id, length) -> None:
        """Keeps the first `length` tokens of every layer."""
        self._c.truncate(_id(seq_id), as_int(length, "length", *INT64))

    def length(self, seq_id, layer=None) -> int:
        return self._c.length(_id(seq_id), -1 if layer is None else _layer(layer))

    def read_kv(self, seq_id, layer):
        """(k, v) of a layer as float32 (length, kv_heads, head_dim) NumPy arrays, dequantized for
        int8 / KIVI caches (CPU caches)."""
        return self._c.read_kv(_id(seq_id), _layer(layer))

    def page_table(self, seq_id) -> np.ndarray:
        return np.asarray(self._c.page_table(_id(seq_id)), dtype=np.int32)

    def sequences(self) -> list[int]:
        return list(self._c.sequences())

    def refcount(self, page) -> int:
        return self._c.refcount(as_int(page, "page", *INT32))

    def swap_out(self, seq_id, stream=None) -> None:
        """Copies the sequence's pages to host memory (pinned on CUDA, async on `stream`) and frees them."""
        self._c.swap_out(_id(seq_id), stream_handle(stream))

    def swap_in(self, seq_id, stream=None) -> None:
        """Allocates pages again and copies the sequence back (CacheFullError if they are not free)."""
        self._c.swap_in(_id(seq_id), stream_handle(stream))

    def is_swapped(self, seq_id) -> bool:
        return self._c.is_swapped(_id(seq_id))

    def stats(self) -> dict:
        """pages_used/free/cached/shared, tokens, bytes_per_token, pool_bytes, wasted_slots and
        fragmentation (unfilled slots of used pages / their capacity), prefix hits, evictions."""
        return dict(self._c.stats())

    def check_invariants(self) -> None:
        """Raises ValueError if a page is owned twice, leaked, or a reference count is wrong."""
        self._c.check_invariants()

    def build_indices(self, seq_ids, layer):
        """(kv_indptr, kv_indices, kv_last_page_len) int32 arrays for paged_attention_raw."""
        a, b, c = self._c.build_indices(_ids(seq_ids), _layer(layer))
        return (np.asarray(a, dtype=np.int32), np.asarray(b, dtype=np.int32), np.asarray(c, dtype=np.int32))


def paged_attention(q, cache: PagedKVCache, layer, seq_ids, q_lens=None, *, causal=True, scale=None, window=None,
                    softcap=None, num_splits=0, return_lse=False, out=None, stream=None):
    """Attention of q over the cached K/V of `layer` for the given sequences.

    q: (total_q, heads, head_dim), rows packed in seq_ids order; q_lens[i] rows for seq_ids[i]
    (None: one row each, decode). heads must be a multiple of the cache's kv_heads (GQA/MQA). The
    new tokens are assumed to be the last ones in the cache (append first): query i of a sequence
    sits at position p = i + kv_len - q_len, and with causal=True sees keys j <= p (prefill and
    chunked prefill). window: sliding window as in flash_attention: an int w (keys p - w .. p + w;
    only the left side when causal), or (left, right) with -1 for unbounded; keys outside it are
    not read. A model's `sliding_window` W (Hugging Face Mistral, Gemma-2: W tokens including the
    current one) is window=W - 1, as in FlashAttention. softcap: scores become
    softcap * tanh(scores / softcap), before the mask. scale: defaults to 1/sqrt(head_dim).
    Returns out like q, and with return_lse the float32 log-sum-exp of shape (heads, total_q); a
    row that sees no key gives 0 and -inf. num_splits: split-KV pieces per sequence (0 = automatic).
    """
    # The common decode call is kept cheap: defaults skip their converters, and seq_ids / q_lens as
    # plain ints or lists of ints are read by the binding itself (anything else is validated there
    # through _ids / _q_lens, with the same messages).
    scale, softcap = (0.0, 0.0) if scale is None and softcap is None else _scale(scale, softcap)
    left, right = (-1, -1) if window is None else _window(window, causal)
    out, handle = out_like_and_stream(q, out, stream)
    lse = empty_like(q, (q.shape[1], q.shape[0]), "float32") if return_lse and len(q.shape) == 3 else None
    if type(layer) is not int or not 0 <= layer <= _INT_MAX:
        layer = _layer(layer)
    if type(num_splits) is not int or num_splits != 0:
        num_splits = as_int(num_splits, "num_splits", *INT32)
    cache._c.attention(q, layer, seq_ids, q_lens, out, lse, causal is True or bool(causal), scale, left, right,
                       softcap, num_splits, handle)
    return (out, lse) if return_lse else out


def paged_attention_raw(q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, qo_indptr=None, *,
                        causal=True, scale=None, window=None, softcap=None, num_splits=0, max_q_len=0,
                        return_lse=False, out=None, stream=None, k_scales=None, v_scales=None):
    """The paged-attention kernel on caller-owned pages and FlashInfer-style int32 arrays.

    q: (total_q, heads, head_dim). k_pages, v_pages: (num_pages, page_size, kv_heads, head_dim),
    each token's (kv_heads, head_dim) block contiguous, any page and token strides (e.g.
    PagedKVCache.k_pages(layer)). Sequence b uses pages
    kv_indices[kv_indptr[b]:kv_indptr[b+1]], the last holding kv_last_page_len[b] tokens, and q
    rows qo_indptr[b]:qo_indptr[b+1] (None: row b, decode). On CPU every index is validated.
    int8 pages need k_scales / v_scales, float32 (num_pages, page_size, kv_heads) (CPU only).
    Masking (causal, window, softcap) and outputs as in paged_attention.
    """
    scale, softcap = (0.0, 0.0) if scale is None and softcap is None else _scale(scale, softcap)
    left, right = (-1, -1) if window is None else _window(window, causal)
    out, handle = out_like_and_stream(q, out, stream)
    lse = empty_like(q, (q.shape[1], q.shape[0]), "float32") if return_lse and len(q.shape) == 3 else None
    if type(num_splits) is not int or num_splits != 0:
        num_splits = as_int(num_splits, "num_splits", *INT32)
    if type(max_q_len) is not int or max_q_len != 0:
        max_q_len = as_int(max_q_len, "max_q_len", *INT32)
    _C.paged_attention_raw(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, out, lse,
                           causal is True or bool(causal), scale, left, right, softcap, num_splits, max_q_len, handle,
                           k_scales, v_scales)
    return (out, lse) if return_lse else out
