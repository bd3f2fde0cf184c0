// PagedKVCache (allocator, page tables, prefix table, swap, statistics) and paged_attention_raw
// (argument checks, then the CPU or CUDA backend).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <list>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "cpu/convert.h"
#include "paged_internal.h"

// check() that builds its message only on failure: these checks run on every kernel call, and an
// eager std::string (a malloc for most messages) was a visible part of a decode-sized call.
#define CHECK_LAZY(ok, kind, msg)       \
  do {                                  \
    if (!(ok)) throw_error(kind, msg);  \
  } while (0)

namespace memkernels {

#if MEMKERNELS_WITH_CUDA
namespace cuda_backend {
// cuda/paged_attention.cu: stream-ordered scratch for the index arrays of one call.
void* paged_upload(int device, const void* host, size_t bytes, void* stream);
void paged_scratch_free(int device, void* ptr, void* stream);
}  // namespace cuda_backend
#endif

namespace {

std::string str(int64_t x) { return std::to_string(x); }

void expect_index_array(const TensorView& t, const char* what, const TensorView& q, int64_t size) {
  expect_ndim(t, what, 1);
  expect_dtype(t, what, {DType::Int32});
  expect_contiguous(t, what);
  expect_same_device(t, what, q, "q");
  if (size >= 0)
    CHECK_LAZY(t.size(0) == size, ErrorKind::Value,
          std::string(what) + ": expected " + str(size) + " entries, got " + str(t.size(0)));
  if (t.size(0) > 0) expect_not_null(t, what);
}

void check_indptr(const int32_t* ptr, int batch, int64_t limit, const char* what, const char* limit_what) {
  CHECK_LAZY(ptr[0] >= 0, ErrorKind::Value, std::string(what) + "[0] must be >= 0, got " + str(ptr[0]));
  for (int b = 0; b < batch; ++b)
    CHECK_LAZY(ptr[b + 1] >= ptr[b], ErrorKind::Value,
          std::string(what) + " must be non-decreasing, but entry " + str(b + 1) + " (" + str(ptr[b + 1]) +
              ") < entry " + str(b) + " (" + str(ptr[b]) + ")");
  CHECK_LAZY(ptr[batch] <= limit, ErrorKind::Value,
        std::string(what) + "[-1] = " + str(ptr[batch]) + " exceeds " + limit_what + " (" + str(limit) + ")");
}

}  // namespace

// kivi: the KIVI fields of a PagedKVCache (its pages then come as uint8 views), else nullptr.
static void paged_attention_impl(const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                                 const TensorView* qo_indptr, const TensorView& kv_indptr,
                                 const TensorView& kv_indices, const TensorView& kv_last_page_len,
                                 const TensorView& out, const TensorView* lse, const PagedAttentionOptions& opts,
                                 int max_q_len, void* stream, const TensorView* k_scales, const TensorView* v_scales,
                                 const PagedProblem* kivi, bool qo_checked = false) {
  expect_ndim(q, "q", 3);
  expect_dtype(q, "q", {DType::Float32, DType::Float16, DType::BFloat16});
  expect_last_dim_contiguous(q, "q");
  const char* names[] = {"k_pages", "v_pages"};
  const TensorView* kv[] = {&k_pages, &v_pages};
  for (int i = 0; i < 2; ++i) {
    const TensorView& t = *kv[i];
    expect_ndim(t, names[i], 4);
    if (!(t.dtype == q.dtype || t.dtype == DType::Int8 || (kivi && t.dtype == DType::UInt8)))
      throw_error(ErrorKind::Type, std::string(names[i]) + " has dtype " + dtype_name(t.dtype) + " but q has " + dtype_name(q.dtype) +
          "; the pages must have the dtype of q and out, or be int8 with scales");
    expect_same_device(t, names[i], q, "q");
    if (!(t.stride(3) == 1 && t.stride(2) == t.size(3)))
      throw_error(ErrorKind::Value, std::string(names[i]) + ": the (kv_heads, head_dim) block of each token must be contiguous");
    if (!(t.stride(0) >= 0 && t.stride(1) >= 0))
      throw_error(ErrorKind::Value, std::string(names[i]) + ": negative page or token stride");
  }
  CHECK_LAZY(k_pages.dtype == v_pages.dtype, ErrorKind::Type, "k_pages and v_pages must have the same dtype");
  if (!(std::equal(k_pages.shape, k_pages.shape + 4, v_pages.shape)))
    throw_error(ErrorKind::Value, "k_pages " + k_pages.shape_str() + " and v_pages " + v_pages.shape_str() + " must have the same shape");
  const int64_t num_pages = k_pages.size(0), page_size = k_pages.size(1), kv_heads = k_pages.size(2);
  const int64_t D = q.size(2), heads = q.size(1), total_q = q.size(0);
  if (!(k_pages.size(3) == D))
    throw_error(ErrorKind::Value, "head_dim of the pages (" + str(k_pages.size(3)) + ") differs from q (" + str(D) + ")");
  CHECK_LAZY(D > 0 && heads > 0 && kv_heads > 0 && page_size > 0, ErrorKind::Value,
        "paged_attention: head_dim, heads, kv_heads and page_size must be > 0");
  if (!(heads % kv_heads == 0))
    throw_error(ErrorKind::Value, "paged_attention: q heads (" + str(heads) + ") must be a multiple of kv heads (" + str(kv_heads) + ")");
  CHECK_LAZY(num_pages < (int64_t(1) << 31) && total_q < (int64_t(1) << 31), ErrorKind::Value,
        "paged_attention: too many pages or query rows (>= 2^31)");
  expect_ndim(out, "out", 3);
  if (!(out.dtype == q.dtype))
    throw_error(ErrorKind::Type, std::string("out has dtype ") + dtype_name(out.dtype) + " but q has " + dtype_name(q.dtype));
  if (!(std::equal(out.shape, out.shape + 3, q.shape)))
    throw_error(ErrorKind::Value, "out: expected the shape of q " + q.shape_str() + ", got " + out.shape_str());
  expect_last_dim_contiguous(out, "out");
  expect_same_device(out, "out", q, "q");
  CHECK_LAZY(std::isfinite(opts.scale) && opts.scale >= 0.0f, ErrorKind::Value,
        "paged_attention: scale must be finite and >= 0");
  CHECK_LAZY(std::isfinite(opts.softcap) && opts.softcap >= 0.0f, ErrorKind::Value,
        "paged_attention: softcap must be finite and >= 0 (0 disables it)");
  CHECK_LAZY(opts.num_splits >= 0, ErrorKind::Value, "paged_attention: num_splits must be >= 0");

  expect_ndim(kv_indptr, "kv_indptr", 1);
  if (!(kv_indptr.size(0) >= 1))
    throw_error(ErrorKind::Value, "kv_indptr: expected batch + 1 >= 1 entries");
  const int64_t batch = kv_indptr.size(0) - 1;
  expect_index_array(kv_indptr, "kv_indptr", q, batch + 1);
  expect_index_array(kv_indices, "kv_indices", q, -1);
  expect_index_array(kv_last_page_len, "kv_last_page_len", q, batch);
  if (qo_indptr) {
    expect_index_array(*qo_indptr, "qo_indptr", q, batch + 1);
  } else {
    if (!(total_q == batch))
      throw_error(ErrorKind::Value, "q: without qo_indptr there is one query row per sequence, so q needs " + str(batch) + " rows, got " +
          str(total_q));
  }

  PagedProblem p;
  p.dtype = q.dtype;
  p.kv_dtype = k_pages.dtype;
  p.batch = int(batch);
  if (kivi) {
    p.kivi_bits = kivi->kivi_bits, p.resid = kivi->resid;
    p.kv_vc = kivi->kv_vc, p.kv_ks = kivi->kv_ks, p.kv_kz = kivi->kv_kz, p.kv_vs = kivi->kv_vs, p.kv_vz = kivi->kv_vz;
  }
  const bool quant = k_pages.dtype == DType::Int8;
  CHECK_LAZY(quant == (k_scales != nullptr) && quant == (v_scales != nullptr), ErrorKind::Value,
        quant ? "int8 k_pages/v_pages need k_scales and v_scales" : "k_scales/v_scales are only for int8 pages");
  if (quant) {
    const char* snames[] = {"k_scales", "v_scales"};
    const TensorView* sc[] = {k_scales, v_scales};
    for (int i = 0; i < 2; ++i) {
      const TensorView& t = *sc[i];
      expect_ndim(t, snames[i], 3);
      expect_dtype(t, snames[i], {DType::Float32});
      expect_same_device(t, snames[i], q, "q");
      if (!(t.size(0) == k_pages.size(0) && t.size(1) == k_pages.size(1) && t.size(2) == k_pages.size(2)))
        throw_error(ErrorKind::Value, std::string(snames[i]) + ": expected (num_pages, page_size, kv_heads) = (" + str(k_pages.size(0)) + ", " +
            str(k_pages.size(1)) + ", " + str(k_pages.size(2)) + "), got " + t.shape_str());
      if (!(t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) >= 0))
        throw_error(ErrorKind::Value, std::string(snames[i]) + ": the (page_size, kv_heads) dims must be contiguous");
      if (t.size(0) > 0) expect_not_null(t, snames[i]);
    }
    p.k_scale = k_scales->ptr<const float>(), p.v_scale = v_scales->ptr<const float>();
    p.ks_page = k_scales->stride(0), p.ks_tok = k_scales->stride(1);
    p.vs_page = v_scales->stride(0), p.vs_tok = v_scales->stride(1);
  }
  p.heads = int(heads), p.kv_heads = int(kv_heads), p.head_dim = int(D), p.page_size = int(page_size);
  p.num_pages = num_pages, p.total_q = total_q;
  p.q = q.data, p.k = k_pages.data, p.v = v_pages.data, p.out = out.data;
  p.q_row = q.stride(0), p.q_head = q.stride(1), p.o_row = out.stride(0), p.o_head = out.stride(1);
  p.k_page = k_pages.stride(0), p.k_tok = k_pages.stride(1), p.k_head = k_pages.stride(2);
  p.v_page = v_pages.stride(0), p.v_tok = v_pages.stride(1), p.v_head = v_pages.stride(2);
  p.qo_indptr = qo_indptr ? qo_indptr->ptr<const int32_t>() : nullptr;
  p.qo_indptr_checked = qo_checked;
  p.kv_indptr = kv_indptr.ptr<const int32_t>();
  p.kv_indices = kv_indices.ptr<const int32_t>();
  p.last_page_len = kv_last_page_len.ptr<const int32_t>();
  p.nnz_pages = kv_indices.size(0);
  p.scale = opts.scale > 0.0f ? opts.scale : 1.0f / std::sqrt(float(D));
  p.softcap = opts.softcap;
  p.window_left = opts.window_left < 0 ? -1 : opts.window_left;
  p.window_right = opts.causal ? 0 : (opts.window_right < 0 ? -1 : opts.window_right);
  p.num_splits = opts.num_splits;
  p.device = q.device.index;
  if (lse) {
    expect_dtype(*lse, "lse", {DType::Float32});
    expect_shape(*lse, "lse", {heads, total_q});
    expect_contiguous(*lse, "lse");
    expect_same_device(*lse, "lse", q, "q");
    p.lse = lse->ptr<float>();
  }
  if (total_q > 0) {
    expect_not_null(q, "q");
    expect_not_null(out, "out");
  }
  if (num_pages > 0) {
    expect_not_null(k_pages, "k_pages");
    expect_not_null(v_pages, "v_pages");
  }

