"""Flash attention: exact attention in tiles with an online softmax, O(seq) extra memory."""
from __future__ import annotations

from . import _memkernels as _C
from ._arrays import check_out, dtype_name, empty_like, require_array, stream_handle


def _window_bounds(window, causal):
    """window: None, an int w (the w keys on each side; left only when causal) or (left, right)."""
    if window is None:
        return -1, -1
    if isinstance(window, int):
        left, right = window, window
    else:
        try:
            left, right = (int(x) for x in window)
        except (TypeError, ValueError):
            raise ValueError(f"window: expected None, an int or a (left, right) pair, got {window!r}") from None
    for side in (left, right):
        if side < -1:
            raise ValueError(f"window: bounds must be >= 0, or -1 for unbounded; got {window!r}")
    return left, (0 if causal else right)


def _common(arrays, scale, softcap):
    for name, a in arrays.items():
        require_array(a, name)
    scale = 0.0 if scale is None else float(scale)
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return scale, 0.0 if softcap is None else float(softcap)


def flash_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, return_lse=False,
                    out=None, stream=None):
    """Attention softmax(q k^T * scale) v, computed in tiles without the seq_q x seq_k matrix.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim) with heads a
    multiple of kv_heads (MHA, GQA, MQA). float32, float16 or bfloat16; NumPy or any DLPack array
    (CuPy, PyTorch, ...) on the CPU or a CUDA GPU; the result comes back in the same kind of array.

    causal: query i sees keys j <= i + seq_k - seq_q (aligned to the end, as FlashAttention does).
    scale: defaults to 1/sqrt(head_dim). window: sliding window, an int w (w keys on each side of
    the diagonal; only the left side when causal) or a (left, right) pair, -1 meaning unbounded.
    softcap: scores become softcap * tanh(scores / softcap). return_lse: also return the float32
    log-sum-exp of each row, shape (batch, heads, seq_q); rows that see no key give output 0, lse -inf.
    out: optional output array shaped like q. stream: CUDA stream (int handle, CuPy or torch stream);
    None: the current stream of q's framework (torch.cuda.current_stream(), CuPy's current stream).
    """
    scale, softcap = _common(dict(q=q, k=k, v=v), scale, softcap)
    left, right = _window_bounds(window, causal)
    out = empty_like(q, q.shape) if out is None else check_out(out, q.shape, dtype_name(q), q)
    lse = empty_like(q, (q.shape[0], q.shape[2], q.shape[1]), "float32") if return_lse and len(q.shape) == 4 else None
    _C.flash_attention(q, k, v, out, lse, causal, scale, left, right, softcap, stream_handle(stream, q))
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, causal=False, scale=None,
                           window=None, softcap=None, return_lse=False, out=None, stream=None):
    """Flash attention over a batch of sequences of different lengths packed along the first axis.

    q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim); cu_seqlens_q / cu_seqlens_k:
    int32 arrays of batch + 1 cumulative offsets starting at 0 (sequence b owns rows
    cu[b]:cu[b+1]). Masks apply per sequence. lse has shape (heads, total_q). max_seqlen_q is a
    hint for the CUDA grid (never read back from the GPU). Other options as in flash_attention.
    """
    scale, softcap = _common(dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k), scale,
                             softcap)
    left, right = _window_bounds(window, causal)
    out = empty_like(q, q.shape) if out is None else check_out(out, q.shape, dtype_name(q), q)
    lse = empty_like(q, (q.shape[1], q.shape[0]), "float32") if return_lse and len(q.shape) == 3 else None
    _C.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, int(max_seqlen_q or 0), causal, scale,
                              left, right, softcap, stream_handle(stream, q))
    return (out, lse) if return_lse else out
