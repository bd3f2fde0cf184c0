"""Weight-only low-bit quantization and quantized matrix multiply (qgemm).

A weight matrix W of shape (out_features, in_features) is stored in 2 to 8 bits per weight with
per-group scales; `qgemm(x, qm)` computes ``x @ dequantize(qm).T`` without materialising W in
float. Formats (``w`` = dequantized weight, ``q`` = stored code, ``s`` / ``z`` / ``m`` = group
scale / zero point / minimum):

==========  ===========================  ======================================================
format      grouping                     value
==========  ===========================  ======================================================
int8        per output channel (default) ``s * q``, q in [-128, 127] (quantize: [-127, 127]);
            or group 32/64/128           group 32 is GGUF's Q8_0
int4/3/2    group 32/64/128, asymmetric  ``s * (q - z)``, q, z in [0, 2^bits)
int*_sym    group 32/64/128, symmetric   ``s * (q - 2^(bits-1))``, s = absmax / (2^(bits-1) - 1);
                                         int4_sym group 32 is GGUF's Q4_0
int4_min    group 32/64/128, float min   ``s * q + m`` (float32(float32(s * q) + m), never
                                         fused), q in [0, 16), s and m float32; quantize: s =
                                         (max - min) / 15, m = min. GGUF's Q4_1 and Q4_K
nf4         group 32/64/128              ``s * NF4[q]``, s = absmax (QLoRA NormalFloat-4);
                                         ``double_quant=True`` stores s itself in int8
q4_k        super-blocks of 256 (GGUF    ``d * sc_j * q - dmin * m_j`` per sub-block j of 32, q in
            Q4_K): fp16 d, dmin; 6-bit   [0, 16); quantize: a search over sub-block scale / min
            sc_j, m_j                    candidates (least squared error, never worse than the
                                         plain range choice)
q5_k        as q4_k (GGUF Q5_K)          the same with q in [0, 32)
q6_k        256 (GGUF Q6_K): fp16 d,     ``d * sc_j * (q - 32)`` per sub-block j of 16, q in [0, 64)
            int8 sc_j
==========  ===========================  ======================================================

Any in_features is accepted for the group-wise formats: when it is not a multiple of the group
size (of 32 for per-channel int8) the last group is partial. Its scale comes from its real weights
only; the codes are stored padded to whole groups with the code of 0, and qgemm pads x with zeros
(a copy of x per call), so nothing changes for the caller. q4_k, q5_k and q6_k need in_features to
be a multiple of 256; GGUF Q4_K / Q5_K / Q6_K blocks load into them losslessly with
`pack_gguf_blocks`. The packed layout is documented in ``memkernels/quant.h``.
"""
from __future__ import annotations

import os

import numpy as np

from . import _memkernels as _C
from ._arrays import bfloat16, check_out, device_of, dtype_name, empty_like, stream_handle

QuantizedMatrix = _C.QuantizedMatrix

FORMATS = ("int8", "int4", "int4_sym", "int4_min", "int3", "int3_sym", "int2", "int2_sym", "nf4", "q4_k", "q5_k",
           "q6_k")
KQUANT_FORMATS = ("q4_k", "q5_k", "q6_k")

# GGUF type name -> (our format, bytes per 256-weight block)
GGUF_KQUANT_TYPES = {"Q4_K": ("q4_k", 144), "Q5_K": ("q5_k", 176), "Q6_K": ("q6_k", 210)}


def _check_qm(qm):
    if not isinstance(qm, QuantizedMatrix):
        raise TypeError(f"qm: expected a memkernels.QuantizedMatrix (from quantize()), got {type(qm).__name__}")


