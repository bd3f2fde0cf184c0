// memkernels/paged_kv_cache.h — a KV cache in fixed-size pages, and attention that reads the pages.
//
// Pool layout (one allocation per cache, on its device):
//   pool[page][layer][token][kv][kv_head][head_dim]      kv = 0 for K, 1 for V
// (K and V of a token side by side: attention reads one sequential stream, whatever the page size)
// With dtype int8 (quantized pages, symmetric int8 per token and kv head, CPU only), each layer
// block is [K int8][V int8] (each padded to 64 bytes) followed by the float32 scales
// [K scales][V scales], each (page_size, kv_heads): x ~= q * scale. KIVI caches (kivi_bits 2/4)
// pack [K codes][V codes][K scale][K zero] (kv_heads, head_dim) [V scale][V zero] (page_size,
// kv_heads) per layer block; they are read through attention() and read_kv() only.
// so one page holds page_size tokens of every layer: copy-on-write, swap and prefix reuse move a
// page with one contiguous copy, and the K (or V) pages of one layer are the strided view
//   (num_pages, page_size, kv_heads, head_dim), page stride num_layers * 2 * page_size * kv_heads *
//   head_dim, token stride 2 * kv_heads * head_dim.
//
// Sequences own page tables (int32 page ids). Every layer of a sequence has its own length (the
// model appends layer by layer); the sequence's length is the largest, and it holds
// ceil(length / page_size) pages. Pages are shared by reference count (fork, prefix reuse); a
// write into a shared page copies it first (copy-on-write). Full pages of a sequence created with
// prefix tokens are entered in a prefix table keyed by a hash of all tokens up to the page's end;
// unreferenced pages stay there (evictable, least recently used first) until a page is needed.
//
// Paged attention (FlashInfer-style arrays; the cache builds them from its tables):
//   q (total_q, heads, head_dim); sequence b owns q rows [qo_indptr[b], qo_indptr[b+1]) and pages
//   kv_indices[kv_indptr[b] .. kv_indptr[b+1]), the last of which holds kv_last_page_len[b] tokens.
//   Query i of a sequence with q_len rows and kv_len keys sits at position a = i + kv_len - q_len
//   (the new tokens are the last ones in the cache, as in chunked prefill) and sees key j iff
//     a - window_left <= j <= a + window_right,
//   a negative bound meaning unbounded and causal setting window_right = 0 (as flash_attention).
//   A model's sliding window of W tokens including the current one (Hugging Face `sliding_window`
//   for Mistral, Gemma-2) is window_left = W - 1, as in FlashAttention's window_size.
//   out like q; lse (heads, total_q) float32, natural log; a row that sees no key gets 0 and -inf.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "memkernels/tensor.h"

namespace memkernels {

struct PagedAttentionOptions {
  float scale = 0.0f;    // 0 -> 1/sqrt(head_dim)
  bool causal = true;    // only matters when a sequence has more than one query row
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(scores / softcap)
  int num_splits = 0;    // split-KV pieces per sequence; 0 = choose from the work and thread count
  int window_left = -1;  // sliding window (see the header comment); < 0: unbounded. Keys outside
  int window_right = -1; // it are not read. window_right is ignored (0) when causal.
};

// The kernel alone. k_pages / v_pages: (num_pages, page_size, kv_heads, head_dim), the last two
// dims contiguous, any page and token strides (a layer of a PagedKVCache pool, or a caller's pool).
// qo_indptr: int32 (batch + 1), or nullptr for one query row per sequence (decode, total_q = batch).
// kv_indptr int32 (batch + 1), kv_indices int32 (nnz), kv_last_page_len int32 (batch), all on the
// device of q. On CPU every index is checked (page ids < num_pages, indptr non-decreasing, last
// page lengths in [1, page_size]); on CUDA the kernels clamp them (reading them back would sync).
// max_q_len: rows of the longest sequence, a grid hint on CUDA (0 = take total_q).
void paged_attention_raw(const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                         const TensorView* qo_indptr, const TensorView& kv_indptr, const TensorView& kv_indices,
                         const TensorView& kv_last_page_len, const TensorView& out, const TensorView* lse,
                         const PagedAttentionOptions& opts, int max_q_len = 0, void* stream = nullptr,
                         const TensorView* k_scales = nullptr, const TensorView* v_scales = nullptr);
// Quantized pages: k_pages / v_pages int8 with k_scales / v_scales float32 (num_pages, page_size,
// kv_heads), the last two dims contiguous, any page stride; q, out any float dtype. CPU only.

struct PagedCacheStats {
  int64_t num_pages = 0, page_size = 0;
  int64_t pages_used = 0;     // referenced by at least one sequence
  int64_t pages_cached = 0;   // unreferenced but kept for prefix reuse (evictable)
  int64_t pages_free = 0;     // on the free list (pages_free + pages_cached can be allocated)
  int64_t pages_shared = 0;   // referenced by more than one sequence
  int64_t num_sequences = 0, num_swapped = 0;
  int64_t tokens = 0;         // sum of sequence lengths (shared tokens counted once per sequence)
  int64_t bytes_per_token = 0;  // all layers, K and V
  int64_t pool_bytes = 0;
  int64_t wasted_slots = 0;   // unfilled token slots in used pages (tails of last pages)
  double fragmentation = 0;   // wasted_slots / (pages_used * page_size)
  int64_t prefix_hits = 0, prefix_queries = 0;  // pages found / looked up by add_sequence
  int64_t evictions = 0;
};

class PagedKVCache {
 public:
  // dtype: float32, float16, bfloat16, or int8 (quantized per token and kv head on append; CPU).
  // Throws Error(Memory) when the pool cannot be allocated.
  // kivi_bits 2 or 4 (with dtype UInt8, CPU): KIVI pages, keys quantized per channel over each
  // page and values per token (asymmetric, scale + zero point, float32), quantized when a page of
  // a layer fills; the tokens after the last full page (the recent window) stay float32 in the
  // sequence until then. Truncating into a quantized page dequantizes its kept tokens.
  PagedKVCache(int num_layers, int num_pages, int page_size, int kv_heads, int head_dim, DType dtype,
               Device device = {}, int kivi_bits = 0);
  ~PagedKVCache();
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;

