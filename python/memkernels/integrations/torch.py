"""memkernels kernels as PyTorch custom operators (``torch.ops.memkernels.*``), inference only.

Each public kernel is registered with ``torch.library.custom_op`` in the ``memkernels`` namespace,
with a fake-tensor implementation giving the output shapes and dtypes, so ``torch.compile`` (with
``fullgraph=True``) traces models calling them without graph breaks, and ``torch.export`` sees
them as single nodes::

    import memkernels.integrations.torch as mkt
    out = mkt.flash_attention(q, k, v, causal=True)          # q (batch, seq, heads, head_dim)
    w = mkt.QuantizedWeight(mk.quantize(weight, "int4"))     # wrap once, outside compiled code
    y = mkt.qgemm(x, w)                                       # == torch.ops.memkernels.qgemm(x, w, None, False)

Quantized and sparse matrices are passed to the operators as opaque objects: wrap a
``memkernels.QuantizedMatrix`` in :class:`QuantizedWeight` and a ``memkernels.SparseMatrix`` in
:class:`SparseWeight` (or use the :class:`QuantizedLinear` / :class:`SparseLinear` modules). The
compiled graph takes the wrapper as an input, reads its shape at trace time for the fake
implementation, and hands the real matrix to the kernel at run time. The functions below wrap a
bare matrix themselves in eager mode; inside ``torch.compile`` pass the wrapper.

Inference only: the operators have no backward. A tensor argument that requires grad while grad
mode is on raises ``ValueError`` (call under ``torch.no_grad()`` / ``torch.inference_mode()``).
On CUDA every operator runs on PyTorch's current stream of the inputs' device.

Needs PyTorch with opaque custom-op arguments (``torch._library.opaque_object``, PyTorch 2.10+).
"""
import atexit
from typing import Optional, Tuple

import torch
from torch import Tensor

import memkernels as _mk

try:
    from torch._library.opaque_object import MemberType, register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise ImportError(f"memkernels.integrations.torch needs PyTorch with opaque custom-op arguments "
                      f"(torch._library.opaque_object, PyTorch 2.10 or newer); found torch {torch.__version__}") from e

__all__ = [
    "QuantizedWeight", "SparseWeight", "QuantizedLinear", "SparseLinear",
    "flash_attention", "flash_attention_varlen", "paged_attention_raw", "qgemm", "spmm", "dequantize",
]


class QuantizedWeight(OpaqueBase):
    """A ``memkernels.QuantizedMatrix`` as an opaque custom-op argument (see the module docstring)."""

    def __init__(self, qm):
        if isinstance(qm, QuantizedWeight):
            qm = qm.matrix
        if not isinstance(qm, _mk.QuantizedMatrix):
            raise TypeError(f"qm: expected a memkernels.QuantizedMatrix, got {type(qm).__name__}")
        self.matrix = qm

    @property
    def out_features(self) -> int:
        return self.matrix.out_features

    @property
    def in_features(self) -> int:
        return self.matrix.in_features

    @property
    def device(self) -> str:
        return self.matrix.device

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.matrix!r})"


class SparseWeight(OpaqueBase):
    """A ``memkernels.SparseMatrix`` as an opaque custom-op argument (see the module docstring)."""

    def __init__(self, sp):
        if isinstance(sp, SparseWeight):
            sp = sp.matrix
        if not isinstance(sp, _mk.SparseMatrix):
            raise TypeError(f"sp: expected a memkernels.SparseMatrix, got {type(sp).__name__}")
        self.matrix = sp

    @property
    def out_features(self) -> int:
        return self.matrix.shape[0]

    @property
    def in_features(self) -> int:
        return self.matrix.shape[1]

    @property
    def device(self) -> str:
        return self.matrix.device

    def __repr__(self) -> str:
        return f"SparseWeight({self.matrix!r})"


# Shapes and device are read from the real object while tracing (they fix the fake outputs).
_SHAPE_MEMBERS = {name: MemberType.USE_REAL for name in ("out_features", "in_features", "device")}
register_opaque_type(QuantizedWeight, typ="reference", members=_SHAPE_MEMBERS)
register_opaque_type(SparseWeight, typ="reference", members=_SHAPE_MEMBERS)


def _stream(t: Tensor):
    """PyTorch's current stream on t's device (CUDA), None on the CPU."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else None


def _no_grad_inputs(**tensors) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but memkernels operators are inference-only (no backward): "
                             "call them under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()"
                             .format(name=name))


def _no_backward(ctx, *grads):
    raise RuntimeError("memkernels operators are inference-only and have no backward; "
                       "run them under torch.no_grad() or torch.inference_mode()")


def _window(left: int, right: int):
    return None if left < 0 and right < 0 else (left, right)


# ---- flash attention ----------------------------------------------------------------------------
# Scalars use the kernels' neutral values: scale 0 = 1/sqrt(head_dim), softcap 0 = none, window -1 = unbounded.
# seqused_k (int32) and key_mask (bool) are optional trailing arguments: None = every key used.
@torch.library.custom_op("memkernels::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window_left: int,
                     window_right: int, softcap: float, seqused_k: Optional[Tensor] = None,
                     key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _mk.flash_attention(q, k, v, causal=causal, scale=scale or None, window=_window(window_left, window_right),
                               softcap=softcap or None, return_lse=True, stream=_stream(q), seqused_k=seqused_k,
                               key_mask=key_mask)


@_flash_attention.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap, seqused_k=None, key_mask=None):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("memkernels::flash_attention_varlen", mutates_args=())
def _flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, causal: bool, scale: float, window_left: int, window_right: int,
                            softcap: float, seqused_k: Optional[Tensor] = None,
                            key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _mk.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, causal=causal,
                                      scale=scale or None, window=_window(window_left, window_right),
                                      softcap=softcap or None, return_lse=True, stream=_stream(q),
                                      seqused_k=seqused_k, key_mask=key_mask)


@_flash_attention_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale, window_left, window_right, softcap,
      seqused_k=None, key_mask=None):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _window_args(window, causal):
    """Our Python `window` (None, w or (left, right)) as the operators' two ints."""
    if window is None:
        return -1, -1
    left, right = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
    return left, (0 if causal else right)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    window=None, softcap: Optional[float] = None, return_lse: bool = False,
                    seqused_k: Optional[Tensor] = None, key_mask: Optional[Tensor] = None):
    """``memkernels.flash_attention`` as the custom op ``torch.ops.memkernels.flash_attention``.

    Same layouts and options: q (batch, seq_q, heads, head_dim), k, v (batch, seq_k, kv_heads,
    head_dim); seqused_k int32 (batch,) and key_mask bool (batch, seq_k) (True = attend) for padded
    batches; returns out (and the float32 lse (batch, heads, seq_q) when return_lse).
    """
    _no_grad_inputs(q=q, k=k, v=v)
    left, right = _window_args(window, causal)
    out, lse = torch.ops.memkernels.flash_attention(q, k, v, bool(causal), float(scale or 0.0), left, right,
                                                    float(softcap or 0.0), seqused_k, key_mask)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                           max_seqlen_q: Optional[int] = None, causal: bool = False, scale: Optional[float] = None,
                           window=None, softcap: Optional[float] = None, return_lse: bool = False,
                           seqused_k: Optional[Tensor] = None, key_mask: Optional[Tensor] = None):
    """``memkernels.flash_attention_varlen`` as ``torch.ops.memkernels.flash_attention_varlen``.

    q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim), int32 cu_seqlens; lse (heads, total_q);
    seqused_k int32 (batch,) and key_mask bool (total_k,) as in memkernels.flash_attention_varlen.
    """
    _no_grad_inputs(q=q, k=k, v=v)
    left, right = _window_args(window, causal)
    out, lse = torch.ops.memkernels.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0),
                                                           bool(causal), float(scale or 0.0), left, right,
                                                           float(softcap or 0.0), seqused_k, key_mask)
    return (out, lse) if return_lse else out


