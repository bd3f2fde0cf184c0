// CUDA paged attention (decode and prefill over pages) and the scatter of new tokens into pages.
//
// Attention: one block of 4 warps per (sequence, kv head, tile of RT query rows, KV split of the
// keys the tile sees: with a sliding window only the window is read). The rows of a tile are query
// heads of the kv head's group (and positions, for prefill), so a K/V row is read once for all of
// them. Lanes split head_dim (EPL elements each, one coalesced row load per warp and token); warps
// take every 4th key; each warp keeps an online softmax per row in registers, and the warps are
// merged through shared memory at the end. With several KV splits the blocks write unnormalised
// partials (O, max, sum) to a stream-ordered workspace and a second kernel merges them by
// log-sum-exp. Decode is memory-bound, so this SIMT design reads K/V once at full coalescing;
// prefill uses the same kernel (correct, not tensor-core fast).
// Index arrays are device memory we cannot validate without a sync: every index is clamped.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_common.cuh"
#include "paged_internal.h"

namespace memkernels::cuda_backend {

namespace {

constexpr int kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int clampi(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Loads EPL consecutive elements as floats; VEC: one aligned vector load, else scalar with d < D.
template <typename T, int EPL, bool VEC>
__device__ __forceinline__ void load_row(const T* p, int d0, int D, float (&x)[EPL]) {
  if constexpr (VEC) {
    constexpr int BYTES = EPL * int(sizeof(T));
    const char* src = reinterpret_cast<const char*>(p + d0);
    if constexpr (BYTES >= 16) {
      uint4 u[BYTES / 16];
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) u[i] = reinterpret_cast<const uint4*>(src)[i];
      const T* t = reinterpret_cast<const T*>(u);
#pragma unroll
      for (int e = 0; e < EPL; ++e) x[e] = to_float(t[e]);
    } else if constexpr (BYTES == 8) {
      uint2 u = *reinterpret_cast<const uint2*>(src);
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < EPL; ++e) x[e] = to_float(t[e]);
    } else if constexpr (BYTES == 4) {
      unsigned int u = *reinterpret_cast<const unsigned int*>(src);
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < EPL; ++e) x[e] = to_float(t[e]);
    } else {
      x[0] = to_float(p[d0]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < EPL; ++e) x[e] = d0 + e < D ? to_float(p[d0 + e]) : 0.0f;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int EPL, int RT, bool VEC>
__global__ void __launch_bounds__(kWarps * 32) paged_attention_kernel(PagedProblem p, float* ws, int nsplit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.x / p.kv_heads, g = blockIdx.x % p.kv_heads;
  const int split = blockIdx.z;
  const int group = p.heads / p.kv_heads, D = p.head_dim, ps = p.page_size;
  const int nnz = int(p.nnz_pages);
  const int pb = clampi(p.kv_indptr[b], 0, nnz), pe = clampi(p.kv_indptr[b + 1], pb, nnz);
  const int npg = pe - pb;
  const int kvlen = npg ? (npg - 1) * ps + clampi(p.last_page_len[b], 1, ps) : 0;
  int q0 = b, qlen = 1;
  if (p.qo_indptr) {
    const int tq = int(p.total_q);
    q0 = clampi(p.qo_indptr[b], 0, tq);
    qlen = clampi(p.qo_indptr[b + 1], q0, tq) - q0;
  }
  const int rows_total = qlen * group;
  const int off = kvlen - qlen;
  MK_DYNAMIC_SHARED(float, smem);

  // The grid's y extent comes from max_q_len, a hint the host cannot check without a sync: each
  // block loops over row tiles blockIdx.y, + gridDim.y, ... so a hint that is too small still
  // covers every row (issue 15 #3). rows_total is uniform in the block, so are the loop and its
  // barriers.
  for (int r0 = int(blockIdx.y) * RT; r0 < rows_total; r0 += int(gridDim.y) * RT) {
    const int nrows = min(RT, rows_total - r0);

    // Keys the tile's rows may see (causal, sliding window): from the first row's window start to
    // the last row's end; keys outside are never read. This range is cut into the KV splits (pieces
    // of at least 128 keys; trailing splits may be empty and leave sum 0 for the merge).
    const KeyRange first = visible_keys(int64_t(r0 / group) + off, kvlen, p.window_left, p.window_right);
    const KeyRange last = visible_keys(int64_t((r0 + nrows - 1) / group) + off, kvlen, p.window_left, p.window_right);
    const int span = max(0, last.hi - first.lo);
    const int chunk = int(max(int64_t(128), (int64_t(span) + nsplit - 1) / nsplit));
    const int lo = first.lo + int(min(int64_t(span), int64_t(split) * chunk));
    const int hi = first.lo + int(min(int64_t(span), int64_t(split + 1) * chunk));

    const bool capped = p.softcap > 0.0f;
    const float q_scale = capped ? p.scale : p.scale * kLog2e;
    const int d0 = lane * EPL;
    float q[RT][EPL], o[RT][EPL], m[RT], l[RT];
    int key_lo[RT], key_hi[RT];  // each row's visible keys [key_lo, key_hi)
  #pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int flat = r0 + min(r, nrows - 1);
      const int pos = flat / group, h = g * group + flat % group;
      load_row<T, EPL, VEC>(static_cast<const T*>(p.q) + int64_t(q0 + pos) * p.q_row + int64_t(h) * p.q_head, d0, D,
                            q[r]);
  #pragma unroll
      for (int e = 0; e < EPL; ++e) {
        q[r][e] *= q_scale;
        o[r][e] = 0.0f;
      }
      m[r] = -INFINITY;
      l[r] = 0.0f;
      const KeyRange keys = visible_keys(int64_t(pos) + off, kvlen, p.window_left, p.window_right);
      key_lo[r] = keys.lo, key_hi[r] = keys.hi;
    }

    const T* kbase = static_cast<const T*>(p.k) + int64_t(g) * p.k_head;
    const T* vbase = static_cast<const T*>(p.v) + int64_t(g) * p.v_head;
    const int maxpage = int(p.num_pages) - 1;
    // U keys per warp in flight: their loads are issued before any of them is used.
    constexpr int U = EPL >= 8 ? 2 : 4;
    for (int j = lo + warp; j < hi; j += kWarps * U) {
      float kx[U][EPL], vx[U][EPL];
  #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int jj = j + u * kWarps;
        if (jj < hi) {
          const int page = clampi(p.kv_indices[pb + jj / ps], 0, maxpage);
          load_row<T, EPL, VEC>(kbase + int64_t(page) * p.k_page + int64_t(jj % ps) * p.k_tok, d0, D, kx[u]);
          load_row<T, EPL, VEC>(vbase + int64_t(page) * p.v_page + int64_t(jj % ps) * p.v_tok, d0, D, vx[u]);
        }
      }
  #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int jj = j + u * kWarps;
        if (jj >= hi) break;
  #pragma unroll
        for (int r = 0; r < RT; ++r) {
          if (r >= nrows) break;
          float s = 0.0f;
  #pragma unroll
          for (int e = 0; e < EPL; ++e) s = fmaf(q[r][e], kx[u][e], s);
          s = warp_sum(s);
          if (capped) s = p.softcap * tanhf(s / p.softcap) * kLog2e;
          if (jj < key_lo[r] || jj >= key_hi[r]) continue;  // masked (uniform across the warp)
          const float m_new = fmaxf(m[r], s);
          const float c = exp2f(m[r] - m_new), pj = exp2f(s - m_new);
          l[r] = l[r] * c + pj;
  #pragma unroll
          for (int e = 0; e < EPL; ++e) o[r][e] = fmaf(o[r][e], c, pj * vx[u][e]);
          m[r] = m_new;
        }
      }
    }

    // Merge the warps: per row, max, sum and O through shared memory.
    float* sm_ml = smem;                      // [warp][RT][2]
    float* sm_o = smem + kWarps * RT * 2;     // [warp][RT][EPL * 32]
    constexpr int DW = EPL * 32;
  #pragma unroll
    for (int r = 0; r < RT; ++r) {
      if (lane == 0) {
        sm_ml[(warp * RT + r) * 2] = m[r];
        sm_ml[(warp * RT + r) * 2 + 1] = l[r];
      }
  #pragma unroll
      for (int e = 0; e < EPL; ++e) sm_o[(warp * RT + r) * DW + d0 + e] = o[r][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      float mx = -INFINITY;
  #pragma unroll
      for (int w = 0; w < kWarps; ++w)
        if (sm_ml[(w * RT + r) * 2 + 1] > 0.0f) mx = fmaxf(mx, sm_ml[(w * RT + r) * 2]);
      float lsum = 0.0f, acc = 0.0f;
      if (mx != -INFINITY) {
  #pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float lw = sm_ml[(w * RT + r) * 2 + 1];
          if (!(lw > 0.0f)) continue;
          const float c = exp2f(sm_ml[(w * RT + r) * 2] - mx);
          lsum += lw * c;
          acc += sm_o[(w * RT + r) * DW + d] * c;
        }
      }
      const int flat = r0 + r, pos = flat / group, h = g * group + flat % group;
      const int64_t qrow = q0 + pos;
      if (nsplit > 1) {
        float* dst = ws + ((int64_t(split) * p.total_q + qrow) * p.heads + h) * (D + 2);
        dst[d] = acc;
        if (d == 0) {
          dst[D] = mx;
          dst[D + 1] = lsum;
        }
      } else {
        T* out = static_cast<T*>(p.out) + qrow * p.o_row + int64_t(h) * p.o_head;
        out[d] = from_float<T>(lsum > 0.0f ? acc / lsum : 0.0f);
        if (d == 0 && p.lse) p.lse[int64_t(h) * p.total_q + qrow] = lsum > 0.0f ? mx * kLn2 + logf(lsum) : -INFINITY;
      }
    }
    __syncthreads();  // the next tile overwrites the shared memory just read
  }
}

