"""Sparse weight matrices (pruned linear layers) and SpMM ``y = x @ W.T`` faster than dense math.

Formats (see core/include/memkernels/sparse.h for the exact layouts):

* ``"bitmap"`` (default, the compute format): 64-column tiles, each a uint64 mask plus its packed
  non-zeros, so a zero costs one bit. At 70% sparsity: 1.33 bytes per weight in float32, 0.73 in
  float16/bfloat16 (CSR with int32 indices: 2.0 / 1.4).
* ``"2:4"``: at most 2 non-zeros in every group of 4 columns (NVIDIA's semi-structured sparsity).
* ``"csr"``: compressed sparse rows, for interchange with SciPy.

Values are float32, float16, bfloat16 or int8 with a float32 scale per row (0.43 bytes per weight
at 70% sparsity in the bitmap format).

Example::

    w = memkernels.prune(w, 0.7)                       # magnitude pruning, per row
    sp = memkernels.SparseMatrix.from_dense(w, dtype="float16")
    y = memkernels.spmm(sp, x)                         # x (tokens, in) -> (tokens, out), = x @ w.T
"""
from __future__ import annotations

import numpy as np

from . import _memkernels as _C
from ._arrays import check_out, dtype_name, empty_like, numpy_dtype, parse_device, stream_handle

FORMATS = ("bitmap", "2:4", "csr")
_VALUE_DTYPES = ("float32", "float16", "bfloat16", "int8")


def _value_dtype(dtype, default: str) -> str:
    if dtype is None:
        return default if default in _VALUE_DTYPES[:3] else "float32"
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _VALUE_DTYPES:
        raise TypeError(f"dtype: expected one of {_VALUE_DTYPES}, got {name!r}")
    return name



def _check_format(format) -> str:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    return format


