"""Streaming a real model's FFN from flash under a DRAM budget, with activation sparsity (issue 17).

`load_model(path, dram_budget_bytes=B, sparsity=S, predictor=...)` converts the checkpoint once
into a weight store (`convert_for_streaming`, cached next to the model or in `stream_dir`), then
runs it as a `StreamingModel`:

- resident (read once, whole): attention, norms, the gate projections (as stored: GGUF quants stay
  quantized), the LM head, the per-layer thresholds, neuron orders and sparsity allocation;
- streamed through the WeightStore's cache: the FFN up rows and down columns, bundled per neuron
  [up row i | down column i] so that one neuron is one contiguous read, and the embedding rows (one
  row per token, gathered from the store instead of a resident table).

Conversion (`convert_for_streaming`, once) runs the dense model on calibration text and records each
FFN's input, gate output and residual stream. From them:
- neurons are stored in the order of their calibrated firing frequency (hottest first): the hot
  neurons form a contiguous prefix, the active cold ones are dense runs, not scattered 4 KiB blocks;
- per-neuron firing frequencies (at sparsity 0, 5, ..., 100 %) let `StreamingModel` pin the neurons
  most likely needed per token in the store's cache, as many as the budget holds (an LRU window
  alone never hits: the 30 layers are visited in a cycle, LRU's worst case);
- per-layer sparsity (TEAL-style): each layer's FFN output error (relative to its residual stream)
  at sparsity 0, 5, ..., 95 %, and a greedy allocation per total sparsity that raises first the
  layers whose error grows least.

Which neurons a token needs is decided before reading (a SwiGLU FFN is dense, so this is
approximate for S > 0):
- predictor="threshold" (CATS / TEAL style, training free): the gate is computed exactly from its
  resident weights; neuron i is read only when |act(gate_i)| exceeds its layer's threshold, the
  quantile s_L of |act(gate)| on calibration text (allocation="uniform", the default: s_L = S;
  "calibrated": the greedy per-layer allocation of mean S, which measured worse on SmolLM2-135M:
  +7.9 % perplexity at S=0.25 against +6.2 % uniform, see bench/results/stream-cpu-2026-12-01.md);
- predictor="lowrank" (Deja Vu / "LLM in a flash" style): a rank-r map h -> gate fitted by least
  squares on calibration activations scores the neurons; those scoring above the layer's calibrated
  quantile s_L are read (the gate of the chosen neurons is still the exact one).
S = 0 reads every neuron and equals the dense forward (up to the FFN storage format).

Memory: `dram_budget_bytes` bounds the weights the model holds: resident bytes plus everything the
weight store holds (neuron cache with its pinned hot neurons, I/O staging). A budget below the
resident part is refused with the numbers. Activations and the KV cache are not weights and are
not counted.

Storage of the streamed FFN: float checkpoints are stored as float32 (bit exact); quantized (GGUF)
up/down matrices as
- ffn_format="int4_int8" (default): up rows 4-bit (groups of 32 along d_model with a float16 scale
  and minimum: GGUF Q4_1 rows are kept bit for bit), down columns int8 with a float32 scale (a down
  column is not a block of GGUF's row layout, so it is re-quantized, and 4 bits there cost SmolLM2
  8 % perplexity); 940 B per neuron at d_model 576;
- "int4": both 4-bit (720 B per neuron, the bytes of GGUF Q4_1);
- "int8": both int8 with one float32 scale per neuron row / column (1152 B).
The decode FFN runs on the 4-bit bundles directly (`stream_ffn_int4`, C++). The embedding rows are
float32 (exact), cut into pieces of one bundle so that every cache slot holds one FFN neuron.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .. import _memkernels as _C
from ..quant import QuantizedMatrix, dequantize, from_bytes
from ..weight_store import CorruptDataError, WeightStore, write_weight_store
from .config import ModelConfig, UnsupportedModelError
from .llama import Model, activation

STORE_VERSION = 2  # 2: neurons ordered by firing frequency, 4-bit bundles, per-layer sparsity
LEVELS = np.linspace(0.0, 1.0, 101)  # calibrated quantiles 0 %, 1 %, ..., 100 %
PREDICTORS = ("threshold", "lowrank")
FFN_FORMATS = ("int4", "int4_int8", "int8", "down_int8", "down_int7")
DOWN_FORMATS = ("down_int8", "down_int7")  # gate and up resident, down columns streamed
ALLOCATIONS = ("calibrated", "uniform")
DEFAULT_RANK = 32
DEFAULT_CALIBRATION_TOKENS = 1024
STREAM_READ_BYTES = 128 << 10  # the streaming store's read unit and largest read (staging = ~5 of them)
_META = "stream/meta"
_QM = "qm/"  # resident QuantizedMatrix tensors are stored as their to_bytes() blobs


def default_calibration_text() -> str:
    """English text shipped by the OS or Python, used when none is given: the Apache 2.0 license
    (Debian's common-licenses), else Python's own LICENSE file."""
    import sys
    for p in ("/usr/share/common-licenses/Apache-2.0",
              os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "LICENSE.txt")):
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                return f.read()
    return " ".join(["The quick brown fox jumps over the lazy dog."] * 200)


def store_path_for(path, stream_dir=None, ffn_format="int4_int8") -> str:
    """Where the streaming store of checkpoint `path` is cached: next to a .gguf file, inside a
    checkpoint directory, or in `stream_dir` (formats other than the default int4_int8 get their
    own file)."""
    path = os.path.abspath(os.fspath(path))
    base = os.path.basename(os.path.normpath(path))
    ext = ".stream.mkws" if ffn_format == "int4_int8" else f".stream-{ffn_format}.mkws"
    if stream_dir is not None:
        return os.path.join(os.fspath(stream_dir), base + ext)
    if os.path.isdir(path):
        return os.path.join(path, "memkernels-stream" + ext[len(".stream"):])
    return path + ext


def _source_key(path) -> dict:
    path = os.path.abspath(os.fspath(path))
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    return {"path": path, "files": [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]}


def _int8_rows(w: np.ndarray):
    """Symmetric int8 with one scale per row: (codes int8, scales float32)."""
    amax = np.abs(w).max(axis=1)
    s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def _load_dense(path):
    """(raw config dict, Model, tokenizer) of a checkpoint loaded whole (the conversion's input)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UnsupportedModelError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        ModelConfig.from_json(os.path.join(path, "config.json"))  # a bad config is refused with its message
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        from . import load_model
        m = load_model(path)
        return raw, m
    from .gguf import load_gguf
    ck = load_gguf(path)
    raw = dict(ck.config)
    m = _UnfusedModel(ModelConfig.from_dict(raw), dict(ck.tensors), ck.tokenizer, source=path,
                      warnings=getattr(ck, "warnings", ()))
    return raw, m


class _UnfusedModel(Model):
    """The conversion's dense model: gate and up stay separate weights (the streamed FFN keeps the
    gate resident and streams up; Model fuses quantized gate/up rows into one matrix)."""

    def _fuse_projections(self):
        pass


def _tokenizer_meta(tok):
    if tok is None:
        return None
    return {"json": tok.backend.to_str(), "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "eos_token_ids": sorted(int(i) for i in tok.eos_token_ids), "chat_template": tok.chat_template,
            "special_tokens": tok.special_tokens}


def _tokenizer_from_meta(d):
    if d is None:
        return None
    import tokenizers
    from .tokenizer import Tokenizer
    return Tokenizer(tokenizers.Tokenizer.from_str(d["json"]), bos_token=d["bos_token"], eos_token=d["eos_token"],
                     eos_token_ids=d["eos_token_ids"], chat_template=d["chat_template"],
                     special_tokens=d["special_tokens"])


def calibration_ids(model: Model, text=None, n_tokens=DEFAULT_CALIBRATION_TOKENS) -> list:
    if model.tokenizer is None:  # no tokenizer: seeded random token ids
        return np.random.default_rng(0).integers(0, model.config.vocab_size, n_tokens).tolist()
    ids = model.tokenizer.encode(text if text is not None else default_calibration_text(), add_special_tokens=False)
    return ids[:n_tokens]


def fit_predictors(H: np.ndarray, G: np.ndarray, act: str, rank: int):
    """Per-layer sparsity data from calibration FFN inputs H (N, d) and gate outputs G (N, d_ff):
    threshold quantiles of |act(G)|; a rank-r least-squares map A (d, r), B (r, d_ff) from H to G
    and the quantiles of its score |act(H A B)|."""
    H = np.asarray(H, np.float64)
    G = np.asarray(G, np.float64)
    thr = np.quantile(np.abs(activation(np, G, act)), LEVELS).astype(np.float32)
    # sparsity 0 keeps every neuron: the minimum rounded to float32 may round up past the float64
    # activation it came from, and then "|act| > thr" would drop that one
    thr[0] = 0.0
    # ridge-regularised least squares (N may be smaller than d), then the best rank-r fit of the
    # fitted values (reduced-rank regression)
    lam = 1e-3 * np.trace(H.T @ H) / H.shape[1] + 1e-12
    W = np.linalg.solve(H.T @ H + lam * np.eye(H.shape[1]), H.T @ G)
    r = int(min(rank, *W.shape))
    # the top right singular vectors of the fitted values H W, from a d x d eigenproblem (an SVD of
    # the N x d_ff matrix is ~25x slower): H^T H = R R^T, M = R^T W, (H W)^T (H W) = M^T M
    R = np.linalg.cholesky(H.T @ H + 1e-9 * lam * np.eye(H.shape[1]))
    M = R.T @ W
    ev, U = np.linalg.eigh(M @ M.T)
    top = np.argsort(ev)[::-1][:r]
    V = (M.T @ U[:, top]) / np.sqrt(np.maximum(ev[top], 1e-300))  # (d_ff, r), orthonormal columns
    B = V.T
    A = W @ V
    score = np.abs(activation(np, (H @ A) @ B, act))
    lr = np.quantile(score, LEVELS).astype(np.float32)
    return thr, A.astype(np.float32), B.astype(np.float32), lr


# ---- 4-bit neuron bundles --------------------------------------------------------------------
# One part (an up row or a down column, d values padded to a multiple of 32) is stored as
#   [codes: dp/2 bytes, value 2j in the low nibble of byte j, 2j+1 in the high nibble]
#   [scales: dp/32 float16][mins: dp/32 float16]      value = code * scale + min
# (asymmetric round-to-nearest in groups of 32 along d). GGUF Q4_1 up rows (groups of 32 along d,
# min = the group's minimum, scale = range / 15, both float16) come out bit for bit; a down column
# cuts across GGUF's groups and is re-quantized.
GROUP = 32
_NIBBLES = np.stack([np.arange(256) & 15, np.arange(256) >> 4], 1).astype(np.float32)  # byte -> (lo, hi)


def int4_part_bytes(d: int) -> int:
    dp = -(-d // GROUP) * GROUP
    return dp // 2 + 4 * (dp // GROUP)


def pack_int4(w: np.ndarray) -> np.ndarray:
    """(n, d) float -> (n, int4_part_bytes(d)) uint8 (the part layout above)."""
    w = np.ascontiguousarray(w, np.float32)
    n, d = w.shape
    dp = -(-d // GROUP) * GROUP
    if dp != d:
        w = np.concatenate([w, np.zeros((n, dp - d), np.float32)], 1)
    g = w.reshape(n, dp // GROUP, GROUP)
    lo, hi = g.min(-1), g.max(-1)
    mn = lo.astype(np.float16)
    sc = ((hi - mn.astype(np.float32)) / 15.0).astype(np.float16)
    s32 = sc.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)
    q = np.clip(np.rint((g - mn.astype(np.float32)[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(n, dp)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    ng = dp // GROUP
    return np.concatenate([codes, sc.view(np.uint8).reshape(n, 2 * ng), mn.view(np.uint8).reshape(n, 2 * ng)], 1)


def unpack_int4(b: np.ndarray, d: int) -> np.ndarray:
    """(..., int4_part_bytes(d)) uint8 -> (..., d) float32."""
    dp = -(-d // GROUP) * GROUP
    ng = dp // GROUP
    lead = b.shape[:-1]
    b = np.ascontiguousarray(b).reshape(int(np.prod(lead)), b.shape[-1])
    sc = np.ascontiguousarray(b[:, dp // 2:dp // 2 + 2 * ng]).view(np.float16).astype(np.float32)
    mn = np.ascontiguousarray(b[:, dp // 2 + 2 * ng:]).view(np.float16).astype(np.float32)
    v = _NIBBLES[b[:, :dp // 2]].reshape(-1, ng, GROUP)
    v *= sc[..., None]
    v += mn[..., None]
    return v.reshape(*lead, dp)[..., :d]


def int8_down_part_bytes(d: int) -> int:
    """An int8 down column: d int8 codes, a float32 scale, padded to an even count."""
    return (d + 4 + 1) // 2 * 2


def bundle_bytes(fmt: str, d: int) -> int:
    """Bytes of one streamed neuron [up | down] in store format `fmt` (quantized checkpoints)."""
    return {"int4": 2 * int4_part_bytes(d), "int4_int8": int4_part_bytes(d) + int8_down_part_bytes(d),
            "int8": 2 * d, "down_int8": int8_down_part_bytes(d), "down_int7": int7_down_part_bytes(d)}[fmt]


def int7_down_part_bytes(d: int) -> int:
    """A 7-bit down column: groups of 8 codes in 7 bytes, then a float32 scale; padded to whole 512 B
    blocks where that costs at most 1/8 (d 576: 508 -> 512 B, one O_DIRECT block; an int8 column of
    580 B straddles two or three)."""
    raw = 7 * (-(-d // 8)) + 4
    block = -(-raw // 512) * 512
    return block if (block - raw) * 8 <= raw else -(-raw // 8) * 8


def _int7_rows(w: np.ndarray):
    """Symmetric 7-bit codes in [-63, 63] with one scale per row: (codes int8, scales float32)."""
    amax = np.abs(w).max(axis=1)
    s = np.where(amax > 0, amax / 63.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -63, 63).astype(np.int8)
    return q, s


def pack_down_columns(fmt: str, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(n, d) int8 codes and (n,) float32 scales -> (n, bundle_bytes(fmt, d)) uint8 down columns
    (down_int8: the codes then the scale; down_int7: 8 codes + 64 per 7 bytes, then the scale)."""
    n, d = q.shape
    b = np.zeros((n, bundle_bytes(fmt, d)), np.uint8)
    if fmt == "down_int8":
        b[:, :d] = q.view(np.uint8)
        b[:, d:d + 4] = s.astype("<f4").view(np.uint8).reshape(n, 4)
        return b
    g = -(-d // 8)
    u = np.full((n, 8 * g), 64, np.uint64)
    u[:, :d] = (q.astype(np.int64) + 64).astype(np.uint64)
    words = np.zeros((n, g), np.uint64)
    for k in range(8):
        words |= u[:, k::8] << np.uint64(7 * k)
    b[:, :7 * g] = words.astype("<u8").view(np.uint8).reshape(n, g, 8)[:, :, :7].reshape(n, 7 * g)
    b[:, 7 * g:7 * g + 4] = s.astype("<f4").view(np.uint8).reshape(n, 4)
    return b


def unpack_down_columns(fmt: str, b: np.ndarray, d: int) -> np.ndarray:
    """(k, bundle_bytes) uint8 down columns -> (k, d) float32."""
    b = np.ascontiguousarray(b).reshape(b.shape[0], -1)
    n = b.shape[0]
    if fmt == "down_int8":
        return b[:, :d].view(np.int8).astype(np.float32) * b[:, d:d + 4].copy().view("<f4")
    g = -(-d // 8)
    w8 = np.zeros((n, g, 8), np.uint8)
    w8[:, :, :7] = b[:, :7 * g].reshape(n, g, 7)
    words = w8.view("<u8").reshape(n, g)
    codes = np.stack([(words >> np.uint64(7 * k)) & np.uint64(127) for k in range(8)], -1).reshape(n, 8 * g)
    sc = b[:, 7 * g:7 * g + 4].copy().view("<f4")
    return (codes[:, :d].astype(np.float32) - 64.0) * sc


def pack_bundles(fmt: str, up: np.ndarray, down_t: np.ndarray) -> np.ndarray:
    """(n, bundle_bytes) uint8 neuron bundles of up rows and down columns (both (n, d)) in a 4-bit format."""
    n, d = up.shape
    if fmt == "int4":
        return np.concatenate([pack_int4(up), pack_int4(down_t)], 1)
    q, sc = _int8_rows(np.asarray(down_t, np.float32))
    dn = np.zeros((n, int8_down_part_bytes(d)), np.uint8)
    dn[:, :d] = q.view(np.uint8)
    dn[:, d:d + 4] = sc.astype("<f4").view(np.uint8).reshape(n, 4)
    return np.concatenate([pack_int4(up), dn], 1)


def unpack_bundles(fmt: str, b: np.ndarray, d: int):
    """(k, ...) uint8 bundles -> up (k, d), down (k, d) float32."""
    b = np.ascontiguousarray(b).reshape(b.shape[0], int(np.prod(b.shape[1:])))
    p4 = int4_part_bytes(d)
    up = unpack_int4(b[:, :p4], d)
    if fmt == "int4":
        return up, unpack_int4(b[:, p4:], d)
    sc = np.ascontiguousarray(b[:, p4 + d:p4 + d + 4]).view("<f4").astype(np.float32)
    return up, b[:, p4:p4 + d].view(np.int8).astype(np.float32) * sc


S_STEP = 0.05  # per-layer sparsity allocation grid
S_MAX = 0.95
FREQ_LEVELS = np.round(np.arange(0, 1.0 + 1e-9, S_STEP), 4)  # firing-frequency table levels


def allocate_sparsity(err: np.ndarray) -> np.ndarray:
    """Per-layer sparsity for every total, greedily (TEAL-style): err (layers, steps) is each layer's
    calibrated FFN output error at sparsity step*S_STEP. Starting dense, each step raises by S_STEP the
    sparsity of the layer whose error grows least. Returns (layers * max_step + 1, layers): row k is
    the allocation after k steps (mean sparsity k * S_STEP / layers)."""
    nl, ns = err.shape
    cur = np.zeros(nl, np.int64)
    rows = [cur.copy()]
    for _ in range(nl * (ns - 1)):
        inc = np.full(nl, np.inf)
        ok = cur < ns - 1
        inc[ok] = err[ok, cur[ok] + 1] - err[ok, cur[ok]]
        cur[int(np.argmin(inc))] += 1
        rows.append(cur.copy())
    return (np.array(rows, np.float32) * S_STEP).astype(np.float32)


def convert_for_streaming(path, dst, *, calibration_text=None, calibration_tokens=DEFAULT_CALIBRATION_TOKENS,
                          rank=DEFAULT_RANK, ffn_format="int4_int8", verbose=False) -> dict:
    """Converts checkpoint `path` (directory or .gguf) into the streaming weight store `dst` (see the
    module docstring). Holds the dense model in memory once. ffn_format: how quantized (GGUF) up/down
    weights are stored: "int4_int8" (default: 4-bit up rows, int8 down columns), "int4" (both 4-bit)
    or "int8" (one scale per neuron row/column); float checkpoints stay float32. Returns the store's
    metadata."""
    if ffn_format not in FFN_FORMATS:
        raise ValueError(f"ffn_format: expected one of {FFN_FORMATS}, got {ffn_format!r}")
    raw, dense = _load_dense(path)
    cfg = dense.config
    if cfg.fused_qkv or cfg.mlp_bias:
        raise UnsupportedModelError(f"streaming: {cfg.model_type} with fused gate_up_proj or mlp_bias is not "
                                    f"supported yet")
    nl, dff, d = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    # calibration: record each FFN's input, gate output and the residual stream it adds to
    rec = {L: ([], [], []) for L in range(nl)}
    pre_ffn = "pre_feedforward_layernorm.weight" if cfg.sandwich_norms else "post_attention_layernorm.weight"

    def recording_mlp(h, L, p):
        rec[L][0].append(np.array(h, np.float32))
        rec[L][1].append(np.array(dense._linear(h, p + "mlp.gate_proj.weight"), np.float32))
        return Model._mlp(dense, h, L, p)

    def recording_norm(x, name):
        if name.endswith(pre_ffn):
            L = int(name.split(".")[2])
            rec[L][2].append(np.einsum("nd,nd->n", np.asarray(x, np.float64), np.asarray(x, np.float64)))
        return Model._norm(dense, x, name)

    ids = calibration_ids(dense, calibration_text, calibration_tokens)
    if len(ids) < 8:
        raise ValueError(f"calibration_text: needs at least 8 tokens, got {len(ids)}")
    dense._mlp, dense._norm = recording_mlp, recording_norm
    for at in range(0, len(ids), 256):  # pieces of 256 tokens, each a fresh sequence
        dense.logits(ids[at:at + 256])
    del dense._mlp, dense._norm
    tensors, ffn = {}, {}
    thr = np.zeros((nl, len(LEVELS)), np.float32)
    lrq = np.zeros((nl, len(LEVELS)), np.float32)
    n_steps = int(round(S_MAX / S_STEP)) + 1
    err = np.zeros((nl, n_steps))
    w = dense.weights
    quantized = any(isinstance(w[f"model.layers.{L}.mlp.{k}_proj.weight"], QuantizedMatrix)
                    for L in range(nl) for k in ("up", "down"))
    fmt = ffn_format if quantized or ffn_format in DOWN_FORMATS else "float32"
    for L in range(nl):
        H, G, R = (np.concatenate(x) for x in rec[L])
        rec[L] = None
        thr[L], A, B, lrq[L] = fit_predictors(H, G, cfg.hidden_act, rank)
        up = w[f"model.layers.{L}.mlp.up_proj.weight"]
        down = w[f"model.layers.{L}.mlp.down_proj.weight"]
        up = dequantize(up) if isinstance(up, QuantizedMatrix) else np.asarray(up, np.float32)
        down = dequantize(down) if isinstance(down, QuantizedMatrix) else np.asarray(down, np.float32)
        a = np.abs(activation(np, G.astype(np.float64), cfg.hidden_act))
        if fmt in DOWN_FORMATS:
            # up stays resident, so each neuron's exact contribution z_i = act(gate_i) * (h . up_i) is
            # known before reading its down column: the criterion is |z_i| * ||down_i|| (the size of
            # what the neuron adds), with the norm of the stored column
            qd, sd = (_int8_rows if fmt == "down_int8" else _int7_rows)(down.T)
            dnorm = np.sqrt(np.einsum("nd,nd->n", qd.astype(np.float64), qd.astype(np.float64))) * sd
            a = a * np.abs(H.astype(np.float64) @ up.T.astype(np.float64)) * dnorm
            thr[L] = np.quantile(a, LEVELS).astype(np.float32)
            thr[L, 0] = 0.0
        # neurons ordered by calibrated firing frequency (at the median threshold; ties by mean |act|):
        # the hot ones are contiguous and pinned first, the reads of the cold tail are dense runs
        f50 = (a > thr[L, 50]).mean(0)
        perm = np.lexsort((-a.mean(0), -f50)).astype(np.int32)
        a = a[:, perm]
        tensors[f"stream/perm/{L}"] = perm
        tensors[f"stream/freq/{L}"] = np.stack(
            [(a > np.interp(lv, LEVELS, thr[L])).mean(0) for lv in FREQ_LEVELS]).astype(np.float32)
        tensors[f"stream/lowrank/{L}/A"], tensors[f"stream/lowrank/{L}/B"] = A, np.ascontiguousarray(B[:, perm])
        up, down_t = np.ascontiguousarray(up[perm]), np.ascontiguousarray(down.T[perm])  # (dff, d) each
        if fmt in DOWN_FORMATS:
            down_t = (qd.astype(np.float32) * sd[:, None])[perm]  # the error curve sees the stored columns
            tensors[f"stream/dnorm/{L}"] = dnorm[perm].astype(np.float32)
        # this layer's error curve: squared FFN output error from dropping the neurons below the
        # threshold of each sparsity step, relative to the residual stream it is added to
        sub = slice(0, min(len(H), 128))
        z = (activation(np, G[sub].astype(np.float64), cfg.hidden_act)[:, perm] * (H[sub] @ up.T.astype(np.float64)))
        rr = np.maximum(R[sub], 1e-30)
        d64 = down_t.astype(np.float64)
        for j in range(1, n_steps):
            off = a[sub] <= np.interp(j * S_STEP, LEVELS, thr[L])
            dy = (z * off) @ d64
            err[L, j] = float((np.einsum("nd,nd->n", dy, dy) / rr).mean())
        if fmt in DOWN_FORMATS:  # one down column per neuron, halved into the store's two parts
            b = pack_down_columns(fmt, qd[perm], sd[perm])
            half = b.shape[1] // 2
            ffn[L] = {"up": np.ascontiguousarray(b[:, :half]), "down": np.ascontiguousarray(b[:, half:].T)}
        elif fmt == "int8":
            qu, su = _int8_rows(up)
            qd, sd = _int8_rows(down_t)
            ffn[L] = {"up": qu, "down": np.ascontiguousarray(qd.T)}
            tensors[f"stream/scales/{L}"] = np.stack([su, sd], 1)
        elif fmt in ("int4", "int4_int8"):
            b = pack_bundles(fmt, up, down_t)
            half = b.shape[1] // 2
            ffn[L] = {"up": np.ascontiguousarray(b[:, :half]), "down": np.ascontiguousarray(b[:, half:].T)}
        else:
            ffn[L] = {"up": up, "down": np.ascontiguousarray(down_t.T)}
    tensors["stream/threshold_quantiles"] = thr
    tensors["stream/lowrank_quantiles"] = lrq
    tensors["stream/allocation"] = allocate_sparsity(np.maximum.accumulate(err, axis=1))
    emb = w["model.embed_tokens.weight"]
    E = dequantize(emb) if isinstance(emb, QuantizedMatrix) else np.asarray(emb, np.float32)
    if fmt == "float32":
        # the embedding table as a bundled "layer" nl: [first half | second half] of each row
        half = (d + 1) // 2
        if d % 2:
            E = np.concatenate([E, np.zeros((E.shape[0], 1), np.float32)], 1)
        ffn[nl] = {"up": np.ascontiguousarray(E[:, :half]), "down": np.ascontiguousarray(E[:, half:].T)}
        pieces = 1
    else:
        # float32 rows cut into pieces of exactly one FFN bundle (same dtype and part size), so that
        # every cache slot is one FFN neuron (the cache's slot is the largest bundle of the file: a
        # float32 embedding row twice an int8 neuron halved what the budget cached)
        part = ffn[0]["up"].shape[1]
        dt = ffn[0]["up"].dtype
        pieces = -(-(4 * d) // (2 * part * dt.itemsize))
        rows = np.zeros((E.shape[0], pieces * 2 * part * dt.itemsize), np.uint8)
        rows[:, :4 * d] = np.ascontiguousarray(E, np.float32).view(np.uint8)
        rows = rows.view(dt).reshape(E.shape[0] * pieces, 2, part)
        ffn[nl] = {"up": np.ascontiguousarray(rows[:, 0]), "down": np.ascontiguousarray(rows[:, 1].T)}
        half = d
    del E
    for name, a in w.items():
        if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")) and \
                not (fmt in DOWN_FORMATS and name.endswith("mlp.up_proj.weight")):
            continue
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue  # only gathered: the store's rows serve it
        if isinstance(a, QuantizedMatrix):
            tensors[_QM + name] = np.frombuffer(a.to_bytes(), np.uint8)
        else:
            tensors[name] = np.ascontiguousarray(a, np.float32)
    meta = {"version": STORE_VERSION, "config": raw, "source": _source_key(path), "rank": int(rank),
            "calibration_tokens": len(ids), "calibration_sha1": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
            "ffn_dtype": fmt, "embed_layer": nl, "embed_pieces": int(pieces), "hidden_padded": 2 * half,
            "tokenizer": _tokenizer_meta(dense.tokenizer), "warnings": list(dense.warnings)}
    tensors[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    del dense, w
    # resident tensors in read units of 128 KiB: the store's staging buffers are sized by its largest
    # read unit (5 of them with 4 I/O threads), and what they do not take of the budget caches neurons
    write_weight_store(dst, tensors, ffn, chunk_bytes=STREAM_READ_BYTES)
    return meta


def _read_meta(ws: WeightStore) -> dict:
    if _META not in ws:
        raise CorruptDataError(f"{ws.path}: not a memkernels streaming store (no '{_META}')")
    try:
        meta = json.loads(ws.get(_META).tobytes().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{ws.path}: bad streaming metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
        raise CorruptDataError(f"{ws.path}: streaming store version {meta.get('version') if isinstance(meta, dict) else '?'}"
                               f", expected {STORE_VERSION}")
    return meta


def open_streaming(path, dram_budget_bytes, *, sparsity=0.0, predictor="threshold", stream_dir=None,
                   calibration_text=None, rank=DEFAULT_RANK, whole_layer_reads=False, ffn_format="int4_int8",
                   **store_kw) -> "StreamingModel":
    """The streaming model of checkpoint `path` (converting it first when no matching store is cached).
    `path` may also be a streaming store (.mkws) itself."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: expected one of {PREDICTORS}, got {predictor!r}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity}")
    if int(dram_budget_bytes) <= 0:
        raise ValueError(f"dram_budget_bytes: expected a positive byte count, got {dram_budget_bytes}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UnsupportedModelError(f"model path {path!r} does not exist")
    if path.endswith(".mkws") and os.path.isfile(path):
        store = path
    else:
        if ffn_format not in FFN_FORMATS:
            raise ValueError(f"ffn_format: expected one of {FFN_FORMATS}, got {ffn_format!r}")
        store = store_path_for(path, stream_dir, ffn_format)
        fresh = False
        if os.path.exists(store):
            try:
                with WeightStore.open(store, 64 << 20) as ws:
                    meta = _read_meta(ws)
                fresh = meta["source"] == _source_key(path) and meta["rank"] == int(rank) and \
                    meta["ffn_dtype"] in (ffn_format, "float32")
            except CorruptDataError:  # an older store version (or a damaged one): convert again
                fresh = False
        if not fresh:
            os.makedirs(os.path.dirname(store), exist_ok=True)
            convert_for_streaming(path, store, calibration_text=calibration_text, rank=rank, ffn_format=ffn_format)
    return StreamingModel(store, int(dram_budget_bytes), sparsity=sparsity, predictor=predictor,
                          whole_layer_reads=whole_layer_reads, **store_kw)


class StreamingModel(Model):
    """A Model whose FFN up/down weights and embedding rows stream from a weight store under a DRAM
    budget (see the module docstring). `stream_stats()` reports the reads."""

    def __init__(self, store_path, dram_budget_bytes, *, sparsity=0.0, predictor="threshold",
                 whole_layer_reads=False, window_tokens=5, io_threads=4, merge_gap_bytes=None, max_read_bytes=STREAM_READ_BYTES,
                 allocation="uniform", pin_hot=True):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor: expected one of {PREDICTORS}, got {predictor!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity}")
        budget = int(dram_budget_bytes)
        self.allocation = allocation
        with WeightStore.open(store_path, max(budget, 64 << 20)) as ws:
            meta = _read_meta(ws)
            listing = {t["name"]: t for t in ws.tensors()}
        cfg = ModelConfig.from_dict(meta["config"])
        nl = cfg.num_hidden_layers
        use_lr = predictor == "lowrank" and sparsity > 0
        resident_names = [n for n in listing if not n.startswith("stream/")
                          or n.startswith(("stream/scales/", "stream/perm/", "stream/dnorm/")) or n.endswith("_quantiles")
                          or n == "stream/allocation" or (use_lr and n.startswith("stream/lowrank/"))]
        resident = sum(listing[n]["nbytes"] for n in resident_names if n != _META)
        if merge_gap_bytes is None:
            # two runs of needed neurons closer than this are read as one: fewer, larger reads against
            # some bytes not needed (measured on SmolLM2: 4 columns of 580 B for down_int8, whose
            # needed columns are scattered; 4 KiB for the [up | down] bundles' denser cold tail)
            merge_gap_bytes = 4 * bundle_bytes(meta["ffn_dtype"], cfg.hidden_size) if meta["ffn_dtype"] in DOWN_FORMATS \
                else 4 << 10
        if budget <= resident:
            raise ValueError(f"dram_budget_bytes: {budget} bytes is not above what stays resident "
                             f"({resident} bytes: attention, gate projections, norms, LM head, predictors); "
                             f"give more than that (the rest of the budget caches streamed FFN neurons)")
        try:
            self.store = WeightStore.open(store_path, budget - resident, window_tokens=window_tokens,
                                          io_threads=io_threads, merge_gap_bytes=merge_gap_bytes,
                                          max_read_bytes=max_read_bytes)
        except ValueError as e:
            raise ValueError(f"dram_budget_bytes: {budget} bytes leaves {budget - resident} after the "
                             f"{resident} resident bytes, too little for the weight store ({e})") from None
        ws = self.store
        tensors = {}
        for n in resident_names:
            if n == _META:
                continue
            a = ws.get(n)
            if n.startswith(_QM):
                tensors[n[len(_QM):]] = from_bytes(a.tobytes())
                del a
            else:
                tensors[n] = a
        self.meta = meta
        self.sparsity, self.predictor, self.whole_layer_reads = float(sparsity), predictor, bool(whole_layer_reads)
        self._stream_meta(tensors, cfg, use_lr)
        self.resident_bytes = resident
        self.dram_budget_bytes = budget
        layers = {l["layer"]: l for l in ws.layers()}
        fdt = meta["ffn_dtype"]
        dm = bundle_bytes(fdt, cfg.hidden_size) // 2 if fdt in ("int4", "int4_int8") + DOWN_FORMATS else cfg.hidden_size
        pieces = meta.get("embed_pieces", 1)
        emb_ok = (layers[nl]["d_model"] * 2 == meta["hidden_padded"]) if fdt == "float32" else \
            (layers.get(nl, {}).get("d_model") == dm and layers[nl]["neurons"] == cfg.vocab_size * pieces)
        if sorted(layers) != list(range(nl + 1)) or not emb_ok:
            raise CorruptDataError(f"{store_path}: streaming store layers {sorted(layers)} do not match the "
                                   f"{nl}-layer model")
        for L in range(nl):
            if layers[L]["neurons"] != cfg.intermediate_size or layers[L]["d_model"] != dm:
                raise CorruptDataError(f"{store_path}: FFN layer {L} is {layers[L]['neurons']} x "
                                       f"{layers[L]['d_model']}, expected {cfg.intermediate_size} x {dm}")
        self.whole_layer_bytes_per_token = sum(layers[L]["bundle_bytes"] * layers[L]["neurons"] for L in range(nl))
        self.pinned_neurons = 0
        if pin_hot and not self.whole_layer_reads:
            self._pin_hot(cfg)
        self._reset_counters()
        # Model.__init__ with the streamed tensors left out of check_tensors
        self.config = cfg
        self.tokenizer = _tokenizer_from_meta(meta.get("tokenizer"))
        self.device, self.exact, self.source = "cpu", True, store_path
        self.warnings = list(meta.get("warnings", ()))
        self.weights = tensors
        self._fuse_projections()  # q/k/v quantized alike: one qgemm (gate has no up to fuse with here)
        tensors = self.weights
        self.quantization = None
        self.last_stats = {}
        from ..model import array_ops
        self.ops = array_ops("cpu", "numpy")
        self._numpy = True
        self._cache = None
        self._rope_table = None
        self._embedding_rows = None
        self.prefill_chunk = 512
        self._dev = {}
        for name, a in tensors.items():
            if name.endswith("norm.weight"):
                self._dev[name] = np.asarray(a, np.float32) + np.float32(cfg.norm_offset)
            else:
                self._dev[name] = a
        self._head = self._dev["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        self._embed_scale = None if cfg.embed_scale is None else float(np.float32(cfg.embed_scale))

    def _stream_meta(self, tensors, cfg, use_lr):
        """Pops the stream/ tensors into per-layer arrays, checking their shapes (a corrupt or
        mismatched predictor raises CorruptDataError)."""
        nl, dff, d = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size

        def take(name, shape):
            if name not in tensors:
                raise CorruptDataError(f"streaming store: tensor {name!r} is missing")
            a = tensors.pop(name)
            if tuple(a.shape) != tuple(shape) or a.dtype != np.float32 or not np.isfinite(a).all():
                raise CorruptDataError(f"streaming store: tensor {name!r} is {a.dtype} {list(a.shape)}, expected "
                                       f"finite float32 {list(shape)}")
            return a

        thr = take("stream/threshold_quantiles", (nl, len(LEVELS)))
        lrq = take("stream/lowrank_quantiles", (nl, len(LEVELS)))
        if (np.diff(thr, axis=1) < 0).any() or (np.diff(lrq, axis=1) < 0).any():
            raise CorruptDataError("streaming store: calibrated quantiles are not increasing")
        alloc = take("stream/allocation", (nl * (int(round(S_MAX / S_STEP))) + 1, nl))
        if self.allocation == "calibrated" and self.sparsity > 0:
            # the greedy allocation whose mean is nearest the target (within S_STEP / layers)
            k = int(np.clip(round(self.sparsity * nl / S_STEP), 0, alloc.shape[0] - 1))
            self.layer_sparsity = alloc[k].astype(np.float64)
        else:
            self.layer_sparsity = np.full(nl, self.sparsity)
        # each layer's quantile s_L of the calibrated |act(gate)| (interpolated on the 1 % grid)
        self._threshold = np.array([np.interp(s, LEVELS, thr[L]) for L, s in enumerate(self.layer_sparsity)],
                                   np.float32)
        self._lr_threshold = np.array([np.interp(s, LEVELS, lrq[L]) for L, s in enumerate(self.layer_sparsity)],
                                      np.float32)
        self._perm = {}
        self._all_neurons = np.arange(dff, dtype=np.int64)
        for L in range(nl):
            if f"stream/perm/{L}" not in tensors:
                raise CorruptDataError(f"streaming store: tensor 'stream/perm/{L}' is missing")
            pm = tensors.pop(f"stream/perm/{L}")
            if pm.shape != (dff,) or pm.dtype != np.int32 or not np.array_equal(np.sort(pm), np.arange(dff)):
                raise CorruptDataError(f"streaming store: 'stream/perm/{L}' is not a permutation of {dff} neurons")
            self._perm[L] = pm.astype(np.int64)
        self._lowrank = {}
        if use_lr:
            for L in range(nl):
                A = take(f"stream/lowrank/{L}/A", (d, self.meta["rank"] if self.meta["rank"] <= min(d, dff) else
                                                     min(d, dff)))
                B = take(f"stream/lowrank/{L}/B", (A.shape[1], dff))
                self._lowrank[L] = (A, B)
        self._scales = {}
        self._ffn_dtype = self.meta["ffn_dtype"]
        self._dnorm = {}
        if self._ffn_dtype in DOWN_FORMATS:
            if self.predictor != "threshold":
                raise ValueError(f"predictor: a down_int8 store decides from the exact contribution |z| * ||down||; "
                                 f"only 'threshold' applies, got {self.predictor!r}")
            for L in range(nl):
                self._dnorm[L] = take(f"stream/dnorm/{L}", (dff,))
        if self.meta["ffn_dtype"] == "int8":
            for L in range(nl):
                self._scales[L] = take(f"stream/scales/{L}", (dff, 2))

    def _pin_hot(self, cfg):
        """Pins the neurons most likely requested per token (calibrated firing frequency at each
        layer's sparsity) into the store's cache, as many as its slots hold less one layer (so that
        get_rows reads a layer's cold neurons in one batch). Cold neurons then go through the LRU
        window; the hot ones are never read again."""
        nl, dff = cfg.num_hidden_layers, cfg.intermediate_size
        st = self.store.stats()
        room = int(st["cache_slots"]) - dff - 2 * self.meta.get("embed_pieces", 1)
        if room <= 0:
            return
        p = np.zeros((nl, dff))
        for L in range(nl):
            f = self.store.get(f"stream/freq/{L}")
            if f.shape != (len(FREQ_LEVELS), dff) or not np.isfinite(f).all():
                raise CorruptDataError(f"streaming store: 'stream/freq/{L}' has shape {list(f.shape)}, expected "
                                       f"{[len(FREQ_LEVELS), dff]}")
            s = self.layer_sparsity[L] if self.sparsity > 0 else 0.0
            j = min(int(s / S_STEP), len(FREQ_LEVELS) - 2)
            t = (s - FREQ_LEVELS[j]) / S_STEP
            p[L] = f[j] + t * (f[j + 1] - f[j])
        # how many per layer: the most probable neurons overall (ties by position, the store's
        # order: earlier = hotter); which: each layer's prefix in the store's order, so that the
        # cold neurons left to read form one contiguous tail (pinning the most probable ones
        # themselves, interleaved with cold ones when the run's sparsity ranks them differently
        # from the stored order, left a cold neuron in nearly every 4 KiB block: more bytes read)
        order = np.lexsort((np.tile(np.arange(dff), nl), -p.ravel()))[:room]
        counts = np.bincount(order // dff, minlength=nl)
        for L in range(nl):
            if counts[L]:
                self.store.pin(L, np.arange(counts[L]))
        self.pinned_neurons = int(counts.sum())

    def _reset_counters(self):
        self._decode_tokens = 0
        self._decode_bytes = 0
        self._decode_reads = 0
        self._decode_hits = 0
        self._decode_misses = 0
        self._neurons_kept = 0
        self._neurons_total = 0
        self.store.reset_stats()

    # -- streamed pieces -----------------------------------------------------------------------
    def _embedding(self, tokens):
        d = self.config.hidden_size
        uniq, inv = np.unique(np.asarray(tokens, np.int64), return_inverse=True)
        k = self.meta.get("embed_pieces", 1)
        if self._ffn_dtype == "float32":
            rows = self.store.get_rows(self.meta["embed_layer"], uniq).reshape(len(uniq), -1)
        else:  # each float32 row is k pieces of one FFN bundle's bytes
            ids = (uniq[:, None] * k + np.arange(k)).ravel()
            rows = self.store.get_rows(self.meta["embed_layer"], ids).reshape(len(uniq), -1).view(np.float32)
        return np.ascontiguousarray(rows[inv.reshape(-1), :d], dtype=np.float32)

    def _mlp(self, h, L, p):
        cfg = self.config
        if self._ffn_dtype in DOWN_FORMATS:
            return self._mlp_down(h, L, p)
        g = self._linear(h, p + "mlp.gate_proj.weight")
        if self._ffn_dtype in ("int4", "int4_int8") and h.shape[0] <= 8:
            return self._mlp_bundles(h, g, L)
        a = activation(np, g, cfg.hidden_act)[:, self._perm[L]]  # the store's neuron order
        keep = None
        if self.sparsity > 0 and not self.whole_layer_reads:
            if self.predictor == "lowrank":
                A, B = self._lowrank[L]
                score = np.abs(activation(np, (h @ A) @ B, cfg.hidden_act))
                keep = score > self._lr_threshold[L]
            else:
                keep = np.abs(a) > self._threshold[L]
            cols = np.flatnonzero(keep.any(0))
        else:
            cols = np.arange(cfg.intermediate_size)
        # per token (what the predictor keeps); the rows read are the union over the tokens
        self._neurons_kept += int(keep.sum()) if keep is not None else len(cols) * h.shape[0]
        self._neurons_total += cfg.intermediate_size * h.shape[0]
        if len(cols) == 0:
            return np.zeros_like(h)
        rows = self.store.get_rows(L, cols)  # (k, 2, d): up row, down column
        if self._ffn_dtype in ("int4", "int4_int8"):  # prefill: dequantize once, then BLAS
            up, down = unpack_bundles(self._ffn_dtype, rows, cfg.hidden_size)
        elif L in self._scales:
            s = self._scales[L][cols]
            up = rows[:, 0].astype(np.float32) * s[:, :1]
            down = rows[:, 1].astype(np.float32) * s[:, 1:]
        else:
            up, down = rows[:, 0], rows[:, 1]
        z = a[:, cols] * (h @ up.T)
        if keep is not None:
            z *= keep[:, cols]
        return z @ down

    def _mlp_bundles(self, h, g, L):
        """Decode FFN on a 4-bit store, one C++ call (stream_ffn_layer): the neuron order, the
        threshold, the cache look-ups and reads, and the FFN on the cached bundles (computed while
        the misses are read)."""
        cfg = self.config
        h = np.ascontiguousarray(h, np.float32)
        a = np.ascontiguousarray(activation(np, g, cfg.hidden_act), np.float32)
        sparse = self.sparsity > 0 and not self.whole_layer_reads
        score, thr = None, 0.0
        if sparse and self.predictor == "lowrank":
            A, B = self._lowrank[L]
            score = np.ascontiguousarray(activation(np, (h @ A) @ B, cfg.hidden_act), np.float32)
            thr = float(self._lr_threshold[L])
        elif sparse:
            thr = float(self._threshold[L])
        if self.whole_layer_reads and L + 1 < cfg.num_hidden_layers:
            # naive streaming double-buffers whole layers: the next one is read while this one computes
            self.store.prefetch(L + 1, self._all_neurons)
        out = np.empty((h.shape[0], cfg.hidden_size), np.float32)
        kept, _ = _C.stream_ffn_layer(self.store._h(), L, h, a, self._perm[L], score, None, sparse, thr, out,
                                      self._ffn_dtype)
        self._neurons_kept += kept
        self._neurons_total += cfg.intermediate_size * h.shape[0]
        return out

    def _mlp_down(self, h, L, p):
        """FFN of a down_int8 store: gate and up resident (one fused qgemm where they are quantized
        alike), z = act(gate) * up exact; neuron i's down column is read only when
        |z_i| * ||down_i|| exceeds the layer's calibrated threshold."""
        cfg = self.config
        if p + "mlp.gate_up_proj.weight" in self._dev:
            gu = self._linear(h, p + "mlp.gate_up_proj.weight")
            g, u = gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:]
        else:
            g, u = self._linear(h, p + "mlp.gate_proj.weight"), self._linear(h, p + "mlp.up_proj.weight")
        z = np.ascontiguousarray(activation(np, g, cfg.hidden_act) * u, np.float32)
        sparse = self.sparsity > 0 and not self.whole_layer_reads
        thr = float(self._threshold[L]) if sparse else 0.0
        T, d = h.shape[0], cfg.hidden_size
        if self.whole_layer_reads and L + 1 < cfg.num_hidden_layers:
            self.store.prefetch(L + 1, self._all_neurons)
        if T <= 8:
            out = np.empty((T, d), np.float32)
            kept, _ = _C.stream_ffn_layer(self.store._h(), L, np.ascontiguousarray(h, np.float32), z, self._perm[L],
                                          None, self._dnorm[L], sparse, thr, out, self._ffn_dtype)
            self._neurons_kept += kept
            self._neurons_total += cfg.intermediate_size * T
            return out
        zs = z[:, self._perm[L]]
        keep = np.abs(zs) * self._dnorm[L] > thr if sparse else np.ones(zs.shape, bool)
        cols = np.flatnonzero(keep.any(0))
        self._neurons_kept += int(keep.sum())
        self._neurons_total += cfg.intermediate_size * T
        if len(cols) == 0:
            return np.zeros((T, d), np.float32)
        D = unpack_down_columns(self._ffn_dtype, self.store.get_rows(L, cols), d)
        return (zs[:, cols] * keep[:, cols]) @ D

    def _forward(self, seq_ids, chunks, starts, all_rows=False):
        decode = all(len(c) == 1 for c in chunks)
        if self.whole_layer_reads:
            self.store.clear_cache()  # naive streaming: every token reads every layer whole
        before = self.store.stats()
        out = super()._forward(seq_ids, chunks, starts, all_rows)
        after = self.store.stats()
        self.store.next_token()
        if decode:
            self._decode_tokens += len(chunks)
            self._decode_bytes += after["bytes_read"] - before["bytes_read"]
            self._decode_reads += after["reads_issued"] - before["reads_issued"]
            # a neuron the whole-layer baseline's read-ahead brought in is found in the cache, but it
            # was read for this token: not a hit
            self._decode_hits += (after["neuron_hits"] - before["neuron_hits"]) - \
                (after["prefetched"] - before["prefetched"])
            self._decode_misses += after["neuron_misses"] - before["neuron_misses"]
        return out

    def stream_stats(self) -> dict:
        """Reads of the decode steps since load (or `reset_stream_stats`): bytes_read_per_token,
        whole_layer_bytes_per_token (reading every streamed FFN layer whole), hit_rate (neurons found
        in the cache), peak_resident_bytes (resident weights + the store's peak), and the rest."""
        st = self.store.stats()
        n = max(self._decode_tokens, 1)
        looked = self._decode_hits + self._decode_misses
        return {"dram_budget_bytes": self.dram_budget_bytes, "resident_weight_bytes": self.resident_bytes,
                "decode_tokens": self._decode_tokens,
                "bytes_read_per_token": self._decode_bytes / n,
                "reads_per_token": self._decode_reads / n,
                "whole_layer_bytes_per_token": self.whole_layer_bytes_per_token,
                "hit_rate": self._decode_hits / looked if looked else 0.0,
                "neurons_kept_fraction": self._neurons_kept / max(self._neurons_total, 1),
                "peak_resident_bytes": self.resident_bytes + st["peak_resident_bytes"] + st["staging_bytes"],
                "store_peak_bytes": st["peak_resident_bytes"], "io_mode": st["io_mode"],
                "io_engine": st["io_engine"], "sparsity": self.sparsity, "predictor": self.predictor, "whole_layer_reads": self.whole_layer_reads,
                "ffn_dtype": self.meta["ffn_dtype"], "allocation": self.allocation,
                "pinned_neurons": self.pinned_neurons, "cache_slots": st["cache_slots"],
                "layer_sparsity_min": float(self.layer_sparsity.min()),
                "layer_sparsity_max": float(self.layer_sparsity.max())}

    def reset_stream_stats(self):
        self._reset_counters()

    def reference_logits(self, token_ids):
        raise NotImplementedError("reference_logits: load the checkpoint without a budget for the float64 check")
