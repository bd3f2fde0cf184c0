"""GGUF checkpoints (the llama.cpp file format) read into Hugging Face names, configs and layouts.

``load_gguf(path)`` memory-maps the file (own parser; the ``gguf`` package supplies the type table
and the dequantizer for the types kept lossy) and returns a
`GGUFCheckpoint`: ``.config`` is a transformers ``config.json``-style dict, ``.tensors`` maps HF tensor
names (``model.layers.0.self_attn.q_proj.weight``) to arrays or `memkernels.QuantizedMatrix`,
``.tokenizer`` is a `Tokenizer` built from the GGUF vocabulary, ``.metadata`` is every key/value.

llama.cpp's converter changes some tensors on the way in; they are changed back so that every tensor
equals the Hugging Face one:

- ``llama`` architecture: the rows of Q and K (weights and biases) are permuted per head so that
  RoPE rotates adjacent pairs (GGML's "normal" rope) instead of the two halves of a head (HF). The
  inverse permutation is applied to whole rows, which keeps quantized blocks intact (lossless).
- Gemma / Gemma2: every RMSNorm weight is stored with 1 added (GGML multiplies by it directly, HF by
  ``1 + w``). 1 is subtracted again, in float32 (so a weight w comes back as ``(w + 1) - 1``, within
  one float32 ulp of 1 of the original).
- Llama 3 rope scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors instead of its
  parameters; the parameters are fitted back and checked to reproduce the tensor.
- A missing ``output.weight`` means tied embeddings.

Data types: F32 and F16 stay as they are (zero-copy views of the file); BF16 is widened to float32
(exact, no ml_dtypes needed). Quantized types become QuantizedMatrix formats of ours (the K-quants
keep their super-blocks: ``memkernels.pack_gguf_blocks``; `unpack_blocks` still gives Q4_K as
int4_min group-32 codes):

=======  ===============================  ========
GGUF     ours (group 32)                  exact?
=======  ===============================  ========
Q4_0     int4_sym   w = d * (q - 8)       yes
Q4_1     int4_min   w = d * q + m         yes
Q4_K     q4_k       super-blocks of 256   yes
Q5_K     q5_k       super-blocks of 256   yes
Q6_K     q6_k       super-blocks of 256   yes
Q8_0     int8       w = d * q             yes
Q5_0     int8       w = d * (q - 16)      yes
others   int8, re-quantized from the      no: a warning on stderr names the type and the largest
         dequantized values               absolute error introduced
=======  ===============================  ========

``load_gguf(path, dequantize=True)`` gives every tensor as float32 instead (bit-exact to the ``gguf``
package's dequantizer after the conversions above): the reference for checking a quantized model.
"""
from __future__ import annotations

import functools
import os
import re
import sys

import numpy as np

from .tokenizer import Tokenizer, UnsupportedModelError  # one definition (config.py's when it has it)

__all__ = ["GGUFCheckpoint", "UnsupportedModelError", "load_gguf", "read_gguf_metadata", "gguf_format_available",
           "unpack_blocks"]

_GROUP = 32

# ---------------------------------------------------------------------------------------------------
# Architectures: GGUF name -> (HF model_type, HF class, layer-tensor map, does the converter permute Q/K)
# ---------------------------------------------------------------------------------------------------
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GEMMA2_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_PHI3_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # llama.cpp keeps Phi-3's fused gate_up as ffn_up
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", _LLAMA_LAYER, True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER, False),
    "gemma": ("gemma", "GemmaForCausalLM", _LLAMA_LAYER, False),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", _GEMMA2_LAYER, False),
    "phi3": ("phi3", "Phi3ForCausalLM", _PHI3_LAYER, False),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Architecture keys ({arch}.KEY) this loader understands; any other one is refused, since it may
# change the math. Keys whose value is checked elsewhere (expert counts must be 0) are listed too.
_KNOWN_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned", "rope.scaling.attn_factor",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_log_multiplier",
    "attn_logit_softcapping", "final_logit_softcapping", "expert_count", "expert_used_count",
}


