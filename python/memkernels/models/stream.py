"""Streaming a real model's FFN from flash under a DRAM budget, with activation sparsity (issue 17).

`load_model(path, dram_budget_bytes=B, sparsity=S, predictor=...)` converts the checkpoint once
into a weight store (`convert_for_streaming`, cached next to the model or in `stream_dir`), then
runs it as a `StreamingModel`:

- resident (read once, whole): attention, norms, the gate projections (as stored: GGUF quants stay
  quantized), the LM head, the per-layer sparsity thresholds and low-rank predictors;
- streamed through the WeightStore's window cache: the FFN up rows and down columns, bundled per
  neuron [up row i | down column i] so that one neuron is one contiguous read, and the embedding
  rows (one row per token, gathered from the store instead of a resident table).

Which neurons a token needs is decided before reading (a SwiGLU FFN is dense, so this is
approximate for S > 0):
- predictor="threshold" (CATS / TEAL style, training free): the gate is computed exactly from its
  resident weights; neuron i is read only when |act(gate_i)| exceeds the layer's threshold, the
  quantile S of |act(gate)| on calibration text;
- predictor="lowrank" (Deja Vu / "LLM in a flash" style): a rank-r map h -> gate fitted by least
  squares on calibration activations scores the neurons; those scoring above the layer's calibrated
  quantile S are read (the gate of the chosen neurons is still the exact one).
S = 0 reads every neuron and equals the dense forward.

Memory: `dram_budget_bytes` bounds the weights the model holds: resident bytes plus everything the
weight store holds (neuron cache, I/O staging). A budget below the resident part is refused with
the numbers. Activations and the KV cache are not weights and are not counted.

Conversion of the streamed FFN: float checkpoints are stored as float32 (bit exact); quantized
(GGUF) up/down matrices are dequantized and re-quantized to int8 with one float32 scale per neuron
row / column (a neuron's down column is not a block of the GGUF row layout, so GGUF blocks cannot be
kept as they are). The embedding rows are stored as float32 (exact).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..quant import QuantizedMatrix, dequantize, from_bytes
from ..weight_store import CorruptDataError, WeightStore, write_weight_store
from .config import ModelConfig, UnsupportedModelError
from .llama import Model, activation

STORE_VERSION = 1
LEVELS = np.linspace(0.0, 1.0, 101)  # calibrated quantiles 0 %, 1 %, ..., 100 %
PREDICTORS = ("threshold", "lowrank")
DEFAULT_RANK = 32
DEFAULT_CALIBRATION_TOKENS = 1024
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


def store_path_for(path, stream_dir=None) -> str:
    """Where the streaming store of checkpoint `path` is cached: next to a .gguf file, inside a
    checkpoint directory, or in `stream_dir`."""
    path = os.path.abspath(os.fspath(path))
    base = os.path.basename(os.path.normpath(path))
    if stream_dir is not None:
        return os.path.join(os.fspath(stream_dir), base + ".stream.mkws")
    if os.path.isdir(path):
        return os.path.join(path, "memkernels-stream.mkws")
    return path + ".stream.mkws"


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
    m = Model(ModelConfig.from_dict(raw), dict(ck.tensors), ck.tokenizer, source=path,
              warnings=getattr(ck, "warnings", ()))
    return raw, m


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


def convert_for_streaming(path, dst, *, calibration_text=None, calibration_tokens=DEFAULT_CALIBRATION_TOKENS,
                          rank=DEFAULT_RANK, verbose=False) -> dict:
    """Converts checkpoint `path` (directory or .gguf) into the streaming weight store `dst` (see the
    module docstring). Holds the dense model in memory once. Returns the store's metadata."""
    raw, dense = _load_dense(path)
    cfg = dense.config
    if cfg.fused_qkv or cfg.mlp_bias:
        raise UnsupportedModelError(f"streaming: {cfg.model_type} with fused gate_up_proj or mlp_bias is not "
                                    f"supported yet")
    nl, dff, d = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    # calibration: record each FFN's input and gate output on sample text
    rec = {L: ([], []) for L in range(nl)}

    def recording_mlp(h, L, p):
        rec[L][0].append(np.array(h, np.float32))
        rec[L][1].append(np.array(dense._linear(h, p + "mlp.gate_proj.weight"), np.float32))
        return Model._mlp(dense, h, L, p)

    ids = calibration_ids(dense, calibration_text, calibration_tokens)
    if len(ids) < 8:
        raise ValueError(f"calibration_text: needs at least 8 tokens, got {len(ids)}")
    dense._mlp = recording_mlp
    for at in range(0, len(ids), 256):  # pieces of 256 tokens, each a fresh sequence
        dense.logits(ids[at:at + 256])
    del dense._mlp
    tensors, ffn = {}, {}
    thr = np.zeros((nl, len(LEVELS)), np.float32)
    lrq = np.zeros((nl, len(LEVELS)), np.float32)
    w = dense.weights
    quantized = any(isinstance(w[f"model.layers.{L}.mlp.{k}_proj.weight"], QuantizedMatrix)
                    for L in range(nl) for k in ("up", "down"))
    for L in range(nl):
        H, G = np.concatenate(rec[L][0]), np.concatenate(rec[L][1])
        rec[L] = None
        thr[L], A, B, lrq[L] = fit_predictors(H, G, cfg.hidden_act, rank)
        tensors[f"stream/lowrank/{L}/A"], tensors[f"stream/lowrank/{L}/B"] = A, B
        up = w[f"model.layers.{L}.mlp.up_proj.weight"]
        down = w[f"model.layers.{L}.mlp.down_proj.weight"]
        up = dequantize(up) if isinstance(up, QuantizedMatrix) else np.asarray(up, np.float32)
        down = dequantize(down) if isinstance(down, QuantizedMatrix) else np.asarray(down, np.float32)
        if quantized:
            qu, su = _int8_rows(up)
            qd, sd = _int8_rows(np.ascontiguousarray(down.T))
            ffn[L] = {"up": qu, "down": np.ascontiguousarray(qd.T)}
            tensors[f"stream/scales/{L}"] = np.stack([su, sd], 1)
        else:
            ffn[L] = {"up": np.ascontiguousarray(up), "down": np.ascontiguousarray(down)}
    tensors["stream/threshold_quantiles"] = thr
    tensors["stream/lowrank_quantiles"] = lrq
    emb = w["model.embed_tokens.weight"]
    E = dequantize(emb) if isinstance(emb, QuantizedMatrix) else np.asarray(emb, np.float32)
    half = (d + 1) // 2
    if d % 2:
        E = np.concatenate([E, np.zeros((E.shape[0], 1), np.float32)], 1)
    # the embedding table as a bundled "layer" nl: [first half | second half] of each row
    ffn[nl] = {"up": np.ascontiguousarray(E[:, :half]), "down": np.ascontiguousarray(E[:, half:].T)}
    del E
    for name, a in w.items():
        if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")):
            continue
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue  # only gathered: the store's rows serve it
        if isinstance(a, QuantizedMatrix):
            tensors[_QM + name] = np.frombuffer(a.to_bytes(), np.uint8)
        else:
            tensors[name] = np.ascontiguousarray(a, np.float32)
    meta = {"version": STORE_VERSION, "config": raw, "source": _source_key(path), "rank": int(rank),
            "calibration_tokens": len(ids), "calibration_sha1": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
            "ffn_dtype": "int8" if quantized else "float32", "embed_layer": nl, "hidden_padded": 2 * half,
            "tokenizer": _tokenizer_meta(dense.tokenizer), "warnings": list(dense.warnings)}
    tensors[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    del dense, w
    write_weight_store(dst, tensors, ffn)
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
                   calibration_text=None, rank=DEFAULT_RANK, whole_layer_reads=False, **store_kw) -> "StreamingModel":
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
        store = store_path_for(path, stream_dir)
        fresh = False
        if os.path.exists(store):
            with WeightStore.open(store, 64 << 20) as ws:
                meta = _read_meta(ws)
            fresh = meta["source"] == _source_key(path) and meta["rank"] == int(rank)
        if not fresh:
            os.makedirs(os.path.dirname(store), exist_ok=True)
            convert_for_streaming(path, store, calibration_text=calibration_text, rank=rank)
    return StreamingModel(store, int(dram_budget_bytes), sparsity=sparsity, predictor=predictor,
                          whole_layer_reads=whole_layer_reads, **store_kw)


