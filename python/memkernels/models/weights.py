"""Checkpoint tensors: read safetensors (single or sharded), check every tensor against the config.

A weight is a NumPy float32 array or a `memkernels.QuantizedMatrix` (GGUF quantized tensors).
Float16 and bfloat16 checkpoint tensors are converted to float32 once, here, at load (bfloat16
through integer bit shifts, so ml_dtypes is not needed); float32 tensors stay memory-mapped.
`check_tensors` checks the Hugging Face names and shapes against the config and fails, naming the tensor,
on any tensor that is missing, has the wrong shape, or would not be used.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..quant import QuantizedMatrix, dequantize
from ..weight_store import read_safetensors, safetensors_dtypes
from .config import ModelConfig, UnsupportedModelError


def bf16_bits_to_float32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bit patterns -> float32 (the top 16 bits of a float32)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _to_float32(name, a):
    if isinstance(a, QuantizedMatrix):
        return a
    dt = a.dtype
    if dt == np.float32:
        return a
    if dt in (np.float16, np.float64):
        return a.astype(np.float32)
    if dt.name == "bfloat16":  # ml_dtypes array
        return bf16_bits_to_float32(a.view(np.uint16))
    raise UnsupportedModelError(f"tensor {name!r} has dtype {dt.name}; expected float32, float16 or bfloat16")


def read_checkpoint_tensors(model_dir) -> dict:
    """name -> float32 array (memory-mapped when the file stores float32) from a checkpoint directory:
    model.safetensors, or the shards listed by model.safetensors.index.json, or every *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnsupportedModelError(f"{index}: cannot read the shard index ({e})") from None
        shards = sorted(set(weight_map.values()))
    else:
        weight_map = None
        shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not shards:
        raise UnsupportedModelError(f"{model_dir}: no .safetensors files")
    out = {}
    for shard in shards:
        path = os.path.join(model_dir, shard)
        if not os.path.exists(path):
            raise UnsupportedModelError(f"{model_dir}: shard {shard!r} named by the index is missing")
        dtypes = safetensors_dtypes(path)
        for name, a in read_safetensors(path, raw_bf16=True).items():
            if name in out:
                raise UnsupportedModelError(f"tensor {name!r} appears in more than one shard")
            if weight_map is not None and weight_map.get(name) != shard:
                raise UnsupportedModelError(f"tensor {name!r} is in shard {shard!r} but the index says "
                                            f"{weight_map.get(name)!r}")
            out[name] = bf16_bits_to_float32(a) if dtypes[name] == "BF16" else _to_float32(name, a)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise UnsupportedModelError(f"tensor {missing[0]!r} is listed in the index but in no shard")
    return out


def expected_shapes(cfg: ModelConfig) -> dict:
    """Every tensor name the forward uses -> its shape (HF layout: linear weights (out, in))."""
    h, v, i_, qd, kd = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    s = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (v, h)
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        s[p + "input_layernorm.weight"] = (h,)
        s[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.sandwich_norms:
            s[p + "pre_feedforward_layernorm.weight"] = (h,)
            s[p + "post_feedforward_layernorm.weight"] = (h,)
        if cfg.fused_qkv:
            s[p + "self_attn.qkv_proj.weight"] = (qd + 2 * kd, h)
            s[p + "mlp.gate_up_proj.weight"] = (2 * i_, h)
        else:
            for n, od in (("q_proj", qd), ("k_proj", kd), ("v_proj", kd)):
                s[p + f"self_attn.{n}.weight"] = (od, h)
                if cfg.attention_bias or cfg.qkv_bias:
                    s[p + f"self_attn.{n}.bias"] = (od,)
            s[p + "mlp.gate_proj.weight"] = (i_, h)
            s[p + "mlp.up_proj.weight"] = (i_, h)
            if cfg.mlp_bias:
                s[p + "mlp.gate_proj.bias"] = (i_,)
                s[p + "mlp.up_proj.bias"] = (i_,)
        s[p + "self_attn.o_proj.weight"] = (h, qd)
        if cfg.attention_bias:
            s[p + "self_attn.o_proj.bias"] = (h,)
        s[p + "mlp.down_proj.weight"] = (h, i_)
        if cfg.mlp_bias:
            s[p + "mlp.down_proj.bias"] = (h,)
    return s


def _shape(a):
    return tuple(a.shape)


def check_tensors(cfg: ModelConfig, tensors: dict) -> dict:
    """Checks names and shapes; returns the tensors the forward uses. A tied checkpoint may also
    store lm_head.weight when it equals the embedding; stored rotary inv_freq buffers must equal
    the ones the config gives (then they carry nothing more)."""
    want = expected_shapes(cfg)
    tensors = dict(tensors)
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        head, emb = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
        same = (emb is not None and not isinstance(head, QuantizedMatrix) and not isinstance(emb, QuantizedMatrix)
                and _shape(head) == _shape(emb) and np.array_equal(head, emb))
        if not same:
            raise UnsupportedModelError("tensor 'lm_head.weight' is present and differs from the embedding, but "
                                        "config says tie_word_embeddings=true")
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        ours = cfg.rope.inv_freq()[0]
        theirs = np.asarray(tensors.pop(name), dtype=np.float64)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-3):
            raise UnsupportedModelError(f"tensor {name!r} (stored rotary frequencies) does not match the config's "
                                        f"rope settings")
    for name, a in tensors.items():
        if name not in want:
            raise UnsupportedModelError(f"tensor {name!r} {list(_shape(a))} is not used by a {cfg.model_type} "
                                        f"model with this config (memkernels refuses to drop it)")
    for name, shape in want.items():
        if name not in tensors:
            raise UnsupportedModelError(f"tensor {name!r} (shape {list(shape)}) is missing from the checkpoint")
        a = tensors[name]
        if _shape(a) != shape:
            raise UnsupportedModelError(f"tensor {name!r} has shape {list(_shape(a))}, expected {list(shape)}")
        if isinstance(a, QuantizedMatrix) and len(shape) != 2:
            raise UnsupportedModelError(f"tensor {name!r} is quantized but must be a float vector")
    return tensors


def as_float64(a) -> np.ndarray:
    """A weight as float64 (QuantizedMatrix dequantized): what the reference forward uses."""
    if isinstance(a, QuantizedMatrix):
        return np.asarray(dequantize(a), dtype=np.float64)
    return np.asarray(a, dtype=np.float64)