# ---- paged attention ----------------------------------------------------------------------------
@torch.library.custom_op("memkernels::paged_attention_raw", mutates_args=())
def _paged_attention_raw(q: Tensor, k_pages: Tensor, v_pages: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                         kv_last_page_len: Tensor, qo_indptr: Optional[Tensor], causal: bool, scale: float,
                         softcap: float, num_splits: int, max_q_len: int, k_scales: Optional[Tensor],
                         v_scales: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _mk.paged_attention_raw(q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, qo_indptr,
                                   causal=causal, scale=scale or None, softcap=softcap or None, num_splits=num_splits,
                                   max_q_len=max_q_len, return_lse=True, stream=_stream(q), k_scales=k_scales,
                                   v_scales=v_scales)


@_paged_attention_raw.register_fake
def _(q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, qo_indptr, causal, scale, softcap, num_splits,
      max_q_len, k_scales, v_scales):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def paged_attention_raw(q: Tensor, k_pages: Tensor, v_pages: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                        kv_last_page_len: Tensor, qo_indptr: Optional[Tensor] = None, *, causal: bool = True,
                        scale: Optional[float] = None, softcap: Optional[float] = None, num_splits: int = 0,
                        max_q_len: int = 0, return_lse: bool = False, k_scales: Optional[Tensor] = None,
                        v_scales: Optional[Tensor] = None):
    """``memkernels.paged_attention_raw`` as ``torch.ops.memkernels.paged_attention_raw`` (same arguments)."""
    _no_grad_inputs(q=q, k_pages=k_pages, v_pages=v_pages)
    out, lse = torch.ops.memkernels.paged_attention_raw(q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len,
                                                        qo_indptr, bool(causal), float(scale or 0.0),
                                                        float(softcap or 0.0), int(num_splits), int(max_q_len),
                                                        k_scales, v_scales)
    return (out, lse) if return_lse else out


# ---- low-bit GEMM ----------------------------------------------------------------------------------
@torch.library.custom_op("memkernels::qgemm", mutates_args=())
def _qgemm(x: Tensor, qm: QuantizedWeight, bias: Optional[Tensor], int8_activations: bool) -> Tensor:
    return _mk.qgemm(x, qm.matrix, bias, stream=_stream(x), int8_activations=int8_activations)


@_qgemm.register_fake
def _(x, qm, bias, int8_activations):
    return x.new_empty(tuple(x.shape[:-1]) + (qm.out_features,))


@torch.library.custom_op("memkernels::dequantize", mutates_args=())
def _dequantize(qm: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty((qm.out_features, qm.in_features), dtype=dtype, device=device)
    _mk.dequantize(qm.matrix, str(dtype).replace("torch.", ""), out=out, stream=_stream(out))
    return out


@_dequantize.register_fake
def _(qm, dtype, device):
    return torch.empty((qm.out_features, qm.in_features), dtype=dtype, device=device)


def _opaque(obj, cls, name):
    """Wraps a bare matrix in eager mode; inside torch.compile the wrapper must come from outside."""
    if isinstance(obj, cls):
        return obj
    if torch.compiler.is_compiling():
        raise TypeError(f"{name}: inside torch.compile pass a memkernels.integrations.torch.{cls.__name__} "
                        f"(wrap the matrix once, outside the compiled code), got {type(obj).__name__}")
    return cls(obj)


def qgemm(x: Tensor, qm, bias: Optional[Tensor] = None, *, int8_activations: bool = False) -> Tensor:
    """``x @ dequantize(qm).T (+ bias)`` as ``torch.ops.memkernels.qgemm``; qm a QuantizedWeight
    (or, in eager mode, a memkernels.QuantizedMatrix). x (..., in_features) -> (..., out_features)."""
    _no_grad_inputs(x=x, bias=bias)
    return torch.ops.memkernels.qgemm(x, _opaque(qm, QuantizedWeight, "qm"), bias, bool(int8_activations))


def dequantize(qm, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The float matrix (out_features, in_features) of qm as a tensor (``torch.ops.memkernels.dequantize``).

    device: where the result goes, by default the matrix's own device (it must be that device)."""
    qm = _opaque(qm, QuantizedWeight, "qm")
    device = torch.device(device if device is not None else qm.device)
    return torch.ops.memkernels.dequantize(qm, dtype, device)


# ---- sparse SpMM ------------------------------------------------------------------------------------
@torch.library.custom_op("memkernels::spmm", mutates_args=())
def _spmm(sp: SparseWeight, x: Tensor) -> Tensor:
    return _mk.spmm(sp.matrix, x, stream=_stream(x))


@_spmm.register_fake
def _(sp, x):
    return x.new_empty(tuple(x.shape[:-1]) + (sp.out_features,))


def spmm(sp, x: Tensor) -> Tensor:
    """``x @ W.T`` as ``torch.ops.memkernels.spmm``; sp a SparseWeight (or, in eager mode, a
    memkernels.SparseMatrix); x (tokens, in_features) or (in_features,)."""
    _no_grad_inputs(x=x)
    return torch.ops.memkernels.spmm(_opaque(sp, SparseWeight, "sp"), x)


for _op in (_flash_attention, _flash_attention_varlen, _paged_attention_raw, _qgemm, _dequantize, _spmm):
    _op.register_autograd(_no_backward)


def _release_traced_matrices() -> None:
    """At exit: PyTorch's fake-tensor cache keys hold the opaque arguments of traced calls (and so the
    matrices) past interpreter shutdown, which nanobind would report as leaked instances."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        FakeTensorMode.cache_clear()
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - best effort during shutdown
        pass


atexit.register(_release_traced_matrices)


# ---- modules ----------------------------------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """A linear layer on a memkernels.QuantizedMatrix: ``x @ W.T + bias`` through ``memkernels::qgemm``."""

    def __init__(self, qm, bias: Optional[Tensor] = None, *, int8_activations: bool = False):
        super().__init__()
        self.weight = QuantizedWeight(qm)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.int8_activations = bool(int8_activations)

    def forward(self, x: Tensor) -> Tensor:
        return qgemm(x, self.weight, self.bias, int8_activations=self.int8_activations)


class SparseLinear(torch.nn.Module):
    """A bias-free linear layer on a memkernels.SparseMatrix through ``memkernels::spmm``."""

    def __init__(self, sp):
        super().__init__()
        self.weight = SparseWeight(sp)

    def forward(self, x: Tensor) -> Tensor:
        return spmm(self.weight, x)