class StreamingModel(Model):
    """A Model whose FFN up/down weights and embedding rows stream from a weight store under a DRAM
    budget (see the module docstring). `stream_stats()` reports the reads."""

    def __init__(self, store_path, dram_budget_bytes, *, sparsity=0.0, predictor="threshold",
                 whole_layer_reads=False, window_tokens=5, io_threads=4, merge_gap_bytes=32 << 10):
        budget = int(dram_budget_bytes)
        with WeightStore.open(store_path, max(budget, 64 << 20)) as ws:
            meta = _read_meta(ws)
            listing = {t["name"]: t for t in ws.tensors()}
        cfg = ModelConfig.from_dict(meta["config"])
        nl = cfg.num_hidden_layers
        use_lr = predictor == "lowrank" and sparsity > 0
        resident_names = [n for n in listing if not n.startswith("stream/")
                          or n.startswith("stream/scales/") or n.endswith("_quantiles")
                          or (use_lr and n.startswith("stream/lowrank/"))]
        resident = sum(listing[n]["nbytes"] for n in resident_names if n != _META)
        if budget <= resident:
            raise ValueError(f"dram_budget_bytes: {budget} bytes is not above what stays resident "
                             f"({resident} bytes: attention, gate projections, norms, LM head, predictors); "
                             f"give more than that (the rest of the budget caches streamed FFN neurons)")
        try:
            self.store = WeightStore.open(store_path, budget - resident, window_tokens=window_tokens,
                                          io_threads=io_threads, merge_gap_bytes=merge_gap_bytes)
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
        if sorted(layers) != list(range(nl + 1)) or layers[nl]["d_model"] * 2 != meta["hidden_padded"]:
            raise CorruptDataError(f"{store_path}: streaming store layers {sorted(layers)} do not match the "
                                   f"{nl}-layer model")
        for L in range(nl):
            if layers[L]["neurons"] != cfg.intermediate_size or layers[L]["d_model"] != cfg.hidden_size:
                raise CorruptDataError(f"{store_path}: FFN layer {L} is {layers[L]['neurons']} x "
                                       f"{layers[L]['d_model']}, expected {cfg.intermediate_size} x {cfg.hidden_size}")
        self.whole_layer_bytes_per_token = sum(layers[L]["bundle_bytes"] * layers[L]["neurons"] for L in range(nl))
        self._reset_counters()
        # Model.__init__ with the streamed tensors left out of check_tensors
        self.config = cfg
        self.tokenizer = _tokenizer_from_meta(meta.get("tokenizer"))
        self.device, self.exact, self.source = "cpu", True, store_path
        self.warnings = list(meta.get("warnings", ()))
        self.weights = tensors
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
        q = self.sparsity * (len(LEVELS) - 1)  # the quantile S, interpolated on the 1 % grid
        i0 = min(int(np.floor(q)), len(LEVELS) - 2)

        def at(table):
            return table[:, i0] + (q - i0) * (table[:, i0 + 1] - table[:, i0])

        self._threshold = at(thr)
        self._lr_threshold = at(lrq)
        self._lowrank = {}
        if use_lr:
            for L in range(nl):
                A = take(f"stream/lowrank/{L}/A", (d, self.meta["rank"] if self.meta["rank"] <= min(d, dff) else
                                                     min(d, dff)))
                B = take(f"stream/lowrank/{L}/B", (A.shape[1], dff))
                self._lowrank[L] = (A, B)
        self._scales = {}
        if self.meta["ffn_dtype"] == "int8":
            for L in range(nl):
                self._scales[L] = take(f"stream/scales/{L}", (dff, 2))

    def _reset_counters(self):
        self._decode_tokens = 0
        self._decode_bytes = 0
        self._decode_hits = 0
        self._decode_misses = 0
        self._neurons_kept = 0
        self._neurons_total = 0
        self.store.reset_stats()

    # -- streamed pieces -----------------------------------------------------------------------
    def _embedding(self, tokens):
        d = self.config.hidden_size
        uniq, inv = np.unique(np.asarray(tokens, np.int64), return_inverse=True)
        rows = self.store.get_rows(self.meta["embed_layer"], uniq)
        return np.ascontiguousarray(rows.reshape(len(uniq), -1)[inv.reshape(-1), :d], dtype=np.float32)

    def _mlp(self, h, L, p):
        cfg = self.config
        g = self._linear(h, p + "mlp.gate_proj.weight")
        a = activation(np, g, cfg.hidden_act)
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
        if L in self._scales:
            s = self._scales[L][cols]
            up = rows[:, 0].astype(np.float32) * s[:, :1]
            down = rows[:, 1].astype(np.float32) * s[:, 1:]
        else:
            up, down = rows[:, 0], rows[:, 1]
        z = a[:, cols] * (h @ up.T)
        if keep is not None:
            z *= keep[:, cols]
        return z @ down

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
            self._decode_hits += after["neuron_hits"] - before["neuron_hits"]
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
                "whole_layer_bytes_per_token": self.whole_layer_bytes_per_token,
                "hit_rate": self._decode_hits / looked if looked else 0.0,
                "neurons_kept_fraction": self._neurons_kept / max(self._neurons_total, 1),
                "peak_resident_bytes": self.resident_bytes + st["peak_resident_bytes"] + st["staging_bytes"],
                "store_peak_bytes": st["peak_resident_bytes"], "io_mode": st["io_mode"],
                "sparsity": self.sparsity, "predictor": self.predictor, "whole_layer_reads": self.whole_layer_reads,
                "ffn_dtype": self.meta["ffn_dtype"]}

    def reset_stream_stats(self):
        self._reset_counters()

    def reference_logits(self, token_ids):
        raise NotImplementedError("reference_logits: load the checkpoint without a budget for the float64 check")