  if (q.device.is_cuda()) {
    require_cuda_usable("paged_attention", q.device);
    CHECK_LAZY(!quant, ErrorKind::NotImplemented, "paged_attention: int8 pages are CPU-only in this version");
    p.max_q_len = max_q_len > 0 ? max_q_len : int(std::max<int64_t>(total_q, 1));
    if (batch == 0 || total_q == 0) return;
#if MEMKERNELS_WITH_CUDA
    cuda_backend::paged_attention(p, stream);
#endif
    return;
  }
  (void)stream;
  // CPU: validate every index; they decide every address the kernel reads.
  check_indptr(p.kv_indptr, p.batch, p.nnz_pages, "kv_indptr", "the entries of kv_indices");
  if (p.qo_indptr) {
    if (!(p.qo_indptr[0] == 0))
      throw_error(ErrorKind::Value, "qo_indptr[0] must be 0, got " + str(p.qo_indptr[0]));
    check_indptr(p.qo_indptr, p.batch, total_q, "qo_indptr", "the rows of q");
    if (!(p.qo_indptr[p.batch] == total_q))
      throw_error(ErrorKind::Value, "qo_indptr[-1] = " + str(p.qo_indptr[p.batch]) + " must equal the rows of q (" + str(total_q) + ")");
  }
  int max_q = 1;
  for (int b = 0; b < p.batch; ++b) {
    const int npg = p.kv_indptr[b + 1] - p.kv_indptr[b];
    if (npg > 0) {
      const int last = p.last_page_len[b];
      if (!(last >= 1 && last <= page_size))
        throw_error(ErrorKind::Value, "kv_last_page_len[" + str(b) + "] = " + str(last) + " is outside [1, page_size = " + str(page_size) + "]");
      if (!(int64_t(npg - 1) * page_size + last < (int64_t(1) << 31)))
        throw_error(ErrorKind::Value, "sequence " + str(b) + " is too long (>= 2^31 tokens)");
    }
    for (int i = p.kv_indptr[b]; i < p.kv_indptr[b + 1]; ++i)
      if (!(p.kv_indices[i] >= 0 && p.kv_indices[i] < num_pages))
        throw_error(ErrorKind::Value, "kv_indices[" + str(i) + "] = " + str(p.kv_indices[i]) + " is not a page id in [0, " + str(num_pages) +
            ")");
    max_q = std::max(max_q, p.q_len(b));
  }
  p.max_q_len = max_q;
  if (batch == 0 || total_q == 0) return;
  MK_CPU_DISPATCH(paged_attention, p);
}

void paged_attention_raw(const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                         const TensorView* qo_indptr, const TensorView& kv_indptr, const TensorView& kv_indices,
                         const TensorView& kv_last_page_len, const TensorView& out, const TensorView* lse,
                         const PagedAttentionOptions& opts, int max_q_len, void* stream, const TensorView* k_scales,
                         const TensorView* v_scales) {
  paged_attention_impl(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, out, lse, opts,
                       max_q_len, stream, k_scales, v_scales, nullptr);
}

// ---------------------------------------------------------------------------------------------
// PagedKVCache

namespace {

// Chain hash of a page: FNV-1a style mix of the previous page's hash and this page's tokens.
uint64_t page_hash(uint64_t prev, const int32_t* tokens, int n) {
  uint64_t h = prev ^ 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < n; ++i) {
    h ^= uint32_t(tokens[i]);
    h *= 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h ? h : 1;  // 0 means "no hash"
}

}  // namespace

struct PagedKVCache::Impl {
  int L, P, ps, kvh, D;
  DType dtype;
  Device device;
  int esize;
  bool quant = false;  // int8 pages with float32 scales
  // Element counts in the pool dtype (bytes for int8); scale_off: bytes from a layer block's start
  // to its K scales (V scales follow after page_size * kv_heads floats).
  int64_t page_elems, layer_elems, kv_elems, page_bytes, scale_off = 0;
  // Float pages interleave K and V per token ([token][K|V][kv_head][head_dim]) so attention reads
  // one sequential stream whatever the page size; int8 pages keep [K block][V block][scales].
  int64_t tok_elems = 0, v_off = 0;
  // KIVI (kivi_bits 2/4): byte offsets in a layer block (see PagedProblem) and packed row bytes.
  int kivi_bits = 0;
  int64_t kv_vc = 0, kv_ks = 0, kv_kz = 0, kv_vs = 0, kv_vz = 0, code_row = 0;
  void* pool = nullptr;
  // Exclusive for every table change and read; attention() holds it shared across the kernel, so
  // free/truncate/swap/append (which release or rewrite pages and KIVI windows) wait for it.
  mutable std::shared_mutex mu;