// One block per (query row, head): merges the split partials.
template <typename T>
__global__ void paged_merge_kernel(PagedProblem p, const float* ws, int nsplit) {
  const int64_t qrow = blockIdx.x / p.heads;
  const int h = blockIdx.x % p.heads, D = p.head_dim;
  const int64_t stride = p.total_q * p.heads * int64_t(D + 2);
  const float* base = ws + (qrow * p.heads + h) * (D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < nsplit; ++s)
    if (base[s * stride + D + 1] > 0.0f) mx = fmaxf(mx, base[s * stride + D]);
  float lsum = 0.0f;
  if (mx != -INFINITY)
    for (int s = 0; s < nsplit; ++s) {
      const float lw = base[s * stride + D + 1];
      if (lw > 0.0f) lsum += lw * exp2f(base[s * stride + D] - mx);
    }
  T* out = static_cast<T*>(p.out) + qrow * p.o_row + int64_t(h) * p.o_head;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    if (mx != -INFINITY)
      for (int s = 0; s < nsplit; ++s) {
        const float lw = base[s * stride + D + 1];
        if (lw > 0.0f) acc += base[s * stride + d] * exp2f(base[s * stride + D] - mx);
      }
    out[d] = from_float<T>(lsum > 0.0f ? acc / lsum : 0.0f);
  }
  if (threadIdx.x == 0 && p.lse) p.lse[int64_t(h) * p.total_q + qrow] = lsum > 0.0f ? mx * kLn2 + logf(lsum) : -INFINITY;
}

template <typename T, int EPL, int RT>
void launch(const PagedProblem& p, cudaStream_t stream, int sms) {
  const int group = p.heads / p.kv_heads;
  // Without qo_indptr every sequence has exactly one query row (decode), whatever max_q_len says:
  // the dispatch passes total_q (= batch) there when the caller gives no hint, which launched
  // batch * group / RT row tiles per sequence (all but one exiting at once), skewed the split
  // heuristic below, and raised the 65535-tile error for large decode batches.
  const int max_q = p.qo_indptr ? std::max(p.max_q_len, 1) : 1;
  // More tiles than the grid's y limit: each block loops over several (see the kernel).
  const int64_t tiles = std::min<int64_t>((int64_t(max_q) * group + RT - 1) / RT, 65535);
  const int64_t blocks = int64_t(p.batch) * p.kv_heads * tiles;
  int nsplit = p.num_splits;
  // Enough blocks to keep ~8 per SM busy: decode is bound by how many loads are in flight.
  if (nsplit <= 0) nsplit = int(std::min<int64_t>(64, std::max<int64_t>(1, (8 * int64_t(sms) + blocks - 1) / blocks)));
  nsplit = std::min(nsplit, 65535);
  const bool vec = p.head_dim == EPL * 32 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.v) % 16 == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                   p.q_row % EPL == 0 && p.q_head % EPL == 0 && p.k_page % EPL == 0 && p.k_tok % EPL == 0 &&
                   p.k_head % EPL == 0 && p.v_page % EPL == 0 && p.v_tok % EPL == 0 && p.v_head % EPL == 0;
  StreamScratch scratch(stream);  // freed (stream-ordered) even if a launch below throws
  float* ws = nullptr;
  if (nsplit > 1)
    ws = static_cast<float*>(scratch.alloc(size_t(nsplit) * size_t(p.total_q) * p.heads * (p.head_dim + 2) * sizeof(float),
                                           "cudaMallocAsync (paged workspace)"));
  const dim3 grid(unsigned(int64_t(p.batch) * p.kv_heads), unsigned(tiles), unsigned(nsplit));
  const size_t smem = size_t(kWarps) * RT * (2 + EPL * 32) * sizeof(float);
  if (vec)
    launch_kernel(paged_attention_kernel<T, EPL, RT, true>, grid, dim3(kWarps * 32), smem, stream, p, ws, nsplit);
  else
    launch_kernel(paged_attention_kernel<T, EPL, RT, false>, grid, dim3(kWarps * 32), smem, stream, p, ws, nsplit);
  check_launch("paged_attention");
  if (nsplit > 1) {
    launch_kernel(paged_merge_kernel<T>, dim3(unsigned(p.total_q * p.heads)), dim3(128), 0, stream, p,
                  static_cast<const float*>(ws), nsplit);
    check_launch("paged_attention (merge)");
  }
}

