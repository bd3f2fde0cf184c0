// CUDA flash attention.
//
// Two kernels:
//  * flash_fwd_mma (fp16/bf16, head_dim in {64, 80, 96, 128, 256}, 16-byte aligned rows):
//    FlashAttention-2 order on tensor cores. A CTA of 4 warps owns 64 query rows of one (batch,
//    head); each warp owns 16 rows. Per key tile of BN keys: S = Q K^T with mma.m16n8k16 (fp32
//    accumulators), mask, online softmax in registers (base 2), then O += P V where P is re-packed
//    from the S accumulators straight into A fragments (the C and A fragment layouts line up) and V
//    is read with ldmatrix.trans.
//  * flash_fwd_generic (fp32, any head_dim <= 512, any alignment): K/V tiles in shared memory as
//    fp32, one warp per query row at a time, lanes split keys for scores and head_dim for P V.
// Masking and lse conventions are those of core/include/memkernels/attention.h.
#include <cfloat>
#include <cstdint>

#include "attention_internal.h"
#include "cuda_common.cuh"

namespace memkernels::cuda_backend {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows of one batch element, with varlen offsets clamped to the packed arrays (never out of bounds),
// and its key mask (nullptr: every key kept).
struct SeqBounds {
  int sq, sk;
  int64_t row0_q, row0_k;
  const uint8_t* mask;
};

__device__ SeqBounds seq_bounds(const AttentionProblem& p, int b) {
  SeqBounds s;
  if (p.cu_seqlens_q) {
    auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); };
    const int64_t q0 = clamp(p.cu_seqlens_q[b], 0, p.total_q), q1 = clamp(p.cu_seqlens_q[b + 1], q0, p.total_q);
    const int64_t k0 = clamp(p.cu_seqlens_k[b], 0, p.total_k), k1 = clamp(p.cu_seqlens_k[b + 1], k0, p.total_k);
    s.sq = int(q1 - q0), s.sk = int(k1 - k0), s.row0_q = q0, s.row0_k = k0;
  } else {
    s.sq = p.seqlen_q, s.sk = p.seqlen_k, s.row0_q = 0, s.row0_k = 0;
  }
  // seqused_k is the caller's device array, never checked on the host: clamp it to the rows owned.
  if (p.seqused_k) s.sk = max(0, min(p.seqused_k[b], s.sk));
  s.mask = p.key_mask ? p.key_mask + b * p.mask_batch + s.row0_k * p.mask_col : nullptr;
  return s;
}

__device__ __forceinline__ bool key_kept(const AttentionProblem& p, const SeqBounds& sb, int col) {
  return !sb.mask || sb.mask[col * p.mask_col] != 0;
}

// Window arithmetic is 64-bit: bounds near INT_MAX mean "unbounded" and must not wrap around.
__device__ __forceinline__ bool key_visible(const AttentionProblem& p, const SeqBounds& sb, int row, int col, int off) {
  const int64_t pos = int64_t(row) + off;
  return col < sb.sk && (p.window_left < 0 || col >= pos - p.window_left) &&
         (p.window_right < 0 || col <= pos + p.window_right) && key_kept(p, sb, col);
}

// Keys [lo, hi) that some row in [first, last] may see (hi <= lo: none).
__device__ __forceinline__ void key_range(const AttentionProblem& p, int first, int last, int off, int sk, int& lo,
                                          int& hi) {
  const int64_t a = int64_t(first) + off, z = int64_t(last) + off;
  lo = p.window_left >= 0 ? int(max(int64_t(0), a - p.window_left)) : 0;
  hi = p.window_right >= 0 ? int(max(int64_t(0), min(int64_t(sk), z + p.window_right + 1))) : sk;
}

// Scores in base-2 units: scale (and softcap) folded in.
__device__ __forceinline__ float to_log2_score(const AttentionProblem& p, float s) {
  if (p.softcap > 0.0f) return p.softcap * tanhf(s * p.scale / p.softcap) * kLog2e;
  return s * p.scale * kLog2e;
}

// ------------------------------------------------------------------ tensor-core kernel (fp16/bf16)

template <typename T> struct MmaTraits;
template <> struct MmaTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16(c, a, b0, b1);
  }
};
template <> struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16(c, a, b0, b1);
  }
};

// Copies rows [row_begin, row_begin + ROWS) of a (rows, D) strided matrix into shared memory
// (leading dimension LD), 16 bytes at a time; rows at or past row_end, and rows the key mask drops
// (mask[row * mask_stride] == 0; padding may hold NaN, and P = 0 times NaN is NaN), are zero-filled.
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int row_begin, int row_end,
                                          const uint8_t* mask = nullptr, int64_t mask_stride = 0) {
  constexpr int kChunks = D * int(sizeof(T)) / 16;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * kChunks; i += blockDim.x) {
    const int r = i / kChunks, c = i % kChunks;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row_begin + r < row_end && (!mask || mask[int64_t(row_begin + r) * mask_stride]))
      val = *reinterpret_cast<const uint4*>(src + int64_t(row_begin + r) * row_stride + c * (16 / sizeof(T)));
    *reinterpret_cast<uint4*>(dst + r * LD + c * (16 / sizeof(T))) = val;
  }
}

template <int D>
constexpr int mma_block_n() { return D > 128 ? 32 : 64; }
template <int D>
constexpr size_t mma_smem_bytes() { return size_t(64 + 2 * mma_block_n<D>()) * (D + 8) * 2; }

// One CTA's work: query rows [m0, m0 + 64) of batch b, head h.
template <typename T, int D>
__device__ __forceinline__ void flash_fwd_mma_tile(const AttentionProblem& p, const int b, const int h, const int m0) {
  constexpr int BM = 64, BN = mma_block_n<D>(), LD = D + 8;  // +8 halves: conflict-free fragment loads
  MK_DYNAMIC_SHARED(T, sQ);
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const SeqBounds sb = seq_bounds(p, b);
  if (m0 >= sb.sq) return;
  const int kvh = h / (p.heads / p.kv_heads);
  const int off = sb.sk - sb.sq;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch + sb.row0_q * p.q_row + h * p.q_head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch + sb.row0_k * p.k_row + kvh * p.k_head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch + sb.row0_k * p.v_row + kvh * p.v_head;

  load_tile<T, D, BM, LD>(sQ, q, p.q_row, m0, sb.sq);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  int lo, hi;
  key_range(p, m0, min(m0 + BM, sb.sq) - 1, off, sb.sk, lo, hi);

  for (int n0 = lo / BN * BN; n0 < hi; n0 += BN) {
    __syncthreads();  // everyone is done with the previous K/V tile (and Q is loaded)
    load_tile<T, D, BN, LD>(sK, k, p.k_row, n0, sb.sk, sb.mask, p.mask_col);
    load_tile<T, D, BN, LD>(sV, v, p.v_row, n0, sb.sk, sb.mask, p.mask_col);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x BN keys.
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
    const T* qa = sQ + (warp * 16 + g) * LD + 2 * tig;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(qa + kk * 16);
      a[1] = *reinterpret_cast<const uint32_t*>(qa + 8 * LD + kk * 16);
      a[2] = *reinterpret_cast<const uint32_t*>(qa + kk * 16 + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(qa + 8 * LD + kk * 16 + 8);
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        const T* kb = sK + (nt * 8 + g) * LD + kk * 16 + 2 * tig;
        MmaTraits<T>::mma(s[nt], a, *reinterpret_cast<const uint32_t*>(kb), *reinterpret_cast<const uint32_t*>(kb + 8));
      }
    }

    // Scale, mask, online softmax. Element e of tile nt is row rows[e / 2], key n0 + nt*8 + 2*tig + e%2.
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + nt * 8 + 2 * tig + (e & 1);
        s[nt][e] = key_visible(p, sb, rows[e / 2], col, off) ? to_log2_score(p, s[nt][e]) : -INFINITY;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));  // the 4 lanes of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays 0
      const float alpha = exp2f(m_run[r] - base);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;  // per-lane partial; the quad is summed at the end
      m_run[r] = m_new;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P's accumulator layout for key tiles 2kk, 2kk+1 is the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = MmaTraits<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = MmaTraits<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = MmaTraits<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = MmaTraits<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const T* vrow = sV + (kk * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t bfrag[4];
        ldmatrix_x4_trans(bfrag, vrow + dt * 16);
        MmaTraits<T>::mma(o[2 * dt], a, bfrag[0], bfrag[1]);
        MmaTraits<T>::mma(o[2 * dt + 1], a, bfrag[2], bfrag[3]);
      }
    }
  }

  // Normalise and store; rows that saw no key get 0 and lse -inf.
  T* out = static_cast<T*>(p.out) + b * p.o_batch + sb.row0_q * p.o_row + h * p.o_head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    if (rows[r] >= sb.sq) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* orow = out + int64_t(rows[r]) * p.o_row;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * tig;
      orow[col] = from_float<T>(o[dt][2 * r] * inv);
      orow[col + 1] = from_float<T>(o[dt][2 * r + 1] * inv);
    }
    if (p.lse && tig == 0)
      p.lse[b * p.lse_batch + h * p.lse_head + sb.row0_q + rows[r]] =
          l > 0.0f ? m_run[r] * kLn2 + logf(l) : -INFINITY;
  }
}