def trim_heap():
    """Hands the heap memory freed by the unpacking temporaries back to the OS (glibc malloc_trim),
    so that it does not stay resident (and add to the peak) while the next tensors are converted."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _fail(path, msg):
    raise UnsupportedModelError(f"{os.fspath(path)}: {msg}")


# ---------------------------------------------------------------------------------------------------
# Block unpacking: raw GGUF rows (rows, blocks * type_size) uint8 -> (codes, scales, mins) whose
# s * q (+ m) in float32 equals gguf.quants.dequantize bit for bit.
# ---------------------------------------------------------------------------------------------------
def _f16(blocks, at):
    """The float16 field at byte offset `at` of every block, as float32 (rows, blocks)."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs):
    """(..., 16) packed bytes -> (..., 32) codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _unpack_q4_0(b):
    # 2 bytes d, 16 bytes of nibbles; w = d * (q - 8)
    return _nibbles(b[..., 2:18]), _f16(b, 0), None


def _unpack_q4_1(b):
    # d, m, 16 bytes of nibbles; w = d * q + m
    return _nibbles(b[..., 4:20]), _f16(b, 0), _f16(b, 2)


def _unpack_q8_0(b):
    # d, 32 int8 codes; w = d * q (codes are returned as the uint8 bit patterns of the int8 values)
    return np.ascontiguousarray(b[..., 2:34]), _f16(b, 0), None


def _unpack_q5_0(b):
    # d, 32 high bits (little-endian uint32), 16 bytes of low nibbles; w = d * (q - 16), stored as int8
    high = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # (rows, blocks, 1)
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    q = _nibbles(b[..., 6:22]) | (bits << 4)
    return (q.astype(np.int16) - 16).astype(np.int8).view(np.uint8), _f16(b, 0), None


def _unpack_q4_k(b):
    # Super-block of 256 = 8 sub-blocks of 32: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes
    # of nibbles (bytes 32j..32j+31 hold sub-block 2j in low nibbles, 2j+1 in high nibbles).
    # w = (d * sc) * q - (dmin * mn); both products are exact in float32 (11 x 6 bits).
    rows, nb = b.shape[:2]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sm = b[..., 4:16].reshape(rows, nb, 3, 4)
    lo_s, lo_m, hi = sm[..., 0, :], sm[..., 1, :], sm[..., 2, :]
    # sub-blocks 0-3: low 6 bits of bytes 0-3 (scales) / 4-7 (mins); sub-blocks 4-7: a nibble of bytes
    # 8-11 plus the top 2 bits of bytes 0-3 / 4-7 as bits 4-5
    sc = np.concatenate([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    qs = b[..., 16:144].reshape(rows, nb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # (rows, nb, 4, 2, 32): sub-block 2j + half
    scales = d[..., None] * sc.astype(np.float32)
    mins = -(dmin[..., None] * mn.astype(np.float32))
    return q.reshape(rows, nb, 256), scales.reshape(rows, nb * 8), mins.reshape(rows, nb * 8)


# GGML type name -> (our format, unpacker). Types not listed are re-quantized to int8 (lossy).
_LOSSLESS = {
    "Q4_0": ("int4_sym", _unpack_q4_0),
    "Q4_1": ("int4_min", _unpack_q4_1),
    "Q8_0": ("int8", _unpack_q8_0),
    "Q5_0": ("int8", _unpack_q5_0),
    "Q4_K": ("int4_min", _unpack_q4_k),
}


# GGML K-quant types loaded as our super-block formats (memkernels.pack_gguf_blocks)
_KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def unpack_blocks(raw: np.ndarray, ggml_type: str):
    """Codes, scales and mins of raw GGUF quantized rows (rows, bytes per row) uint8, for the lossless
    types (Q4_0, Q4_1, Q8_0, Q5_0, Q4_K). Returns (format, codes (rows, cols) uint8, scales (rows,
    cols / 32) float32, mins (rows, cols / 32) float32 or None); ``s * q + m`` per group (``s * (q - 8)``
    for int4_sym, ``s * int8(q)`` for int8) is the value ``gguf.quants.dequantize`` gives."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    fmt, fn = _LOSSLESS[ggml_type]
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    raw = np.asarray(raw)
    rows = raw.shape[0]
    codes, scales, mins = fn(raw.reshape(rows, -1, type_size))
    return fmt, codes.reshape(rows, -1), scales.reshape(rows, -1), None if mins is None else mins.reshape(rows, -1)


