"""One Llama-family forward (llama, mistral, qwen2, gemma, gemma2, phi3) on memkernels kernels.

`Model` holds the weights "as stored": float weights as float32 arrays (float16/bfloat16
checkpoints are converted to float32 once at load; the matmuls are float32), quantized weights
(GGUF, or `quantize=` at load) as `QuantizedMatrix` run by `qgemm`. K/V live in one
`PagedKVCache` per model: prefill appends the prompt's K/V and runs `paged_attention` over the
cache with per-sequence query lengths, decode runs it for every active sequence at once, and
prompts sharing full pages of a prefix reuse them. RMSNorm, RoPE and activations are array code in
float32 through `ArrayOps` (NumPy on the CPU; PyTorch or CuPy arrays with device="cuda").

`Model.reference_logits` is the float64 NumPy forward of the same weights (QuantizedMatrix
dequantized) with plain full attention and no memkernels kernel: what `--check` compares with.
"""
from __future__ import annotations

import inspect
import math
import time

import numpy as np

from .. import attention as _attention
from .. import paged as _paged
from ..model import ArrayOps, array_ops
from ..quant import QuantizedMatrix, dequantize, qgemm, quantize as _quantize
from .config import ModelConfig, UnsupportedModelError
from .weights import as_float64, check_tensors

PAGE_SIZE = 16


def paged_attention_has_window() -> bool:
    """True once paged_attention takes window= (sliding-window layers then decode on the pages)."""
    return "window" in inspect.signature(_paged.paged_attention).parameters


def _gelu_erf(xp, x):
    if xp is np:
        from scipy.special import erf  # NumPy has no erf
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))).astype(x.dtype)
    fn = getattr(xp, "erf", None) or __import__("cupyx.scipy.special", fromlist=["erf"]).erf
    return 0.5 * x * (1.0 + fn(x / math.sqrt(2.0)))


def activation(xp, x, kind):
    if kind in ("silu", "swish"):
        if xp is np:  # the same operations in one temporary (bit for bit)
            t = np.negative(x)
            np.exp(t, out=t)
            t += 1
            return np.divide(x, t, out=t)
        return x / (1 + xp.exp(-x))
    if kind in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    if kind == "gelu":
        return _gelu_erf(xp, x)
    if kind == "relu":
        return x * (x > 0)
    raise UnsupportedModelError(f"hidden_act {kind!r} is not supported")