  std::vector<int32_t> free_list;  // stack of free page ids
  std::vector<int32_t> ref;        // references from sequence tables
  // Prefix table: hashed pages; unreferenced hashed pages are kept in LRU order (front = oldest).
  std::unordered_map<uint64_t, int32_t> by_hash;
  std::vector<uint64_t> hash_of;                // 0 = not in the table
  std::vector<uint64_t> parent_of;              // hash of the previous page (verification)
  std::vector<std::vector<int32_t>> tokens_of;  // the page's tokens (verification)
  std::list<int32_t> lru;
  std::vector<std::list<int32_t>::iterator> lru_pos;
  std::vector<char> in_lru;

  struct Seq {
    std::vector<int32_t> pages;
    std::vector<int64_t> layer_len;
    std::vector<int32_t> tokens;  // known token ids (prefix tokens given at creation)
    std::vector<uint64_t> chain;  // chain hashes of the first chain.size() pages
    std::vector<std::vector<float>> resid;  // KIVI: per layer, float32 K then V of the recent window
    bool swapped = false;
    void* host = nullptr;  // swapped-out pages
    int64_t host_pages = 0;
    int64_t length() const { return *std::max_element(layer_len.begin(), layer_len.end()); }
  };
  std::unordered_map<int64_t, Seq> seqs;
  int64_t next_id = 0;
  int64_t prefix_hits = 0, prefix_queries = 0, evictions = 0;

  char* page_ptr(int32_t page) const { return static_cast<char*>(pool) + int64_t(page) * page_bytes; }
  int64_t available() const { return int64_t(free_list.size()) + int64_t(lru.size()); }

  Seq& get(int64_t id, const char* op) {
    auto it = seqs.find(id);
    CHECK_LAZY(it != seqs.end(), ErrorKind::Value,
          std::string(op) + ": unknown sequence id " + str(id) + " (never added, or already freed)");
    return it->second;
  }
  const Seq& get(int64_t id, const char* op) const { return const_cast<Impl*>(this)->get(id, op); }
  Seq& get_resident(int64_t id, const char* op) {
    Seq& s = get(id, op);
    CHECK_LAZY(!s.swapped, ErrorKind::Value, std::string(op) + ": sequence " + str(id) + " is swapped out (swap_in first)");
    return s;
  }

  void unlink_lru(int32_t page) {
    if (!in_lru[page]) return;
    lru.erase(lru_pos[page]);
    in_lru[page] = 0;
  }
  void unhash(int32_t page) {
    if (!hash_of[page]) return;
    auto it = by_hash.find(hash_of[page]);
    if (it != by_hash.end() && it->second == page) by_hash.erase(it);
    hash_of[page] = 0;
    tokens_of[page].clear();
    tokens_of[page].shrink_to_fit();
  }
  // Callers check available() first.
  int32_t alloc_page() {
    int32_t page;
    if (!free_list.empty()) {
      page = free_list.back();
      free_list.pop_back();
    } else {
      page = lru.front();
      unlink_lru(page);
      unhash(page);
      ++evictions;
    }
    ref[page] = 1;
    return page;
  }
  void release_page(int32_t page) {
    if (--ref[page] > 0) return;
    if (hash_of[page]) {
      lru.push_back(page);
      lru_pos[page] = std::prev(lru.end());
      in_lru[page] = 1;
    } else {
      free_list.push_back(page);
    }
  }
  void acquire_page(int32_t page) {
    if (ref[page]++ == 0) unlink_lru(page);
  }

  // Enters the sequence's full pages (full in every layer, with known tokens) in the prefix table.
  void register_pages(Seq& s) {
    int64_t full = *std::min_element(s.layer_len.begin(), s.layer_len.end()) / ps;
    full = std::min<int64_t>(full, int64_t(s.tokens.size()) / ps);
    full = std::min<int64_t>(full, int64_t(s.pages.size()));
    for (int64_t i = int64_t(s.chain.size()); i < full; ++i) {
      const uint64_t prev = i ? s.chain[i - 1] : 0;
      const uint64_t h = page_hash(prev, s.tokens.data() + i * ps, ps);
      s.chain.push_back(h);
      const int32_t page = s.pages[i];
      if (hash_of[page] || by_hash.count(h)) continue;  // already known (maybe as another page)
      hash_of[page] = h;
      parent_of[page] = prev;
      tokens_of[page].assign(s.tokens.begin() + i * ps, s.tokens.begin() + (i + 1) * ps);
      by_hash[h] = page;
    }
  }

  // KIVI: packs the full window of `layer` into `page`.
  void kivi_quantize(Seq& s, int layer, int32_t page) {
    const int levels = (1 << kivi_bits) - 1, per_byte = 8 / kivi_bits;
    const float* win = s.resid[size_t(layer)].data();
    const int64_t kv_block = int64_t(ps) * kvh * D;
    uint8_t* blk = reinterpret_cast<uint8_t*>(page_ptr(page)) + layer * layer_elems;
    float* ks = reinterpret_cast<float*>(blk + kv_ks);
    float* kz = reinterpret_cast<float*>(blk + kv_kz);
    float* vs = reinterpret_cast<float*>(blk + kv_vs);
    float* vz = reinterpret_cast<float*>(blk + kv_vz);
    auto code = [&](float x, float scale, float zero) {
      const float c = scale > 0.0f ? std::nearbyint((x - zero) / scale) : 0.0f;
      return uint8_t(std::min(float(levels), std::max(0.0f, c)));
    };
    std::fill(blk, blk + 2 * kv_vc, uint8_t(0));
    for (int g = 0; g < kvh; ++g)
      for (int d = 0; d < D; ++d) {  // keys: per channel over the page's tokens
        float lo = win[g * D + d], hi = lo;
        for (int t = 1; t < ps; ++t) {
          const float x = win[(int64_t(t) * kvh + g) * D + d];
          lo = std::min(lo, x), hi = std::max(hi, x);
        }
        const float scale = (hi - lo) / levels;
        ks[g * D + d] = scale, kz[g * D + d] = lo;
        for (int t = 0; t < ps; ++t) {
          const uint8_t c = code(win[(int64_t(t) * kvh + g) * D + d], scale, lo);
          blk[(int64_t(t) * kvh + g) * code_row + d / per_byte] |= uint8_t(c << ((d % per_byte) * kivi_bits));
        }
      }
    for (int t = 0; t < ps; ++t)
      for (int g = 0; g < kvh; ++g) {  // values: per token
        const float* x = win + kv_block + (int64_t(t) * kvh + g) * D;
        float lo = x[0], hi = x[0];
        for (int d = 1; d < D; ++d) lo = std::min(lo, x[d]), hi = std::max(hi, x[d]);
        const float scale = (hi - lo) / levels;
        vs[t * kvh + g] = scale, vz[t * kvh + g] = lo;
        uint8_t* row = blk + kv_vc + (int64_t(t) * kvh + g) * code_row;
        for (int d = 0; d < D; ++d) row[d / per_byte] |= uint8_t(code(x[d], scale, lo) << ((d % per_byte) * kivi_bits));
      }
  }
  // KIVI: token t of `page`, `layer` as floats (k and v: kv_heads * head_dim each).
  void kivi_dequant_token(int32_t page, int layer, int t, float* k, float* v) const {
    const int per_byte = 8 / kivi_bits, mask = (1 << kivi_bits) - 1;
    const uint8_t* blk = reinterpret_cast<const uint8_t*>(page_ptr(page)) + layer * layer_elems;
    const float* ks = reinterpret_cast<const float*>(blk + kv_ks);
    const float* kz = reinterpret_cast<const float*>(blk + kv_kz);
    const float* vs = reinterpret_cast<const float*>(blk + kv_vs);
    const float* vz = reinterpret_cast<const float*>(blk + kv_vz);
    for (int g = 0; g < kvh; ++g) {
      const uint8_t* kr = blk + (int64_t(t) * kvh + g) * code_row;
      const uint8_t* vr = blk + kv_vc + (int64_t(t) * kvh + g) * code_row;
      for (int d = 0; d < D; ++d) {
        const int sh = (d % per_byte) * kivi_bits;
        k[g * D + d] = float((kr[d / per_byte] >> sh) & mask) * ks[g * D + d] + kz[g * D + d];
        v[g * D + d] = float((vr[d / per_byte] >> sh) & mask) * vs[t * kvh + g] + vz[t * kvh + g];
      }
    }
  }

  void copy_page(int32_t dst, int32_t src, void* stream) {
    device_memcpy(page_ptr(dst), device, page_ptr(src), device, size_t(page_bytes), stream);
  }
};

PagedKVCache::PagedKVCache(int num_layers, int num_pages, int page_size, int kv_heads, int head_dim, DType dtype,
                           Device device, int kivi_bits)
    : impl_(new Impl) {
  CHECK_LAZY(kivi_bits == 0 || ((kivi_bits == 2 || kivi_bits == 4) && dtype == DType::UInt8), ErrorKind::Value,
        "PagedKVCache: kivi_bits must be 0, or 2 or 4 with dtype uint8");
  CHECK_LAZY(kivi_bits == 0 || device.is_cpu(), ErrorKind::NotImplemented,
        "PagedKVCache: KIVI pages are CPU-only in this version");
  CHECK_LAZY(kivi_bits == 0 || (int64_t(head_dim) * kivi_bits) % 8 == 0, ErrorKind::Value,
        "PagedKVCache: KIVI needs head_dim * bits to be a multiple of 8");
  CHECK_LAZY(num_layers > 0 && num_pages > 0 && page_size > 0 && kv_heads > 0 && head_dim > 0, ErrorKind::Value,
        "PagedKVCache: num_layers, num_pages, page_size, kv_heads and head_dim must all be > 0, got " +
            str(num_layers) + ", " + str(num_pages) + ", " + str(page_size) + ", " + str(kv_heads) + ", " +
            str(head_dim));
  CHECK_LAZY(dtype == DType::Float32 || dtype == DType::Float16 || dtype == DType::BFloat16 || dtype == DType::Int8 ||
            (dtype == DType::UInt8 && kivi_bits),
        ErrorKind::Type,
        std::string("PagedKVCache: dtype must be float32, float16, bfloat16 or int8, got ") + dtype_name(dtype));
  CHECK_LAZY(dtype != DType::Int8 || device.is_cpu(), ErrorKind::NotImplemented,
        "PagedKVCache: int8 pages are CPU-only in this version");
  CHECK_LAZY(page_size <= (1 << 20), ErrorKind::Value, "PagedKVCache: page_size must be <= 2^20");
  // Bound the pool size in floating point before the int64 products below: they could overflow
  // (UB) and wrap, e.g. PagedKVCache(2^30, 4, 2^20, 1, 2^13) got a 0-byte pool that append() then
  // wrote past (a segfault; found while fuzzing the constructor, see test_regressions.py). The bound
  // covers the int8 layout too (per token and head: D bytes + a 4-byte scale, for K and V).
  const double pool_bound = double(num_layers) * double(num_pages) *
                            (2.0 * double(page_size) * double(kv_heads) * (double(head_dim) * dtype_size(dtype) + 4.0) +
                             256.0);
  CHECK_LAZY(pool_bound < 4e18, ErrorKind::Value, "PagedKVCache: pool size overflows");
  Impl& m = *impl_;
  m.L = num_layers, m.P = num_pages, m.ps = page_size, m.kvh = kv_heads, m.D = head_dim;
  m.dtype = dtype, m.device = device, m.esize = dtype_size(dtype);
  m.kv_elems = int64_t(page_size) * kv_heads * head_dim;
  m.layer_elems = 2 * m.kv_elems;
  m.tok_elems = 2 * int64_t(kv_heads) * head_dim;
  m.v_off = int64_t(kv_heads) * head_dim;
  if (dtype == DType::Int8) {
    m.quant = true;
    m.kv_elems = (m.kv_elems + 63) / 64 * 64;
    m.scale_off = 2 * m.kv_elems;
    m.tok_elems = int64_t(kv_heads) * head_dim;
    m.v_off = m.kv_elems;
    m.layer_elems = m.scale_off + (2 * int64_t(page_size) * kv_heads * 4 + 63) / 64 * 64;
  }
  if (kivi_bits) {
    auto pad = [](int64_t x) { return (x + 63) / 64 * 64; };
    m.kivi_bits = kivi_bits;
    m.code_row = int64_t(head_dim) * kivi_bits / 8;
    const int64_t codes = pad(int64_t(page_size) * kv_heads * m.code_row);
    m.kv_vc = codes;
    m.kv_ks = 2 * codes;
    m.kv_kz = m.kv_ks + pad(int64_t(kv_heads) * head_dim * 4);
    m.kv_vs = m.kv_kz + pad(int64_t(kv_heads) * head_dim * 4);
    m.kv_vz = m.kv_vs + pad(int64_t(page_size) * kv_heads * 4);
    m.layer_elems = m.kv_vz + pad(int64_t(page_size) * kv_heads * 4);
  }
  m.page_elems = m.layer_elems * num_layers;
  m.page_bytes = m.page_elems * m.esize;
  const double total = double(m.page_bytes) * num_pages;
  CHECK_LAZY(total < 9e18, ErrorKind::Value, "PagedKVCache: pool size overflows");
  if (device.is_cuda()) require_cuda_usable("PagedKVCache", device);
  m.pool = device_malloc(device, size_t(m.page_bytes) * size_t(num_pages));
  m.free_list.resize(num_pages);
  for (int i = 0; i < num_pages; ++i) m.free_list[i] = num_pages - 1 - i;  // page 0 is handed out first
  m.ref.assign(num_pages, 0);
  m.hash_of.assign(num_pages, 0);
  m.parent_of.assign(num_pages, 0);
  m.tokens_of.resize(num_pages);
  m.lru_pos.resize(num_pages);
  m.in_lru.assign(num_pages, 0);
}

PagedKVCache::~PagedKVCache() {
  for (auto& [id, s] : impl_->seqs)
    if (s.host) host_free_pinned(s.host);
  device_free(impl_->device, impl_->pool);
}

int PagedKVCache::num_layers() const { return impl_->L; }
int PagedKVCache::num_pages() const { return impl_->P; }
int PagedKVCache::page_size() const { return impl_->ps; }
int PagedKVCache::kv_heads() const { return impl_->kvh; }
int PagedKVCache::head_dim() const { return impl_->D; }
DType PagedKVCache::dtype() const { return impl_->dtype; }
Device PagedKVCache::device() const { return impl_->device; }

TensorView PagedKVCache::pool() const {
  const Impl& m = *impl_;
  // int8 and KIVI layer blocks mix codes and float32 scales: a byte view (int8 / uint8) of the
  // exact pool, layer_elems being bytes there.
  if (m.quant || m.kivi_bits) return TensorView(m.pool, m.dtype, {m.P, m.L, m.layer_elems}, m.device);
  return TensorView(m.pool, m.dtype, {m.P, m.L, m.ps, 2, m.kvh, m.D}, m.device);
}

static TensorView layer_pages(const PagedKVCache::Impl& m, int layer, int kv) {
  CHECK_LAZY(!m.kivi_bits, ErrorKind::Value, "k_pages/v_pages: KIVI pages are packed; use read_kv or pool()");
  CHECK_LAZY(layer >= 0 && layer < m.L, ErrorKind::Value,
        "layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  TensorView t(static_cast<char*>(m.pool) + (layer * m.layer_elems + kv * m.v_off) * m.esize, m.dtype,
               {m.P, m.ps, m.kvh, m.D}, m.device);
  t.strides[0] = m.page_elems;
  t.strides[1] = m.tok_elems;
  return t;
}
static TensorView layer_scales(const PagedKVCache::Impl& m, int layer, int kv) {
  CHECK_LAZY(m.quant, ErrorKind::Value, "k_scales/v_scales: only int8 caches have scales");
  CHECK_LAZY(layer >= 0 && layer < m.L, ErrorKind::Value,
        "layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  TensorView t(static_cast<char*>(m.pool) + layer * m.layer_elems + m.scale_off + kv * int64_t(m.ps) * m.kvh * 4,
               DType::Float32, {m.P, m.ps, m.kvh}, m.device);
  t.strides[0] = m.page_bytes / 4;
  return t;
}
TensorView PagedKVCache::k_scales(int layer) const { return layer_scales(*impl_, layer, 0); }
TensorView PagedKVCache::v_scales(int layer) const { return layer_scales(*impl_, layer, 1); }
TensorView PagedKVCache::k_pages(int layer) const { return layer_pages(*impl_, layer, 0); }
TensorView PagedKVCache::v_pages(int layer) const { return layer_pages(*impl_, layer, 1); }

int64_t PagedKVCache::add_sequence(const int32_t* prefix_tokens, int64_t num_tokens, int64_t* cached_tokens) {
  CHECK_LAZY(num_tokens >= 0 && (num_tokens == 0 || prefix_tokens), ErrorKind::Value,
        "add_sequence: prefix tokens must be a valid array");
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq s;
  s.layer_len.assign(m.L, 0);
  if (m.kivi_bits) s.resid.assign(m.L, std::vector<float>(size_t(2) * m.ps * m.kvh * m.D, 0.0f));
  s.tokens.assign(prefix_tokens, prefix_tokens + num_tokens);
  // Walk the full pages of the prefix while the table has them.
  const int64_t full = num_tokens / m.ps;
  m.prefix_queries += full;
  uint64_t prev = 0;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t* tok = prefix_tokens + i * m.ps;
    const uint64_t h = page_hash(prev, tok, m.ps);
    auto it = m.by_hash.find(h);
    if (it == m.by_hash.end()) break;
    const int32_t page = it->second;
    if (m.parent_of[page] != prev || !std::equal(tok, tok + m.ps, m.tokens_of[page].begin())) break;
    m.acquire_page(page);
    s.pages.push_back(page);
    s.chain.push_back(h);
    prev = h;
  }
  m.prefix_hits += int64_t(s.pages.size());
  const int64_t cached = int64_t(s.pages.size()) * m.ps;
  std::fill(s.layer_len.begin(), s.layer_len.end(), cached);
  if (cached_tokens) *cached_tokens = cached;
  const int64_t id = m.next_id++;
  m.seqs.emplace(id, std::move(s));
  return id;
}

void PagedKVCache::append(const std::vector<int64_t>& seq_ids, int layer, const TensorView& k, const TensorView& v,
                          const std::vector<int64_t>& counts, void* stream) {
  Impl& m = *impl_;
  CHECK_LAZY(layer >= 0 && layer < m.L, ErrorKind::Value,
        "append: layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  const char* names[] = {"k", "v"};
  const TensorView* kv[] = {&k, &v};
  for (int i = 0; i < 2; ++i) {
    const TensorView& t = *kv[i];
    expect_ndim(t, names[i], 3);
    // Quantized caches (int8, KIVI) quantize float input on append: integer k/v (int8 codes, uint8)
    // would be read as another dtype, so only float dtypes are taken there.
    const bool is_float = t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16;
    const bool quantized = m.quant || m.kivi_bits;
    const std::string cache_dtype =
        m.kivi_bits ? "kivi" + std::to_string(m.kivi_bits) : std::string(dtype_name(m.dtype));
    CHECK_LAZY(quantized ? is_float : t.dtype == m.dtype, ErrorKind::Type,
          std::string("append: ") + names[i] + " has dtype " + dtype_name(t.dtype) +
              (quantized ? ", but a " + cache_dtype + " cache quantizes k/v on append: give float32, float16 or bfloat16"
                         : " but the cache holds " + cache_dtype));
    CHECK_LAZY(t.device == m.device, ErrorKind::Value,
          std::string("append: ") + names[i] + " is on " + t.device.str() + " but the cache is on " + m.device.str());
    CHECK_LAZY(t.size(1) == m.kvh && t.size(2) == m.D, ErrorKind::Value,
          std::string("append: ") + names[i] + " must be (tokens, kv_heads=" + str(m.kvh) + ", head_dim=" + str(m.D) +
              "), got " + t.shape_str());
    CHECK_LAZY(t.size(0) == 0 || (t.stride(2) == 1 && t.stride(1) == m.D), ErrorKind::Value,
          std::string("append: ") + names[i] + ": each token's (kv_heads, head_dim) block must be contiguous");
  }
  CHECK_LAZY(k.dtype == v.dtype, ErrorKind::Type, "append: k and v must have the same dtype");
  CHECK_LAZY(k.size(0) == v.size(0), ErrorKind::Value,
        "append: k " + k.shape_str() + " and v " + v.shape_str() + " must have the same number of tokens");
  CHECK_LAZY(counts.empty() || counts.size() == seq_ids.size(), ErrorKind::Value,
        "append: counts has " + str(int64_t(counts.size())) + " entries for " + str(int64_t(seq_ids.size())) +
            " sequences");
  int64_t total = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const int64_t n = counts.empty() ? 1 : counts[i];
    CHECK_LAZY(n >= 0, ErrorKind::Value, "append: counts[" + str(int64_t(i)) + "] = " + str(n) + " is negative");
    CHECK_LAZY(n <= INT64_MAX - total, ErrorKind::Value, "append: counts add up to more than 2^63 - 1 tokens");
    total += n;
  }
  CHECK_LAZY(total == k.size(0), ErrorKind::Value,
        "append: the counts add up to " + str(total) + " tokens but k and v have " + str(k.size(0)));
  if (total > 0) {
    expect_not_null(k, "k");
    expect_not_null(v, "v");
  }

  std::lock_guard<std::shared_mutex> lock(m.mu);
  // 1. Plan: validate ids and count the pages needed (new pages + copy-on-write copies).
  std::unordered_set<int64_t> seen;
  int64_t need = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    Impl::Seq& s = m.get_resident(seq_ids[i], "append");
    CHECK_LAZY(seen.insert(seq_ids[i]).second, ErrorKind::Value,
          "append: sequence " + str(seq_ids[i]) + " appears more than once");
    const int64_t n = counts.empty() ? 1 : counts[i];
    if (n == 0) continue;
    const int64_t cur = s.layer_len[layer], end = cur + n;
    CHECK_LAZY(end < (int64_t(1) << 31) && (end + m.ps - 1) / m.ps <= m.P, ErrorKind::CacheFull,
          "append: sequence " + str(seq_ids[i]) + " would need more pages than the cache has");
    const int64_t have = int64_t(s.pages.size()), want = std::max(have, (end + m.ps - 1) / m.ps);
    need += want - have;
    for (int64_t pg = cur / m.ps; pg < std::min(have, (end - 1) / m.ps + 1); ++pg)
      if (m.ref[s.pages[pg]] > 1 || m.hash_of[s.pages[pg]]) ++need;
  }
  CHECK_LAZY(need <= m.available(), ErrorKind::CacheFull,
        "append: needs " + str(need) + " free pages but only " + str(m.available()) + " of " + str(m.P) +
            " are free; nothing was appended");

  // 2. Commit: copy-on-write, new pages, slots for every row.
  std::vector<int64_t> slots(static_cast<size_t>(total));
  std::vector<std::pair<Impl::Seq*, int64_t>> row_pos;  // KIVI: (sequence, position) of each row
  if (m.kivi_bits) row_pos.reserve(size_t(total));
  int64_t row = 0;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    Impl::Seq& s = m.seqs.at(seq_ids[i]);
    const int64_t n = counts.empty() ? 1 : counts[i];
    if (n == 0) continue;
    const int64_t cur = s.layer_len[layer], end = cur + n;
    const int64_t have = int64_t(s.pages.size());
    for (int64_t pg = cur / m.ps; pg < std::min(have, (end - 1) / m.ps + 1); ++pg) {
      const int32_t old = s.pages[pg];
      if (m.ref[old] > 1 || m.hash_of[old]) {
        const int32_t fresh = m.alloc_page();
        m.copy_page(fresh, old, stream);
        m.release_page(old);
        s.pages[pg] = fresh;
        if (int64_t(s.chain.size()) > pg) s.chain.resize(size_t(pg));
      }
    }
    while (int64_t(s.pages.size()) * m.ps < end) s.pages.push_back(m.alloc_page());
    for (int64_t t = cur; t < end; ++t) {
      slots[size_t(row++)] = int64_t(s.pages[size_t(t / m.ps)]) * m.ps + t % m.ps;
      if (m.kivi_bits) row_pos.emplace_back(&s, t);
    }
    s.layer_len[layer] = end;
    m.register_pages(s);
  }
  if (total == 0) return;

  // 3. Scatter the rows into their slots.
  PagedAppend a;
  a.dtype = m.dtype;
  a.rows = total;
  a.row_elems = int64_t(m.kvh) * m.D;
  a.k = k.data, a.v = v.data, a.k_row = k.stride(0), a.v_row = v.stride(0);
  a.pool = m.pool;
  a.page_stride = m.page_elems;
  a.layer_offset = layer * m.layer_elems;
  a.kv_offset = m.v_off;
  a.tok_stride = m.tok_elems;
  a.page_size = m.ps;
  a.num_pages = m.P;
  a.device = m.device.index;
  if (m.device.is_cuda()) {
#if MEMKERNELS_WITH_CUDA
    void* dslots = cuda_backend::paged_upload(m.device.index, slots.data(), slots.size() * sizeof(int64_t), stream);
    a.slots = static_cast<const int64_t*>(dslots);
    cuda_backend::paged_append(a, stream);
    cuda_backend::paged_scratch_free(m.device.index, dslots, stream);
#endif
    return;
  }
  if (m.kivi_bits) {  // rows go to the recent window; a window that fills is quantized into its page
    const int in_size = dtype_size(k.dtype);
    const int64_t kv_block = int64_t(m.ps) * m.kvh * m.D;
    for (int64_t r = 0; r < total; ++r) {
      Impl::Seq& s = *row_pos[size_t(r)].first;
      const int64_t t = row_pos[size_t(r)].second;
      float* win = s.resid[size_t(layer)].data();
      for (int kvi = 0; kvi < 2; ++kvi) {
        const TensorView& src = kvi ? v : k;
        cpu::load_floats(static_cast<const char*>(src.data) + r * src.stride(0) * in_size, src.dtype,
                         int64_t(m.kvh) * m.D, win + kvi * kv_block + (t % m.ps) * m.kvh * m.D);
      }
      if (t % m.ps == m.ps - 1) m.kivi_quantize(s, layer, s.pages[size_t(t / m.ps)]);
    }
    return;
  }
  if (m.quant) {  // symmetric int8 per (token, kv head): scale = max|x| / 127
    const int in_size = dtype_size(k.dtype);
    std::vector<float> tmp(size_t(m.D));
    for (int64_t r = 0; r < total; ++r) {
      const int64_t page = slots[r] / m.ps, off = slots[r] % m.ps;
      char* layer_base = static_cast<char*>(m.pool) + page * m.page_bytes + layer * m.layer_elems;
      for (int kvi = 0; kvi < 2; ++kvi) {
        const TensorView& src = kvi ? v : k;
        int8_t* dst = reinterpret_cast<int8_t*>(layer_base + kvi * m.kv_elems) + off * a.row_elems;
        float* scales = reinterpret_cast<float*>(layer_base + m.scale_off) + kvi * int64_t(m.ps) * m.kvh + off * m.kvh;
        for (int h = 0; h < m.kvh; ++h) {
          const char* row = static_cast<const char*>(src.data) + (r * src.stride(0) + h * m.D) * in_size;
          cpu::load_floats(row, src.dtype, m.D, tmp.data());
          float amax = 0.0f;
          for (float x : tmp) amax = std::max(amax, std::fabs(x));
          const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
          for (int d = 0; d < m.D; ++d)
            dst[h * m.D + d] = int8_t(std::lrintf(std::min(127.0f, std::max(-127.0f, tmp[d] * inv))));
          scales[h] = scale;
        }
      }
    }
    return;
  }
  const size_t row_bytes = size_t(a.row_elems) * m.esize;
  const char* kb = static_cast<const char*>(k.data);
  const char* vb = static_cast<const char*>(v.data);
  char* pool = static_cast<char*>(m.pool);
  for (int64_t r = 0; r < total; ++r) {
    const int64_t page = slots[r] / m.ps, off = slots[r] % m.ps;
    char* dst = pool + (page * a.page_stride + a.layer_offset + off * a.tok_stride) * m.esize;
    std::memcpy(dst, kb + r * a.k_row * m.esize, row_bytes);
    std::memcpy(dst + a.kv_offset * m.esize, vb + r * a.v_row * m.esize, row_bytes);
  }
}

int64_t PagedKVCache::fork(int64_t seq_id) {
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq copy = m.get_resident(seq_id, "fork");
  for (int32_t page : copy.pages) m.acquire_page(page);
  const int64_t id = m.next_id++;
  m.seqs.emplace(id, std::move(copy));
  return id;
}

void PagedKVCache::free(int64_t seq_id) {
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq& s = m.get(seq_id, "free");
  for (int32_t page : s.pages) m.release_page(page);
  if (s.host) host_free_pinned(s.host);
  m.seqs.erase(seq_id);
}

void PagedKVCache::truncate(int64_t seq_id, int64_t length) {
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq& s = m.get_resident(seq_id, "truncate");
  CHECK_LAZY(length >= 0 && length <= s.length(), ErrorKind::Value,
        "truncate: length " + str(length) + " is outside [0, " + str(s.length()) + "] for sequence " + str(seq_id));
  if (m.kivi_bits) {  // a cut inside a quantized page: its kept tokens go back to the window
    const int64_t kv_block = int64_t(m.ps) * m.kvh * m.D;
    for (int layer = 0; layer < m.L; ++layer) {
      const int64_t old = s.layer_len[layer], pn = length / m.ps;
      if (length < old && length % m.ps && old >= (pn + 1) * m.ps) {
        float* win = s.resid[size_t(layer)].data();
        for (int t = 0; t < length % m.ps; ++t)
          m.kivi_dequant_token(s.pages[size_t(pn)], layer, t, win + int64_t(t) * m.kvh * m.D,
                               win + kv_block + int64_t(t) * m.kvh * m.D);
      }
    }
  }
  for (auto& n : s.layer_len) n = std::min(n, length);
  const size_t keep = size_t((length + m.ps - 1) / m.ps);
  for (size_t i = keep; i < s.pages.size(); ++i) m.release_page(s.pages[i]);
  s.pages.resize(keep);
  if (int64_t(s.tokens.size()) > length) s.tokens.resize(size_t(length));
  if (int64_t(s.chain.size()) > length / m.ps) s.chain.resize(size_t(length / m.ps));
}

int64_t PagedKVCache::length(int64_t seq_id, int layer) const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  const Impl::Seq& s = m.get(seq_id, "length");
  if (layer < 0) return s.length();
  CHECK_LAZY(layer < m.L, ErrorKind::Value, "length: layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  return s.layer_len[layer];
}

std::vector<int32_t> PagedKVCache::page_table(int64_t seq_id) const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  return m.get(seq_id, "page_table").pages;
}

