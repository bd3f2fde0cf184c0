// memkernels/attention.h — flash attention (tiled online softmax, O(seq) extra memory).
//
// Layouts follow FlashAttention: q (batch, seq_q, heads, head_dim), k/v (batch, seq_k, kv_heads,
// head_dim), out like q, lse (batch, heads, seq_q) float32 in natural log. heads must be a multiple
// of kv_heads (MHA, GQA, MQA). The last dimension must be contiguous; other strides are free.
//
// Masking, with off = seq_k - seq_q (causal is aligned to the end, as FlashAttention does):
//   key j is visible to query i  iff  i + off - window_left <= j <= i + off + window_right,
//   where a negative window bound means unbounded and causal sets window_right = 0.
// A query row that sees no key gets output 0 and lse -inf (as FlashAttention-2 does), also when
// the key mask or seqused_k below drops every key it would see.
//
// Padded batches (KeyPadding, both optional, combinable with every option above):
//   seqused_k: int32 (batch,), contiguous. Batch b uses only keys [0, seqused_k[b]) of its seq_k
//     rows, as FlashAttention's seqused_k: off above becomes seqused_k[b] - seq_q, so causal and
//     window positions align to the end of the used keys (a KV cache filled to different lengths).
//     Requires 0 <= seqused_k[b] <= seq_k; on the CPU a value outside is an Error, on CUDA (which
//     never reads device memory back to check) it is clamped to [0, seq_k].
//   key_mask: bool (batch, seq_k) (any strides), true = attend / keep, false = padding. A dropped
//     key takes no part in the softmax and its K and V rows are never read (padding may hold NaN).
//     Positions are unchanged: causal / window masks count dropped keys like any other, as in
//     PyTorch SDPA with a boolean key-padding mask (left padding needs no repacking).
//   Varlen calls: seqused_k[b] <= cu_seqlens_k[b+1] - cu_seqlens_k[b] keys of sequence b, and the
//     key mask is (total_k,), one flag per packed key row.
#pragma once

#include "memkernels/tensor.h"

namespace memkernels {

struct AttentionOptions {
  bool causal = false;
  float scale = 0.0f;       // 0 -> 1/sqrt(head_dim)
  int window_left = -1;     // < 0: unbounded
  int window_right = -1;    // < 0: unbounded
  float softcap = 0.0f;     // > 0: scores become softcap * tanh(scores / softcap) (Gemma-2 style)
};

// Per-batch key lengths and key-padding mask (see above); null pointers: every key is used.
struct KeyPadding {
  const TensorView* seqused_k = nullptr;  // int32 (batch,)
  const TensorView* key_mask = nullptr;   // bool (batch, seq_k); varlen: (total_k,)
};

// out (and lse, when given) are written; nothing else is allocated beyond O(seq) scratch.
// stream: a cudaStream_t for CUDA tensors (nullptr = default stream); ignored on CPU.
void flash_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView* lse, const AttentionOptions& opts,
                     void* stream = nullptr);
void flash_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView* lse, const AttentionOptions& opts,
                     const KeyPadding& keys, void* stream = nullptr);

// Variable-length batch packed along the first axis: q (total_q, heads, head_dim), k/v (total_k,
// kv_heads, head_dim); cu_seqlens_q/k int32 (batch + 1) cumulative offsets starting at 0;
// lse (heads, total_q). max_seqlen_q sizes the CUDA grid (<= 0: total_q, never read back from the GPU).
void flash_attention_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                            const TensorView& out, const TensorView* lse,
                            const AttentionOptions& opts, int max_seqlen_q = 0,
                            void* stream = nullptr);
void flash_attention_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                            const TensorView& out, const TensorView* lse,
                            const AttentionOptions& opts, const KeyPadding& keys,
                            int max_seqlen_q = 0, void* stream = nullptr);

}  // namespace memkernels