def _is_single(prompts) -> bool:
    """A string or a flat sequence of token ids is one prompt; a list of those is several."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    try:
        first = prompts[0]
    except (IndexError, TypeError, KeyError):
        raise ValueError("prompts: expected a string, a list of token ids, or a non-empty list of those") from None
    return isinstance(first, (int, np.integer))


class Model:
    """A loaded checkpoint ready to run. Build with `memkernels.load_model(path)`.

    Attributes: config (ModelConfig), tokenizer (or None: then prompts are token ids), device,
    weights (HF name -> float32 array or QuantizedMatrix; quantized q/k/v and gate/up of a layer are
    held fused under self_attn.qkv_proj / mlp.gate_up_proj), quantization (None or a dict with the
    format and the measured logit drift vs the float checkpoint), last_stats (timings of the last
    generate), warnings (list of strings, e.g. GGUF K-quant conversions)."""

    def __init__(self, config: ModelConfig, tensors: dict, tokenizer=None, *, device="cpu", exact=False,
                 quantize=None, source="", warnings=(), framework="auto", embedding_rows=None,
                 _own_tensors=False):
        self.config = cfg = config
        self.tokenizer = tokenizer
        self.device = device
        self.exact = bool(exact)
        self.source = source
        self.warnings = list(warnings)
        self.weights = check_tensors(cfg, tensors)
        if _own_tensors:  # load_model's own dict: drop its references so fused-away parts are freed at once
            tensors.clear()
        self.quantization = None
        self.last_stats = {}
        # optional callable: host int64 token ids -> float32 embedding rows, bit-equal to the stored
        # (quantized) embedding's rows (GGUF: read from the memory-mapped file)
        self._embedding_rows = embedding_rows
        # the arrays between kernels: NumPy on the CPU by default; PyTorch / CuPy on a GPU (or
        # framework="torch" on the CPU, which runs the GPU driver's code path without a GPU)
        self.ops: ArrayOps = array_ops(device, framework)
        self._numpy = self.ops.xp is np
        self._cache = None
        self._rope_table = None
        # prompts are prefilled in pieces of at most this many tokens per forward (all sequences
        # together), which bounds the activations a long prompt holds; chunked prefill is exact
        self.prefill_chunk = 512
        self._prepare()
        if quantize:
            self._quantize(quantize)

    # -- weights -------------------------------------------------------------------------------
    def _prepare(self):
        """Device copies of the weights, norms with Gemma's +1 folded in, the embedding table."""
        cfg, ops, w = self.config, self.ops, self.weights
        self._fuse_projections()
        self._dev = {}
        for name, a in w.items():
            if isinstance(a, QuantizedMatrix):
                self._dev[name] = a if self.device == "cpu" else a.to(self.device)
            elif name.endswith("norm.weight"):
                # Gemma's RMSNorm multiplies by (1 + w), computed in float32 as transformers does
                self._dev[name] = ops.to_device(np.asarray(a, np.float32) + np.float32(cfg.norm_offset))
            elif self._numpy:
                self._dev[name] = np.asarray(a, dtype=np.float32)  # float32 checkpoints stay memory-mapped
            else:
                self._dev[name] = ops.to_device(a)
        emb = w["model.embed_tokens.weight"]
        # the embedding lookup gathers rows: a quantized table stays quantized and only the looked-up
        # rows are dequantized per step (the tied lm_head runs the same matrix through qgemm)
        self._embed = _QuantizedRows(emb, ops, self._embedding_rows) if isinstance(emb, QuantizedMatrix) \
            else self._dev["model.embed_tokens.weight"]
        self._head = self._dev["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        # transformers multiplies the embeddings by sqrt(hidden) rounded to the model's dtype (float32 here)
        self._embed_scale = None if cfg.embed_scale is None else float(np.float32(cfg.embed_scale))

    def _fuse_projections(self):
        """q/k/v (and gate/up) quantized alike are replaced in `weights` by one QuantizedMatrix of
        their stacked rows under the fused names (self_attn.qkv_proj, mlp.gate_up_proj, as Phi-3
        names them): one qgemm per layer instead of three (two), and no second copy in memory."""
        if self.config.fused_qkv:
            return
        from .gguf import trim_heap
        w = self.weights
        for L in range(self.config.num_hidden_layers):
            p = f"model.layers.{L}."
            for parts, fused in ((("q_proj", "k_proj", "v_proj"), "self_attn.qkv_proj"),
                                 (("gate_proj", "up_proj"), "mlp.gate_up_proj")):
                pre = p + fused.split(".")[0] + "."
                qms = [w.get(pre + n + ".weight") for n in parts]
                biases = [w.get(pre + n + ".bias") for n in parts]
                if not fuse_rows_supported(qms) or (any(b is None for b in biases) and any(b is not None for b in biases)):
                    continue
                w[p + fused + ".weight"] = fuse_rows(qms)
                if biases[0] is not None:
                    w[p + fused + ".bias"] = np.concatenate([np.asarray(b, np.float32) for b in biases])
                for n in parts:
                    w.pop(pre + n + ".weight")
                    w.pop(pre + n + ".bias", None)
                del qms
            trim_heap()  # the parts' buffers and the temporaries: back to the OS before the next layer

    def reset_cache(self):
        """Drops the KV cache (every cached sequence and prefix page); the next call starts cold."""
        self._cache = None

    def _quantize(self, fmt):
        """Quantizes every linear weight (not the embedding gather, not norms) to `fmt` and measures
        the logit drift against the float model on a fixed probe sequence."""
        cfg = self.config
        rng = np.random.default_rng(1234)
        probe = rng.integers(0, cfg.vocab_size, size=min(24, max(4, cfg.vocab_size // 4))).tolist()
        before = self.logits(probe)
        for name, a in list(self.weights.items()):
            if isinstance(a, QuantizedMatrix) or a.ndim != 2 or name == "model.embed_tokens.weight" \
                    and not cfg.tie_word_embeddings:
                continue
            gs = None
            if fmt != "int8":  # the largest group that divides in_features; else 128 with a partial last group
                gs = next((g for g in (128, 64, 32) if a.shape[1] % g == 0), 128)
            self.weights[name] = _quantize(np.ascontiguousarray(a, dtype=np.float32), fmt, group_size=gs)
        self._prepare()
        after = self.logits(probe)
        err = float(np.abs(after - before).max())
        scale = float(np.abs(before).max())
        self.quantization = {"format": fmt, "probe_tokens": len(probe), "max_abs_logit_drift": err,
                             "relative_logit_drift": err / max(scale, 1e-30)}

    # -- building blocks -------------------------------------------------------------------------
    def _linear(self, x, name, bias_name=None):
        w = self._dev[name]
        b = self._dev.get(bias_name) if bias_name else None
        if isinstance(w, QuantizedMatrix):
            return qgemm(self.ops.contiguous(x), w, b, int8_activations=not self.exact)
        y = x @ w.T
        return y + b if b is not None else y

    def _norm(self, x, name):
        if self._numpy and x.ndim == 2 and x.dtype == np.float32:
            # NumPy: the same operations as ArrayOps.rms_norm (sum / n is what mean does), bit for bit,
            # with two temporaries instead of six
            y = np.multiply(x, x)
            ms = np.add.reduce(y, axis=-1, keepdims=True)
            ms /= x.shape[-1]
            ms += self.config.rms_norm_eps
            np.sqrt(ms, out=ms)
            np.divide(x, ms, out=y)
            y *= self._dev[name]
            return y
        return self.ops.rms_norm(x, self._dev[name], self.config.rms_norm_eps)

    def _rope_tables(self, starts, lens):
        """cos, sin (tokens, rotary_dim) for each sequence's new positions. 'dynamic' rope takes its
        frequencies from each sequence's length at this step, as transformers does running that
        sequence alone (keys already cached keep the rotation they were stored with)."""
        rope, parts = self.config.rope, []
        if rope.rope_type != "dynamic":
            # positions' rows of a table grown on demand (same values as computing them per step)
            end = max(s + n for s, n in zip(starts, lens))
            if self._rope_table is None or self._rope_table[0].shape[0] < end:
                size = max(end, 256, 0 if self._rope_table is None else 2 * self._rope_table[0].shape[0])
                inv, att = rope.inv_freq(None)
                ang = np.arange(size, dtype=np.float64)[:, None] * inv[None, :]
                cos, sin = np.cos(ang) * att, np.sin(ang) * att
                self._rope_table = (self.ops.to_device(np.concatenate([cos, cos], -1)),
                                    self.ops.to_device(np.concatenate([sin, sin], -1)))
            if len(starts) == 1:
                sl = slice(starts[0], starts[0] + lens[0])
                return self._rope_table[0][sl], self._rope_table[1][sl]
            pos = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
            pos = pos if self._numpy else self.ops.to_device(pos, "int64")
            return self._rope_table[0][pos], self._rope_table[1][pos]
        for s, n in zip(starts, lens):
            inv, att = rope.inv_freq(s + n if rope.rope_type == "dynamic" else None)
            ang = np.arange(s, s + n, dtype=np.float64)[:, None] * inv[None, :]
            parts.append((np.cos(ang) * att, np.sin(ang) * att))
        cos = np.concatenate([p[0] for p in parts])
        sin = np.concatenate([p[1] for p in parts])
        return (self.ops.to_device(np.concatenate([cos, cos], -1)), self.ops.to_device(np.concatenate([sin, sin], -1)))

    def _rope(self, x, cos, sin):
        rd = self.config.rope.rotary_dim
        if rd == x.shape[-1] and self._numpy:
            # ArrayOps.rope's operations (x * cos + rotate_half(x) * sin) in place, bit for bit
            half, c, s = rd // 2, cos[:, None, :], sin[:, None, :]
            rot = np.empty(x.shape, np.float32)
            np.negative(x[..., half:], out=rot[..., :half])
            rot[..., half:] = x[..., :half]
            rot *= s
            out = np.multiply(x, c)
            out += rot
            return out
        if rd == x.shape[-1]:
            return self.ops.rope(x, cos, sin)
        xp = self.ops.xp  # partial rotary (phi3): the leading rd dims rotate, the rest pass through
        return xp.concatenate([self.ops.rope(x[..., :rd], cos, sin), x[..., rd:]], -1)

    def _attention(self, q, layer, seq_ids, q_lens, kv_lens):
        cfg = self.config
        w = cfg.window(layer)
        if w is not None and max(kv_lens) <= w + 1:
            w = None  # every key is inside the window
        kw = dict(scale=cfg.scale(), softcap=cfg.attn_softcap)
        if w is None:
            return _paged.paged_attention(q, self._cache, layer, seq_ids, q_lens=q_lens, **kw)
        if paged_attention_has_window():
            return _paged.paged_attention(q, self._cache, layer, seq_ids, q_lens=q_lens, window=w, **kw)
        # until paged_attention takes window=: flash attention over each sequence's cached K/V
        outs, at = [], 0
        for sid, n in zip(seq_ids, q_lens):
            k, v = (self.ops.to_device(a) for a in self._cache.read_kv(sid, layer))
            outs.append(_attention.flash_attention(q[None, at:at + n], k[None], v[None], causal=True, window=w,
                                                   **kw)[0])
            at += n
        return self.ops.xp.concatenate(outs, 0) if len(outs) > 1 else outs[0]

    def _embedding(self, tokens):
        """Embedding rows of host token ids (int64) as an activation array."""
        idx = tokens if self._numpy else self.ops.to_device(tokens, "int64")
        return self._embed[idx]

    def _mlp(self, h, L, p):
        """The FFN of layer L (prefix p) on normed activations h (tokens, hidden)."""
        cfg, xp = self.config, self.ops.xp
        if p + "mlp.gate_up_proj.weight" in self._dev:  # Phi-3's own fused gate_up, or gate/up fused at load
            gu = self._linear(h, p + "mlp.gate_up_proj.weight", p + "mlp.gate_up_proj.bias")
            g, u = gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:]
        else:
            mb = cfg.mlp_bias
            g = self._linear(h, p + "mlp.gate_proj.weight", p + "mlp.gate_proj.bias" if mb else None)
            u = self._linear(h, p + "mlp.up_proj.weight", p + "mlp.up_proj.bias" if mb else None)
        m = self._linear(activation(xp, g, cfg.hidden_act) * u, p + "mlp.down_proj.weight",
                         p + "mlp.down_proj.bias" if cfg.mlp_bias else None)
        return m

    # -- the forward ---------------------------------------------------------------------------
    def _ensure_cache(self, pages_needed):
        cfg = self.config
        if self._cache is None or self._cache.num_pages < pages_needed:
            n = max(pages_needed, 2 * self._cache.num_pages if self._cache is not None else 64)
            self._cache = _paged.PagedKVCache(cfg.num_hidden_layers, n, PAGE_SIZE, cfg.num_key_value_heads,
                                              cfg.head_dim, "float32", device=self.device)

    @property
    def cache(self):
        """The model's PagedKVCache (created on first use, grown when a call needs more pages)."""
        return self._cache

    def _forward(self, seq_ids, chunks, starts, all_rows=False):
        """Runs new tokens of several sequences through the model, appending their K/V to the cache.

        chunks[i]: token ids of seq_ids[i] at positions starts[i]... Returns host float32 logits of
        every row (all_rows) or of each sequence's last row."""
        cfg, ops, xp = self.config, self.ops, self.ops.xp
        lens = [len(c) for c in chunks]
        kv_lens = [s + n for s, n in zip(starts, lens)]
        tokens = np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks])
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}")
        cos, sin = self._rope_tables(starts, lens)
        x = self._embedding(tokens)
        if self._embed_scale is not None:
            x = x * self._embed_scale
        T, H, KV, D = len(tokens), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for L in range(cfg.num_hidden_layers):
            p = f"model.layers.{L}."
            h = self._norm(x, p + "input_layernorm.weight")
            if p + "self_attn.qkv_proj.weight" in self._dev:
                qkv = self._linear(h, p + "self_attn.qkv_proj.weight", p + "self_attn.qkv_proj.bias")
                q, k, v = qkv[:, :cfg.q_dim], qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim], qkv[:, cfg.q_dim + cfg.kv_dim:]
            else:
                bias = cfg.attention_bias or cfg.qkv_bias
                q, k, v = (self._linear(h, p + f"self_attn.{n}.weight", p + f"self_attn.{n}.bias" if bias else None)
                           for n in ("q_proj", "k_proj", "v_proj"))
            q = ops.contiguous(self._rope(q.reshape(T, H, D), cos, sin))
            k = ops.contiguous(self._rope(k.reshape(T, KV, D), cos, sin))
            v = ops.contiguous(v.reshape(T, KV, D))
            self._cache.append(seq_ids, L, k, v, counts=lens)
            a = self._attention(q, L, seq_ids, lens, kv_lens).reshape(T, H * D)
            o = self._linear(a, p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias" if cfg.attention_bias
                             else None)
            if cfg.sandwich_norms:
                o = self._norm(o, p + "post_attention_layernorm.weight")
            x = x + o
            h = self._norm(x, p + ("pre_feedforward_layernorm.weight" if cfg.sandwich_norms
                                   else "post_attention_layernorm.weight"))
            m = self._mlp(h, L, p)
            if cfg.sandwich_norms:
                m = self._norm(m, p + "post_feedforward_layernorm.weight")
            x = x + m
        if not all_rows:
            x = x[np.cumsum(lens) - 1] if self._numpy else x[ops.to_device(np.cumsum(lens) - 1, "int64")]
        x = self._norm(x, "model.norm.weight")
        if isinstance(self._head, QuantizedMatrix):
            logits = qgemm(ops.contiguous(x), self._head, int8_activations=not self.exact)
        else:
            logits = x @ self._head.T
        if cfg.final_softcap is not None:
            logits = xp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return np.asarray(ops.to_host(logits), dtype=np.float32)

    def _prefill(self, seq_ids, chunks, starts, all_rows=False):
        """_forward in pieces of at most prefill_chunk tokens; logits of every row (all_rows) or of
        each sequence's last row, as one forward would give."""
        budget = max(1, int(self.prefill_chunk))
        done = [0] * len(chunks)
        rows = [[] for _ in chunks]
        last = [None] * len(chunks)
        while any(d < len(c) for d, c in zip(done, chunks)):
            take, left = [], budget
            for i, c in enumerate(chunks):
                n = min(len(c) - done[i], left)
                if n > 0:
                    take.append((i, n))
                    left -= n
                if left == 0:
                    break
            out = self._forward([seq_ids[i] for i, _ in take], [chunks[i][done[i]:done[i] + n] for i, n in take],
                                [starts[i] + done[i] for i, _ in take], all_rows=all_rows)
            at = 0
            for i, n in take:
                if all_rows:
                    rows[i].append(out[at:at + n])
                    at += n
                else:
                    last[i] = out[at]
                    at += 1
                done[i] += n
        if all_rows:
            return np.concatenate([r for rr in rows for r in rr])
        return np.stack(last)

    # -- public API ----------------------------------------------------------------------------
    def _tokens(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.json / GGUF vocabulary): give token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError("a prompt must have at least one token")
        return ids

    def logits(self, token_ids) -> np.ndarray:
        """(len, vocab) float32 logits of every position of a fresh sequence (nothing cached reused)."""
        ids = self._tokens(token_ids)
        self._ensure_cache(-(-len(ids) // PAGE_SIZE) + 1)
        sid = self._cache.add_sequence()
        try:
            return self._prefill([sid], [ids], [0], all_rows=True)
        finally:
            self._cache.free(sid)

    def generate(self, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=None, stop_at_eos=True,
                 callback=None):
        """Generates for one prompt (a string or a list of token ids) or several (a list of them).

        All prompts share the model's paged KV cache: full pages of a prompt prefix already cached
        (from an earlier prompt or call) are reused, the rest is prefilled in one batched pass, and
        decode steps run every unfinished sequence together. temperature 0: greedy; otherwise
        sampling from softmax(logits / temperature) restricted to the top_p nucleus, seeded by seed.
        callback(prompt_index, token_id) is called for each new token as it is chosen (streaming).
        Returns the new token ids: a list for one prompt, a list of lists for several.
        Timings of the call are in `last_stats`."""
        single = _is_single(prompts)
        plist = [prompts] if single else list(prompts)
        if not plist:
            raise ValueError("prompts: expected a prompt or a non-empty list of prompts")
        toks = [self._tokens(p) for p in plist]
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not (0 < top_p <= 1):
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        eos = set()
        if stop_at_eos:
            eos = set(getattr(self.tokenizer, "eos_token_ids", None) or ()) | self.config.eos_ids()
        rng = np.random.default_rng(seed)
        self._ensure_cache(sum(-(-(len(t) + max_new_tokens) // PAGE_SIZE) + 1 for t in toks) + 1)
        cache = self._cache
        # prompts whose first page repeats an earlier prompt's wait for a second prefill pass, so the
        # cache offers them the pages the first pass filled (prefix reuse within one call)
        wave, seen = [0] * len(toks), set()
        for i, t in enumerate(toks):
            key = tuple(t[:PAGE_SIZE]) if len(t) > PAGE_SIZE else None
            if key is not None and key in seen:
                wave[i] = 1
            elif key is not None:
                seen.add(key)
        seqs, starts = [None] * len(toks), [0] * len(toks)
        logits = np.zeros((len(toks), self.config.vocab_size), np.float32)
        out = [[] for _ in toks]
        n_prefill, t_prefill = 0, 0.0
        try:
            for w in (0, 1):
                batch = [i for i in range(len(toks)) if wave[i] == w]
                if not batch:
                    continue
                for i in batch:
                    t = toks[i]
                    sid = cache.add_sequence(prefix_tokens=t)
                    seqs[i] = sid
                    cached = cache.length(sid)
                    if cached >= len(t):  # keep one token to compute: its logits pick the first new token
                        cache.truncate(sid, len(t) - 1)
                        cached = len(t) - 1
                    starts[i] = cached
                if not max_new_tokens:
                    continue
                chunks = [toks[i][starts[i]:] for i in batch]
                t0 = time.perf_counter()
                logits[batch] = self._prefill([seqs[i] for i in batch], chunks, [starts[i] for i in batch])
                t_prefill += time.perf_counter() - t0
                n_prefill += sum(len(c) for c in chunks)
            lengths = [len(t) for t in toks]
            active = list(range(len(toks)))
            n_decode, t_decode = 0, 0.0
            while max_new_tokens and active:
                nxt = []
                for row, i in enumerate(active):
                    tok = sample(logits[row], temperature, top_p, rng)
                    out[i].append(tok)
                    if callback is not None:
                        callback(i, tok)
                    if not (tok in eos or len(out[i]) >= max_new_tokens):
                        nxt.append(i)
                active = nxt
                if not active:
                    break
                t0 = time.perf_counter()
                logits = self._forward([seqs[i] for i in active], [[out[i][-1]] for i in active],
                                       [lengths[i] + len(out[i]) - 1 for i in active])
                t_decode += time.perf_counter() - t0
                n_decode += len(active)
        finally:
            for sid in seqs:
                if sid is not None:
                    cache.free(sid)
        self.last_stats = {"prefill_tokens": n_prefill, "prefill_s": t_prefill, "decode_tokens": n_decode,
                           "decode_s": t_decode, "reused_prefix_tokens": sum(starts)}
        return out[0] if single else out

    def reference_logits(self, token_ids) -> np.ndarray:
        """(len, vocab) float64 logits from a NumPy forward of the model's own weights (quantized
        ones dequantized), with full attention per position and no memkernels kernel."""
        return reference_forward(self.config, self.weights, self._tokens(token_ids))


class _QuantizedRows:
    """Row gather (``rows[idx]``) from a quantized embedding without a float copy of the table:
    each step dequantizes only the looked-up rows, bit-equal to ``dequantize(qm)[idx]``."""

    def __init__(self, qm, ops, rows_fn=None):
        self.qm, self.ops, self.shape = qm, ops, tuple(qm.shape)
        self._fn = rows_fn
        self._codes = self._scales = None
        if rows_fn is None and qm.format == "int8" and not qm.double_quant and qm.device == "cpu":
            # int8 rows are plain int8 codes (quant.h): view them in the serialized copy (header 64 bytes)
            n, k = self.shape
            self._raw = qm.to_bytes()
            self._codes = np.frombuffer(self._raw, np.int8, n * k, 64).reshape(n, k)
            self._scales = np.asarray(qm.scales(), np.float32).reshape(n, -1)
        elif rows_fn is None:  # other formats: dequantized once (as before)
            self._full = ops.to_device(np.asarray(dequantize(qm), np.float32)) if qm.device == "cpu" else None
            if self._full is None:
                raise UnsupportedModelError("a GPU quantized embedding needs its rows from the checkpoint")

    def __getitem__(self, idx):
        if self._fn is None and self._codes is None:
            return self._full[idx]
        ids = np.asarray(self.ops.to_host(idx) if not isinstance(idx, np.ndarray) else idx, np.int64)
        if self._fn is not None:
            rows = np.asarray(self._fn(ids), np.float32)
        else:
            n, k = len(ids), self.shape[1]
            s = self._scales[ids]
            rows = (self._codes[ids].astype(np.float32).reshape(n, s.shape[1], -1) * s[..., None]).reshape(n, k)
        return rows if self.ops.xp is np else self.ops.to_device(rows)


_FUSABLE = ("int8", "int4_sym", "int4_min", "nf4")


def fuse_rows_supported(qms) -> bool:
    """Whether fuse_rows can stack these matrices (same CPU format, group size and in_features)."""
    if not qms or any(not isinstance(q, QuantizedMatrix) for q in qms):
        return False
    a = qms[0]
    return all(q.device == "cpu" and q.format == a.format and q.format in _FUSABLE and not q.double_quant
               and q.group_size == a.group_size and q.in_features == a.in_features for q in qms)


def _codes_of(qm) -> np.ndarray:
    """The (rows, cols) uint8 codes of a CPU int8 / 4-bit QuantizedMatrix, from its packed layout
    (quant.h: rows of 32-weight chunks, padded to whole groups; 4-bit chunk byte i = weight i low
    nibble, i + 16 high)."""
    n, k = qm.shape
    kp = qm.padded_in_features
    raw = qm.to_bytes()
    if qm.bits == 8:
        return np.frombuffer(raw, np.uint8, n * kp, 64).reshape(n, kp)[:, :k]
    b = np.frombuffer(raw, np.uint8, n * kp // 2, 64).reshape(n, kp // 32, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=-1).reshape(n, kp)[:, :k]


def fuse_rows(qms):
    """One QuantizedMatrix whose rows are those of `qms` stacked (same values, bit for bit)."""
    from ..quant import pack_quantized
    a = qms[0]
    codes = np.concatenate([_codes_of(q) for q in qms])
    scales = np.concatenate([np.asarray(q.scales(), np.float32).reshape(q.out_features, -1) for q in qms])
    mins = None
    if a.format == "int4_min":
        mins = np.concatenate([np.asarray(q.mins(), np.float32).reshape(q.out_features, -1) for q in qms])
    return pack_quantized(a.format, codes, scales, mins=mins, group_size=a.group_size)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def reference_forward(cfg: ModelConfig, weights: dict, ids) -> np.ndarray:
    """The checkpoint's forward in float64 NumPy for one fresh sequence (see Model.reference_logits)."""
    W = {}

    # Model fuses quantized q/k/v and gate/up (qkv_proj, gate_up_proj): their rows, split back
    qkv = (("q_proj", 0, cfg.q_dim), ("k_proj", cfg.q_dim, cfg.q_dim + cfg.kv_dim),
           ("v_proj", cfg.q_dim + cfg.kv_dim, cfg.q_dim + 2 * cfg.kv_dim))
    split = {f".self_attn.{n}.": (".self_attn.qkv_proj.", a, b) for n, a, b in qkv}
    split.update({".mlp.gate_proj.": (".mlp.gate_up_proj.", 0, cfg.intermediate_size),
                  ".mlp.up_proj.": (".mlp.gate_up_proj.", cfg.intermediate_size, 2 * cfg.intermediate_size)})

    def w(name):
        if name not in W:
            if name in weights:
                W[name] = as_float64(weights[name])
            else:
                part = next(k for k in split if k in name)
                fused, a, b = split[part]
                W[name] = w(name.replace(part, fused))[a:b]
        return W[name]

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * (w(name) + cfg.norm_offset)

    def lin(x, name, bias=None):
        y = x @ w(name).T
        return y + w(bias) if bias else y

    def act(x):
        if cfg.hidden_act in ("silu", "swish"):
            return x / (1 + np.exp(-x))
        if cfg.hidden_act == "gelu":
            from scipy.special import erf
            return 0.5 * x * (1 + erf(x / math.sqrt(2)))
        if cfg.hidden_act == "relu":
            return np.maximum(x, 0)
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T, H, KV, D, rd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope.rotary_dim
    inv, att = cfg.rope.inv_freq(T)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang) * att, np.sin(ang) * att

    def rope(x):  # x (T, heads, D): rotate-half on the leading rd dims
        x1, x2, rest = x[..., :rd // 2], x[..., rd // 2:rd], x[..., rd:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)

    emb = w("model.embed_tokens.weight")
    x = emb[np.asarray(ids)]
    if cfg.embed_scale is not None:
        x = x * float(np.float32(cfg.embed_scale))
    i_idx, j_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        h = norm(x, p + "input_layernorm.weight")
        if cfg.fused_qkv:
            qkv = lin(h, p + "self_attn.qkv_proj.weight")
            q, k, v = qkv[:, :cfg.q_dim], qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim], qkv[:, cfg.q_dim + cfg.kv_dim:]
        else:
            b = cfg.attention_bias or cfg.qkv_bias
            q, k, v = (lin(h, p + f"self_attn.{n}.weight", p + f"self_attn.{n}.bias" if b else None)
                       for n in ("q_proj", "k_proj", "v_proj"))
        q, k, v = rope(q.reshape(T, H, D)), rope(k.reshape(T, KV, D)), v.reshape(T, KV, D)
        g = H // KV
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("ihd,jhd->hij", q, k) * cfg.scale()
        if cfg.attn_softcap:
            s = np.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
        mask = j_idx <= i_idx
        win = cfg.layer_windows[L]
        if win is not None:
            mask = mask & (j_idx > i_idx - win)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hij,jhd->ihd", s, v).reshape(T, H * D)
        o = lin(a, p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias" if cfg.attention_bias else None)
        if cfg.sandwich_norms:
            o = norm(o, p + "post_attention_layernorm.weight")
        x = x + o
        h = norm(x, p + ("pre_feedforward_layernorm.weight" if cfg.sandwich_norms else "post_attention_layernorm.weight"))
        if cfg.fused_qkv:
            gu = lin(h, p + "mlp.gate_up_proj.weight")
            gt, up = gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:]
        else:
            mb = cfg.mlp_bias
            gt = lin(h, p + "mlp.gate_proj.weight", p + "mlp.gate_proj.bias" if mb else None)
            up = lin(h, p + "mlp.up_proj.weight", p + "mlp.up_proj.bias" if mb else None)
        m = lin(act(gt) * up, p + "mlp.down_proj.weight", p + "mlp.down_proj.bias" if cfg.mlp_bias else None)
        if cfg.sandwich_norms:
            m = norm(m, p + "post_feedforward_layernorm.weight")
        x = x + m
    x = norm(x, "model.norm.weight")
    logits = x @ w("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight").T
    if cfg.final_softcap:
        logits = np.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits
