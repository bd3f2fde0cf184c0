"""A small Llama-style decoder that runs on all five capabilities, and its NumPy float64 twin.

The model (RMSNorm, RoPE, GQA attention, gated FFN) is what `python -m memkernels demo` runs:

* every weight lives in a weight store on disk (`prepare_store`): the attention projections as
  int4 QuantizedMatrix bytes, the FFN gate as a pruned SparseMatrix, the FFN up/down projections
  as bundled neurons that are streamed under a DRAM budget;
* prefill runs flash attention over each prompt and writes K/V into a paged KV cache; decode runs
  paged attention over that cache for several sequences at once (one of them forked);
* the FFN reads only the neurons whose gate is active for the current tokens (`get_rows`), kept
  resident across tokens by the store's window. With hidden_act="relu" (the ReLU-fied models
  "LLM in a flash" streams) inactive neurons contribute exactly zero, so the result is exact; with
  "silu" (Llama checkpoints) every neuron is active and the whole FFN streams through the budget.

The model's glue between kernels (embedding lookup, RMSNorm, RoPE, activations, the dense FFN
products of the few active neurons) goes through `ArrayOps`: NumPy on the CPU, or PyTorch / CuPy
arrays on the CPU or a GPU, so the same driver runs `demo --device cuda` with every array and
every kernel on the GPU.

`ReferenceModel` computes the same logits in float64 from the same (quantized, pruned) weights
without any memkernels kernel, recomputing full attention at every position.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .paged import PagedKVCache, paged_attention
from .attention import flash_attention
from .quant import dequantize, from_bytes, qgemm, quantize
from .sparse import SparseMatrix, prune, spmm
from .weight_store import WeightStore, read_safetensors, write_weight_store

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "relu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        missing = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "vocab_size"} - set(fields)
        if missing:
            raise ValueError(f"{path}: missing config keys {sorted(missing)}")
        fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
        cfg = cls(**fields)
        cfg.validate()
        return cfg

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act not in ("relu", "silu"):
            raise ValueError(f"hidden_act must be 'relu' or 'silu', got {self.hidden_act!r}")


def layer_name(i: int, part: str) -> str:
    prefix = f"model.layers.{i}."
    if part in ATTN_PROJ:
        return prefix + f"self_attn.{part}.weight"
    if part in ("gate_proj", "up_proj", "down_proj"):
        return prefix + f"mlp.{part}.weight"
    return prefix + f"{part}.weight"


def gate_bias_name(i: int) -> str:
    return f"model.layers.{i}.mlp.gate_proj.bias"


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict:
    """Seeded weights in the Hugging Face Llama naming and layouts (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def lin(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, d)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
         "lm_head.weight": lin(cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        w[layer_name(i, "q_proj")] = lin(cfg.num_attention_heads * hd, d)
        w[layer_name(i, "k_proj")] = lin(cfg.num_key_value_heads * hd, d)
        w[layer_name(i, "v_proj")] = lin(cfg.num_key_value_heads * hd, d)
        w[layer_name(i, "o_proj")] = lin(d, cfg.num_attention_heads * hd)
        w[layer_name(i, "gate_proj")] = lin(f, d)
        w[layer_name(i, "up_proj")] = lin(f, d)
        w[layer_name(i, "down_proj")] = lin(d, f)
        if cfg.hidden_act == "relu":
            # ReLU-fied FFNs are sparse because of their gate bias: about 10% of neurons fire per token
            gate_rows = np.linalg.norm(w[layer_name(i, "gate_proj")], axis=1)
            w[gate_bias_name(i)] = (-1.3 * gate_rows).astype(np.float32)
        w[layer_name(i, "input_layernorm")] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[layer_name(i, "post_attention_layernorm")] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    return w


def load_checkpoint(model_dir) -> tuple[ModelConfig, dict]:
    """A Llama-style checkpoint directory: config.json + *.safetensors (shards)."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model path {model_dir!r} is not a directory (expected config.json + *.safetensors)")
    cfg = ModelConfig.from_json(os.path.join(model_dir, "config.json"))
    shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"{model_dir}: no .safetensors files")
    weights = {}
    for s in shards:
        weights.update({k: np.asarray(v, dtype=np.float32) for k, v in read_safetensors(os.path.join(model_dir, s)).items()})
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        layer_name(i, p) for i in range(cfg.num_hidden_layers)
        for p in ATTN_PROJ + ("gate_proj", "up_proj", "down_proj", "input_layernorm", "post_attention_layernorm")]
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return cfg, weights


def _progress(label, done, total, enabled=True, width=30):
    """A one-line progress bar, redrawn in place; only on a terminal."""
    if not enabled or not sys.stdout.isatty():
        return
    filled = int(width * done / max(total, 1))
    print(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="" if done < total else "\n",
          flush=True)


def _attn_group_size(in_features: int) -> int:
    for g in (128, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of 32 (needed for int4 groups)")


def prepare_store(cfg: ModelConfig, weights: dict, path, *, prune_sparsity: float = 0.5, progress=True) -> dict:
    """Quantizes the attention projections to int4, prunes the FFN (magnitude), and writes every
    weight to a weight store at `path`. Returns byte counts per kind for the report."""
    tensors = {"config.json": np.frombuffer(json.dumps(asdict(cfg)).encode(), dtype=np.uint8)}
    ffn_layers, sizes = {}, {"int4 attention": 0, "sparse gate": 0, "streamed FFN": 0, "other": 0}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        tensors[name] = weights[name]
        sizes["other"] += weights[name].nbytes
    for i in range(cfg.num_hidden_layers):
        for p in ATTN_PROJ:
            w = weights[layer_name(i, p)]
            blob = quantize(w, "int4", group_size=_attn_group_size(w.shape[1])).to_bytes()
            tensors[layer_name(i, p)] = np.frombuffer(blob, dtype=np.uint8)
            sizes["int4 attention"] += len(blob)
        gate, up, down = (weights[layer_name(i, p)] for p in ("gate_proj", "up_proj", "down_proj"))
        if prune_sparsity > 0:
            gate, up, down = (prune(w, prune_sparsity) for w in (gate, up, down))
        blob = SparseMatrix.from_dense(gate, format="bitmap").to_bytes()
        tensors[layer_name(i, "gate_proj")] = np.frombuffer(blob, dtype=np.uint8)
        sizes["sparse gate"] += len(blob)
        ffn_layers[i] = {"up": up, "down": down}
        sizes["streamed FFN"] += up.nbytes + down.nbytes
        for name in (layer_name(i, "input_layernorm"), layer_name(i, "post_attention_layernorm"), gate_bias_name(i)):
            if name in weights:
                tensors[name] = weights[name]
                sizes["other"] += weights[name].nbytes
        _progress("quantize + prune", i + 1, cfg.num_hidden_layers, progress)
    write_weight_store(path, tensors, ffn_layers, chunk_bytes=64 << 10)  # small reads: small staging buffers
    return sizes


def rope_tables(positions, head_dim, theta):
    """cos and sin (len(positions), head_dim) in float64 for the 'rotate half' rotary embedding."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.cos(ang), np.cos(ang)], -1), np.concatenate([np.sin(ang), np.sin(ang)], -1)


class ArrayOps:
    """The array operations the model does between kernel calls, for one framework and device.

    NumPy (CPU) and CuPy (GPU) share this class (CuPy mirrors NumPy's API); `TorchOps` is the
    PyTorch version. Everything is float32 on `device`; only token ids, the active-neuron ids and
    the logits cross to the host.
    """

    def __init__(self, xp, device="cpu"):
        self.xp, self.device = xp, device

    def to_device(self, host_array, dtype="float32"):
        return self.xp.asarray(np.asarray(host_array, dtype=dtype))

    def from_store(self, a):
        """An array the weight store returned (on this device) as this framework's array."""
        return a if isinstance(a, self.xp.ndarray) else self.xp.from_dlpack(a)

    def to_host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else self.xp.asnumpy(a)

    def contiguous(self, a):
        return self.xp.ascontiguousarray(a)

    def synchronize(self):
        """Waits for the device's queued work (for timings); nothing to wait for with NumPy."""
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    def rms_norm(self, x, w, eps):
        return x / self.xp.sqrt(self.xp.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos[:, None, :] + self.xp.concatenate([-x[..., half:], x[..., :half]], -1) * sin[:, None, :]

    def act(self, x, kind):
        return self.xp.maximum(x, 0) if kind == "relu" else x / (1 + self.xp.exp(-x))

    def active_columns(self, g) -> np.ndarray:
        """Host int32 ids of the columns of g with any positive entry."""
        return self.to_host(self.xp.flatnonzero((g > 0).any(axis=0))).astype(np.int32)


class TorchOps(ArrayOps):
    """ArrayOps for PyTorch tensors on `device` ('cpu' or 'cuda[:N]'). rms_norm and rope are
    inherited: torch takes NumPy's mean(axis=, keepdims=) and concatenate spellings."""

    def __init__(self, device="cpu"):
        import torch

        super().__init__(torch, device)

    def to_device(self, host_array, dtype="float32"):
        return self.xp.from_numpy(np.ascontiguousarray(host_array, dtype=dtype)).to(self.device)

    def from_store(self, a):
        return a if isinstance(a, self.xp.Tensor) else self.xp.from_dlpack(a)

    def to_host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else a.cpu().numpy()

    def contiguous(self, a):
        return a.contiguous()

    def synchronize(self):
        if self.device.startswith("cuda"):
            self.xp.cuda.synchronize()

    def act(self, x, kind):
        return self.xp.relu(x) if kind == "relu" else self.xp.nn.functional.silu(x)

    def active_columns(self, g) -> np.ndarray:
        return self.to_host(self.xp.nonzero((g > 0).any(dim=0)).flatten()).astype(np.int32)


def array_ops(device: str = "cpu", framework: str = "auto") -> ArrayOps:
    """ArrayOps for a device ('cpu', 'cuda', 'cuda:N') and framework ('numpy', 'torch', 'cupy' or
    'auto': NumPy on the CPU; on a GPU PyTorch if it sees one, else CuPy). Raises ValueError when
    the combination cannot run here."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    on_gpu = device.startswith("cuda")
    if framework == "auto":
        if not on_gpu:
            framework = "numpy"
        else:
            try:
                import torch

                framework = "torch" if torch.cuda.is_available() else "cupy"
            except ImportError:
                framework = "cupy"
    if framework == "numpy":
        if on_gpu:
            raise ValueError("NumPy arrays live on the CPU: use framework 'torch' or 'cupy' with a CUDA device")
        return ArrayOps(np)
    if framework == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError("framework 'torch' needs PyTorch (pip install torch)") from None
        if on_gpu and not torch.cuda.is_available():
            raise ValueError("PyTorch sees no CUDA device (a CPU-only build, or no GPU on this machine)")
        return TorchOps(device)
    if framework == "cupy":
        if not on_gpu:
            raise ValueError("CuPy arrays live on a GPU: use --device cuda, or framework 'numpy' on the CPU")
        try:
            import cupy
        except ImportError:
            raise ValueError("a CUDA device needs PyTorch or CuPy for the model's arrays; neither is installed") from None
        index = int(device.split(":")[1]) if ":" in device else 0
        cupy.cuda.Device(index).use()
        return ArrayOps(cupy, device)
    raise ValueError(f"framework: expected 'auto', 'numpy', 'torch' or 'cupy', got {framework!r}")


class StreamedModel:
    """The memkernels pipeline over an opened weight store, its arrays held by `ops` (NumPy on the
    CPU by default). The store must be opened on the same device as `ops`."""

    def __init__(self, store: WeightStore, max_tokens: int, max_seqs: int, page_size: int = 16,
                 ops: ArrayOps | None = None):
        self.ops = ops = ops or ArrayOps(np)
        if store.device.split(":")[0] != ops.device.split(":")[0]:
            raise ValueError(f"the weight store is on {store.device} but the model runs on {ops.device}")
        self.store = store
        get = lambda name: ops.from_store(store.get(name))  # noqa: E731
        host = lambda name: ops.to_host(get(name))  # noqa: E731
        self.cfg = cfg = ModelConfig(**json.loads(host("config.json").tobytes().decode()))
        self.embed, self.norm, self.lm_head = (get(n) for n in ("model.embed_tokens.weight", "model.norm.weight",
                                                                  "lm_head.weight"))
        # the quantized and sparse matrices are parsed (and checked) on the host, then moved
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            L = {p: from_bytes(host(layer_name(i, p)).tobytes()).to(ops.device) for p in ATTN_PROJ}
            L["gate"] = SparseMatrix.from_bytes(host(layer_name(i, "gate_proj")).tobytes()).to(ops.device)
            L["ln1"] = get(layer_name(i, "input_layernorm"))
            L["ln2"] = get(layer_name(i, "post_attention_layernorm"))
            L["gate_bias"] = get(gate_bias_name(i)) if gate_bias_name(i) in store else 0.0
            self.layers.append(L)
        cos, sin = rope_tables(np.arange(max_tokens), cfg.head_dim, cfg.rope_theta)
        self.rope_cos, self.rope_sin = ops.to_device(cos), ops.to_device(sin)
        pages = max_seqs * (-(-max_tokens // page_size) + 1) + 4
        self.cache = PagedKVCache(cfg.num_hidden_layers, pages, page_size, cfg.num_key_value_heads, cfg.head_dim,
                                  "float32", ops.device)
        self.active_fraction = []

    def _ffn(self, i, x):
        """Gated FFN over the neurons active for any of the rows of x, streamed from the store."""
        L, ops = self.layers[i], self.ops
        g = spmm(L["gate"], x) + L["gate_bias"]                  # (tokens, d_ff), sparse gate
        if self.cfg.hidden_act == "relu":
            ids = ops.active_columns(g)
        else:
            ids = np.arange(g.shape[1], dtype=np.int32)
        self.active_fraction.append(len(ids) / g.shape[1])
        if len(ids) == 0:  # no neuron fires for these tokens: the FFN adds nothing
            return x * 0
        rows = ops.from_store(self.store.get_rows(i, ids))      # (k, 2, d_model): up rows, down columns
        up, down = rows[:, 0], rows[:, 1]
        h = ops.act(g[:, ops.to_device(ids, "int64")], self.cfg.hidden_act) * (x @ up.T)  # (tokens, k)
        return h @ down                                          # (tokens, d_model)

    def _layer(self, i, x, seq_ids, positions, q_lens, prefill: bool):
        cfg, L, ops = self.cfg, self.layers[i], self.ops
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = ops.rms_norm(x, L["ln1"], cfg.rms_norm_eps)
        # exact=True: the demo is checked against its float64 twin to 1e-3 (qgemm's int8-activation
        # default would add up to sum|w| * max|x| / 254 per output)
        q = ops.contiguous(ops.rope(qgemm(h, L["q_proj"], exact=True).reshape(-1, nh, hd), cos, sin))
        k = ops.contiguous(ops.rope(qgemm(h, L["k_proj"], exact=True).reshape(-1, nkv, hd), cos, sin))
        v = qgemm(h, L["v_proj"], exact=True).reshape(-1, nkv, hd)
        self.cache.append(seq_ids, i, k, v, counts=q_lens)
        if prefill:  # one sequence: flash attention over the prompt itself
            attn = flash_attention(q[None], k[None], v[None], causal=True)[0]
        else:        # decode: paged attention over every sequence's cached K/V
            attn = paged_attention(q, self.cache, i, seq_ids)
        x = x + qgemm(attn.reshape(-1, nh * hd), L["o_proj"], exact=True)
        h = ops.rms_norm(x, L["ln2"], cfg.rms_norm_eps)
        return x + self._ffn(i, h)

    def forward(self, seq_ids, tokens, positions, q_lens, prefill) -> np.ndarray:
        """Logits (tokens, vocab) as a host float32 array."""
        ops = self.ops
        x = self.embed[ops.to_device(tokens, "int64")]
        positions = ops.to_device(positions, "int64")
        for i in range(self.cfg.num_hidden_layers):
            x = self._layer(i, x, seq_ids, positions, q_lens, prefill)
        self.store.next_token()
        return ops.to_host(ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps) @ self.lm_head.T)


class ReferenceModel:
    """The same model in float64 NumPy, weights dequantized / pruned exactly as stored."""

    def __init__(self, store: WeightStore):
        self.cfg = cfg = ModelConfig(**json.loads(store.get("config.json").tobytes().decode()))
        f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        self.embed, self.norm, self.lm_head = (f64(store.get(n)) for n in
                                               ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))
        self.layers = []
        all_ids = np.arange(cfg.intermediate_size, dtype=np.int32)
        for i in range(cfg.num_hidden_layers):
            L = {p: f64(dequantize(from_bytes(store.get(layer_name(i, p)).tobytes()))) for p in ATTN_PROJ}
            L["gate"] = f64(SparseMatrix.from_bytes(store.get(layer_name(i, "gate_proj")).tobytes()).to_dense())
            rows = f64(store.get_rows(i, all_ids))
            L["up"], L["down"] = rows[:, 0], rows[:, 1]
            L["ln1"] = f64(store.get(layer_name(i, "input_layernorm")))
            L["ln2"] = f64(store.get(layer_name(i, "post_attention_layernorm")))
            L["gate_bias"] = f64(store.get(gate_bias_name(i))) if gate_bias_name(i) in store else 0.0
            self.layers.append(L)

    def logits(self, tokens):
        """Logits at every position of one token sequence (full causal attention, no cache)."""
        cfg, f64 = self.cfg, ArrayOps(np)
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        n = len(tokens)
        cos, sin = rope_tables(np.arange(n), hd, cfg.rope_theta)
        x = self.embed[np.asarray(tokens)]
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for L in self.layers:
            h = f64.rms_norm(x, L["ln1"], cfg.rms_norm_eps)
            q = f64.rope((h @ L["q_proj"].T).reshape(n, nh, hd), cos, sin)
            k = f64.rope((h @ L["k_proj"].T).reshape(n, nkv, hd), cos, sin)
            v = (h @ L["v_proj"].T).reshape(n, nkv, hd)
            k, v = (np.repeat(a, nh // nkv, axis=1) for a in (k, v))
            s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + np.einsum("hij,jhd->ihd", p, v).reshape(n, nh * hd) @ L["o_proj"].T
            h = f64.rms_norm(x, L["ln2"], cfg.rms_norm_eps)
            x = x + (f64.act(h @ L["gate"].T + L["gate_bias"], cfg.hidden_act) * (h @ L["up"].T)) @ L["down"]
        return f64.rms_norm(x, self.norm, cfg.rms_norm_eps) @ self.lm_head.T


def generate(store: WeightStore, prompts, new_tokens: int, *, fork_after_prefill: bool = True, progress=True,
             ops: ArrayOps | None = None):
    """Prefills each prompt (flash attention), forks the first sequence (its copy takes a different
    first token), then decodes `new_tokens` tokens greedily for every sequence at once (paged
    attention). `ops` picks the framework and device (default NumPy, CPU); the store must be open on
    that device. Returns (token lists, host logits per sequence {position: logits}, timings, model)."""
    max_len = max(len(p) for p in prompts) + new_tokens + 1
    model = StreamedModel(store, max_len, len(prompts) + 1, ops=ops)
    seqs, tokens, logits, t = [], [], [], {}
    t0 = time.perf_counter()
    for p in prompts:
        sid = model.cache.add_sequence()
        out = model.forward([sid], p, np.arange(len(p)), [len(p)], prefill=True)
        seqs.append(sid)
        tokens.append(list(p) + [int(out[-1].argmax())])
        logits.append({len(p) - 1: out[-1]})
    t["prefill"] = time.perf_counter() - t0
    if fork_after_prefill:
        child = model.cache.fork(seqs[0])
        seqs.append(child)
        alt = logits[0][len(prompts[0]) - 1].argsort()[-2]      # the runner-up token
        tokens.append(tokens[0][:-1] + [int(alt)])
        logits.append(dict(logits[0]))
    t0 = time.perf_counter()
    for step in range(new_tokens):
        last = [tk[-1] for tk in tokens]
        pos = [len(tk) - 1 for tk in tokens]
        out = model.forward(seqs, last, pos, None, prefill=False)
        for b in range(len(seqs)):
            logits[b][pos[b]] = out[b]
            tokens[b].append(int(out[b].argmax()))
        _progress("decode", step + 1, new_tokens, progress)
    model.ops.synchronize()
    t["decode"] = time.perf_counter() - t0
    t["decode_tokens"] = new_tokens * len(seqs)
    t["forward_passes"] = len(prompts) + new_tokens
    return tokens, logits, t, model


def max_logit_error(store: WeightStore, tokens, logits, progress=True) -> float:
    """Largest |logit - reference| over every position every sequence produced. A store opened on a
    GPU is reopened on the CPU for the reference's weights."""
    if store.device != "cpu":
        with WeightStore.open(store.path, store.dram_budget_bytes) as cpu_store:
            return max_logit_error(cpu_store, tokens, logits, progress)
    ref = ReferenceModel(store)
    err = 0.0
    for b, (tk, lg) in enumerate(zip(tokens, logits)):
        _progress("float64 reference", b, len(tokens), progress)
        full = ref.logits(tk[:-1])
        for pos, row in lg.items():
            err = max(err, float(np.max(np.abs(full[pos] - row))))
    _progress("float64 reference", len(tokens), len(tokens), progress)
    return err


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


__all__ = ["ModelConfig", "random_weights", "load_checkpoint", "prepare_store", "StreamedModel", "ReferenceModel",
           "generate", "max_logit_error"]