// The CTA takes row tiles blockIdx.x, blockIdx.x + gridDim.x, ...: a grid sized from a too-small
// max_seqlen_q hint (varlen; the offsets are never read back to the host) still covers every row.
template <typename T, int D>
__global__ void __launch_bounds__(128) flash_fwd_mma(const AttentionProblem p) {
  const int sq = seq_bounds(p, blockIdx.z).sq;
  for (int m0 = blockIdx.x * 64; m0 < sq; m0 += gridDim.x * 64) {
    __syncthreads();  // the previous tile is done with shared memory
    flash_fwd_mma_tile<T, D>(p, blockIdx.z, blockIdx.y, m0);
  }
}

// ------------------------------------------------------------------ generic kernel (any dtype, any head_dim)

constexpr int kGenericRows = 16;  // query rows per CTA (4 warps x 4 rows)

__host__ __device__ constexpr int generic_block_n(int d) { return d > 256 ? 16 : 32; }
size_t generic_smem_bytes(int d) {
  const int bn = generic_block_n(d);
  return (size_t(2) * bn * (d + 1) + size_t(2) * kGenericRows * d) * sizeof(float);
}

// One CTA's work: query rows [m0, m0 + kGenericRows) of batch b, head h.
template <typename T>
__device__ __forceinline__ void flash_fwd_generic_tile(const AttentionProblem& p, const int b, const int h, const int m0) {
  MK_DYNAMIC_SHARED(float, smem);
  const int D = p.head_dim, BN = generic_block_n(D), LDK = D + 1;  // +1: lanes read different keys
  float* sK = smem;
  float* sV = sK + BN * LDK;
  float* sQ = sV + BN * LDK;
  float* sO = sQ + kGenericRows * D;
  __shared__ float s_m[kGenericRows], s_l[kGenericRows];

  const SeqBounds sb = seq_bounds(p, b);
  if (m0 >= sb.sq) return;
  const int kvh = h / (p.heads / p.kv_heads), off = sb.sk - sb.sq;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch + sb.row0_q * p.q_row + h * p.q_head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch + sb.row0_k * p.k_row + kvh * p.k_head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch + sb.row0_k * p.v_row + kvh * p.v_head;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < kGenericRows * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    sQ[i] = m0 + r < sb.sq ? to_float(q[int64_t(m0 + r) * p.q_row + d]) : 0.0f;
    sO[i] = 0.0f;
  }
  if (threadIdx.x < kGenericRows) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.0f;
  }
  int lo, hi;
  key_range(p, m0, min(m0 + kGenericRows, sb.sq) - 1, off, sb.sk, lo, hi);

  for (int n0 = lo / BN * BN; n0 < hi; n0 += BN) {
    __syncthreads();
    for (int i = threadIdx.x; i < BN * D; i += blockDim.x) {
      const int j = i / D, d = i % D;
      const bool ok = n0 + j < sb.sk && key_kept(p, sb, n0 + j);  // dropped keys: zeros, never read
      sK[j * LDK + d] = ok ? to_float(k[int64_t(n0 + j) * p.k_row + d]) : 0.0f;
      sV[j * LDK + d] = ok ? to_float(v[int64_t(n0 + j) * p.v_row + d]) : 0.0f;
    }
    __syncthreads();
    for (int rr = 0; rr < kGenericRows / 4; ++rr) {
      const int r = warp * (kGenericRows / 4) + rr, row = m0 + r;
      if (row >= sb.sq) break;
      // lane j scores key n0 + j (and n0 + j + 32 never: BN <= 32)
      float score = -INFINITY;
      if (lane < BN && key_visible(p, sb, row, n0 + lane, off)) {
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += sQ[r * D + d] * sK[lane * LDK + d];
        score = to_log2_score(p, dot);
      }
      float mx = score;
      for (int w = 16; w > 0; w /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, w));
      const float m_old = s_m[r], m_new = fmaxf(m_old, mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float pj = exp2f(score - base), alpha = exp2f(m_old - base);
      float sum = pj;
      for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffff, sum, w);
      // Every lane runs every pass (d0 is warp-uniform): __shfl_sync names all 32 lanes, so a loop
      // `for (d = lane; d < D; d += 32)` would call it from a partial warp whenever D % 32 != 0
      // (e.g. D = 40 or fp32 D = 80), which is undefined behaviour (hang or garbage) on sm_70+.
      for (int d0 = 0; d0 < D; d0 += 32) {
        const int d = d0 + lane;
        float acc = d < D ? sO[r * D + d] * alpha : 0.0f;
        for (int j = 0; j < BN; ++j) {
          const float pjj = __shfl_sync(0xffffffff, pj, j);
          if (d < D) acc += pjj * sV[j * LDK + d];
        }
        if (d < D) sO[r * D + d] = acc;
      }
      __syncwarp();
      if (lane == 0) {
        s_l[r] = s_l[r] * alpha + sum;
        s_m[r] = m_new;
      }
      __syncwarp();
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.o_batch + sb.row0_q * p.o_row + h * p.o_head;
  for (int i = threadIdx.x; i < kGenericRows * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    if (m0 + r >= sb.sq) continue;
    const float l = s_l[r];
    out[int64_t(m0 + r) * p.o_row + d] = from_float<T>(l > 0.0f ? sO[i] / l : 0.0f);
  }
  if (p.lse && threadIdx.x < kGenericRows && m0 + threadIdx.x < sb.sq) {
    const float l = s_l[threadIdx.x];
    p.lse[b * p.lse_batch + h * p.lse_head + sb.row0_q + m0 + threadIdx.x] =
        l > 0.0f ? s_m[threadIdx.x] * kLn2 + logf(l) : -INFINITY;
  }
}

// Row tiles blockIdx.x, blockIdx.x + gridDim.x, ... (as flash_fwd_mma).
template <typename T>
__global__ void __launch_bounds__(128) flash_fwd_generic(const AttentionProblem p) {
  const int sq = seq_bounds(p, blockIdx.z).sq;
  for (int m0 = blockIdx.x * kGenericRows; m0 < sq; m0 += gridDim.x * kGenericRows) {
    __syncthreads();  // the previous tile is done with shared memory
    flash_fwd_generic_tile<T>(p, blockIdx.z, blockIdx.y, m0);
  }
}

// ------------------------------------------------------------------ launch

bool aligned16(const void* ptr, int64_t stride_elems, int elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elems * elem_size) % 16 == 0;
}

bool mma_path_usable(const AttentionProblem& p) {
  if (p.dtype != DType::Float16 && p.dtype != DType::BFloat16) return false;
  const int d = p.head_dim;
  if (d != 64 && d != 80 && d != 96 && d != 128 && d != 256) return false;
  return aligned16(p.q, p.q_row, 2) && aligned16(p.q, p.q_head, 2) && aligned16(p.q, p.q_batch, 2) &&
         aligned16(p.k, p.k_row, 2) && aligned16(p.k, p.k_head, 2) && aligned16(p.k, p.k_batch, 2) &&
         aligned16(p.v, p.v_row, 2) && aligned16(p.v, p.v_head, 2) && aligned16(p.v, p.v_batch, 2);
}