def _requantize_int8(w: np.ndarray):
    """Symmetric int8 with one scale per 32 values of float32 rows w: (codes as uint8 bits, scales, max error)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // _GROUP, _GROUP)
    s = np.abs(g).max(axis=-1) / np.float32(127)
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(g / s[..., None]), -127, 127)
    err = float(np.abs(q * s[..., None] - g).max()) if g.size else 0.0
    return q.astype(np.int8).view(np.uint8).reshape(rows, cols), s, err


@functools.lru_cache(maxsize=None)
def gguf_format_available(fmt: str) -> bool:
    """Whether this memkernels build can hold `fmt` ("int4_sym", "int4_min", "int8") at group 32 with
    the signed / zero scales GGUF blocks carry (memkernels.pack_quantized accepts it)."""
    import memkernels as mk
    codes = np.arange(64, dtype=np.uint8).reshape(2, 32) % 16
    scales = np.array([[-0.5], [0.0]], np.float32)
    try:
        if fmt == "int4_min":
            mk.pack_quantized(fmt, codes, scales, mins=np.ones((2, 1), np.float32), group_size=_GROUP)
        else:
            mk.pack_quantized(fmt, codes, scales, group_size=_GROUP)
    except (ValueError, TypeError, RuntimeError):
        return False
    return True


def _pack(fmt, codes, scales, mins, name, path):
    import memkernels as mk
    if not gguf_format_available(fmt):
        raise UnsupportedModelError(
            f"{path}: tensor '{name}': this memkernels build has no group-32 '{fmt}' format with signed scales "
            f"(needed to keep the GGUF weights quantized); pass dequantize=True to load them as float32")
    if fmt == "int4_min":
        return mk.pack_quantized(fmt, codes, scales, mins=mins, group_size=_GROUP)
    return mk.pack_quantized(fmt, codes, scales, group_size=_GROUP)


# ---------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------
class _Source:
    """Where an HF tensor comes from: a GGUF tensor, a row permutation, and a value offset."""
    __slots__ = ("tensor", "perm", "offset")

    def __init__(self, tensor, perm=None, offset=0.0):
        self.tensor, self.perm, self.offset = tensor, perm, offset


class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint.

    Attributes: path; arch (GGUF architecture name); config (HF config.json-style dict); tensors (HF
    name -> NumPy array or QuantizedMatrix); tensor_types (HF name -> GGUF type name, e.g. "Q4_K");
    tokenizer (Tokenizer, or None when the file has no vocabulary); metadata (every GGUF key -> value);
    warnings (lossy conversions made, one line each).
    """

    def __init__(self, path, reader, arch, config, sources, tensors, tokenizer, metadata, warnings):
        self.path = os.fspath(path)
        self.arch = arch
        self.config = config
        self.tensors = tensors
        self.tensor_types = {k: s.tensor.tensor_type.name for k, s in sources.items()}
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.warnings = warnings
        self._reader = reader
        self._sources = sources

    def raw_rows(self, name: str) -> np.ndarray:
        """The GGUF data of HF tensor `name` in HF row order: (rows, bytes per row) uint8 for quantized
        types, the float array for F32/F16/BF16 (BF16 as its uint16 bits)."""
        src = self._sources[name]
        data = src.tensor.data
        if src.tensor.tensor_type.name == "BF16":
            data = data.view(np.uint16) if data.dtype != np.uint16 else data
        return data if src.perm is None else data[src.perm]

    def dequantized(self, name: str, rows=None) -> np.ndarray:
        """HF tensor `name` as float32, computed by the ``gguf`` package's dequantizer (the reference the
        loaded tensors are checked against), with the conversions undone. rows: optional row indices
        (e.g. token ids of an embedding) to dequantize only those."""
        from gguf.quants import dequantize
        src = self._sources[name]
        t = src.tensor
        data = self.raw_rows(name)
        if rows is not None:
            data = data[np.asarray(rows)]
        if t.tensor_type.name == "BF16":
            out = (data.astype(np.uint32) << 16).view(np.float32)
        else:
            out = np.array(dequantize(np.ascontiguousarray(data), t.tensor_type), dtype=np.float32)
        if src.offset:
            out = out - np.float32(src.offset)
        return out

    def close(self):
        """Drops the tensors and the memory map (tensors already handed out stay valid if referenced)."""
        self.tensors = {}
        self._sources = {}
        self._reader = None

    def __repr__(self):
        return f"GGUFCheckpoint({self.path!r}, arch={self.arch!r}, tensors={len(self.tensors)})"


class _GGUFTensor:
    """One tensor of the file: name, GGML type, shape in GGML order (columns first), and data: a
    read-only view of the file, (rows, cols) for F32/F16, (rows, bytes per row) uint8 otherwise."""
    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class _GGUFFile:
    """A GGUF file (versions 2 and 3) parsed from a memory map: `fields` (key -> value; numeric
    arrays as NumPy arrays, string arrays as lists) and `tensors`. Every length and offset is checked
    against the file size, so a truncated or corrupt file raises CorruptDataError, never reads past
    the end or allocates what the file cannot hold. (The gguf package's GGUFReader builds a NumPy
    array per string: 33 s for Llama 3's 128k-token vocabulary here, this 1.3 s.)"""

    _SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                11: "<i8", 12: "<f8"}
    _STRING, _ARRAY, _BOOL = 8, 9, 7

    def __init__(self, path):
        import mmap
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                self._corrupt(0, f"the file has {size} bytes, less than a GGUF header")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self.pos = 0
        if bytes(self.mm[:4]) != b"GGUF":
            self._corrupt(0, f"no GGUF magic (starts with {bytes(self.mm[:4])!r})")
        self.pos = 4
        version = self._u32()
        if version not in (2, 3):
            self._corrupt(4, f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._u64(), self._u64()
        if n_tensors > size or n_kv > size:
            self._corrupt(8, f"{n_tensors} tensors / {n_kv} keys cannot fit in {size} bytes")
        self.fields = {}
        self.spans = {}  # tensor name -> (byte offset, bytes) in the file
        for _ in range(n_kv):
            key = self._string()
            vtype = self._u32()
            self.fields[key] = self._value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            if not 1 <= n_dims <= 4:
                self._corrupt(self.pos, f"tensor '{name}' has {n_dims} dimensions")
            dims = tuple(self._u64() for _ in range(n_dims))
            infos.append((name, dims, self._u32(), self._u64()))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            self._corrupt(0, f"general.alignment {align!r} is not a power of two")
        start = -(-self.pos // align) * align
        self.tensors = []
        seen = set()
        for name, dims, tcode, offset in infos:
            if name in seen:
                self._corrupt(start, f"tensor '{name}' appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, tcode, start + offset))

    def release(self, name, start_byte=0, nbytes=None):
        """Drops the file pages of tensor `name` (or of its bytes [start_byte, start_byte + nbytes))
        from this process's resident memory (MADV_DONTNEED on the read-only file mapping: the data
        stays valid and is read back from the page cache if touched again). Called once a tensor (a
        chunk of rows) has been converted into its own buffer."""
        import mmap
        at, n = self.spans.get(name, (0, 0))
        at, n = at + start_byte, n - start_byte if nbytes is None else min(nbytes, n - start_byte)
        page = mmap.PAGESIZE
        start, end = -(-at // page) * page, (at + n) // page * page
        if end > start and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass  # only a memory hint

    def _corrupt(self, at, msg):
        import memkernels as mk
        raise mk.CorruptDataError(f"{self.path}: not a readable GGUF file (truncated or corrupt): {msg} "
                                  f"(at byte {at})")

    def _need(self, n):
        if n < 0 or self.pos + n > self.size:
            self._corrupt(self.pos, f"{n} more bytes needed, the file has {self.size - self.pos} left")

    def _int(self, n):
        self._need(n)
        v = int.from_bytes(self.mm[self.pos:self.pos + n], "little")
        self.pos += n
        return v

    def _u32(self):
        return self._int(4)

    def _u64(self):
        return self._int(8)

    def _string(self):
        n = self._u64()
        self._need(n)
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")  # some vocabularies hold invalid UTF-8 pieces

    def _value(self, vtype, key):
        if vtype == self._STRING:
            return self._string()
        if vtype == self._ARRAY:
            etype, count = self._u32(), self._u64()
            if etype == self._STRING:
                if count * 8 > self.size - self.pos:
                    self._corrupt(self.pos, f"'{key}' claims {count} strings")
                return [self._string() for _ in range(count)]
            if etype == self._ARRAY:
                return [self._value(self._ARRAY, key) for _ in range(count)]
            dt = self._dtype(etype, key)
            self._need(count * dt.itemsize)
            arr = np.frombuffer(self.mm, dt, count, self.pos).copy()
            self.pos += count * dt.itemsize
            return arr.astype(bool) if etype == self._BOOL else arr
        dt = self._dtype(vtype, key)
        self._need(dt.itemsize)
        v = np.frombuffer(self.mm, dt, 1, self.pos)[0].item()
        self.pos += dt.itemsize
        return bool(v) if vtype == self._BOOL else v

    def _dtype(self, code, key):
        if code not in self._SCALARS:
            self._corrupt(self.pos, f"metadata '{key}' has value type {code}")
        return np.dtype(self._SCALARS[code])

    def _tensor(self, name, dims, tcode, at):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        try:
            ttype = GGMLQuantizationType(tcode)
        except ValueError:
            raise UnsupportedModelError(f"{self.path}: tensor '{name}' has GGML data type {tcode}, which is not "
                                        "known (an unsupported type, or a corrupt file)") from None
        block, type_size = GGML_QUANT_SIZES[ttype]
        n = int(np.prod(dims, dtype=np.float64))
        if n > self.size * 8 or dims[0] % block:
            self._corrupt(at, f"tensor '{name}' shape {dims} does not fit type {ttype.name}")
        nbytes = n // block * type_size
        if at + nbytes > self.size:
            self._corrupt(at, f"tensor '{name}' ({nbytes} bytes at {at}) runs past the end of the file "
                              f"({self.size} bytes)")
        self.spans[name] = (at, nbytes)
        rows_shape = tuple(reversed(dims))
        plain = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}.get(ttype.name)
        if plain is not None:
            data = np.frombuffer(self.mm, plain, n, at).reshape(rows_shape)
        else:
            data = np.frombuffer(self.mm, np.uint8, nbytes, at).reshape(*rows_shape[:-1], dims[0] // block * type_size)
        return _GGUFTensor(name, ttype, dims, data)


def read_gguf_metadata(path) -> dict:
    """Every key/value of a GGUF file (numeric arrays as NumPy arrays), without loading tensors."""
    return _GGUFFile(path).fields


def _decimal(v):
    """A float read from GGUF's float32 as the decimal that was written (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(v))) if isinstance(v, float) else v


def _scalar(meta, key, path, default=None, required=False):
    v = _decimal(meta.get(key, default))
    if v is None and required:
        _fail(path, f"GGUF metadata key '{key}' is missing")
    if isinstance(v, (list, np.ndarray)):
        arr = np.asarray(v)
        if arr.size and np.all(arr == arr.flat[0]):
            return arr.flat[0].item()
        _fail(path, f"GGUF metadata key '{key}' varies per layer ({list(arr)[:8]}...); not supported")
    return v


def _fit_llama3(factors: np.ndarray, theta: float, dim: int, path):
    """Llama 3 rope-scaling parameters that reproduce llama.cpp's rope_freqs divisors.

    Divisors are 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) between,
    with s linear in 1 / wavelength: s = (orig / wavelength - low) / (high - low). Only the two band
    edges (orig / high, orig / low) matter, so low_freq_factor is fixed to 1 and the others solved for
    (the Llama 3.x values come back when they were used). Returns None for all-1 divisors."""
    f = factors.astype(np.float64)
    if not np.all(np.isfinite(f)) or f.min() <= 0:
        _fail(path, "rope_freqs tensor has non-positive or non-finite values")
    F = float(f.max())
    if np.all(np.abs(f - 1) <= 1e-6):
        return None
    wl = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ones = np.abs(f - 1) <= 1e-6
    full = np.abs(f - F) <= 1e-6 * F
    mid = ~ones & ~full
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / F) / (1 - 1 / F)
        a, c = np.polyfit(1 / wl[mid], s, 1)  # s = a / wl + c: a = orig / (high - low), c = -low / (high - low)
        if a <= 0 or c >= 0:
            _fail(path, "rope_freqs tensor is not a Llama 3 rope scaling")
        orig, high = float(round(a / -c, 3)), float(round(1.0 + 1.0 / -c, 6))
    elif mid.sum() == 0 and ones.any() and full.any() and wl[ones].max() < wl[full].min():
        # no wavelength inside the band: put its edges just inside the gap
        lo_edge, hi_edge = wl[ones].max(), wl[full].min()
        orig = float(hi_edge * 0.999)
        high = orig / (lo_edge * 1.001)
    else:
        _fail(path, "rope_freqs tensor is not a Llama 3 rope scaling (cannot place the band edges)")
    params = {"factor": F, "low_freq_factor": 1.0, "high_freq_factor": high, "original_max_position_embeddings": orig}
    # check: the divisors recomputed from the parameters
    sm = (orig / wl - 1.0) / (high - 1.0)
    want = np.where(wl < orig / high, 1.0, np.where(wl > orig, F, 1 / ((1 - sm) / F + sm)))
    if not np.allclose(want, f, rtol=1e-5, atol=0):
        _fail(path, "rope_freqs tensor does not match a Llama 3 rope scaling (max deviation "
                    f"{float(np.abs(want - f).max()):.3g}); not supported")
    out = {"rope_type": "llama3", **{k: float(v) for k, v in params.items()}}
    if out["original_max_position_embeddings"].is_integer():
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def _build_config(meta, arch, names, path, tensors_by_name) -> dict:
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    for k in meta:
        if k.startswith(arch + ".") and k[len(arch) + 1:] not in _KNOWN_ARCH_KEYS:
            _fail(path, f"GGUF metadata key '{k}' is not understood by this loader")
    for k in ("expert_count", "expert_used_count"):
        if _scalar(meta, key(k), path, 0):
            _fail(path, f"mixture-of-experts models ({key(k)} = {meta[key(k)]}) are not supported")
    def posint(k, default=None, required=False):
        v = _scalar(meta, key(k), path, default, required)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(path, f"GGUF metadata '{key(k)}' must be a positive integer, got {v!r}")
        return v

    layers = _scalar(meta, key("block_count"), path, required=True)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        _fail(path, f"GGUF metadata '{key('block_count')}' must be a non-negative integer, got {layers!r}")
    hidden = posint("embedding_length", required=True)
    heads = posint("attention.head_count", required=True)
    kv_heads = posint("attention.head_count_kv", heads)
    head_dim = posint("attention.key_length", max(1, hidden // heads))
    v_dim = posint("attention.value_length", head_dim)
    if v_dim != head_dim:
        _fail(path, f"key length {head_dim} != value length {v_dim} is not supported")
    model_type, hf_class, _, _ = _ARCHS[arch]
    tokens = meta.get("tokenizer.ggml.tokens")
    emb = tensors_by_name.get("token_embd.weight")
    vocab = _scalar(meta, key("vocab_size"), path)
    if vocab is None:
        vocab = int(emb.shape[1]) if emb is not None else (len(tokens) if tokens is not None else None)
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": posint("feed_forward_length", required=True),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(_scalar(meta, key("attention.layer_norm_rms_epsilon"), path, required=True)),
        "rope_theta": float(_scalar(meta, key("rope.freq_base"), path, 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_scalar(meta, key("context_length"), path, 2048)),
        "vocab_size": None if vocab is None else int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    rope_dim = _scalar(meta, key("rope.dimension_count"), path)
    if rope_dim is not None and int(rope_dim) != head_dim:
        if arch == "phi3":
            cfg["partial_rotary_factor"] = int(rope_dim) / head_dim
        else:
            _fail(path, f"partial rotary embedding (rope dimension {rope_dim} of head size {head_dim}) is not "
                        f"supported for {arch}")
    # rope scaling from metadata
    stype = meta.get(key("rope.scaling.type"))
    if stype not in (None, "none"):
        factor = float(_scalar(meta, key("rope.scaling.factor"), path, 1.0))
        if stype == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif stype == "yarn":
            rs = {"rope_type": "yarn", "factor": factor}
            orig = _scalar(meta, key("rope.scaling.original_context_length"), path)
            if orig is not None:
                rs["original_max_position_embeddings"] = int(orig)
            for gk, hk in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                           ("attn_factor", "attention_factor")):
                v = _scalar(meta, key("rope.scaling." + gk), path)
                if v is not None:
                    rs[hk] = float(v)
            if _scalar(meta, key("rope.scaling.yarn_log_multiplier"), path, 0.0):
                _fail(path, f"{key('rope.scaling.yarn_log_multiplier')} is not supported")
            cfg["rope_scaling"] = rs
        else:
            _fail(path, f"rope scaling type '{stype}' is not supported")
    if "rope_freqs.weight" in names:
        if arch != "llama" or cfg["rope_scaling"] is not None:
            _fail(path, f"a rope_freqs tensor with architecture {arch} / rope scaling {stype} is not supported")
        t = tensors_by_name["rope_freqs.weight"]
        if t.tensor_type.name != "F32" or t.data.size != head_dim // 2:
            _fail(path, f"rope_freqs tensor must be F32 with {head_dim // 2} values, got {t.tensor_type.name} "
                        f"with {t.data.size}")
        cfg["rope_scaling"] = _fit_llama3(np.asarray(t.data, np.float32), cfg["rope_theta"], head_dim, path)
    sw = _scalar(meta, key("attention.sliding_window"), path)
    if arch in ("gemma", "gemma2"):
        cfg["hidden_act"] = "gelu_pytorch_tanh"
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = _scalar(meta, key("attn_logit_softcapping"), path)
        cfg["final_logit_softcapping"] = _scalar(meta, key("final_logit_softcapping"), path)
        cfg["sliding_window"] = None if sw is None else int(sw)
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (46 layers): hidden/heads
        cfg["query_pre_attn_scalar"] = hidden // heads if cfg["num_hidden_layers"] == 46 else head_dim
        # even layers use the sliding window (llama.cpp's Gemma2 pattern, as in transformers)
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(cfg["num_hidden_layers"])]
    else:
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if meta.get(key(k)):
                _fail(path, f"{key(k)} is not supported for architecture {arch}")
        if sw is not None:
            if arch == "gemma":
                _fail(path, f"{key('attention.sliding_window')} is not supported for architecture gemma")
            cfg["sliding_window"] = int(sw)
    if arch == "qwen2":
        cfg["use_sliding_window"] = False  # as Qwen2 configs have it; llama.cpp has no window for qwen2
    if arch == "llama":
        attn_bias = any(n.endswith("attn_q.bias") for n in names)
        mlp_bias = any(n.endswith("ffn_up.bias") for n in names)
        if sw is not None:
            # Mistral files use the llama architecture; the sliding window is what sets them apart
            if attn_bias or mlp_bias:
                _fail(path, "a llama-architecture file with both a sliding window and biases is not supported")
            cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
        else:
            cfg["attention_bias"], cfg["mlp_bias"] = attn_bias, mlp_bias
    if arch == "phi3":
        orig = _scalar(meta, key("rope.scaling.original_context_length"), path)
        if orig is not None:
            cfg["original_max_position_embeddings"] = int(orig)
        if "rope_factors_long.weight" in names or "rope_factors_short.weight" in names:
            if not ("rope_factors_long.weight" in names and "rope_factors_short.weight" in names):
                _fail(path, "only one of rope_factors_long / rope_factors_short is present")
            cfg["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in tensors_by_name["rope_factors_long.weight"].data],
                "short_factor": [float(x) for x in tensors_by_name["rope_factors_short.weight"].data],
            }
    for k, mk_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        v = meta.get(mk_key)
        cfg[k] = None if v is None else int(v)
    return cfg


def load_gguf(path, *, dequantize: bool = False, verbose: bool = True) -> GGUFCheckpoint:
    """Reads a GGUF file into HF names and layouts (see the module docstring).

    dequantize: give every tensor as float32 (exact values of the file) instead of quantized matrices.
    verbose: print the warning about lossy conversions to stderr (once per file); the lines are in
    ``.warnings`` either way. Raises FileNotFoundError, memkernels.CorruptDataError (not a GGUF file,
    truncated) or UnsupportedModelError (architecture, tensor, data type or setting not supported).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = _GGUFFile(path)
    meta = reader.fields
    parts = meta.get("split.count", 1)
    if isinstance(parts, int) and parts > 1:
        _fail(path, f"this is part of a GGUF split into {parts} files, which is not supported: merge the parts "
                    "into one file first (llama.cpp's gguf-split --merge)")
    arch = meta.get("general.architecture")
    if arch is None:
        _fail(path, "GGUF metadata has no 'general.architecture'")
    if arch not in _ARCHS:
        _fail(path, f"GGUF architecture '{arch}' is not supported (supported: {', '.join(sorted(_ARCHS))})")
    _, _, layer_map, permute_qk = _ARCHS[arch]
    by_name = {t.name: t for t in reader.tensors}
    names = set(by_name)
    cfg = _build_config(meta, arch, names, path, by_name)
    n_layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    # map names, collecting what to undo
    sources: dict[str, _Source] = {}
    for name, t in by_name.items():
        if name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue  # folded into config["rope_scaling"] above
        if name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if m is None or m.group(2) not in layer_map or int(m.group(1)) >= n_layers:
                _fail(path, f"tensor '{name}' is not understood for architecture {arch}")
            hf = f"model.layers.{int(m.group(1))}.{layer_map[m.group(2)]}"
        src = _Source(t)
        if permute_qk and re.search(r"attn_[qk]\.(weight|bias)$", name):
            nh = heads if ".attn_q." in name else kv_heads
            rows = int(t.shape[1]) if len(t.shape) > 1 else int(t.shape[0])
            if rows % (2 * nh):
                _fail(path, f"tensor '{name}' has {rows} rows, not a multiple of 2 x {nh} heads")
            # GGUF row (h, i, pair j) holds HF row (h, j, i): gather the GGUF rows in HF order
            src.perm = np.arange(rows).reshape(nh, rows // nh // 2, 2).swapaxes(1, 2).reshape(-1)
        if arch in ("gemma", "gemma2") and name.endswith("norm.weight"):
            src.offset = 1.0
        sources[hf] = src
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in sources:
            _fail(path, f"GGUF file has no tensor for '{required}'")

    tensors: dict = {}
    lossy: dict[str, float] = {}
    for hf, src in sources.items():
        tensors[hf] = _convert(path, hf, src, dequantize, lossy, reader)
        if not isinstance(tensors[hf], np.ndarray) or not np.may_share_memory(tensors[hf], src.tensor.data):
            reader.release(src.tensor.name)  # converted into its own buffer: the file pages are not needed
            if src.tensor.data.nbytes >= 1 << 20:
                trim_heap()
    warnings = [f"{path}: {t} weights have no exact memkernels format; re-quantized to int8 (group 32), max "
                f"abs error {err:.3g}" for t, err in sorted(lossy.items())]
    if warnings and verbose:
        print("memkernels: warning: " + "; ".join(w.split(": ", 1)[1] for w in warnings) + f" ({path})",
              file=sys.stderr)
    tok = None
    if "tokenizer.ggml.model" in meta:
        try:
            tok = Tokenizer.from_gguf_metadata(meta)
        except UnsupportedModelError as e:  # the weights still load: prompts can be given as token ids
            warnings.append(f"{path}: no tokenizer: {e}")
            if verbose:
                print(f"memkernels: warning: {e}; give prompts as token ids ({path})", file=sys.stderr)
        except ValueError as e:  # inconsistent vocabulary metadata
            import memkernels as mk
            raise mk.CorruptDataError(f"{path}: tokenizer metadata is inconsistent: {e}") from None
    if cfg["vocab_size"] is None and tok is not None:
        cfg["vocab_size"] = tok.vocab_size
    return GGUFCheckpoint(path, reader, arch, cfg, sources, tensors, tok, meta, warnings)


def _convert(path, hf, src, dequantize, lossy, reader=None):
    t = src.tensor
    tname = t.tensor_type.name
    data = t.data
    if src.perm is not None:
        data = data[src.perm]
    if tname in ("F32", "F16"):
        if src.offset:
            return data.astype(np.float32) - np.float32(src.offset)
        return data.astype(np.float32) if dequantize else data
    if tname == "BF16":
        out = (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return out - np.float32(src.offset) if src.offset else out
    from gguf.quants import dequantize as _gg_dequantize

    def gg_dequantize(raw, qtype):
        try:
            return _gg_dequantize(raw, qtype)
        except NotImplementedError:
            _fail(path, f"tensor '{t.name}' has GGML type {tname}, which is not supported")
    if data.ndim != 2 or dequantize or src.offset:
        # 1-D quantized tensors (unusual) and float requests: exact float32
        out = np.array(gg_dequantize(np.ascontiguousarray(data), t.tensor_type), np.float32)
        return out - np.float32(src.offset) if src.offset else out
    rows = data.shape[0]
    cols = int(t.shape[0])
    step = max(1, (1 << 20) // max(1, cols))  # row chunks: bounded temporaries (~1M values, a few MiB)
    if tname in _KQUANT_TYPES:
        # K-quants keep their super-blocks (q4_k / q5_k / q6_k), repacked losslessly in C++
        import memkernels as mk
        qm = mk.pack_gguf_blocks(tname, np.ascontiguousarray(data), cols)
        if reader is not None and src.perm is None:
            reader.release(t.name)
        return qm
    if tname in _LOSSLESS:
        fmt = _LOSSLESS[tname][0]
        codes = np.empty((rows, cols), np.uint8)
        scales = np.empty((rows, cols // _GROUP), np.float32)
        mins = np.empty((rows, cols // _GROUP), np.float32) if fmt == "int4_min" else None
        for r0 in range(0, rows, step):
            _, c, s, m = unpack_blocks(data[r0:r0 + step], tname)
            codes[r0:r0 + step], scales[r0:r0 + step] = c, s
            if mins is not None:
                mins[r0:r0 + step] = m
            del c, s, m  # free each chunk's temporaries before the next
            if reader is not None and src.perm is None:  # and the chunk's file pages
                reader.release(t.name, r0 * data.shape[1], step * data.shape[1])
        qm = _pack(fmt, codes, scales, mins, hf, path)
        del codes, scales, mins
        return qm
    # lossy: dequantize exactly, re-quantize to int8 group 32 in row chunks
    chunks_c, chunks_s, err = [], [], 0.0
    for r0 in range(0, rows, step):
        w = np.asarray(gg_dequantize(np.ascontiguousarray(data[r0:r0 + step]), t.tensor_type), np.float32)
        c, s, e = _requantize_int8(w)
        chunks_c.append(c)
        chunks_s.append(s)
        err = max(err, e)
    lossy[tname] = max(lossy.get(tname, 0.0), err)
    return _pack("int8", np.concatenate(chunks_c), np.concatenate(chunks_s), None, hf, path)