void PagedKVCache::read_kv(int64_t seq_id, int layer, float* k, float* v) const {
  read_kv(seq_id, layer, [&](int64_t) { return std::make_pair(k, v); });
}

int64_t PagedKVCache::read_kv(int64_t seq_id, int layer,
                              const std::function<std::pair<float*, float*>(int64_t)>& alloc) const {
  const Impl& m = *impl_;
  CHECK_LAZY(m.device.is_cpu(), ErrorKind::NotImplemented, "read_kv: CPU caches only");
  CHECK_LAZY(layer >= 0 && layer < m.L, ErrorKind::Value, "read_kv: layer " + str(layer) + " out of range");
  // Sized and read under one lock: an append from another thread between the two would overflow.
  std::lock_guard<std::shared_mutex> lock(m.mu);
  const Impl::Seq& s = const_cast<Impl&>(m).get_resident(seq_id, "read_kv");
  const int64_t len = s.layer_len[layer], row = int64_t(m.kvh) * m.D, kv_block = int64_t(m.ps) * row;
  const auto [k, v] = alloc(len);
  for (int64_t t = 0; t < len; ++t) {
    const int32_t page = s.pages[size_t(t / m.ps)];
    const int in = int(t % m.ps);
    float* kd = k + t * row;
    float* vd = v + t * row;
    if (m.kivi_bits) {
      if (t >= len / m.ps * m.ps) {
        const float* win = s.resid[size_t(layer)].data();
        std::copy(win + in * row, win + (in + 1) * row, kd);
        std::copy(win + kv_block + in * row, win + kv_block + (in + 1) * row, vd);
      } else {
        m.kivi_dequant_token(page, layer, in, kd, vd);
      }
    } else if (m.quant) {
      const char* blk = m.page_ptr(page) + layer * m.layer_elems;
      const float* sc = reinterpret_cast<const float*>(blk + m.scale_off);
      for (int64_t i = 0; i < row; ++i) {
        kd[i] = float(reinterpret_cast<const int8_t*>(blk)[in * row + i]) * sc[in * m.kvh + i / m.D];
        vd[i] = float(reinterpret_cast<const int8_t*>(blk + m.kv_elems)[in * row + i]) *
                sc[int64_t(m.ps) * m.kvh + in * m.kvh + i / m.D];
      }
    } else {
      const char* tok = m.page_ptr(page) + (layer * m.layer_elems + in * m.tok_elems) * m.esize;
      cpu::load_floats(tok, m.dtype, row, kd);
      cpu::load_floats(tok + m.v_off * m.esize, m.dtype, row, vd);
    }
  }
  return len;
}

std::vector<int64_t> PagedKVCache::sequences() const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  std::vector<int64_t> ids;
  for (auto& kv : m.seqs) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int PagedKVCache::refcount(int32_t page) const {
  const Impl& m = *impl_;
  CHECK_LAZY(page >= 0 && page < m.P, ErrorKind::Value, "refcount: page " + str(page) + " out of range");
  std::lock_guard<std::shared_mutex> lock(m.mu);
  return m.ref[page];
}

void PagedKVCache::swap_out(int64_t seq_id, void* stream) {
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq& s = m.get_resident(seq_id, "swap_out");
  const int64_t n = int64_t(s.pages.size());
  void* host = host_malloc_pinned(size_t(std::max<int64_t>(n, 1) * m.page_bytes));
  for (int64_t i = 0; i < n; ++i)
    device_memcpy(static_cast<char*>(host) + i * m.page_bytes, Device{}, m.page_ptr(s.pages[i]), m.device,
                  size_t(m.page_bytes), stream);
  for (int32_t page : s.pages) m.release_page(page);
  s.pages.clear();
  s.chain.clear();
  s.host = host;
  s.host_pages = n;
  s.swapped = true;
}

void PagedKVCache::swap_in(int64_t seq_id, void* stream) {
  Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  Impl::Seq& s = m.get(seq_id, "swap_in");
  CHECK_LAZY(s.swapped, ErrorKind::Value, "swap_in: sequence " + str(seq_id) + " is not swapped out");
  CHECK_LAZY(s.host_pages <= m.available(), ErrorKind::CacheFull,
        "swap_in: needs " + str(s.host_pages) + " free pages but only " + str(m.available()) + " are free");
  for (int64_t i = 0; i < s.host_pages; ++i) {
    const int32_t page = m.alloc_page();
    s.pages.push_back(page);
    device_memcpy(m.page_ptr(page), m.device, static_cast<char*>(s.host) + i * m.page_bytes, Device{},
                  size_t(m.page_bytes), stream);
  }
  // The host copy may still be read by the copies just queued: wait for them before freeing it.
  if (m.device.is_cuda() && stream) stream_synchronize(m.device, stream);
  host_free_pinned(s.host);
  s.host = nullptr;
  s.host_pages = 0;
  s.swapped = false;
  m.register_pages(s);
}

bool PagedKVCache::is_swapped(int64_t seq_id) const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  return m.get(seq_id, "is_swapped").swapped;
}

// The caller holds m.mu (shared or exclusive).
static void build_indices_locked(const PagedKVCache::Impl& m, const std::vector<int64_t>& seq_ids, int layer,
                                 std::vector<int32_t>& kv_indptr, std::vector<int32_t>& kv_indices,
                                 std::vector<int32_t>& last_page_len) {
  kv_indptr.assign(1, 0);
  kv_indices.clear();
  last_page_len.clear();
  for (int64_t id : seq_ids) {
    const PagedKVCache::Impl::Seq& s = const_cast<PagedKVCache::Impl&>(m).get_resident(id, "paged_attention");
    const int64_t len = s.layer_len[layer];
    const int64_t npg = (len + m.ps - 1) / m.ps;
    kv_indices.insert(kv_indices.end(), s.pages.begin(), s.pages.begin() + npg);
    kv_indptr.push_back(int32_t(kv_indices.size()));
    last_page_len.push_back(npg ? int32_t(len - (npg - 1) * m.ps) : 0);
  }
}

