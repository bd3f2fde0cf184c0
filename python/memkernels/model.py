"""The demo's seeded model and the array glue the model forward runs on.

`write_random_checkpoint(dir, ...)` writes a seeded Llama checkpoint directory (config.json +
model.safetensors, the layout transformers writes) that `python -m memkernels demo` loads through
`memkernels.load_model` like any other checkpoint: the demo is a thin caller of the model package.

`ArrayOps` is the model's glue between kernels (embedding lookup, RMSNorm, RoPE, activations):
NumPy on the CPU, or PyTorch / CuPy arrays on the CPU or a GPU, so the same forward runs with
every array and every kernel on the GPU.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np


def write_random_checkpoint(path, *, vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=1024, hidden_act="relu", seed=0) -> dict:
    """Writes a seeded Llama checkpoint (float32 safetensors, HF names and layouts) to directory
    `path`; returns its config dict. Weights are N(0, 1/fan_in), embeddings N(0, 1), norms near 1."""
    from safetensors.numpy import save_file

    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
                         f"({num_attention_heads}), which must be a multiple of num_key_value_heads "
                         f"({num_key_value_heads})")
    if hidden_act not in ("relu", "silu"):
        raise ValueError(f"hidden_act: expected 'relu' or 'silu', got {hidden_act!r}")
    rng = np.random.default_rng(seed)
    d, f, hd = hidden_size, intermediate_size, hidden_size // num_attention_heads

    def lin(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab_size, d)).astype(np.float32),
         "model.norm.weight": norm(), "lm_head.weight": lin(vocab_size, d)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(num_attention_heads * hd, d)
        w[p + "self_attn.k_proj.weight"] = lin(num_key_value_heads * hd, d)
        w[p + "self_attn.v_proj.weight"] = lin(num_key_value_heads * hd, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, num_attention_heads * hd)
        w[p + "mlp.gate_proj.weight"] = lin(f, d)
        w[p + "mlp.up_proj.weight"] = lin(f, d)
        w[p + "mlp.down_proj.weight"] = lin(d, f)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
           "hidden_size": d, "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
           "num_key_value_heads": num_key_value_heads, "intermediate_size": f, "hidden_act": hidden_act,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "torch_dtype": "float32"}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    save_file(w, os.path.join(path, "model.safetensors"))
    return cfg


class ArrayOps:
    """The array operations the model does between kernel calls, for one framework and device.

    NumPy (CPU) and CuPy (GPU) share this class (CuPy mirrors NumPy's API); `TorchOps` is the
    PyTorch version. Everything is float32 on `device`; only token ids and
    the logits cross to the host.
    """

    def __init__(self, xp, device="cpu"):
        self.xp, self.device = xp, device

    def to_device(self, host_array, dtype="float32"):
        return self.xp.asarray(np.asarray(host_array, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else self.xp.asnumpy(a)

    def contiguous(self, a):
        return self.xp.ascontiguousarray(a)

    def rms_norm(self, x, w, eps):
        return x / self.xp.sqrt(self.xp.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos[:, None, :] + self.xp.concatenate([-x[..., half:], x[..., :half]], -1) * sin[:, None, :]


class TorchOps(ArrayOps):
    """ArrayOps for PyTorch tensors on `device` ('cpu' or 'cuda[:N]'). rms_norm and rope are
    inherited: torch takes NumPy's mean(axis=, keepdims=) and concatenate spellings."""

    def __init__(self, device="cpu"):
        import torch

        super().__init__(torch, device)

    def to_device(self, host_array, dtype="float32"):
        return self.xp.from_numpy(np.ascontiguousarray(host_array, dtype=dtype)).to(self.device)

    def to_host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else a.cpu().numpy()

    def contiguous(self, a):
        return a.contiguous()


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


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


__all__ = ["write_random_checkpoint", "ArrayOps", "TorchOps", "array_ops", "peak_rss_bytes"]