template <typename U>
__global__ void paged_append_kernel(PagedAppend a) {
  const int64_t row = blockIdx.x;
  const int64_t slot = a.slots[row];
  const int64_t page = slot / a.page_size, off = slot % a.page_size;
  if (slot < 0 || page >= a.num_pages) return;  // never produced by the cache; a guard for memory safety
  U* dst = static_cast<U*>(a.pool) + page * a.page_stride + a.layer_offset + off * a.tok_stride;
  const U* k = static_cast<const U*>(a.k) + row * a.k_row;
  const U* v = static_cast<const U*>(a.v) + row * a.v_row;
  for (int64_t i = threadIdx.x; i < a.row_elems; i += blockDim.x) {
    dst[i] = k[i];
    dst[a.kv_offset + i] = v[i];
  }
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    n = 100;
  }
  return n;
}

// Host staging for the index uploads (issue 15 #5): a copy from pageable memory goes through a
// driver bounce buffer and may block the host; from pinned memory it is a plain DMA. One
// persistent pinned ring per device: each upload takes the next span (wrapping at the end) and
// records an event after its copy; a span is written again only once the copies that read it have
// completed (the event), so the host never overwrites data still in flight. The ring doubles
// (after draining) when one upload does not fit. Kept for the process lifetime on purpose: freed at
// exit it would race the CUDA runtime's own teardown.
class PinnedRing {
 public:
  // Copies `bytes` from host to device memory `dst` on stream s through the ring.
  void upload(void* dst, const void* host, size_t bytes, cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t need = (bytes + 255) & ~size_t(255);
    if (need > cap_) grow(need);
    if (head_ + need > cap_) head_ = 0;
    // Wait for (and retire) the in-flight spans this one overlaps; retire finished ones on the way.
    for (auto it = flight_.begin(); it != flight_.end();) {
      const bool overlaps = it->off < head_ + need && head_ < it->off + it->bytes;
      if (overlaps) check_cuda(cudaEventSynchronize(it->done), "cudaEventSynchronize (pinned ring)");
      if (overlaps || cudaEventQuery(it->done) == cudaSuccess) {
        events_.push_back(it->done);
        it = flight_.erase(it);
      } else {
        cudaGetLastError();  // cudaErrorNotReady is not an error
        ++it;
      }
    }
    unsigned char* src = base_ + head_;
    std::memcpy(src, host, bytes);
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (paged indices)");
    cudaEvent_t ev = nullptr;
    if (!events_.empty()) {
      ev = events_.back();
      events_.pop_back();
    } else {
      check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate (pinned ring)");
    }
    const cudaError_t err = cudaEventRecord(ev, s);
    if (err != cudaSuccess) {
      events_.push_back(ev);
      // Without the event the span's end is unknown: wait for the copy before reusing it.
      cudaStreamSynchronize(s);
      check_cuda(err, "cudaEventRecord (pinned ring)");
    }
    flight_.push_back({head_, need, ev});
    head_ += need;
  }

 private:
  struct Span {
    size_t off, bytes;
    cudaEvent_t done;
  };
  void grow(size_t need) {
    for (const Span& sp : flight_) {
      cudaEventSynchronize(sp.done);
      events_.push_back(sp.done);
    }
    flight_.clear();
    size_t cap = std::max<size_t>(cap_ ? 2 * cap_ : 64 * 1024, need);
    void* p = nullptr;
    check_cuda(cudaMallocHost(&p, cap), "cudaMallocHost (pinned ring for the page tables)");
    if (base_) cudaFreeHost(base_);
    base_ = static_cast<unsigned char*>(p), cap_ = cap, head_ = 0;
  }
  std::mutex mu_;
  unsigned char* base_ = nullptr;
  size_t cap_ = 0, head_ = 0;
  std::list<Span> flight_;
  std::vector<cudaEvent_t> events_;  // recorded and finished: reusable
};