class SparseMatrix:
    """A sparse weight W (out_features, in_features) in one of the formats of this module.

    Build it with :meth:`from_dense`, :meth:`from_scipy` or :meth:`from_bytes`; multiply with
    :func:`spmm`. It is immutable; :meth:`to` gives a copy on another device (e.g. ``"cuda"``).
    """

    __slots__ = ("_h",)

    def __init__(self, handle):
        if not isinstance(handle, _C.SparseMatrixHandle):
            raise TypeError("use SparseMatrix.from_dense / from_scipy / from_bytes to build a SparseMatrix")
        self._h = handle

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, w, format: str = "bitmap", threshold: float = 0.0, dtype=None) -> "SparseMatrix":
        """Stores the entries of the 2-D CPU array w with ``|w| > threshold`` (0: every non-zero).

        dtype: value dtype, 'float32', 'float16', 'bfloat16' (default: w's, float64 -> float32) or
        'int8' (symmetric, one float32 scale per row; entries that round to 0 are dropped).
        format '2:4' needs at most 2 non-zeros per group of 4 columns (``prune(w, method='2:4')``).
        """
        if isinstance(w, (list, tuple)):
            w = np.asarray(w, dtype=np.float32)
        threshold = float(threshold)
        if not np.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
        vd = _value_dtype(dtype, dtype_name(w))
        return cls(_C.sparse_from_dense(w, _check_format(format), vd, threshold))

    @classmethod
    def from_scipy(cls, m, format: str = "bitmap", dtype=None) -> "SparseMatrix":
        """From any SciPy sparse matrix or array (CSR is read as is, others through ``tocsr()``).

        The CSR arrays are validated in full in C++ (indptr monotonic and of length rows + 1,
        indices in range, lengths consistent): corrupt input raises ValueError. Duplicates are
        summed and explicit zeros dropped, as ``to_dense`` would show them.
        """
        try:
            import scipy.sparse as sps
        except ImportError:  # pragma: no cover
            raise ImportError("from_scipy needs SciPy (pip install scipy)") from None
        if not sps.issparse(m):
            raise TypeError(f"from_scipy: expected a SciPy sparse matrix or array, got {type(m).__name__}")
        if m.format != "csr":
            m = m.tocsr()
        if len(m.shape) != 2:
            raise ValueError(f"from_scipy: expected a 2-D matrix, got shape {m.shape}")
        data = np.ascontiguousarray(m.data)
        if data.dtype.kind in "iub":
            data = data.astype(np.float64)
        vd = _value_dtype(dtype, data.dtype.name)
        rows, cols = (int(s) for s in m.shape)
        return cls(_C.sparse_from_csr(rows, cols, np.ascontiguousarray(m.indptr), np.ascontiguousarray(m.indices),
                                      data, _check_format(format), vd))

    @classmethod
    def from_bytes(cls, data) -> "SparseMatrix":
        """Reads what :meth:`to_bytes` wrote; damaged, truncated or foreign bytes raise CorruptDataError."""
        return cls(_C.sparse_from_bytes(bytes(data)))

    # ---- export ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A versioned, checksummed serialisation (CPU matrices)."""
        return self._h.to_bytes()

    def to_dense(self, dtype=None) -> np.ndarray:
        """W as a dense NumPy array (default dtype: the value dtype; float32 for int8 values)."""
        default = "float32" if self.dtype == "int8" else self.dtype
        name = default if dtype is None else (dtype if isinstance(dtype, str) else np.dtype(dtype).name)
        out = np.empty(self.shape, dtype=numpy_dtype(name))
        self._h.to_dense(out)
        return out

    def to_scipy(self):
        """A ``scipy.sparse.csr_array`` (sorted indices); float16/bfloat16 values come back as float32."""
        import scipy.sparse as sps

        n = self._h.csr_nnz()
        indptr = np.empty(self.shape[0] + 1, dtype=np.int64)
        indices = np.empty(n, dtype=np.int32)
        values = np.empty(n, dtype=np.float32)
        self._h.to_csr(indptr, indices, values)
        return sps.csr_array((values, indices, indptr), shape=self.shape)

    def to(self, device) -> "SparseMatrix":
        """A copy on 'cpu', 'cuda' or 'cuda:<index>' (self when already there)."""
        kind, index = parse_device(device)
        return SparseMatrix(self._h.to_device(kind == "cuda", index))

    # ---- properties --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self._h.rows, self._h.cols)

    @property
    def format(self) -> str:
        return self._h.format

    @property
    def dtype(self) -> str:
        """The value dtype: 'float32', 'float16', 'bfloat16' or 'int8'."""
        return self._h.value_dtype

    @property
    def device(self) -> str:
        return self._h.device

    @property
    def nnz(self) -> int:
        """Stored values (2:4 counts the explicit zeros that fill up groups)."""
        return self._h.nnz_stored

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers: values plus masks / indices / row pointers."""
        return self._h.nbytes

    @property
    def bytes_per_weight(self) -> float:
        rows, cols = self.shape
        return self.nbytes / max(1, rows * cols)

    def spmm(self, x, *, out=None, stream=None):
        """Same as :func:`spmm` (self, x)."""
        return spmm(self, x, out=out, stream=stream)

    __call__ = spmm

    def __repr__(self) -> str:
        return (f"SparseMatrix(shape={self.shape}, format={self.format!r}, dtype={self.dtype!r}, nnz={self.nnz}, "
                f"bytes_per_weight={self.bytes_per_weight:.3f}, device={self.device!r})")


def spmm(sp: SparseMatrix, x, *, out=None, stream=None):
    """``x @ W.T`` for x (tokens, in_features) -> (tokens, out_features), like a linear layer.

    x: float32, float16 or bfloat16 (the result has x's dtype; float32 accumulation), a NumPy
    or DLPack array on the device of sp; a 1-D x (in_features,) gives (out_features,).
    out: optional output array. stream: CUDA stream (int handle, CuPy or torch stream); None: the
    current stream of x's framework (torch.cuda.current_stream(), CuPy's current stream).
    """
    if not isinstance(sp, SparseMatrix):
        raise TypeError(f"spmm: expected a SparseMatrix, got {type(sp).__name__}")
    if len(x.shape) == 1:
        x2 = x.reshape(1, -1)
        o2 = None if out is None else out.reshape(1, -1)
        return spmm(sp, x2, out=o2, stream=stream).reshape(-1)
    if len(x.shape) != 2:
        raise ValueError(f"x: expected (tokens, in_features) or (in_features,), got shape {tuple(x.shape)}")
    shape = (x.shape[0], sp.shape[0])
    out = empty_like(x, shape) if out is None else check_out(out, shape, dtype_name(x), x)
    _C.spmm(sp._h, x, out, stream_handle(stream, x))
    return out


def prune(w, sparsity: float = 0.5, method: str = "magnitude") -> np.ndarray:
    """A copy of the 2-D NumPy array w with the smallest-magnitude entries set to 0.

    method: 'magnitude' (each row keeps its largest ``(1 - sparsity) * cols`` entries: every output
    feature equally sparse, as Wanda compares), 'global' (one threshold for the whole matrix), or
    '2:4' (the 2 largest of every group of 4 columns; sparsity is then 0.5 and ignored).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D array, got shape {w.shape}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    mag = np.abs(w.astype(np.float32))
    rows, cols = w.shape
    keep = np.zeros(w.shape, dtype=bool)
    if method == "magnitude":
        k = cols - int(round(sparsity * cols))  # entries kept per row
        if k >= cols:
            keep[:] = True
        elif k > 0:
            idx = np.argpartition(-mag, k - 1, axis=1)[:, :k]
            np.put_along_axis(keep, idx, True, axis=1)
    elif method == "global":
        k = w.size - int(round(sparsity * w.size))
        if k >= w.size:
            keep[:] = True
        elif k > 0:
            flat = np.argpartition(-mag.ravel(), k - 1)[:k]
            keep.ravel()[flat] = True
    elif method == "2:4":
        cpad = (cols + 3) // 4 * 4
        m = np.full((rows, cpad), -1.0, dtype=np.float32)
        m[:, :cols] = mag
        g = m.reshape(rows, cpad // 4, 4)
        top = np.argsort(-g, axis=2, kind="stable")[:, :, :2]
        kg = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(kg, top, True, axis=2)
        keep = kg.reshape(rows, cpad)[:, :cols]
    else:
        raise ValueError(f"method: expected 'magnitude', 'global' or '2:4', got {method!r}")
    out = w.copy()
    out[~keep] = 0
    return out


__all__ = ["SparseMatrix", "spmm", "prune", "FORMATS"]
