// Internal description of one flash-attention call, shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>

#include "memkernels/attention.h"
#include "runtime_internal.h"

namespace memkernels {

struct AttentionProblem {
  DType dtype = DType::Float32;  // of q, k, v and out
  int device = 0;                // CUDA device index of the arrays
  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int seqlen_q = 0, seqlen_k = 0;  // fixed lengths; with cu_seqlens the maxima over the batch
  // Variable-length batches: batch b owns rows [cu[b], cu[b+1]) of the packed arrays.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;  // varlen: rows of the packed arrays (CUDA clamps offsets to them)
  // Per-batch key lengths (FlashAttention's seqused_k): batch b uses keys [0, seqused_k[b]) of its
  // seq_k rows, and causal / window positions align to that end. CPU: a validated private copy;
  // CUDA: the caller's device array, clamped to [0, seq_k] by the kernel.
  const int32_t* seqused_k = nullptr;
  // Key-padding mask: key j of batch b takes part iff
  // key_mask[b * mask_batch + (row0_k(b) + j) * mask_col] != 0 (bytes, 1 = keep).
  const uint8_t* key_mask = nullptr;
  int64_t mask_batch = 0, mask_col = 0;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // optional

  // Strides in elements. Element (b, i, h, d) of q lives at
  // q + b * q_batch + (row0(b) + i) * q_row + h * q_head + d, row0(b) = cu_seqlens_q ? cu[b] : 0.
  int64_t q_batch = 0, q_row = 0, q_head = 0;
  int64_t k_batch = 0, k_row = 0, k_head = 0;
  int64_t v_batch = 0, v_row = 0, v_head = 0;
  int64_t o_batch = 0, o_row = 0, o_head = 0;
  // lse element (b, h, i) at lse + b * lse_batch + h * lse_head + row0(b) + i.
  int64_t lse_batch = 0, lse_head = 0;

  float scale = 1.0f;
  bool causal = false;
  int window_left = -1, window_right = -1;  // causal already folded into window_right
  float softcap = 0.0f;

  int seq_q(int b) const { return cu_seqlens_q ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  int seq_k(int b) const {
    return seqused_k ? seqused_k[b] : cu_seqlens_k ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k;
  }
  // Mask entries of batch b's keys (index j * mask_col), or nullptr when every key is kept.
  const uint8_t* mask_row(int b) const {
    return key_mask ? key_mask + b * mask_batch + row0_k(b) * mask_col : nullptr;
  }
  int64_t row0_q(int b) const { return cu_seqlens_q ? cu_seqlens_q[b] : 0; }
  int64_t row0_k(int b) const { return cu_seqlens_k ? cu_seqlens_k[b] : 0; }
};

namespace cuda_backend {
void flash_attention(const AttentionProblem& p, void* stream);
}

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void flash_attention(const ::memkernels::AttentionProblem& p))