  int num_layers() const;
  int num_pages() const;
  int page_size() const;
  int kv_heads() const;
  int head_dim() const;
  DType dtype() const;
  Device device() const;
  // The whole pool, (num_pages, num_layers, page_size, 2, kv_heads, head_dim); int8: (num_pages,
  // num_layers, bytes per layer block).
  TensorView pool() const;
  TensorView k_pages(int layer) const;  // (num_pages, page_size, kv_heads, head_dim), strided pages
  TensorView v_pages(int layer) const;
  TensorView k_scales(int layer) const;  // int8 caches: (num_pages, page_size, kv_heads) float32
  TensorView v_scales(int layer) const;

  // A new empty sequence. With prefix tokens, full pages whose token prefix is in the prefix table
  // are reused: the sequence starts with *cached_tokens tokens (a multiple of page_size) already in
  // every layer, and later full pages of these tokens are entered in the table as they fill.
  int64_t add_sequence(const int32_t* prefix_tokens = nullptr, int64_t num_tokens = 0,
                       int64_t* cached_tokens = nullptr);
  // Appends tokens to one layer of several sequences. k, v: (total_new, kv_heads, head_dim) in the
  // cache's dtype (any float dtype for an int8 cache) and device, rows packed in seq_ids order; counts[i] rows for seq_ids[i] (empty
  // counts = one row each, decode). All or nothing: on Error(CacheFull) or any other error,
  // nothing has changed.
  void append(const std::vector<int64_t>& seq_ids, int layer, const TensorView& k, const TensorView& v,
              const std::vector<int64_t>& counts = {}, void* stream = nullptr);
  int64_t fork(int64_t seq_id);            // a new sequence sharing every page of seq_id
  void free(int64_t seq_id);
  void truncate(int64_t seq_id, int64_t length);  // keeps the first `length` tokens of every layer
  int64_t length(int64_t seq_id, int layer = -1) const;  // layer < 0: the sequence length
  std::vector<int32_t> page_table(int64_t seq_id) const;
  // The K and V of a layer as float32 (length(seq_id, layer), kv_heads, head_dim) each, dequantized
  // for int8/KIVI caches (host memory; CPU caches).
  void read_kv(int64_t seq_id, int layer, float* k, float* v) const;
  // The same, sized and read under one lock (another thread may append meanwhile): alloc(len) is
  // called with the layer's length and returns the (k, v) buffers of len rows; returns len.
  int64_t read_kv(int64_t seq_id, int layer, const std::function<std::pair<float*, float*>(int64_t)>& alloc) const;
  std::vector<int64_t> sequences() const;
  int refcount(int32_t page) const;

  // Moves a sequence's pages to host memory (pinned when CUDA is usable; asynchronous on `stream`)
  // and frees them; later writes to those pages (other appends) must be ordered after the copy, i.e.
  // issued on the same stream. swap_in allocates pages again (all or nothing, Error(CacheFull)),
  // copies the data back and waits for `stream` before freeing the host copy.
  void swap_out(int64_t seq_id, void* stream = nullptr);
  void swap_in(int64_t seq_id, void* stream = nullptr);
  bool is_swapped(int64_t seq_id) const;

  // Attention of q over `layer` of the given sequences. The cache's lock is held shared until the
  // kernel has read the pages, so other threads may call anything meanwhile: attention calls run
  // together, free/truncate/swap/append wait for them. q (total_q, heads, head_dim); q_lens[i]
  // rows for seq_ids[i] (empty = one row each). See the header comment for masking and lse.
  void attention(const TensorView& q, int layer, const std::vector<int64_t>& seq_ids,
                 const std::vector<int64_t>& q_lens, const TensorView& out, const TensorView* lse,
                 const PagedAttentionOptions& opts, void* stream = nullptr);

  // The FlashInfer-style arrays for `seq_ids` at `layer` (host memory), as attention() builds them.
  void build_indices(const std::vector<int64_t>& seq_ids, int layer, std::vector<int32_t>& kv_indptr,
                     std::vector<int32_t>& kv_indices, std::vector<int32_t>& last_page_len) const;

  PagedCacheStats stats() const;
  // Checks the allocator invariants (every page exactly once in {free list, cached, referenced},
  // reference counts equal the number of table entries); throws Error(Value) naming the broken one.
  void check_invariants() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace memkernels
