"""memkernels flash attention as a transformers (5.x) attention implementation.

    import memkernels.integrations.transformers as mk_hf
    mk_hf.register()                      # once per process
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="memkernels")
    # or, on a loaded model: model.set_attn_implementation("memkernels")

:func:`register` adds two entries under the same name, both needed: the attention function to
transformers' ``AttentionInterface``, and a mask function to ``AttentionMaskInterface``. Without
the mask function transformers builds no mask at all for an unknown implementation, and padded
rows silently attend to padding.

What the attention function handles, for decoder models calling ``attention_interface(...)``
(Llama, Mistral, Qwen2, Gemma2 and the like):

- causal attention, MHA / GQA / MQA, the model's ``scaling``;
- sliding windows: transformers' ``sliding_window=S`` lets a query see itself and the S - 1 keys
  before it, which is memkernels' ``window=(S - 1, 0)`` (FlashAttention's convention; the
  conversion is done here). For bidirectional models S keys on each side: ``window=(S, S)``;
- ``softcap`` (Gemma2's attention logit soft-capping);
- padding, left, right or anywhere, in prefill and in decode with a KV cache: the mask function
  hands the attention function the 2-D key-padding mask (batch, kv_len), or None when nothing is
  padded, and it goes to the kernel as ``flash_attention(..., key_mask=...)``: one call on
  transposed views of the model's tensors, no repacking, no copies, no host synchronisation.
  Positions are those of the padded rows, as in "sdpa" (causality and sliding windows count
  padding keys like any other). Query rows that are padding get finite values the model ignores
  (0 where no real key is visible, e.g. left padding);
- packed sequences given by ``position_ids`` restarting inside one row (no attention mask).

Not handled (ValueError): 4-D custom masks, attention dropout in training mode. Inference only,
like every memkernels operator: run the model under ``torch.no_grad()`` / ``torch.inference_mode()``.
On CUDA tensors the kernels run on PyTorch's current stream.
"""
from typing import Optional

import torch

from . import torch as _mkt

__all__ = ["register", "memkernels_attention", "memkernels_mask", "NAME"]

NAME = "memkernels"


def memkernels_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """The mask function registered with AttentionMaskInterface: the boolean key-padding mask
    (batch, kv_length) of the keys the layer sees (the last kv_length columns of the 2-D mask),
    or None when no key is padding. Causality and sliding windows are the kernel's own options."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def _packed_segments(position_ids: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int):
    """cu_seqlens (int32) when one row packs several sequences (position_ids restart), else None."""
    if position_ids is None or batch != 1 or q_len != kv_len or q_len < 2:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != q_len:
        return None
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [0] + starts.tolist() + [q_len]
    return torch.tensor(bounds, dtype=torch.int32, device=pos.device), max(b - a for a, b in zip(bounds, bounds[1:]))


def memkernels_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                         softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The attention function registered with AttentionInterface.

    query (batch, heads, q_len, head_dim), key / value (batch, kv_heads, kv_len, head_dim), as
    transformers passes them; returns (output (batch, q_len, heads, head_dim), None)."""
    if dropout and module.training:
        raise ValueError(f"memkernels attention is inference-only: attention dropout {dropout} in training mode")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("memkernels attention takes the 2-D key-padding mask its mask function builds, got a "
                         f"{attention_mask.dim()}-D attention_mask (custom 4-D masks are not supported)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    if sliding_window is not None and sliding_window > 0:
        # transformers: a causal query sees keys q - S < k <= q (S keys, itself included); bidirectional:
        # |q - k| <= S. memkernels counts the keys on each side besides the diagonal.
        window = (int(sliding_window) - 1, 0) if causal else (int(sliding_window), int(sliding_window))
    opts = dict(causal=bool(causal), scale=scaling, window=window, softcap=softcap or None)

    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    # (batch, seq, heads, head_dim) views: the kernels take strided arrays, so no copy here.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    if attention_mask is None:
        packed = _packed_segments(kwargs.get("position_ids"), batch, q_len, kv_len)
        if packed is None:
            return _mkt.flash_attention(q, k, v, **opts), None
        cu, max_len = packed
        out = _mkt.flash_attention_varlen(q[0], k[0], v[0], cu, cu, max_seqlen_q=max_len, **opts)
        return out.unsqueeze(0), None

    keep = attention_mask.to(device=query.device, dtype=torch.bool)
    if keep.shape != (batch, kv_len):
        if keep.dim() == 2 and keep.shape[0] == batch and keep.shape[1] > kv_len:
            keep = keep[:, -kv_len:]  # the keys this layer sees are the last kv_len positions
        else:
            raise ValueError(f"attention_mask: expected a key-padding mask of shape ({batch}, {kv_len}), "
                             f"got {tuple(attention_mask.shape)}")
    # The queries are the last q_len positions of the keys (the cache's layout): causality is aligned
    # to the end, and padding keys are dropped by the kernel itself (never read, whatever they hold).
    return _mkt.flash_attention(q, k, v, key_mask=keep, **opts), None


def register(name: str = NAME) -> None:
    """Registers memkernels attention and its mask function with transformers under `name`, so
    ``attn_implementation=name`` (in from_pretrained, from_config or set_attn_implementation) uses it."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, memkernels_attention)
    AttentionMaskInterface.register(name, memkernels_mask)
