"""Weight-only low-bit quantization and quantized matrix multiply (qgemm).

A weight matrix W of shape (out_features, in_features) is stored in 2 to 8 bits per weight with
per-group scales; `qgemm(x, qm)` computes ``x @ dequantize(qm).T`` without materialising W in
float. Formats (``w`` = dequantized weight, ``q`` = stored code, ``s`` / ``z`` = group scale / zero):

==========  ===========================  ======================================================
format      grouping                     value
==========  ===========================  ======================================================
int8        per output channel           ``s * q``, q in [-127, 127]
int4/3/2    group 32/64/128, asymmetric  ``s * (q - z)``, q, z in [0, 2^bits)
int*_sym    group 32/64/128, symmetric   ``s * (q - 2^(bits-1))``, s = absmax / (2^(bits-1) - 1)
nf4         group 32/64/128              ``s * NF4[q]``, s = absmax (QLoRA NormalFloat-4);
                                         ``double_quant=True`` stores s itself in int8
==========  ===========================  ======================================================

in_features must be a multiple of the group size (of 32 for int8); pad W (and x) with zero
columns otherwise. The packed layout is documented in ``memkernels/quant.h``.
"""
from __future__ import annotations

import os

import numpy as np

from . import _memkernels as _C
from ._arrays import check_out, device_of, dtype_name, empty_like, stream_handle

QuantizedMatrix = _C.QuantizedMatrix

FORMATS = ("int8", "int4", "int4_sym", "int3", "int3_sym", "int2", "int2_sym", "nf4")


def _check_qm(qm):
    if not isinstance(qm, QuantizedMatrix):
        raise TypeError(f"qm: expected a memkernels.QuantizedMatrix (from quantize()), got {type(qm).__name__}")


def quantize(w, format: str = "int4", *, group_size: int | None = None, double_quant: bool = False) -> QuantizedMatrix:
    """Round-to-nearest quantization of w (out_features, in_features), float32/float16/bfloat16 on the CPU.

    format: one of FORMATS. group_size: 32, 64 or 128 (default 128) for the grouped formats; int8 is
    per output channel and takes None. double_quant: nf4 only, stores the group scales in int8 too
    (about 0.37 fewer bits per weight at group 64). Returns a CPU QuantizedMatrix; move it to a GPU
    with ``qm.to("cuda")``.
    """
    if not isinstance(format, str):
        raise TypeError(f"format: expected a string such as 'int4', got {type(format).__name__}")
    if device_of(w)[0] != "cpu":
        raise ValueError("quantize: w must be a CPU array; quantize on the CPU, then move with qm.to('cuda')")
    if isinstance(w, np.ndarray) and w.dtype == np.float64:
        w = w.astype(np.float32)
    gs = 0 if group_size is None else int(group_size)
    if group_size is not None and gs <= 0:
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    return _C.quantize(w, format, gs, bool(double_quant))


def dequantize(qm: QuantizedMatrix, dtype: str = "float32", *, out=None, like=None, stream=None):
    """The float matrix (out_features, in_features) a QuantizedMatrix stands for.

    dtype: float32, float16 or bfloat16. On a GPU pass `like` (an array on that device, used to pick
    the array type of the result) or `out`.
    """
    _check_qm(qm)
    shape = qm.shape
    if out is None:
        if qm.device != "cpu":
            if like is None:
                raise ValueError("dequantize: the matrix is on a GPU; pass out= or like= (an array on that device)")
            out = empty_like(like, shape, dtype)
        else:
            out = empty_like(np.empty(0, np.float32), shape, dtype)
    _C.dequantize(qm, out, stream_handle(stream))
    return out


def qgemm(x, qm: QuantizedMatrix, bias=None, *, out=None, stream=None):
    """``x @ dequantize(qm).T (+ bias)`` with the weights unpacked on the fly, accumulated in fp32.

    x: (tokens, in_features) or (in_features,), float32/float16/bfloat16, NumPy or any DLPack array on
    qm's device. bias: optional (out_features,) of x's dtype. Returns (tokens, out_features) (or
    (out_features,) for 1-D x) in x's dtype; `out` may be given (2-D shape).
    """
    _check_qm(qm)
    vector = len(x.shape) == 1
    if vector:
        x = x.reshape(1, x.shape[0])
    shape = (x.shape[0], qm.out_features)
    if out is None:
        out = empty_like(x, shape)
    else:
        check_out(out, shape, dtype_name(x), x)
    _C.qgemm(x, qm, bias, out, stream_handle(stream))
    return out.reshape(qm.out_features) if vector else out


def from_bytes(data) -> QuantizedMatrix:
    """A QuantizedMatrix from `qm.to_bytes()` output; raises CorruptDataError on bad bytes."""
    return _C.quant_from_bytes(bytes(data))


def load_quantized(path) -> QuantizedMatrix:
    """Reads a file written by `qm.save(path)`; raises CorruptDataError on bad content, OSError on I/O."""
    return _C.quant_load(os.fspath(path))


def nbytes_per_weight(qm: QuantizedMatrix) -> float:
    """Stored bytes per weight, scales and zero points included."""
    return qm.bits_per_weight / 8.0