def quantize(w, format: str = "int4", *, group_size: int | None = None, double_quant: bool = False) -> QuantizedMatrix:
    """Round-to-nearest quantization of w (out_features, in_features), float32/float16/bfloat16 on the CPU.

    format: one of FORMATS. group_size: 32, 64 or 128 (default 128) for the grouped formats; int8 is
    per output channel by default (None) or takes 32, 64 or 128; q4_k / q5_k / q6_k work in super-blocks of
    256 (None or 256; in_features a multiple of 256). double_quant: nf4 only, stores the group scales in int8 too
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
    _C.dequantize(qm, out, stream_handle(stream, out))
    return out


# dtypes of the fast path, compared by identity (NumPy's builtin dtypes are singletons; `in` on a
# set would call dtype.__eq__, which converts its argument and costs a microsecond)
_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)


def qgemm(x, qm: QuantizedMatrix, bias=None, *, out=None, stream=None, exact: bool = False,
          int8_activations: bool | None = None):
    """``x @ dequantize(qm).T (+ bias)`` with the weights unpacked on the fly, accumulated in fp32.

    x: (tokens, in_features), (in_features,) or (..., in_features), float32/float16/bfloat16, NumPy or
    any DLPack array on qm's device. bias: optional (out_features,), float32, float16 or bfloat16
    whatever x's dtype (another dtype is converted to x's once per call). Returns x's shape with
    the last dimension replaced by out_features, in x's dtype; `out` may be given (that shape; for
    N-D x it must be reshapeable without a copy, e.g. contiguous).

    By default, for int8, int4, int4_sym, int4_min, int3, int3_sym, int2, int2_sym, nf4 (not with
    double_quant) and the K-quants with 1 to 64 tokens on CPUs with AVX512-VNNI or AVX2, x is
    quantized to int8 on the fly (one scale per token and block B of in_features, max_B |x_t| / 127;
    B is the weight group, 256 weights for per-channel int8 and the K-quants) and the dot products
    are integer: faster, and each output of token t is within
    ``sum_B sum_{k in B} |w_k| * max_B |x_t| / 254`` (plus fp32 rounding; nf4, whose levels become
    round(127 L) / 127, adds ``0.0037 * sum_k |s_k| (|x_k| + max_{B(k)} |x_t| / 254)``, s the group
    scale) of the exact product (the bounds are in
    memkernels/quant.h). Prefill on CPUs with AVX512-BF16 (from 32 tokens for those formats but the
    K-quants, from 12 for nf4 with double_quant): each block of weight rows is dequantized once per call and x and the weights
    are rounded to bf16, products summed in fp32; each output is then within
    ``(2**-7 + 2**-16) * sum_k |w_k x_k|`` (plus fp32 rounding) of the exact product. exact=True
    keeps x in fp32 everywhere (the results of the fp32 path); other formats, more tokens without
    AVX512-BF16 and CUDA run the fp32 path. int8_activations: the older
    spelling (False = exact=True; True = the default).
    """
    if int8_activations is not None:
        if exact and int8_activations:
            raise ValueError("qgemm: exact=True and int8_activations=True contradict each other; pass one")
        exact = not int8_activations
    # The common decode call (a 2-D NumPy x, no out, no stream) allocates its result and goes
    # straight to the kernel: per-call Python work is a few attribute reads (bench/qgemm.py --small).
    if out is None and stream is None and type(x) is np.ndarray and (
            (dt := x.dtype) is _F32 or dt is _F16 or (dt is bfloat16 and dt is not None)):
        if x.ndim == 2:
            _check_qm(qm)
            out = np.empty((x.shape[0], qm.out_features), x.dtype)
            _C.qgemm(x, qm, bias, out, 0, not exact)
            return out
        if x.ndim == 1:
            _check_qm(qm)
            out = np.empty(qm.out_features, x.dtype)
            _C.qgemm(x[None], qm, bias, out[None], 0, not exact)
            return out
    _check_qm(qm)
    if out is not None:
        # the kernel reads x (and bias) while it writes out: an overlap would feed it its own output
        for name, a in (("x", x), ("bias", bias)):
            if a is not None and _overlap(out, a):
                raise ValueError(f"out: overlaps {name}; qgemm needs an output buffer apart from its inputs")
    lead = tuple(x.shape[:-1])
    target = None  # the caller's out when the kernel has to write a 2-D copy of it
    if len(x.shape) != 2:  # (in_features,) or (..., in_features): run as 2-D, shape the result back
        if len(x.shape) == 0:
            raise ValueError("x: expected (tokens, in_features) or (in_features,), got a scalar")
        x = x.reshape(-1, x.shape[-1])
        if out is not None:
            check_out(out, lead + (qm.out_features,), dtype_name(x), x)
            flat = out.reshape(-1, qm.out_features)
            if _overlap(flat, out):
                out = flat
            else:  # reshape copied (a non-contiguous out): compute apart, then write the caller's out
                target, out = out, None
    shape = (x.shape[0], qm.out_features)
    if out is None:
        out = empty_like(x, shape)
    else:
        check_out(out, shape, dtype_name(x), x)
    _C.qgemm(x, qm, bias, out, stream_handle(stream, x), not exact)
    if target is not None:
        result = out.reshape(target.shape)
        if hasattr(target, "copy_"):  # PyTorch
            target.copy_(result)
        else:
            target[...] = result
        return target
    return out if len(lead) == 1 else out.reshape(lead + (qm.out_features,))


def _overlap(a, b) -> bool:
    """Whether two arrays may share memory (NumPy bounds; PyTorch / CuPy data ranges)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    def span(t):
        if hasattr(t, "data_ptr"):  # PyTorch
            start = t.data_ptr()
            return start, start + max(t.numel(), 1) * t.element_size()
        if hasattr(t, "data") and hasattr(t.data, "ptr"):  # CuPy
            return t.data.ptr, t.data.ptr + max(t.nbytes, 1)
        return None
    sa, sb = span(a), span(b)
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


def _float_param(a, name):
    """scales / mins as a contiguous float32 array: float16/bfloat16 convert exactly, float64 rounds;
    a non-float array is a TypeError naming the argument."""
    arr = np.asarray(a)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise TypeError(f"{name}: expected a float array (float32; float16, bfloat16 and float64 are "
                        f"converted), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def pack_quantized(format: str, codes, scales, zeros=None, *, mins=None, group_size: int | None = None,
                   double_quant: bool = False) -> QuantizedMatrix:
    """A QuantizedMatrix from codes computed elsewhere (an external quantizer, a GGUF importer).

    codes: (out_features, in_features) uint8 codes q (int8 format: the signed values, as int8 or as
    their uint8 bits); scales: (out_features, groups) float, finite, any sign, zero allowed (stored
    as float32, bit for bit); zeros: (out_features, groups) uint8 for int4/int3/int2 only; mins:
    (out_features, groups) float, finite, for int4_min only; groups = ceil(in_features / group_size)
    (a partial last group is fine). group_size: 32, 64 or 128 (default
    128; int8: None = per output channel). Dequantized values follow the table in this module, e.g.
    GGUF blocks: ``pack_quantized("int8", q8_0_codes, d, group_size=32)``,
    ``pack_quantized("int4_sym", q4_0_codes, d, group_size=32)``,
    ``pack_quantized("int4_min", q4_k_codes, d * sc, mins=-dmin * mn, group_size=32)``.
    """
    codes = np.ascontiguousarray(codes)
    scales = _float_param(scales, "scales")
    zeros = None if zeros is None else np.ascontiguousarray(zeros)
    mins = None if mins is None else _float_param(mins, "mins")
    gs = 0 if group_size is None else int(group_size)
    return _C.pack_quantized(format, codes, scales, zeros, gs, bool(double_quant), mins)


def pack_gguf_blocks(ggml_type: str, blocks, in_features: int) -> QuantizedMatrix:
    """A q4_k / q5_k / q6_k QuantizedMatrix from GGUF Q4_K / Q5_K / Q6_K blocks, losslessly.

    ggml_type: "Q4_K", "Q5_K" or "Q6_K" (or our name, "q4_k", ...). blocks: (out_features, bytes per
    row) uint8, each row the tensor's GGUF blocks as stored in the file (in_features / 256 blocks of
    144 / 176 / 210 bytes). `dequantize(qm)` then equals ``gguf.quants.dequantize`` bit for bit.
    """
    if not isinstance(ggml_type, str):
        raise TypeError(f"ggml_type: expected a string such as 'Q4_K', got {type(ggml_type).__name__}")
    fmt = GGUF_KQUANT_TYPES.get(ggml_type, (ggml_type, 0))[0]
    if fmt not in KQUANT_FORMATS:
        raise ValueError(f"ggml_type: expected Q4_K, Q5_K or Q6_K (or q4_k, q5_k, q6_k), got '{ggml_type}'")
    arr = np.asarray(blocks)
    if arr.dtype != np.uint8:
        raise TypeError(f"blocks: expected uint8 bytes, got dtype {arr.dtype}")
    return _C.pack_gguf_kquant(fmt, np.ascontiguousarray(arr), int(in_features))


def _group_params(fmt: str, bits: int, wg: np.ndarray):
    """Round-to-nearest parameters of one group of columns wg (N, g), float64, as quantize() does:
    returns (scale (N,), zero (N,) or None) with the same rules as the C++ quantizer."""
    if fmt == "nf4":
        s = np.abs(wg).max(axis=1)
        return np.where(s > 0, s, 1.0), None
    if fmt == "int4_min":  # returns (scale, min): w = s * q + m
        lo, hi = wg.min(axis=1), wg.max(axis=1)
        return (hi - lo) / 15, lo
    if fmt == "int8" or fmt.endswith("_sym"):
        qmax = 2 ** (bits - 1) - 1
        s = np.abs(wg).max(axis=1) / qmax
        return np.where(s > 0, s, 1.0), None
    qmax = 2 ** bits - 1
    lo = np.minimum(wg.min(axis=1), 0.0)
    hi = np.maximum(wg.max(axis=1), 0.0)
    s = (hi - lo) / qmax
    s = np.where(s > 0, s, 1.0)
    return s, np.clip(np.rint(-lo / s), 0, qmax)


def _quantize_column(fmt, bits, w, s, z, levels):
    """Codes and dequantized values of one column w (N,) with group parameters s, z."""
    if fmt == "nf4":
        q = np.abs((w / s)[:, None] - levels[None, :]).argmin(axis=1)
        return q.astype(np.uint8), s * levels[q]
    if fmt == "int4_min":  # z is the group minimum here
        safe = np.where(s > 0, s, 1.0)
        q = np.clip(np.rint((w - z) / safe), 0, 15)
        return q.astype(np.uint8), (s * q).astype(np.float32).astype(np.float64) + z
    if z is None:
        qmax = 2 ** (bits - 1) - 1
        q = np.clip(np.rint(w / s), -qmax, qmax)
        code = q.astype(np.int8).view(np.uint8) if fmt == "int8" else (q + 2 ** (bits - 1)).astype(np.uint8)
        return code, s * q
    q = np.clip(np.rint(w / s) + z, 0, 2 ** bits - 1)
    return q.astype(np.uint8), s * (q - z)


def quantize_gptq(w, format: str = "int4", *, group_size: int | None = None, hessian=None, activations=None,
                  damp: float = 0.01, block_size: int = 128, double_quant: bool = False) -> QuantizedMatrix:
    """GPTQ-style error-compensated quantization (Frantar et al. 2022), on the CPU with NumPy.

    Columns are quantized one at a time; each column's rounding error is spread over the columns not
    yet quantized through the inverse Hessian of the layer's input, so ``x @ W.T`` is preserved for
    inputs like the calibration data. hessian: (in_features, in_features), ``X.T @ X`` of calibration
    inputs; or activations: (samples, in_features) to build it from. damp: fraction of the mean
    diagonal added to the Hessian for stability. Group parameters are chosen (round-to-nearest rules)
    when the first column of a group is reached. Cost O(out * in^2): seconds for 4096 x 4096.
    """
    if (hessian is None) == (activations is None):
        raise ValueError("quantize_gptq: pass exactly one of hessian= or activations=")
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format '{format}' (expected one of {', '.join(FORMATS)})")
    if format in KQUANT_FORMATS:
        raise ValueError(f"quantize_gptq: {format} (a K-quant super-block format) is not supported by GPTQ here; "
                         "use quantize() (round-to-nearest with a scale search)")
    W = np.asarray(w).astype(np.float64)
    if W.ndim != 2:
        raise ValueError(f"w: expected 2 dimensions (out_features, in_features), got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError("quantize_gptq: w contains NaN or infinity")
    n, k = W.shape
    if activations is not None:
        X = np.asarray(activations).astype(np.float64)
        if X.ndim != 2 or X.shape[1] != k:
            raise ValueError(f"activations: expected (samples, {k}), got shape {X.shape}")
        H = X.T @ X / max(1, X.shape[0])
    else:
        H = np.array(hessian, dtype=np.float64)
        if H.shape != (k, k):
            raise ValueError(f"hessian: expected shape ({k}, {k}), got {H.shape}")
    if not np.isfinite(H).all():
        raise ValueError("quantize_gptq: the Hessian contains NaN or infinity")
    if not (0 <= damp < 1):
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    # Validates format / group size / shape exactly as quantize() does (and gives the group size).
    probe = _C.quantize(np.zeros((1, k), np.float32), format, 0 if group_size is None else int(group_size),
                        bool(double_quant))
    g, bits = probe.group_size, probe.bits
    levels = np.asarray(_C.nf4_codebook(), np.float64)

    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(k)
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise ValueError("quantize_gptq: the Hessian is not positive definite; raise damp") from None

    groups = -(-k // g)  # the last group may be partial
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, groups), np.float64)
    zeros = np.empty((n, groups), np.float64) if format in ("int4", "int3", "int2", "int4_min") else None
    bs = max(g, block_size // g * g) if g < k else block_size
    s = z = None
    for b0 in range(0, k, bs):
        b1 = min(k, b0 + bs)
        W1 = W[:, b0:b1].copy()
        E = np.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                # the group lies inside this block (bs is a multiple of g), or is the whole row (int8)
                wg = W1[:, i:i + g] if g < k else W
                s, z = _group_params(format, bits, wg)
                scales[:, col // g] = s
                if zeros is not None:
                    zeros[:, col // g] = z
            s32 = s.astype(np.float32).astype(np.float64)
            z32 = z.astype(np.float32).astype(np.float64) if format == "int4_min" else z
            q, dq = _quantize_column(format, bits, W1[:, i], s32, z32, levels)
            codes[:, col] = q
            err = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E[:, i] = err
        W[:, b1:] -= E @ U[b0:b1, b1:]
    if format == "int4_min":
        return pack_quantized(format, codes, scales.astype(np.float32), mins=zeros.astype(np.float32),
                              group_size=group_size)
    return pack_quantized(format, codes.view(np.int8) if format == "int8" else codes, scales.astype(np.float32),
                          None if zeros is None else zeros.astype(np.uint8), group_size=group_size,
                          double_quant=double_quant)


def from_bytes(data) -> QuantizedMatrix:
    """A QuantizedMatrix from `qm.to_bytes()` output; raises CorruptDataError on bad bytes."""
    return _C.quant_from_bytes(bytes(data))


def load_quantized(path) -> QuantizedMatrix:
    """Reads a file written by `qm.save(path)`; raises CorruptDataError on bad content, OSError on I/O."""
    return _C.quant_load(os.fspath(path))


def nbytes_per_weight(qm: QuantizedMatrix) -> float:
    """Stored bytes per weight, scales and zero points included."""
    return qm.bits_per_weight / 8.0
