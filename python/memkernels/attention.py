"""Flash attention: exact attention in tiles with an online softmax, O(seq) extra memory."""
from __future__ import annotations

import numpy as np

from . import _memkernels as _C
from ._arrays import INT32, as_int, check_out, dtype_name, empty_like, out_like_and_stream, require_array, stream_handle


def _window_bounds(window, causal):
    """window: None, an int w (the w keys on each side; left only when causal) or (left, right)."""
    if window is None:
        return -1, -1
    try:
        sides = (window, window) if isinstance(window, (int, np.integer)) else tuple(window)
        if len(sides) != 2:
            raise TypeError
        left, right = (as_int(x, "window", -1, INT32[1]) for x in sides)
    except TypeError:  # Python or NumPy integers only (not floats, not bools)
        raise ValueError(f"window: expected None, an int or a (left, right) pair of ints, got {window!r}") from None
    except ValueError:
        raise ValueError(f"window: bounds must be in [0, 2^31 - 1], or -1 for unbounded; got {window!r}") from None
    return left, (0 if causal else right)


def _float32_option(value, name):
    """A scale or softcap as the float32 the kernels receive; None -> 0.0 (the default / off).
    A positive value that rounds to 0.0 in float32 would silently mean the default: refused."""
    if value is None:
        return 0.0
    x = float(value)
    if x > 0 and np.float32(x) == 0:
        raise ValueError(f"{name} = {value!r} is positive but rounds to 0 in float32 (the kernels' type; "
                         f"0 means {'1/sqrt(head_dim)' if name == 'scale' else 'no softcap'}): use a value "
                         f">= {float(np.finfo(np.float32).smallest_subnormal):g}")
    return x


def _options(scale, softcap):
    """scale and softcap as the kernels' float32 values (0.0 = default / off). Ranges (finite,
    >= 0) are checked once, in C++; only the float32 rounding to 0 is caught here."""
    return (0.0 if scale is None else _float32_option(scale, "scale"),
            0.0 if softcap is None else _float32_option(softcap, "softcap"))


def flash_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, return_lse=False,
                    out=None, stream=None, seqused_k=None, key_mask=None):
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

    Padded batches, without repacking (both optional, on the device of q, combinable with every
    option above):

    seqused_k: int32 (batch,): sequence b uses only its first seqused_k[b] keys (FlashAttention's
    seqused_k, e.g. a KV cache filled to different lengths); causal and window positions align to
    the end of those keys (seq_k becomes seqused_k[b] in the rule above). 0 <= seqused_k[b] <=
    seq_k (checked on the CPU; clamped on CUDA, where reading it back would synchronise).
    key_mask: bool (batch, seq_k), True = attend (a real token), False = padding. Masked keys take
    no part in the softmax and their k/v rows are never read (they may hold garbage, NaN included).
    Positions are unchanged: causal and windows count masked keys like any other, as PyTorch's
    SDPA does with a boolean mask, so left- and right-padded batches work as they are.
    A query row left without any visible key gets output 0 and lse -inf (as FlashAttention-2).
    """
    if type(q) is not np.ndarray:  # NumPy, the common CPU case, is cheap: k, v and the masks are checked in C++
        require_array(q, "q")
    out, handle = out_like_and_stream(q, out, stream)
    scale, softcap = (0.0, 0.0) if scale is None and softcap is None else _options(scale, softcap)
    left, right = (-1, -1) if window is None else _window_bounds(window, causal)
    lse = empty_like(q, (q.shape[0], q.shape[2], q.shape[1]), "float32") if return_lse and len(q.shape) == 4 else None
    _C.flash_attention(q, k, v, out, lse, causal, scale, left, right, softcap, handle, seqused_k, key_mask)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, causal=False, scale=None,
                           window=None, softcap=None, return_lse=False, out=None, stream=None, seqused_k=None,
                           key_mask=None):
    """Flash attention over a batch of sequences of different lengths packed along the first axis.

    q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim); cu_seqlens_q / cu_seqlens_k:
    int32 arrays of batch + 1 cumulative offsets starting at 0 (sequence b owns rows
    cu[b]:cu[b+1]). Masks apply per sequence. lse has shape (heads, total_q). max_seqlen_q is a
    hint for the CUDA grid (never read back from the GPU). Other options as in flash_attention;
    seqused_k (batch,) counts keys from each sequence's first row (at most its cu_seqlens_k
    length), and key_mask is bool (total_k,), one flag per packed key row.
    """
    require_array(q, "q")
    scale, softcap = _options(scale, softcap)
    left, right = _window_bounds(window, causal)
    out = empty_like(q, q.shape) if out is None else check_out(out, q.shape, dtype_name(q), q)
    lse = empty_like(q, (q.shape[1], q.shape[0]), "float32") if return_lse and len(q.shape) == 3 else None
    _C.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse,
                              as_int(max_seqlen_q or 0, "max_seqlen_q", 0, INT32[1]), causal, scale, left, right,
                              softcap, stream_handle(stream, q), seqused_k, key_mask)
    return (out, lse) if return_lse else out
