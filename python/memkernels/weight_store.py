"""Weight streaming from flash storage under a DRAM budget ("LLM in a flash", Alizadeh et al. 2023).

A weight store is one file of our own format: whole tensors, plus FFN layers stored neuron by neuron
as bundles [gate row i | up row i | down column i] so that one contiguous read brings one neuron
and neighbouring active neurons come in one large read. Every read unit has a CRC-32C.

    import memkernels as mk
    mk.convert_to_weight_store("model.safetensors", "model.mkws")     # or .npz / .npy
    with mk.WeightStore.open("model.mkws", dram_budget_bytes=2 << 30) as ws:
        emb = ws.get("model.embed_tokens.weight")
        ws.prefetch(0, predicted_ids)              # async, overlaps with compute
        rows = ws.get_rows(0, active_ids)          # (k, 3, d_model): gate, up, down rows
        ws.next_token()                            # windowing: forget neurons idle for k tokens
        print(ws.stats())

FFN tensors are recognised by their names (Hugging Face `...layers.{i}.mlp.{gate,up,down}_proj.weight`
by default; pass `ffn_pattern` for other models) and must have the HF layouts: gate/up
(d_ff, d_model), down (d_model, d_ff). Quantized or sparse weights are stored as their component
arrays (packed codes, scales, CSR index arrays) with any integer dtype.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Mapping

import numpy as np

from . import _memkernels as _C
from ._arrays import INT32, INT64, UINT32, as_int, numpy_dtype, parse_device, stream_handle

CorruptDataError = _C.CorruptDataError

DEFAULT_FFN_PATTERN = r"^(?:.*\.)?layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$"

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
}



def _parse_device(device) -> tuple[str, int]:
    if not isinstance(device, str):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return parse_device(device)


def _empty(shape, dtype: str, device: tuple[str, int]):
    if device[0] == "cpu":
        return np.empty(shape, dtype=numpy_dtype(dtype))
    try:
        import cupy

        with cupy.cuda.Device(device[1]):
            return cupy.empty(shape, dtype=dtype)
    except ImportError:
        pass
    try:
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{device[1]}")
    except ImportError:
        return _C.empty_cuda(list(shape), dtype, device[1])


def _ids(neuron_ids) -> np.ndarray:
    ids = np.asarray(neuron_ids)
    if ids.ndim != 1:
        raise ValueError(f"neuron_ids: expected a 1-D array of neuron indices, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"neuron_ids: expected integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


class WeightStore:
    """A weight-store file opened for reading under a DRAM budget. Use `WeightStore.open(...)`."""

    def __init__(self, handle, path: str, device: tuple[str, int]):
        self._s = handle
        self.path = path
        self._device = device

    @classmethod
    def open(cls, path, dram_budget_bytes: int, device: str = "cpu", *, io_threads: int = 4,
             window_tokens: int = 5, direct_io: bool = True, merge_gap_bytes: int = 32 << 10,
             max_read_bytes: int = 1 << 20, async_io: bool = True) -> "WeightStore":
        """Opens `path` (made by `write_weight_store` / `convert_to_weight_store`).

        dram_budget_bytes bounds everything the store holds in host memory: the neuron cache, the
        I/O staging buffers and (device="cuda") the pinned gather buffers. A budget smaller than the
        largest single read allows (two read buffers of `largest_read_bytes` — four on CUDA — plus
        one neuron) raises ValueError. Reads use O_DIRECT (page cache
        bypassed) through `io_threads` threads; where the filesystem refuses O_DIRECT (tmpfs) they
        fall back to buffered reads with posix_fadvise(DONTNEED) — see `io_mode`.
        async_io: O_DIRECT reads of a CPU store go through Linux native AIO (each call's reads in one
        submission, a deep queue, completions reaped in batches by one thread) instead of a pread
        per read in the `io_threads` threads; where the kernel refuses AIO (seccomp, fs.aio-max-nr),
        for buffered files and CUDA stores, with async_io=False or with the environment variable
        MEMKERNELS_STORE_IO=threads, the threads read — see `io_engine`. Same reads, same results.
        window_tokens: neurons not used in the last k tokens leave the cache at `next_token()`
        (0 disables the window; the budget still evicts least recently used neurons).
        merge_gap_bytes: two runs of needed neurons closer than this are read as one;
        max_read_bytes: the largest read issued. Truncated, corrupt or wrong-version files raise
        CorruptDataError; a missing file OSError.
        """
        dev = _parse_device(device)
        h = _C.WeightStore.open(os.fspath(path), as_int(dram_budget_bytes, "dram_budget_bytes", *INT64), dev[0], dev[1],
                                as_int(io_threads, "io_threads", *INT32), as_int(window_tokens, "window_tokens", *INT32),
                                bool(direct_io), as_int(merge_gap_bytes, "merge_gap_bytes", *INT64),
                                as_int(max_read_bytes, "max_read_bytes", *INT64), bool(async_io))
        return cls(h, os.fspath(path), dev)

    def _h(self):
        if self._s is None:
            raise ValueError("the weight store is closed")
        return self._s

    # ---- information ----
    @property
    def io_mode(self) -> str:
        """'direct' (O_DIRECT, page cache bypassed) or 'buffered' (the filesystem refused O_DIRECT)."""
        return self._h().io_mode()

    @property
    def io_engine(self) -> str:
        """'aio' (Linux native AIO, batched submissions) or 'threads' (pread in the I/O threads)."""
        return self._h().io_engine()

    @property
    def device(self) -> str:
        return "cpu" if self._device[0] == "cpu" else f"cuda:{self._device[1]}"

    @property
    def dram_budget_bytes(self) -> int:
        return self._h().dram_budget_bytes()

    @property
    def largest_read_bytes(self) -> int:
        return self._h().largest_read_bytes()

    def tensors(self) -> list[dict]:
        """The whole tensors: name, dtype, shape, offset, nbytes, chunk_bytes."""
        return self._h().tensors()

    def layers(self) -> list[dict]:
        """The bundled FFN layers: layer, neurons, d_model, dtype, parts (3 with gate, else 2), ..."""
        return self._h().layers()

    def __contains__(self, name) -> bool:
        return any(t["name"] == name for t in self.tensors())

    # ---- reads ----
    def get(self, name: str, out=None, stream=None):
        """The whole tensor `name` (checksummed, not cached) as a new array or into `out` (on CUDA:
        copied on the store's copy stream, ordered with `stream` as in get_rows)."""
        info = self._h().tensor_info(name)
        if out is None:
            out = _empty(tuple(info["shape"]), info["dtype"], self._device)
        self._h().get(name, out, stream_handle(stream, out))
        return out

    def get_rows(self, layer: int, neuron_ids, out=None, stream=None):
        """Neurons `neuron_ids` of FFN `layer` as an array (k, parts, d_model) in the stored dtype:
        [:, 0] gate_proj rows, [:, 1] up_proj rows, [:, 2] down_proj columns (without a gate:
        up, down). Neurons resident in the cache are hits; misses are read in coalesced runs and
        cached. On CUDA the host-to-device copies run on the store's own copy stream: they start
        after the work already enqueued on `stream` (None: the framework's current stream) and
        `stream` waits on an event after them, so kernels enqueued on it next see the rows; the host
        does not wait. Copies overlap the kernels enqueued after the call, so asking for the next
        layer's rows before enqueuing this layer's kernels overlaps the transfer with them."""
        info = self._h().layer_info(as_int(layer, "layer", *INT64))
        ids = _ids(neuron_ids)
        shape = (ids.shape[0], info["parts"], info["d_model"])
        if out is None:
            out = _empty(shape, info["dtype"], self._device)
        self._h().get_rows(as_int(layer, "layer", *INT64), ids, out, stream_handle(stream, out))
        return out

    def prefetch(self, layer: int, neuron_ids) -> None:
        """Starts loading a predicted active set of `layer` in the background (returns at once);
        a later get_rows() finds them resident. Stops at the budget."""
        self._h().prefetch(as_int(layer, "layer", *INT64), _ids(neuron_ids))

    def pin(self, layer: int, neuron_ids) -> None:
        """Loads neurons `neuron_ids` of `layer` into the cache (reading those not resident) and keeps
        them there: the window, the LRU and clear_cache() never evict them (hot neurons calibrated
        offline; with layers visited in a cycle an LRU alone never hits). Pinned neurons count in the
        budget like any cached neuron. Raises ValueError when they would leave no slot free."""
        self._h().pin(as_int(layer, "layer", *INT64), _ids(neuron_ids))

    def unpin_all(self) -> None:
        """Pinned neurons become ordinary cache entries (evictable)."""
        self._h().unpin_all()

    def wait_prefetch(self) -> None:
        """Blocks until every prefetch issued so far has landed."""
        self._h().wait_prefetch()

    def next_token(self) -> None:
        """Ends a token: neurons unused for `window_tokens` tokens leave the cache."""
        self._h().next_token()

    def clear_cache(self) -> None:
        self._h().clear_cache()

    def stats(self) -> dict:
        """bytes_read, reads_issued, neuron_hits, neuron_misses, hit_rate, prefetched, evictions,
        resident_bytes, peak_resident_bytes, cache_capacity_bytes, staging_bytes, cache_slots,
        slot_bytes, pinned_neurons, read_granularity (bytes: every read is aligned to it, 512
        where O_DIRECT accepts 512-byte reads, else 4096), tokens, io_mode, io_engine."""
        return dict(self._h().stats())

    def reset_stats(self) -> None:
        self._h().reset_stats()

    def close(self) -> None:
        """Waits for outstanding reads and frees the budget's memory."""
        self._s = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._s is None:
            return f"WeightStore({self.path!r}, closed)"
        return (f"WeightStore({self.path!r}, {len(self.tensors())} tensors, {len(self.layers())} FFN layers, "
                f"budget={self.dram_budget_bytes}, io_mode={self.io_mode!r}, device={self.device!r})")


# ---- writing ---------------------------------------------------------------------------------
def _as_array(a, name):
    if not isinstance(a, np.ndarray):
        if not (hasattr(a, "__array__") or isinstance(a, (list, tuple))):
            raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
        a = np.asarray(a)
    return a  # read-only arrays (memory-mapped checkpoints) are written without a copy


def write_weight_store(path, tensors: Mapping[str, np.ndarray] | None = None,
                       ffn_layers: Mapping[int, Mapping[str, np.ndarray]] | None = None, *,
                       chunk_bytes: int = 1 << 20) -> None:
    """Writes a weight store. tensors: name -> array (any dtype: float, quantized codes, index
    arrays). ffn_layers: layer -> {"gate": (d_ff, d_model) optional, "up": (d_ff, d_model),
    "down": (d_model, d_ff)} (the Hugging Face gate_proj / up_proj / down_proj.weight layouts).
    The file appears at `path` only when complete (written to path + ".partial", then renamed)."""
    w = _C.WeightStoreWriter(os.fspath(path))
    try:
        for name, a in (tensors or {}).items():
            w.add_tensor(str(name), _as_array(a, name), as_int(chunk_bytes, "chunk_bytes", *UINT32))
        for layer, parts in (ffn_layers or {}).items():
            missing = {"up", "down"} - set(parts)
            if missing:
                raise ValueError(f"ffn_layers[{layer}]: missing {sorted(missing)} (needs up, down and optionally gate)")
            up = _as_array(parts["up"], "up")
            down = _as_array(parts["down"], "down")
            gate = parts.get("gate")
            gate = None if gate is None else _as_array(gate, "gate")
            if down.ndim != 2 or up.ndim != 2 or down.shape != up.shape[::-1]:
                raise ValueError(f"ffn_layers[{layer}]: down must be (d_model, d_ff) = {up.shape[::-1]} for up "
                                 f"{up.shape}, got {down.shape}")
            w.add_ffn_layer(as_int(layer, f"ffn_layers key {layer!r}", *INT64), gate, up, down.T)
        w.finish()
    except BaseException:
        w.abort()  # no partial file left behind
        raise


def _split_ffn(arrays: Mapping[str, np.ndarray], ffn_pattern: str | None):
    """(tensors, ffn_layers) from a flat name -> array mapping."""
    tensors, groups = {}, {}
    rx = re.compile(ffn_pattern) if ffn_pattern else None
    for name, a in arrays.items():
        m = rx.match(name) if rx else None
        if m:
            groups.setdefault(int(m.group(1)), {})[m.group(2)] = (name, a)
        else:
            tensors[name] = a
    ffn = {}
    for layer, parts in sorted(groups.items()):
        if "up" in parts and "down" in parts:
            ffn[layer] = {k: v[1] for k, v in parts.items()}
        else:  # incomplete: keep them as plain tensors
            tensors.update({n: a for n, a in parts.values()})
    return tensors, ffn


def _require_regular_file(path: str) -> None:
    """OSError unless `path` is a regular file: opening a FIFO blocks until a writer comes, and a
    device or directory is not a checkpoint."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or directory?)", path)


def read_safetensors(path, *, raw_bf16: bool = False) -> dict:
    """name -> NumPy array (memory-mapped) from a .safetensors file, parsed without the
    `safetensors` package. Malformed files raise CorruptDataError. BF16 tensors come back as
    ml_dtypes bfloat16 arrays, or with raw_bf16=True as their uint16 bit patterns (no ml_dtypes
    needed; `safetensors_dtypes` tells which tensors those are)."""
    path = os.fspath(path)
    _require_regular_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptDataError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CorruptDataError(f"{path}: safetensors header length {n} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptDataError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="c") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (b0, b1) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptDataError(f"{path}: bad safetensors entry for {name!r}") from None
        if dt == "BF16":
            np_dt = np.dtype(np.uint16) if raw_bf16 else numpy_dtype("bfloat16")
        elif dt in _ST_DTYPES:
            np_dt = np.dtype(_ST_DTYPES[dt])
        else:
            raise TypeError(f"{path}: tensor {name!r} has safetensors dtype {dt}, which memkernels does not store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dt.itemsize
        if not (0 <= b0 <= b1 and base + b1 <= size and b1 - b0 == nbytes):
            raise CorruptDataError(f"{path}: tensor {name!r} data_offsets {[b0, b1]} do not match its shape/dtype "
                                   f"or the file size")
        out[name] = mm[base + b0: base + b1].view(np_dt).reshape(shape)
    return out


def safetensors_dtypes(path) -> dict:
    """name -> safetensors dtype string ('F32', 'BF16', ...) from a file's header."""
    with open(os.fspath(path), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
            return {k: e["dtype"] for k, e in header.items() if k != "__metadata__"}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptDataError(f"{path}: bad safetensors header ({e})") from None


def read_numpy(path) -> dict:
    """name -> array from a .npz (its keys) or a .npy file (named by the file stem)."""
    path = os.fspath(path)
    _require_regular_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    stem = os.path.splitext(os.path.basename(path))[0]
    return {stem: np.load(path, mmap_mode="c", allow_pickle=False)}


def _refuse_source_as_destination(dst, srcs) -> None:
    """ValueError when `dst` is one of the source files (the same inode under any name): the
    converted store would replace the checkpoint it is read from."""
    try:
        d = os.stat(dst)
    except (OSError, ValueError):
        return  # no such file (or a NUL in the name, refused by the writer): nothing to destroy
    for s in srcs:
        try:
            st = os.stat(s)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino) == (d.st_dev, d.st_ino):
            raise ValueError(f"dst: {os.fspath(dst)!r} is the source file {os.fspath(s)!r} (same file); "
                             f"converting in place would destroy the checkpoint: choose another destination")


def convert_to_weight_store(src, dst, *, ffn_pattern: str | None = DEFAULT_FFN_PATTERN,
                            chunk_bytes: int = 1 << 20) -> dict:
    """Converts .safetensors (one file or a list of shards), .npz or .npy files, or a Hugging Face
    style checkpoint directory (config.json + *.safetensors shards), to a weight store at `dst`.
    Tensors whose names match `ffn_pattern` (group 1: layer number, group 2: gate|up|down)
    become bundled FFN layers; the rest are stored whole. None disables bundling. A directory's
    config.json is kept as the uint8 tensor "config.json". Returns
    {"tensors": [...names], "ffn_layers": [...layer ids]}."""
    arrays = {}
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"{os.fspath(src)}: a checkpoint directory needs *.safetensors files; none found")
        config = os.path.join(src, "config.json")
        if os.path.isfile(config):
            with open(config, "rb") as f:
                arrays["config.json"] = np.frombuffer(f.read(), dtype=np.uint8)
        src = [os.path.join(src, f) for f in shards]
    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    _refuse_source_as_destination(dst, srcs)
    for s in srcs:
        s = os.fspath(s)
        if s.endswith(".safetensors"):
            part = read_safetensors(s)
        elif s.endswith(".npz") or s.endswith(".npy"):
            part = read_numpy(s)
        else:
            raise ValueError(f"{s}: expected a .safetensors, .npz or .npy file")
        dup = set(part) & set(arrays)
        if dup:
            raise ValueError(f"{s}: tensor names already seen in another file: {sorted(dup)[:5]}")
        arrays.update(part)
    tensors, ffn = _split_ffn(arrays, ffn_pattern)
    write_weight_store(dst, tensors, ffn, chunk_bytes=chunk_bytes)
    return {"tensors": sorted(tensors), "ffn_layers": sorted(ffn)}


__all__ = ["WeightStore", "write_weight_store", "convert_to_weight_store", "read_safetensors", "read_numpy",
           "DEFAULT_FFN_PATTERN"]
