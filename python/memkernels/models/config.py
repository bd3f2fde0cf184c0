"""Model configuration: a Hugging Face config.json read completely or refused.

`ModelConfig.from_dict` understands the Llama family as transformers 4 and 5 write it (llama,
mistral, qwen2, gemma, gemma2, phi3): RoPE under `rope_theta` + `rope_scaling` (transformers 4)
or `rope_parameters` (transformers 5), scaling types default / linear / dynamic / llama3 / yarn,
explicit `head_dim`, tied embeddings, attention / MLP biases, sliding windows (all layers,
`max_window_layers`, or per-layer `layer_types`), Gemma's (1 + w) norms, embedding scale and
softcaps. Every key of the file must be either understood or on an explicit list of keys that do
not change inference math; anything else raises `UnsupportedModelError` naming it, so a
checkpoint is never run with part of its definition silently ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np


class UnsupportedModelError(ValueError):
    """A checkpoint, config field, rope type or tensor that memkernels does not understand."""


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3")

# Keys that do not change what inference computes: ids, bookkeeping, training-only settings.
HARMLESS_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout", "chunk_size_feed_forward",
    "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "max_position_embeddings", "tokenizer_class", "task_specific_params", "finetuning_task",
    "prefix", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens", "model_type", "cache_implementation",
    "generation_config", "use_return_dict", "torchscript", "tf_legacy_loss", "pruned_heads", "add_cross_attention",
    "cross_attention_hidden_size", "is_decoder", "tie_encoder_decoder", "output_scores", "return_dict_in_generate",
    # pretraining_tp > 1 only splits the same matmuls into slices in transformers 4 (same math)
    "pretraining_tp",
    # generation defaults some old configs carry; generation options come from the caller here
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "num_return_sequences", "output_past", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
})

# Keys each architecture understands (beyond HARMLESS_KEYS); all are read below.
_COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
           "rope_parameters", "head_dim", "partial_rotary_factor"}
ARCH_KEYS = {
    "llama": _COMMON | {"attention_bias", "mlp_bias"},
    "mistral": _COMMON | {"sliding_window"},
    "qwen2": _COMMON | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "use_mrope"},
    "gemma": _COMMON | {"attention_bias", "hidden_activation", "use_bidirectional_attention"},
    "gemma2": _COMMON | {"attention_bias", "hidden_activation", "use_bidirectional_attention",
                         "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                         "sliding_window", "layer_types", "cache_implementation"},
    "phi3": _COMMON | {"sliding_window", "original_max_position_embeddings"},
}

# transformers' class defaults for the keys that change the math, used when config.json omits a key
# (as transformers does when it reads the file); structural sizes have no default and are required.
DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": 4096,
                "max_position_embeddings": 4096 * 32},
    "qwen2": {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "max_position_embeddings": 32768},
    "gemma": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 256, "attention_bias": False,
              "max_position_embeddings": 8192},
    "gemma2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 256, "attention_bias": False,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "max_position_embeddings": 8192},
    "phi3": {"rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
             "max_position_embeddings": 4096},
}
# architectures whose missing num_key_value_heads means multi-head attention (others default to a number)
_KV_DEFAULTS_TO_HEADS = ("llama", "phi3")

# Keys that mean a mixture of experts (or another block) this forward does not have.
MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts",
            "n_shared_experts", "router_aux_loss_coef", "shared_expert_intermediate_size", "decoder_sparse_step",
            "moe_layer_freq", "first_k_dense_replace", "mlp_only_layers", "norm_topk_prob", "output_router_logits")

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "relu")

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "original_max_position_embeddings", "truncate"},
}


def _fail(msg):
    raise UnsupportedModelError(msg)


@dataclass
class RopeConfig:
    """Rotary embedding: rotated dims, theta, scaling type and its parameters."""
    theta: float = 10000.0
    rope_type: str = "default"
    params: dict = field(default_factory=dict)
    rotary_dim: int = 0  # leading dims of each head that rotate (partial_rotary_factor); the rest pass through
    max_position_embeddings: int = 2048

    def inv_freq(self, seq_len: int | None = None) -> tuple[np.ndarray, float]:
        """(inv_freq float64 of rotary_dim/2 entries, attention factor scaling cos and sin).

        seq_len matters for 'dynamic' only (NTK-aware base growth past max_position_embeddings)."""
        dim, base, p = self.rotary_dim, float(self.theta), self.params
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        t = self.rope_type
        if t == "default":
            return 1.0 / base ** exponents, 1.0
        if t == "linear":
            return 1.0 / base ** exponents / float(p["factor"]), 1.0
        if t == "dynamic":
            factor, mpe = float(p["factor"]), self.max_position_embeddings
            n = mpe if seq_len is None else max(int(seq_len), mpe)
            # the base grows with the sequence so the lowest frequency stretches over it (NTK-aware)
            base = base * ((factor * n / mpe) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / base ** exponents, 1.0
        if t == "llama3":
            inv = 1.0 / base ** exponents
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            # long wavelengths (beyond old/lo) are interpolated by `factor`, short ones (below old/hi)
            # kept, and the band between blends the two linearly in old/wavelen
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            return np.where(medium, blended, scaled), 1.0
        if t == "yarn":
            factor = float(p["factor"])
            old = float(p["original_max_position_embeddings"])

            def mscale(s, m=1.0):
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            att = p.get("attention_factor")
            if att is None:
                m, m_all = p.get("mscale"), p.get("mscale_all_dim")
                att = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
            beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

            def dim_of(rotations):  # the dimension whose wavelength makes `rotations` turns over `old` tokens
                return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low, high = dim_of(beta_fast), dim_of(beta_slow)
            if p.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
            extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
            pos = base ** exponents
            inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
            return inv, float(att)
        _fail(f"rope type {t!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


@dataclass
class ModelConfig:
    """A decoder of the Llama family, every switch that changes its math explicit."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # q/k/v/o biases (llama, gemma)
    qkv_bias: bool = False              # q/k/v biases only (qwen2)
    mlp_bias: bool = False
    fused_qkv: bool = False             # phi3: qkv_proj and gate_up_proj
    norm_offset: float = 0.0            # gemma: RMSNorm weight is (1 + w)
    embed_scale: float | None = None    # gemma: embeddings * sqrt(hidden_size), rounded to the model dtype
    sandwich_norms: bool = False        # gemma2: post-attention and pre/post-feedforward norms
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None     # None: head_dim ** -0.5
    layer_windows: list = field(default_factory=list)   # per layer: None or the HF sliding_window S
    bos_token_id: object = None
    eos_token_id: object = None
    dtype: str = "float32"

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def window(self, layer: int):
        """Sliding window of a layer as memkernels counts it (keys to the left of the query), or None.

        HF's sliding_window S lets a query see itself and the S - 1 tokens before it."""
        s = self.layer_windows[layer]
        return None if s is None else int(s) - 1

    def scale(self) -> float:
        return float(self.attn_scale) if self.attn_scale is not None else self.head_dim ** -0.5

    def eos_ids(self) -> set:
        e = self.eos_token_id
        if e is None:
            return set()
        return {int(x) for x in e} if isinstance(e, (list, tuple)) else {int(e)}

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            raise UnsupportedModelError(f"cannot read model config {path}: {e}") from None
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"{path}: config is not a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            _fail(f"model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        if d.get("quantization_config") is not None:
            _fail(f"config field 'quantization_config' ({d['quantization_config'].get('quant_method', '?')}): "
                  f"pre-quantized HF checkpoints are not supported; use a float checkpoint or a GGUF file")
        for k in MOE_KEYS:
            if k in d and d[k] not in (None, 0, False, [], 1 if k == "decoder_sparse_step" else None):
                _fail(f"config field {k!r} = {d[k]!r}: mixture-of-experts models are not supported")
        d = {**DEFAULTS[mt], **d}
        if "num_key_value_heads" not in d and mt not in _KV_DEFAULTS_TO_HEADS:
            _fail(f"config field 'num_key_value_heads' is missing (a {mt} config must give it)")
        allowed = ARCH_KEYS[mt] | HARMLESS_KEYS
        unknown = sorted(k for k in d if k not in allowed and k not in MOE_KEYS and k != "quantization_config")
        if unknown:
            _fail(f"config field {unknown[0]!r} of a {mt} model is not understood (unknown fields: {unknown})")

        def req(k):
            if d.get(k) is None:
                _fail(f"config field {k!r} is missing")
            return d[k]

        def posint(k, v=None):
            v = req(k) if v is None else v
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(f"config field {k!r} must be a positive integer, got {v!r}")
            return v

        hidden, heads = posint("hidden_size"), posint("num_attention_heads")
        kv_heads = posint("num_key_value_heads", d["num_key_value_heads"] if "num_key_value_heads" in d else heads)
        if heads % kv_heads:
            _fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                _fail(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim given")
            head_dim = hidden // heads
        head_dim = posint("head_dim", head_dim)
        layers = posint("num_hidden_layers")

        act = d.get("hidden_act") or "silu"
        if mt == "gemma":
            # transformers 4 read hidden_activation; "gelu" in hidden_act is the legacy value of the
            # official releases, meant (and run by transformers 5) as the tanh approximation
            act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
            if act == "gelu" and not d.get("hidden_activation"):
                act = "gelu_pytorch_tanh"
        if mt == "gemma2":  # Gemma2 runs hidden_activation; a differing hidden_act would be ignored there
            act = d.get("hidden_activation") or "gelu_pytorch_tanh"
            if d.get("hidden_act") not in (None, act):
                _fail(f"config fields hidden_act {d['hidden_act']!r} and hidden_activation {act!r} disagree")
        if act not in ACTIVATIONS:
            _fail(f"config field hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if d.get("use_mrope"):
            _fail("config field 'use_mrope' = true: multimodal rotary embeddings (Qwen2-VL) are not supported")
        if d.get("use_bidirectional_attention"):
            _fail("config field 'use_bidirectional_attention' = true: only causal decoders are supported")

        rope = _rope(d, head_dim)
        cfg = cls(model_type=mt, vocab_size=posint("vocab_size"), hidden_size=hidden,
                  intermediate_size=posint("intermediate_size"), num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), hidden_act=act, rope=rope,
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", mt in ("gemma", "gemma2"))),
                  bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                  dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"))
        cfg.attention_bias = bool(d.get("attention_bias", False))
        cfg.mlp_bias = bool(d.get("mlp_bias", False))
        cfg.layer_windows = [None] * layers
        if mt == "qwen2":
            cfg.qkv_bias = True
        if mt == "phi3":
            cfg.fused_qkv = True
        if mt in ("gemma", "gemma2"):
            cfg.norm_offset = 1.0
            cfg.embed_scale = math.sqrt(hidden)
        if mt in ("mistral", "phi3") and d.get("sliding_window") is not None:
            cfg.layer_windows = [posint("sliding_window")] * layers
        if mt == "qwen2":
            sw = d.get("sliding_window") if d.get("use_sliding_window") else None
            types = d.get("layer_types")
            if types is None:
                mwl = d.get("max_window_layers", 28)
                types = ["sliding_attention" if sw is not None and i >= mwl else "full_attention"
                         for i in range(layers)]
            cfg.layer_windows = _windows(types, sw, layers)
        if mt == "gemma2":
            cfg.sandwich_norms = True
            cfg.attn_softcap = _opt_float(d, "attn_logit_softcapping")
            cfg.final_softcap = _opt_float(d, "final_logit_softcapping")
            qpas = d.get("query_pre_attn_scalar")
            if not isinstance(qpas, (int, float)) or qpas <= 0:
                _fail(f"config field 'query_pre_attn_scalar' must be > 0, got {qpas!r}")
            cfg.attn_scale = float(qpas) ** -0.5
            types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                             for i in range(layers)]
            cfg.layer_windows = _windows(types, d.get("sliding_window"), layers)
        if d.get("cache_implementation") not in (None, "hybrid"):
            _fail(f"config field 'cache_implementation' = {d['cache_implementation']!r} is not supported")
        return cfg


def _opt_float(d, k):
    v = d.get(k)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or v <= 0:
        _fail(f"config field {k!r} must be a positive number or null, got {v!r}")
    return float(v)


def _windows(types, sliding_window, layers):
    if not isinstance(types, list) or len(types) != layers:
        _fail(f"config field 'layer_types' must list {layers} layer types, got {types!r}")
    out = []
    for i, t in enumerate(types):
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            if not isinstance(sliding_window, int) or sliding_window <= 0:
                _fail(f"layer {i} is 'sliding_attention' but config field 'sliding_window' is {sliding_window!r}")
            out.append(sliding_window)
        else:
            _fail(f"layer type {t!r} (config field 'layer_types', layer {i}) is not supported")
    return out


def _rope(d: dict, head_dim: int) -> RopeConfig:
    """RoPE from either layout: transformers 5 `rope_parameters` (theta inside) or transformers 4
    `rope_theta` + `rope_scaling`."""
    rp = d.get("rope_parameters")
    rs = d.get("rope_scaling")
    if rp is not None and not isinstance(rp, dict):
        _fail(f"config field 'rope_parameters' must be an object, got {rp!r}")
    if rs is not None and not isinstance(rs, dict):
        _fail(f"config field 'rope_scaling' must be an object or null, got {rs!r}")
    if rp is not None and any(isinstance(v, dict) for v in rp.values()):
        _fail("config field 'rope_parameters' per layer type is not supported")
    params = {}
    if rs:
        params.update(rs)
    if rp:
        params.update(rp)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    t = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if t not in ROPE_TYPES:
        _fail(f"rope type {t!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    unknown = sorted(set(params) - _ROPE_KEYS[t])
    if unknown:
        _fail(f"rope parameter {unknown[0]!r} of rope type {t!r} is not understood")
    for k in sorted(_ROPE_KEYS[t] - {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                     "truncate"}):
        if params.get(k) is None:
            if t == "yarn" and k == "original_max_position_embeddings" and d.get(k):
                params[k] = d[k]
                continue
            _fail(f"rope parameter {k!r} is required for rope type {t!r}")
    rotary_dim = int(head_dim * float(partial))
    if rotary_dim <= 0 or rotary_dim % 2:
        _fail(f"partial_rotary_factor {partial!r} gives {rotary_dim} rotary dims of head_dim {head_dim} "
              f"(must be even and > 0)")
    if not isinstance(theta, (int, float)) or theta <= 1:
        _fail(f"rope_theta must be a number > 1, got {theta!r}")
    return RopeConfig(theta=float(theta), rope_type=t, params=params, rotary_dim=rotary_dim,
                      max_position_embeddings=int(d.get("max_position_embeddings") or 2048))
