"""Array helpers shared by the Python wrappers: device detection, output allocation, streams.

Kernels never allocate their outputs in C++; the wrappers allocate them here with the framework
the inputs came from (NumPy on CPU; CuPy or PyTorch on CUDA, or a bare DLPack array otherwise),
so results come back as the kind of array the caller passed in.
"""
from __future__ import annotations

import operator
import re

import numpy as np

from . import _memkernels as _C

CPU, CUDA = "cpu", "cuda"

INT32 = (-(2**31), 2**31 - 1)  # C int
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)


def as_int(value, name: str, lo: int, hi: int) -> int:
    """`value` as a Python int in [lo, hi]: Python and NumPy integers (and integral floats) are
    accepted; anything else is a TypeError and an out-of-range value a ValueError naming `name`
    (instead of a nanobind signature dump for ints that do not fit the C type)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            v = int(value)
        else:
            raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} = {v} is out of range [{lo}, {hi}]")
    return v


def parse_device(device) -> tuple[str, int]:
    """('cpu', 0) or ('cuda', index) from 'cpu', 'cuda' or 'cuda:N' (N a decimal index); anything
    else (e.g. 'cudaXYZ', 'cuda:x', 'cuda:-1') is a ValueError naming the argument."""
    text = str(device) if not isinstance(device, str) else device
    m = re.fullmatch(r"(cpu)|cuda(?::([0-9]+))?", text)
    if m is None or (m.group(2) is not None and int(m.group(2)) > INT32[1]):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return (CPU, 0) if m.group(1) else (CUDA, int(m.group(2) or 0))

try:  # NumPy has no bfloat16 of its own; ml_dtypes provides the one JAX and others use.
    import ml_dtypes as _ml_dtypes

    bfloat16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is optional
    bfloat16 = None


_NP_DTYPES = {n: np.dtype(n) for n in ("float32", "float16", "float64", "int32", "int64", "int8", "uint8")}
if bfloat16 is not None:
    _NP_DTYPES["bfloat16"] = bfloat16
_NP_NAMES = {dt: n for n, dt in _NP_DTYPES.items()}


def numpy_dtype(name: str):
    """The NumPy dtype for a dtype name, 'bfloat16' included (through ml_dtypes)."""
    if name == "bfloat16":
        if bfloat16 is None:
            raise TypeError("bfloat16 NumPy arrays need the ml_dtypes package (pip install ml_dtypes)")
        return bfloat16
    return np.dtype(name)


def require_array(a, name: str):
    """Raises TypeError naming the argument unless `a` is a NumPy or DLPack-capable array."""
    if not (isinstance(a, np.ndarray) or hasattr(a, "__dlpack__")) or not hasattr(a, "shape"):
        raise TypeError(f"{name}: expected a NumPy or DLPack-capable array, got {type(a).__name__}")
    return a


def device_of(a) -> tuple[str, int]:
    """('cpu', 0) or ('cuda', index) for a NumPy / DLPack-capable array."""
    if isinstance(a, np.ndarray):
        return CPU, 0
    if hasattr(a, "__dlpack_device__"):
        dev_type, dev_id = a.__dlpack_device__()
        dev_type = int(dev_type)
        if dev_type in (1, 3):  # kDLCPU, kDLCUDAHost
            return CPU, 0
        if dev_type in (2, 13):  # kDLCUDA, kDLCUDAManaged
            return CUDA, int(dev_id)
        raise ValueError(f"arrays on DLPack device type {dev_type} are not supported (only CPU and CUDA)")
    raise TypeError(f"expected a NumPy or DLPack-capable array, got {type(a).__name__}")


def dtype_name(a) -> str:
    """'float32', 'float16', 'bfloat16', 'int32', ... for NumPy, CuPy and PyTorch arrays."""
    if type(a) is np.ndarray:  # np.dtype.name is computed in Python on every access: look it up
        dt = a.dtype
        return _NP_NAMES.get(dt) or dt.name
    dt = a.dtype
    name = getattr(dt, "name", None) or str(dt)
    return name.replace("torch.", "")


def _framework(a) -> str:
    mod = type(a).__module__.split(".")[0]
    return mod if mod in ("numpy", "torch", "cupy") else "other"


def empty_like(ref, shape, dtype: str | None = None):
    """An uninitialised array of `shape` on ref's device, from ref's framework, dtype by name."""
    if type(ref) is np.ndarray:  # the per-call fast path of every CPU wrapper
        return np.empty(shape, ref.dtype if dtype is None else _NP_DTYPES.get(dtype) or numpy_dtype(dtype))
    dtype = dtype or dtype_name(ref)
    shape = tuple(int(s) for s in shape)
    device, index = device_of(ref)
    fw = _framework(ref)
    if fw == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=ref.device)
    if device == CPU:
        return np.empty(shape, dtype=numpy_dtype(dtype))
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(index):
            return cupy.empty(shape, dtype=dtype)
    return _C.empty_cuda(list(shape), dtype, index)


def check_out(out, shape, dtype: str, ref, name: str = "out"):
    """Validates a caller-provided output array (shape, dtype, device) before a kernel writes it."""
    if type(out) is np.ndarray and type(ref) is np.ndarray and out.shape == tuple(shape) and \
            _NP_NAMES.get(out.dtype) == dtype:
        return out  # both NumPy (so on the CPU) and as expected: the common case, checked cheaply
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if dtype_name(out) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {dtype_name(out)}")
    if device_of(out) != device_of(ref):
        raise ValueError(f"{name} is on {device_of(out)} but the inputs are on {device_of(ref)}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{name}: the array is read-only, but the result is written into it; pass a writable array")
    return out


def current_stream_handle(a) -> int:
    """The current CUDA stream of the framework `a` comes from, as an integer handle: for a PyTorch
    tensor torch.cuda.current_stream(a.device), for a CuPy array cupy.cuda.get_current_stream() on
    the array's device; 0 (the legacy default stream) for NumPy/CPU arrays and other frameworks."""
    if a is None or isinstance(a, np.ndarray):
        return 0
    device, index = device_of(a)
    if device != CUDA:
        return 0
    fw = _framework(a)
    if fw == "torch":
        import torch

        return int(torch.cuda.current_stream(a.device).cuda_stream)
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(index):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def stream_handle(stream, like=None) -> int:
    """A CUDA stream as an integer handle. None: the current stream of the framework `like` (the
    call's main input) comes from (see current_stream_handle), so that work the caller queued on a
    side stream with `with torch.cuda.stream(s):` / `with cupy.cuda.Stream():` is ordered before the
    kernel; 0 without `like`. Also accepts ints, CuPy streams (.ptr) and PyTorch streams
    (.cuda_stream)."""
    if stream is None:
        return current_stream_handle(like)
    if isinstance(stream, bool):
        raise TypeError("stream: expected an int handle, a CuPy or a PyTorch stream, got bool")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"stream: expected an int handle, a CuPy or a PyTorch stream, got {type(stream).__name__}")


def out_like_and_stream(q, out, stream):
    """The output array of an attention call shaped and typed like q (a new one, or `out` checked),
    and the stream handle to launch on. Plain NumPy input, the common CPU case, takes the short way:
    its handle is 0 unless a stream is given."""
    if type(q) is np.ndarray:
        out = np.empty(q.shape, q.dtype) if out is None else check_out(out, q.shape, dtype_name(q), q)
        return out, 0 if stream is None else stream_handle(stream, q)
    out = empty_like(q, q.shape) if out is None else check_out(out, q.shape, dtype_name(q), q)
    return out, stream_handle(stream, q)
