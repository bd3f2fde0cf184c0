// Internal description of one paged-attention call and the page scatter, shared by the CPU and CUDA
// backends.
#pragma once

#include <cstdint>

#include "memkernels/paged_kv_cache.h"
#include "runtime_internal.h"

namespace memkernels {

#if defined(__CUDACC__)
#define MK_PAGED_HD __host__ __device__
#else
#define MK_PAGED_HD
#endif

struct KeyRange {
  int lo, hi;  // keys [lo, hi); empty when lo == hi
};

// The keys a query at absolute position a (= row + kv_len - q_len, negative when q_len > kv_len)
// may see: [a - window_left, a + window_right], a negative bound meaning unbounded, clamped to
// [0, kv_len). In 64-bit: bounds near INT_MAX must not overflow (they mean "unbounded").
MK_PAGED_HD inline KeyRange visible_keys(int64_t a, int kv_len, int window_left, int window_right) {
  int64_t lo = window_left >= 0 ? a - window_left : 0;
  int64_t hi = window_right >= 0 ? a + window_right + 1 : kv_len;
  lo = lo < 0 ? 0 : (lo > kv_len ? kv_len : lo);
  hi = hi > kv_len ? kv_len : (hi < lo ? lo : hi);
  return {int(lo), int(hi)};
}

struct PagedProblem {
  DType dtype = DType::Float32;     // of q and out
  DType kv_dtype = DType::Float32;  // of the pages: dtype, or Int8 with scales
  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  int64_t num_pages = 0, total_q = 0;
  int max_q_len = 1;  // longest q_len in the batch (CPU: exact; CUDA: a bound)

  const void* q = nullptr;
  const void* k = nullptr;  // page 0 of the K pages
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // optional, (heads, total_q)
  // Strides in elements. q row r head h: q + r * q_row + h * q_head. Token t of page p, kv head g:
  // k + p * k_page + t * k_tok + g * k_head.
  int64_t q_row = 0, q_head = 0, o_row = 0, o_head = 0;
  int64_t k_page = 0, k_tok = 0, k_head = 0, v_page = 0, v_tok = 0, v_head = 0;

  // Int8 pages: value = q * scale, scale of token t, kv head g of page p at
  // k_scale + p * ks_page + t * ks_tok + g.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t ks_page = 0, ks_tok = 0, vs_page = 0, vs_tok = 0;

  // KIVI pages (kivi_bits 2 or 4): k is the layer's block in page 0 (bytes), k_page the page
  // stride in bytes; within a layer block: K codes [token][kv_head][head_dim * bits / 8] at 0, V
  // codes at kv_vc, per-channel K scale/zero (kv_heads, head_dim) at kv_ks/kv_kz, per-token V
  // scale/zero (page_size, kv_heads) at kv_vs/kv_vz (bytes). x ~= code * scale + zero. Keys past
  // the last full page of sequence b are float32 rows in resid[b]: K (page_size, kv_heads,
  // head_dim), then V.
  int kivi_bits = 0;
  int64_t kv_vc = 0, kv_ks = 0, kv_kz = 0, kv_vs = 0, kv_vz = 0;
  const float* const* resid = nullptr;

  const int32_t* qo_indptr = nullptr;  // null: row b for sequence b
  bool qo_indptr_checked = false;      // CUDA: built and checked on the host (PagedKVCache)
  const int32_t* kv_indptr = nullptr;
  const int32_t* kv_indices = nullptr;
  const int32_t* last_page_len = nullptr;
  int64_t nnz_pages = 0;

  float scale = 1.0f, softcap = 0.0f;
  // Sliding window (see visible_keys); causal is folded in as window_right = 0.
  int window_left = -1, window_right = -1;
  int num_splits = 0;
  int device = 0;  // CUDA device index

  // Host-side helpers (CPU backend; the arrays are validated before the kernel runs).
  int q0(int b) const { return qo_indptr ? qo_indptr[b] : b; }
  int q_len(int b) const { return qo_indptr ? qo_indptr[b + 1] - qo_indptr[b] : 1; }
  int kv_len(int b) const {
    const int n = kv_indptr[b + 1] - kv_indptr[b];
    return n > 0 ? (n - 1) * page_size + last_page_len[b] : 0;
  }
  // Keys visible to query row i of sequence b.
  KeyRange keys(int b, int i) const {
    return visible_keys(int64_t(i) + kv_len(b) - q_len(b), kv_len(b), window_left, window_right);
  }
};

// Scatter of new tokens into pages: row i of k/v (kv_heads * head_dim contiguous elements each)
// goes to token slot slots[i] (= page * page_size + offset) of `layer`.
struct PagedAppend {
  DType dtype = DType::Float32;
  int64_t rows = 0, row_elems = 0;  // row_elems = kv_heads * head_dim
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_row = 0, v_row = 0;  // row strides of the inputs (elements)
  void* pool = nullptr;
  int64_t page_stride = 0;   // elements per page (all layers)
  int64_t layer_offset = 0;  // elements from a page's start to this layer's K block
  int64_t kv_offset = 0;     // elements from a token's K row to its V row
  int64_t tok_stride = 0;    // elements between consecutive tokens of a page
  int page_size = 0;
  const int64_t* slots = nullptr;  // device memory on CUDA
  int64_t num_pages = 0;
  int device = 0;
};

namespace cuda_backend {
void paged_attention(const PagedProblem& p, void* stream);
void paged_append(const PagedAppend& a, void* stream);
}  // namespace cuda_backend

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void paged_attention(const ::memkernels::PagedProblem& p))