void PagedKVCache::build_indices(const std::vector<int64_t>& seq_ids, int layer, std::vector<int32_t>& kv_indptr,
                                 std::vector<int32_t>& kv_indices, std::vector<int32_t>& last_page_len) const {
  const Impl& m = *impl_;
  if (!(layer >= 0 && layer < m.L))
    throw_error(ErrorKind::Value, "layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  std::lock_guard<std::shared_mutex> lock(m.mu);
  build_indices_locked(m, seq_ids, layer, kv_indptr, kv_indices, last_page_len);
}

void PagedKVCache::attention(const TensorView& q, int layer, const std::vector<int64_t>& seq_ids,
                             const std::vector<int64_t>& q_lens, const TensorView& out, const TensorView* lse,
                             const PagedAttentionOptions& opts, void* stream) {
  const Impl& m = *impl_;
  if (!(q.device == m.device))
    throw_error(ErrorKind::Value, "paged_attention: q is on " + q.device.str() + " but the cache is on " + m.device.str());
  if (!(q.ndim != 3 || q.size(2) == m.D))
    throw_error(ErrorKind::Value, "paged_attention: q head_dim " + str(q.ndim == 3 ? q.size(2) : 0) + " differs from the cache's " + str(m.D));
  if (!(q_lens.empty() || q_lens.size() == seq_ids.size()))
    throw_error(ErrorKind::Value, "paged_attention: q_lens has " + str(int64_t(q_lens.size())) + " entries for " +
        str(int64_t(seq_ids.size())) + " sequences");
  if (!(layer >= 0 && layer < m.L))
    throw_error(ErrorKind::Value, "layer " + str(layer) + " is out of range [0, " + str(m.L) + ")");
  // Held shared until the kernel has read the pages (on CUDA: until it is queued; later page
  // writes are ordered after it on the stream): free, truncate, swap and append of any sequence
  // wait, so the pages and KIVI windows read here are neither released nor rewritten meanwhile.
  std::shared_lock<std::shared_mutex> reading(m.mu);
  std::vector<int32_t> indptr, indices, last;
  build_indices_locked(m, seq_ids, layer, indptr, indices, last);
  std::vector<int32_t> qo(1, 0);
  int max_q = 1;
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const int64_t n = q_lens.empty() ? 1 : q_lens[i];
    if (!(n >= 0))
      throw_error(ErrorKind::Value, "paged_attention: q_lens[" + str(int64_t(i)) + "] is negative");
    CHECK_LAZY(qo.back() + n < (int64_t(1) << 31), ErrorKind::Value, "paged_attention: too many query rows");
    qo.push_back(int32_t(qo.back() + n));
    max_q = std::max<int>(max_q, int(n));
  }
  const int64_t batch = int64_t(seq_ids.size());
  if (m.kivi_bits) {
    std::vector<const float*> resid;
    for (int64_t id : seq_ids) resid.push_back(m.get(id, "paged_attention").resid[size_t(layer)].data());
    PagedProblem kv;
    kv.kivi_bits = m.kivi_bits, kv.resid = resid.data();
    kv.kv_vc = m.kv_vc, kv.kv_ks = m.kv_ks, kv.kv_kz = m.kv_kz, kv.kv_vs = m.kv_vs, kv.kv_vz = m.kv_vz;
    TensorView pages(static_cast<char*>(m.pool) + layer * m.layer_elems, DType::UInt8, {m.P, m.ps, m.kvh, m.D});
    pages.strides[0] = m.page_bytes;
    TensorView tin(indptr.data(), DType::Int32, {batch + 1});
    TensorView tix(indices.data(), DType::Int32, {int64_t(indices.size())});
    TensorView tl(last.data(), DType::Int32, {batch});
    TensorView tq(qo.data(), DType::Int32, {batch + 1});
    paged_attention_impl(q, pages, pages, q_lens.empty() ? nullptr : &tq, tin, tix, tl, out, lse, opts, max_q, stream,
                         nullptr, nullptr, &kv);
    return;
  }
  if (m.device.is_cpu()) {
    TensorView tin(indptr.data(), DType::Int32, {batch + 1});
    TensorView tix(indices.data(), DType::Int32, {int64_t(indices.size())});
    TensorView tl(last.data(), DType::Int32, {batch});
    TensorView tq(qo.data(), DType::Int32, {batch + 1});
    TensorView ks, vs;
    if (m.quant) ks = k_scales(layer), vs = v_scales(layer);
    paged_attention_raw(q, k_pages(layer), v_pages(layer), q_lens.empty() ? nullptr : &tq, tin, tix, tl, out, lse,
                        opts, max_q, stream, m.quant ? &ks : nullptr, m.quant ? &vs : nullptr);
    return;
  }
#if MEMKERNELS_WITH_CUDA
  // One upload of all four arrays; stream-ordered, so nothing here waits for the GPU.
  std::vector<int32_t> packed;
  packed.reserve(indptr.size() + indices.size() + last.size() + qo.size());
  packed.insert(packed.end(), indptr.begin(), indptr.end());
  packed.insert(packed.end(), last.begin(), last.end());
  packed.insert(packed.end(), qo.begin(), qo.end());
  packed.insert(packed.end(), indices.begin(), indices.end());
  int32_t* d = static_cast<int32_t*>(
      cuda_backend::paged_upload(m.device.index, packed.data(), packed.size() * sizeof(int32_t), stream));
  TensorView tin(d, DType::Int32, {batch + 1}, m.device);
  TensorView tl(d + batch + 1, DType::Int32, {batch}, m.device);
  TensorView tq(d + 2 * batch + 1, DType::Int32, {batch + 1}, m.device);
  TensorView tix(d + 3 * batch + 2, DType::Int32, {int64_t(indices.size())}, m.device);
  try {
    // qo is built here from the sequences' lengths: no read-back check of it on the device.
    paged_attention_impl(q, k_pages(layer), v_pages(layer), q_lens.empty() ? nullptr : &tq, tin, tix, tl, out, lse,
                         opts, max_q, stream, nullptr, nullptr, nullptr, true);
  } catch (...) {
    cuda_backend::paged_scratch_free(m.device.index, d, stream);
    throw;
  }
  cuda_backend::paged_scratch_free(m.device.index, d, stream);
#else
  require_cuda_usable("paged_attention", m.device);
#endif
}

PagedCacheStats PagedKVCache::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  PagedCacheStats st;
  st.num_pages = m.P, st.page_size = m.ps;
  st.pages_free = int64_t(m.free_list.size());
  st.pages_cached = int64_t(m.lru.size());
  st.pages_used = m.P - st.pages_free - st.pages_cached;
  for (int i = 0; i < m.P; ++i) st.pages_shared += m.ref[i] > 1;
  st.bytes_per_token = int64_t(m.L) * 2 * m.kvh * (m.quant ? m.D + 4 : m.D * m.esize);
  if (m.kivi_bits) st.bytes_per_token = int64_t(m.L) * m.layer_elems / m.ps;  // codes + scales, per token
  st.pool_bytes = m.page_bytes * m.P;
  std::vector<int32_t> fill(m.P, 0);
  for (auto& [id, s] : m.seqs) {
    ++st.num_sequences;
    st.num_swapped += s.swapped;
    const int64_t len = s.length();
    st.tokens += len;
    for (size_t i = 0; i < s.pages.size(); ++i)
      fill[s.pages[i]] = std::max<int32_t>(fill[s.pages[i]], int32_t(std::min<int64_t>(m.ps, len - int64_t(i) * m.ps)));
  }
  for (int i = 0; i < m.P; ++i)
    if (m.ref[i] > 0) st.wasted_slots += m.ps - fill[i];
  st.fragmentation = st.pages_used ? double(st.wasted_slots) / double(st.pages_used * m.ps) : 0.0;
  st.prefix_hits = m.prefix_hits, st.prefix_queries = m.prefix_queries, st.evictions = m.evictions;
  return st;
}

void PagedKVCache::check_invariants() const {
  const Impl& m = *impl_;
  std::lock_guard<std::shared_mutex> lock(m.mu);
  std::vector<int> where(m.P, 0), refs(m.P, 0);
  for (int32_t p : m.free_list) {
    CHECK_LAZY(p >= 0 && p < m.P && where[p] == 0, ErrorKind::Value, "invariant: page " + str(p) + " twice in free list");
    CHECK_LAZY(!m.hash_of[p], ErrorKind::Value, "invariant: free page " + str(p) + " still hashed");
    where[p] = 1;
  }
  for (int32_t p : m.lru) {
    CHECK_LAZY(where[p] == 0, ErrorKind::Value, "invariant: page " + str(p) + " both free and cached");
    CHECK_LAZY(m.hash_of[p] && m.in_lru[p], ErrorKind::Value, "invariant: cached page " + str(p) + " not hashed");
    where[p] = 2;
  }
  for (auto& [id, s] : m.seqs) {
    CHECK_LAZY(int64_t(s.pages.size()) == (s.swapped ? 0 : (s.length() + m.ps - 1) / m.ps), ErrorKind::Value,
          "invariant: sequence " + str(id) + " holds " + str(int64_t(s.pages.size())) + " pages for length " +
              str(s.length()));
    for (int32_t p : s.pages) ++refs[p];
  }
  for (int p = 0; p < m.P; ++p) {
    CHECK_LAZY(refs[p] == m.ref[p], ErrorKind::Value,
          "invariant: page " + str(p) + " has refcount " + str(m.ref[p]) + " but " + str(refs[p]) + " table entries");
    CHECK_LAZY((refs[p] > 0) != (where[p] != 0), ErrorKind::Value,
          "invariant: page " + str(p) + " is " + (refs[p] ? "referenced and free/cached" : "leaked"));
  }
  for (auto& [h, p] : m.by_hash)
    CHECK_LAZY(m.hash_of[p] == h, ErrorKind::Value, "invariant: prefix table entry of page " + str(p) + " is stale");
}

}  // namespace memkernels