template <typename T, int D>
void launch_mma(const AttentionProblem& p, cudaStream_t stream) {
  const size_t smem = mma_smem_bytes<D>();
  check_cuda(cudaFuncSetAttribute(flash_fwd_mma<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "flash_attention: cudaFuncSetAttribute");
  dim3 grid((p.seqlen_q + 63) / 64, p.heads, p.batch);
  launch_kernel(flash_fwd_mma<T, D>, grid, 128, smem, stream, p);
  check_launch("flash_attention (mma kernel)");
}

template <typename T>
void launch_mma_for_dim(const AttentionProblem& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_mma<T, 64>(p, stream);
    case 80: return launch_mma<T, 80>(p, stream);
    case 96: return launch_mma<T, 96>(p, stream);
    case 128: return launch_mma<T, 128>(p, stream);
    case 256: return launch_mma<T, 256>(p, stream);
  }
}

}  // namespace

void flash_attention(const AttentionProblem& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceGuard guard(p.device);
  check(p.batch <= 65535 && p.heads <= 65535, ErrorKind::Value, "flash_attention (CUDA): batch and heads must be <= 65535");
  if (mma_path_usable(p)) {
    if (p.dtype == DType::Float16) launch_mma_for_dim<__half>(p, stream);
    else launch_mma_for_dim<__nv_bfloat16>(p, stream);
    return;
  }
  check(p.head_dim <= 512, ErrorKind::NotImplemented,
        "flash_attention (CUDA): head_dim " + std::to_string(p.head_dim) + " > 512 is not supported on CUDA");
  const size_t smem = generic_smem_bytes(p.head_dim);
  // Per-block shared memory differs by GPU (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89):
  // say which head_dim fits instead of failing in cudaFuncSetAttribute.
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device),
             "flash_attention: cudaDeviceGetAttribute");
  if (smem > size_t(optin)) {
    int fits = 1;
    while (fits < 512 && generic_smem_bytes(fits + 1) <= size_t(optin)) ++fits;
    throw_error(ErrorKind::NotImplemented,
                "flash_attention (CUDA): head_dim " + std::to_string(p.head_dim) + " in " + dtype_name(p.dtype) + " needs " +
                    std::to_string(smem) + " bytes of shared memory per block, this GPU allows " + std::to_string(optin) +
                    " (head_dim <= " + std::to_string(fits) + " fits)");
  }
  dim3 grid((p.seqlen_q + kGenericRows - 1) / kGenericRows, p.heads, p.batch);
  dispatch_float_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_cuda(cudaFuncSetAttribute(flash_fwd_generic<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "flash_attention: cudaFuncSetAttribute");
    launch_kernel(flash_fwd_generic<T>, grid, 128, smem, stream, p);
  });
  check_launch("flash_attention (generic kernel)");
}

}  // namespace memkernels::cuda_backend