PinnedRing& pinned_ring(int device) {
  static std::mutex mu;
  static std::map<int, PinnedRing*>* rings = new std::map<int, PinnedRing*>();  // never freed (see above)
  std::lock_guard<std::mutex> lock(mu);
  PinnedRing*& r = (*rings)[device];
  if (!r) r = new PinnedRing();
  return *r;
}

}  // namespace

void* paged_upload(int device, const void* host, size_t bytes, void* stream) {
  DeviceGuard guard(device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  void* d = nullptr;
  check_cuda(cudaMallocAsync(&d, bytes ? bytes : 4, s), "cudaMallocAsync (paged indices)");
  if (bytes) {
    try {
      pinned_ring(device).upload(d, host, bytes, s);
    } catch (...) {
      cudaFreeAsync(d, s);
      throw;
    }
  }
  return d;
}

void paged_scratch_free(int device, void* ptr, void* stream) {
  DeviceGuard guard(device);
  cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream));
}

void paged_append(const PagedAppend& a, void* stream) {
  DeviceGuard guard(a.device);
  check(a.rows < (int64_t(1) << 31), ErrorKind::Value, "append (CUDA): too many rows in one call (>= 2^31)");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_size(a.dtype) == 4)
    launch_kernel(paged_append_kernel<float>, dim3(unsigned(a.rows)), dim3(128), 0, s, a);
  else
    launch_kernel(paged_append_kernel<unsigned short>, dim3(unsigned(a.rows)), dim3(128), 0, s, a);
  check_launch("paged append");
}

// qo_indptr is device memory. Rows of q no sequence covers would be left unwritten (or, with KV
// splits, filled from an uninitialised workspace), so qo_indptr[-1] != total_q must be an error
// (issue 15 #2): read the batch + 1 offsets back (one small copy and a sync of the stream) and
// check them like the CPU does; this also gives the exact longest q_len for the grid. Under CUDA
// graph capture a sync is not allowed: the check is skipped there and the kernel clamps.
static void check_qo_indptr(PagedProblem& p, cudaStream_t s) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(s, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return;
  std::vector<int32_t> qo(size_t(p.batch) + 1);
  check_cuda(cudaMemcpyAsync(qo.data(), p.qo_indptr, qo.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync (qo_indptr)");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize (qo_indptr)");
  auto str = [](int64_t x) { return std::to_string(x); };
  check(qo[0] == 0, ErrorKind::Value, "qo_indptr[0] must be 0, got " + str(qo[0]));
  int max_q = 1;
  for (int b = 0; b < p.batch; ++b) {
    check(qo[b + 1] >= qo[b], ErrorKind::Value,
          "qo_indptr must be non-decreasing, but entry " + str(b + 1) + " (" + str(qo[b + 1]) + ") < entry " + str(b) +
              " (" + str(qo[b]) + ")");
    max_q = std::max(max_q, qo[b + 1] - qo[b]);
  }
  check(qo[p.batch] == p.total_q, ErrorKind::Value,
        "qo_indptr[-1] = " + str(qo[p.batch]) + " must equal the rows of q (" + str(p.total_q) + ")");
  p.max_q_len = max_q;
}

void paged_attention(const PagedProblem& p, void* stream) {
  DeviceGuard guard(p.device);
  check(p.head_dim <= 256, ErrorKind::NotImplemented,
        "paged_attention (CUDA): head_dim " + std::to_string(p.head_dim) + " > 256 is not supported");
  const int sms = sm_count(p.device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PagedProblem q = p;
  if (p.qo_indptr && !p.qo_indptr_checked) check_qo_indptr(q, s);
  dispatch_float_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (p.head_dim <= 32)
      launch<T, 1, 8>(q, s, sms);
    else if (p.head_dim <= 64)
      launch<T, 2, 8>(q, s, sms);
    else if (p.head_dim <= 128)
      launch<T, 4, 8>(q, s, sms);
    else
      launch<T, 8, 4>(q, s, sms);
  });
}

}  // namespace memkernels::cuda_backend
