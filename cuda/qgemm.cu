// CUDA quantized GEMM and dequantize. Codes are unpacked and scaled in registers; the dequantized
// matrix never exists in memory. The packed layout is the CPU one (memkernels/quant.h): it already
// suits mma.sync, because lane l of a warp needs weights c, c+1, c+8, c+9 (c = 2 * (l % 4)) of a
// 16-wide k step, and with 32-weight chunks whose byte i holds weights i and i + 16 (4-bit), or
// i, i+8, i+16, i+24 (2/3-bit), those and the next k step's come from the same two bytes.
//
// Every format is w = s * (T[q] - z) + m per group: T the integer code or NF4 level, z the zero
// point (or the symmetric offset), m the int4_min minimum (0 otherwise); int8 may be per channel
// (one group per row) or grouped, which the kernels see only as group_size.
// Paths:
//  - GEMV (tokens <= 4, and float32 x): a warp per output row, each lane a 32-weight chunk per
//    step (16 contiguous bytes for int4: a warp reads 512 coalesced bytes), fp32 FMAs, warp sum.
//  - mma (fp16/bf16 x, tokens > 4): each warp owns 16 weight rows x 8 or 16 tokens and runs
//    m16n8k16 tensor-core MMAs with the A fragment dequantized straight into registers and the
//    B fragment (x) read as 32-bit pairs. Split-K over blockIdx.z keeps every SM busy on short-N
//    layers; each split writes its partial sums to its own fp32 slice of a workspace, then a small
//    kernel adds the slices in split order (deterministic: no atomics), the bias, and converts.
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "quant_internal.h"

namespace memkernels::cuda_backend {
namespace {

// The NF4 levels (memkernels::nf4_codebook()), statically initialised: no per-call upload, no sync.
__constant__ float kNF4Levels[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                                     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                                     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                                     0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                                     0.7229568362236023f, 1.0f};

__device__ __forceinline__ float dev_scale(const QuantView& w, int64_t n, int64_t g) {
  const int64_t j = n * w.groups + g;
  // one explicit FMA, as QuantView::scale on the CPU: dequantize is bit for bit the CPU's
  return w.scales ? __ldg(w.scales + j) : fmaf(__ldg(w.scale_steps + (j >> 8)), float(w.scale_codes[j]), w.scale_offset);
}

__device__ __forceinline__ float dev_zero(const QuantView& w, int64_t n, int64_t g) {
  return (w.zeros ? float(__ldg(w.zeros + n * w.groups + g)) : 0.0f) + w.code_offset;
}

// int4_min's group minimum (0 for the other formats): w = s * (T[q] - z) + m.
__device__ __forceinline__ float dev_min(const QuantView& w, int64_t n, int64_t g) {
  return w.mins ? __ldg(w.mins + n * w.groups + g) : 0.0f;
}

template <bool NF4>
__device__ __forceinline__ float level(uint32_t q, const float* nf4) {
  if constexpr (NF4) return nf4[q & 15];
  else return float(q);
}

// All 32 raw levels of one chunk, in weight order.
template <int BITS, bool NF4>
__device__ __forceinline__ void decode32(const uint8_t* chunk, const float* nf4, float (&e)[32]) {
  if constexpr (BITS == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(chunk);
    const uint32_t wd[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t b = (wd[i >> 2] >> (8 * (i & 3))) & 0xffu;
      e[i] = level<NF4>(b & 15u, nf4);
      e[i + 16] = level<NF4>(b >> 4, nf4);
    }
  } else if constexpr (BITS == 8) {
    const uint4 a = *reinterpret_cast<const uint4*>(chunk), b = *reinterpret_cast<const uint4*>(chunk + 16);
    const uint32_t wd[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 32; ++i) e[i] = float(int8_t((wd[i >> 2] >> (8 * (i & 3))) & 0xffu));
  } else {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(chunk);  // 2-bit chunks 8 B, 3-bit 12 B: 4-aligned
    const uint32_t lo[2] = {p[0], p[1]};
    const uint32_t hi = BITS == 3 ? p[2] : 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t b = (lo[i >> 2] >> (8 * (i & 3))) & 0xffu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t q = (b >> (2 * j)) & 3u;
        if (BITS == 3) q |= ((hi >> (i + 8 * j)) & 1u) << 2;
        e[i + 8 * j] = float(q);
      }
    }
  }
}

// Raw levels of weights c, c+1, c+8, c+9, c+16, c+17, c+24, c+25 of one chunk (c even, < 8):
// the A-fragment elements of one lane for the chunk's two k16 steps.
template <int BITS, bool NF4>
__device__ __forceinline__ void decode8(const uint8_t* chunk, int c, const float* nf4, float (&e)[8]) {
  if constexpr (BITS == 4) {
    const uint32_t p = *reinterpret_cast<const uint16_t*>(chunk + c);
    const uint32_t q = *reinterpret_cast<const uint16_t*>(chunk + c + 8);
    e[0] = level<NF4>(p & 15u, nf4), e[1] = level<NF4>((p >> 8) & 15u, nf4);
    e[2] = level<NF4>(q & 15u, nf4), e[3] = level<NF4>((q >> 8) & 15u, nf4);
    e[4] = level<NF4>((p >> 4) & 15u, nf4), e[5] = level<NF4>((p >> 12) & 15u, nf4);
    e[6] = level<NF4>((q >> 4) & 15u, nf4), e[7] = level<NF4>((q >> 12) & 15u, nf4);
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t p = *reinterpret_cast<const uint16_t*>(chunk + c + 8 * j);
      e[2 * j] = float(int8_t(p & 0xffu));
      e[2 * j + 1] = float(int8_t(p >> 8));
    }
  } else {
    const uint32_t p = *reinterpret_cast<const uint16_t*>(chunk + c);
    const uint32_t hi = BITS == 3 ? *reinterpret_cast<const uint32_t*>(chunk + 8) : 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t q0 = (p >> (2 * j)) & 3u, q1 = (p >> (8 + 2 * j)) & 3u;
      if (BITS == 3) {
        q0 |= ((hi >> (c + 8 * j)) & 1u) << 2;
        q1 |= ((hi >> (c + 1 + 8 * j)) & 1u) << 2;
      }
      e[2 * j] = float(q0);
      e[2 * j + 1] = float(q1);
    }
  }
}

// 32 consecutive x values as floats; `aligned`: p is 16-byte aligned (vector loads).
template <typename T>
__device__ __forceinline__ void load_x32(const T* p, bool aligned, float (&x)[32]) {
  if (!aligned) {
#pragma unroll
    for (int i = 0; i < 32; ++i) x[i] = to_float(p[i]);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p) + i);
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < 8; ++j) x[8 * i + j] = to_float(h[j]);
    }
  }
}

// ---- GEMV: a warp per row, NT tokens per pass -----------------------------------------------------
constexpr int kGemvWarps = 8;

// The epilogue of the warp-per-row GEMV kernels (int formats and K-quants): each token's per-lane
// partial dots summed over the warp, lane 0 adds the bias and stores row n of the token's output.
template <int NT, typename T>
__device__ __forceinline__ void warp_store_row(const float (&acc)[NT], int lane, int64_t n, int64_t t0, int64_t tokens,
                                               const T* __restrict__ bias, T* __restrict__ out, int64_t ldo) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && t0 + t < tokens) {
      if (bias) v += to_float(bias[n]);
      out[(t0 + t) * ldo + n] = from_float<T>(v);
    }
  }
}

template <int BITS, bool NF4, int NT, typename T>
__global__ void __launch_bounds__(kGemvWarps * 32)
    qgemv_kernel(QuantView w, const T* __restrict__ x, int64_t ldx, const T* __restrict__ bias, T* __restrict__ out,
                 int64_t ldo, int64_t tokens, bool x_aligned) {
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNF4Levels[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  const int64_t t0 = int64_t(blockIdx.y) * NT;
  if (n >= w.rows) return;
  constexpr int CB = BITS * 4;
  const int64_t chunks = w.cols / 32;
  const int cpg = w.group_size / 32;
  const uint8_t* row = w.codes + n * w.row_bytes;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  for (int64_t ch = lane; ch < chunks; ch += 32) {
    float e[32];
    decode32<BITS, NF4>(row + ch * CB, nf4, e);
    const int64_t g = ch / cpg;
    const float s = dev_scale(w, n, g), z = dev_zero(w, n, g), m = dev_min(w, n, g);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t0 + t >= tokens) break;
      float xv[32];
      load_x32(x + (t0 + t) * ldx + ch * 32, x_aligned, xv);
      float d = 0.0f, sx = 0.0f;
#pragma unroll
      for (int i = 0; i < 32; ++i) d = fmaf(e[i], xv[i], d), sx += xv[i];
      // chunk sum of s * (T[q] - z) + m times x
      acc[t] = fmaf(m, sx, fmaf(s, d - z * sx, acc[t]));
    }
  }
  warp_store_row<NT>(acc, lane, n, t0, tokens, bias, out, ldo);
}

// ---- mma path ---------------------------------------------------------------------------------------
constexpr int kMmaWarps = 4;  // 64 weight rows per block

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) mma_m16n8k16_f16(d, a, b0, b1);
  else mma_m16n8k16_bf16(d, a, b0, b1);
}

// ws[split][token][n] = partial sums over chunks [ch0, ch1) of split blockIdx.z, for 16 rows per
// warp and NT8 * 8 tokens. Each element is written by exactly one lane (no atomics): the finish
// kernel adds the splits in a fixed order, so results are the same bit for bit on every run.
template <int BITS, bool NF4, int NT8, typename T>
__global__ void __launch_bounds__(kMmaWarps * 32)
    qgemm_mma_kernel(QuantView w, const T* __restrict__ x, int64_t ldx, float* __restrict__ ws, int64_t tokens,
                     int64_t chunks_per_split) {
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNF4Levels[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, c = (lane & 3) * 2;
  const int64_t row0 = (int64_t(blockIdx.x) * kMmaWarps + warp) * 16;
  if (row0 >= w.rows) return;
  const int64_t tok0 = int64_t(blockIdx.y) * NT8 * 8;
  const int64_t rA = min(row0 + gid, w.rows - 1), rB = min(row0 + gid + 8, w.rows - 1);
  constexpr int CB = BITS * 4;
  const int cpg = w.group_size / 32;
  const int64_t ch0 = int64_t(blockIdx.z) * chunks_per_split;
  const int64_t ch1 = min(ch0 + chunks_per_split, w.cols / 32);
  const uint8_t* rowA = w.codes + rA * w.row_bytes;
  const uint8_t* rowB = w.codes + rB * w.row_bytes;
  const T* xr[NT8];
#pragma unroll
  for (int j = 0; j < NT8; ++j) xr[j] = x + min(tok0 + j * 8 + gid, tokens - 1) * ldx;

  float acc[NT8][4];
#pragma unroll
  for (int j = 0; j < NT8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  int64_t gcur = -1;
  float sA = 0.0f, zA = 0.0f, sB = 0.0f, zB = 0.0f, mA = 0.0f, mB = 0.0f;
#pragma unroll 2
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t g = ch / cpg;
    if (g != gcur) {
      gcur = g;
      sA = dev_scale(w, rA, g), zA = dev_zero(w, rA, g), mA = dev_min(w, rA, g);
      sB = dev_scale(w, rB, g), zB = dev_zero(w, rB, g), mB = dev_min(w, rB, g);
    }
    float eA[8], eB[8];
    decode8<BITS, NF4>(rowA + ch * CB, c, nf4, eA);
    decode8<BITS, NF4>(rowB + ch * CB, c, nf4, eB);
#pragma unroll
    for (int i = 0; i < 8; ++i) eA[i] = fmaf(eA[i] - zA, sA, mA), eB[i] = fmaf(eB[i] - zB, sB, mB);
    // A fragments of the two k16 steps: {row g k c..c+1, row g+8 k c..c+1, row g k c+8.., row g+8 k c+8..}
    const uint32_t a0[4] = {pack2<T>(eA[0], eA[1]), pack2<T>(eB[0], eB[1]), pack2<T>(eA[2], eA[3]),
                            pack2<T>(eB[2], eB[3])};
    const uint32_t a1[4] = {pack2<T>(eA[4], eA[5]), pack2<T>(eB[4], eB[5]), pack2<T>(eA[6], eA[7]),
                            pack2<T>(eB[6], eB[7])};
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
      const uint32_t* xp = reinterpret_cast<const uint32_t*>(xr[j] + ch * 32 + c);
      mma16816<T>(acc[j], a0, __ldg(xp), __ldg(xp + 4));
      mma16816<T>(acc[j], a1, __ldg(xp + 8), __ldg(xp + 12));
    }
  }
  // C fragment: {row g, tokens c, c+1}, {row g+8, tokens c, c+1}.
#pragma unroll
  for (int j = 0; j < NT8; ++j)
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t n = row0 + gid + (h >= 2 ? 8 : 0);
      const int64_t t = tok0 + j * 8 + c + (h & 1);
      if (n < w.rows && t < tokens) ws[(int64_t(blockIdx.z) * tokens + t) * w.rows + n] = acc[j][h];
    }
}

template <typename T>
__global__ void finish_kernel(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ out,
                              int64_t ldo, int64_t rows, int64_t tokens, int splits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * tokens) return;
  const int64_t t = i / rows, n = i % rows;
  float v = ws[i];
  for (int s = 1; s < splits; ++s) v += ws[int64_t(s) * rows * tokens + i];  // fixed order: deterministic
  if (bias) v += to_float(bias[n]);
  out[t * ldo + n] = from_float<T>(v);
}

// ---- dequantize -------------------------------------------------------------------------------------
template <int BITS, bool NF4, typename T>
__global__ void dequant_kernel(QuantView w, T* __restrict__ out) {
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNF4Levels[threadIdx.x];
  __syncthreads();
  const int64_t chunks = w.cols / 32;
  const int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= w.rows * chunks) return;
  const int64_t n = id / chunks, ch = id % chunks, g = ch / (w.group_size / 32);
  float e[32];
  decode32<BITS, NF4>(w.codes + n * w.row_bytes + ch * BITS * 4, nf4, e);
  const float s = dev_scale(w, n, g), z = dev_zero(w, n, g), m = dev_min(w, n, g);
  T* dst = out + n * w.cols + ch * 32;
  // float32(float32((T[q] - z) * s) + m), never fused into one FMA: bit for bit the CPU result (and
  // GGUF's dequantization for int4_min); m = 0 adds nothing for the other formats.
#pragma unroll
  for (int i = 0; i < 32; ++i) dst[i] = from_float<T>(__fadd_rn(__fmul_rn(e[i] - z, s), m));
}

// Calls fn.template operator()<BITS, NF4>() for the format.
template <typename Fn>
void by_format(QuantFormat f, Fn&& fn) {
  switch (f) {
    case QuantFormat::Int8: fn.template operator()<8, false>(); break;
    case QuantFormat::Int3:
    case QuantFormat::Int3Sym: fn.template operator()<3, false>(); break;
    case QuantFormat::Int2:
    case QuantFormat::Int2Sym: fn.template operator()<2, false>(); break;
    case QuantFormat::NF4: fn.template operator()<4, true>(); break;
    default: fn.template operator()<4, false>(); break;
  }
}

template <typename T>
struct GemmLauncher {
  const QGemmProblem& p;
  cudaStream_t st;
  template <int BITS, bool NF4>
  void operator()() const {
    const QuantView& w = p.w;
    const T* x = static_cast<const T*>(p.x);
    const T* bias = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out);
    constexpr bool half_type = !std::is_same_v<T, float>;
    if (!half_type || p.tokens <= 4) {
      constexpr int NT = 4;
      // Vector loads of x need 16-byte aligned 32-element runs: base and row stride.
      const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (p.x_row * int64_t(sizeof(T))) % 16 == 0;
      const unsigned row_blocks = unsigned((w.rows + kGemvWarps - 1) / kGemvWarps);
      if (p.tokens == 1) {
        launch_kernel(qgemv_kernel<BITS, NF4, 1, T>, dim3(row_blocks), dim3(kGemvWarps * 32), 0, st, w, x, p.x_row, bias,
                      out, p.out_row, int64_t(1), aligned);
        check_launch("qgemm (gemv)");
        return;
      }
      // fp32 x takes this path for any token count: gridDim.y = ceil(tokens / NT) passed 65535 from
      // 262141 tokens on (a launch error), so long inputs run in slabs of at most 65535 * NT tokens.
      // Offsetting x by whole rows keeps `aligned` valid (it already requires 16-byte row strides).
      constexpr int64_t kSlab = int64_t(65535) * NT;
      for (int64_t t0 = 0; t0 < p.tokens; t0 += kSlab) {
        const int64_t nt = std::min(kSlab, p.tokens - t0);
        const dim3 grid{row_blocks, unsigned((nt + NT - 1) / NT)};
        launch_kernel(qgemv_kernel<BITS, NF4, NT, T>, grid, dim3(kGemvWarps * 32), 0, st, w, x + t0 * p.x_row, p.x_row,
                      bias, out + t0 * p.out_row, p.out_row, nt, aligned);
        check_launch("qgemm (gemv)");
      }
      return;
    }
    if constexpr (half_type) {
      // mma B fragments are 32-bit pairs of x: rows must be 4-byte aligned.
      check((p.x_row % 2) == 0 && (reinterpret_cast<uintptr_t>(x) % 4) == 0, ErrorKind::Value,
            "qgemm: on CUDA, fp16/bf16 x rows must start at 4-byte aligned addresses");
      const int64_t rows_blocks = (w.rows + 16 * kMmaWarps - 1) / (16 * kMmaWarps);
      const bool wide = p.tokens > 8;
      const int64_t tok_blocks = (p.tokens + (wide ? 16 : 8) - 1) / (wide ? 16 : 8);
      int dev = 0, sms = 132;
      cudaGetDevice(&dev);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      const int64_t chunks = w.cols / 32;
      int64_t splits = std::max<int64_t>(1, (4 * int64_t(sms)) / std::max<int64_t>(1, rows_blocks * tok_blocks));
      splits = std::min<int64_t>(splits, std::max<int64_t>(1, chunks / 8));
      splits = std::min<int64_t>(splits, 65535);
      const int64_t per = (chunks + splits - 1) / splits;
      splits = (chunks + per - 1) / per;
      // One fp32 partial per split (each written once, no memset), summed in order by finish_kernel.
      StreamScratch scratch(st);  // freed (stream-ordered) even if a launch below throws
      float* ws = static_cast<float*>(
          scratch.alloc(size_t(splits) * size_t(p.tokens * w.rows) * sizeof(float), "cudaMallocAsync (qgemm workspace)"));
      const dim3 grid{unsigned(rows_blocks), unsigned(tok_blocks), unsigned(splits)};
      if (wide)
        launch_kernel(qgemm_mma_kernel<BITS, NF4, 2, T>, grid, dim3(kMmaWarps * 32), 0, st, w, x, p.x_row, ws, p.tokens, per);
      else
        launch_kernel(qgemm_mma_kernel<BITS, NF4, 1, T>, grid, dim3(kMmaWarps * 32), 0, st, w, x, p.x_row, ws, p.tokens, per);
      check_launch("qgemm (mma)");
      const int64_t total = p.tokens * w.rows;
      launch_kernel(finish_kernel<T>, dim3(unsigned((total + 255) / 256)), dim3(256), 0, st, static_cast<const float*>(ws),
                    bias, out, p.out_row, w.rows, p.tokens, int(splits));
      check_launch("qgemm (finish)");
    }
  }
};

template <typename T>
struct DequantLauncher {
  const DequantProblem& p;
  cudaStream_t st;
  template <int BITS, bool NF4>
  void operator()() const {
    const int64_t total = p.w.rows * (p.w.cols / 32);
    launch_kernel(dequant_kernel<BITS, NF4, T>, dim3(unsigned((total + 127) / 128)), dim3(128), 0, st, p.w,
                  static_cast<T*>(p.out));
    check_launch("dequantize");
  }
};


// ---- K-quants (q4_k / q5_k / q6_k): a simple warp-per-row GEMV for every token count -------------
// Lane l takes 32-weight chunks l, l + 32, ... of the row (chunk c of super-block c / 8); each
// weight is decoded with the formula of quant.h (products exact in fp32: the CPU's values bit for
// bit), fp32 FMAs with x, then a warp sum. Correctness first: no tensor cores.
template <int F>  // 0: q4_k, 1: q5_k, 2: q6_k
__device__ __forceinline__ uint32_t kq_code(const uint8_t* sb, int c, int i) {
  const uint8_t byte = sb[16 * c + (i & 15)];
  uint32_t q = i < 16 ? (byte & 15u) : (byte >> 4);
  const int h = c >> 2, j = 16 * (c & 3) + (i & 15);
  if constexpr (F == 1) {
    uint64_t bits;
    memcpy(&bits, sb + 128 + 16 * h + (i < 16 ? 0 : 8), 8);
    q |= uint32_t((bits >> j) & 1u) << 4;
  } else if constexpr (F == 2) {
    const uint8_t hb = sb[128 + 32 * h + (j & 31)];
    const int shift = (j >> 5) * 2 + (i < 16 ? 0 : 4);
    q |= uint32_t((hb >> shift) & 3u) << 4;
  }
  return q;
}

__device__ __forceinline__ float kq_half(uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}

template <int F>
__device__ __forceinline__ void kq_decode32(const QuantView& w, int64_t n, int64_t ch, float (&e)[32]) {
  const int64_t SB = w.cols / 256, b = ch / 8;
  const int c = int(ch % 8);
  const uint8_t* sb = w.codes + n * w.row_bytes + b * (32 * w.bits);
  const uint8_t* sub = w.sub_scales + (n * SB + b) * 16;
  const uint16_t* sup = w.super_scales + (n * SB + b) * 2;
  const float d = kq_half(sup[0]);
  if constexpr (F == 2) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float a = d * float(int8_t(sub[2 * c + (i >> 4)]));
      e[i] = a * (float(kq_code<F>(sb, c, i)) - 32.0f);
    }
  } else {
    const float a = d * float(sub[c]), m = kq_half(sup[1]) * float(sub[8 + c]);
#pragma unroll
    for (int i = 0; i < 32; ++i) e[i] = a * float(kq_code<F>(sb, c, i)) - m;
  }
}

template <int F, int NT, typename T>
__global__ void __launch_bounds__(kGemvWarps * 32)
    kq_gemv_kernel(QuantView w, const T* __restrict__ x, int64_t ldx, const T* __restrict__ bias, T* __restrict__ out,
                   int64_t ldo, int64_t tokens) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  const int64_t t0 = int64_t(blockIdx.y) * NT;
  if (n >= w.rows) return;
  const int64_t chunks = w.cols / 32;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  for (int64_t ch = lane; ch < chunks; ch += 32) {
    float e[32];
    kq_decode32<F>(w, n, ch, e);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t0 + t >= tokens) break;
      const T* xr = x + (t0 + t) * ldx + ch * 32;
      float dsum = 0.0f;
#pragma unroll
      for (int i = 0; i < 32; ++i) dsum = fmaf(e[i], to_float(xr[i]), dsum);
      acc[t] += dsum;
    }
  }
  warp_store_row<NT>(acc, lane, n, t0, tokens, bias, out, ldo);
}

template <int F, typename T>
__global__ void kq_dequant_kernel(QuantView w, T* __restrict__ out) {
  const int64_t chunks = w.cols / 32;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= w.rows * chunks) return;
  const int64_t n = i / chunks, ch = i % chunks;
  float e[32];
  kq_decode32<F>(w, n, ch, e);
#pragma unroll
  for (int k = 0; k < 32; ++k) out[n * w.cols + ch * 32 + k] = from_float<T>(e[k]);
}

template <typename Fn>
void by_kquant(QuantFormat f, Fn&& fn) {
  switch (f) {
    case QuantFormat::Q4K: fn.template operator()<0>(); break;
    case QuantFormat::Q5K: fn.template operator()<1>(); break;
    default: fn.template operator()<2>(); break;
  }
}

template <typename T>
struct KqGemmLauncher {
  const QGemmProblem& p;
  cudaStream_t st;
  template <int F>
  void operator()() const {
    constexpr int NT = 4;
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const T* bias = static_cast<const T*>(p.bias);
    const unsigned row_blocks = unsigned((p.w.rows + kGemvWarps - 1) / kGemvWarps);
    constexpr int64_t kSlab = int64_t(65535) * NT;
    for (int64_t t0 = 0; t0 < p.tokens; t0 += kSlab) {
      const int64_t nt = std::min(kSlab, p.tokens - t0);
      if (nt == 1) {
        launch_kernel(kq_gemv_kernel<F, 1, T>, dim3(row_blocks), dim3(kGemvWarps * 32), 0, st, p.w, x + t0 * p.x_row,
                      p.x_row, bias, out + t0 * p.out_row, p.out_row, nt);
      } else {
        const dim3 grid{row_blocks, unsigned((nt + NT - 1) / NT)};
        launch_kernel(kq_gemv_kernel<F, NT, T>, grid, dim3(kGemvWarps * 32), 0, st, p.w, x + t0 * p.x_row, p.x_row,
                      bias, out + t0 * p.out_row, p.out_row, nt);
      }
      check_launch("qgemm (k-quant gemv)");
    }
  }
};

template <typename T>
struct KqDequantLauncher {
  const DequantProblem& p;
  cudaStream_t st;
  template <int F>
  void operator()() const {
    const int64_t total = p.w.rows * (p.w.cols / 32);
    launch_kernel(kq_dequant_kernel<F, T>, dim3(unsigned((total + 127) / 128)), dim3(128), 0, st, p.w,
                  static_cast<T*>(p.out));
    check_launch("dequantize (k-quant)");
  }
};

int device_of_pointer(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    int d = 0;
    cudaGetDevice(&d);
    return d;
  }
  return attr.device;
}

}  // namespace

void qgemm(const QGemmProblem& p, void* stream) {
  DeviceGuard guard(device_of_pointer(p.out));
  check(p.w.rows * p.w.cols / 32 < (int64_t(1) << 40) && p.w.rows / 64 < 2147483647 && p.tokens < 65535 * 16,
        ErrorKind::Value, "qgemm: problem too large for the CUDA grid");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (quant_is_kquant(p.w.format)) {
    dispatch_float_dtype(p.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      by_kquant(p.w.format, KqGemmLauncher<T>{p, st});
    });
    return;
  }
  dispatch_float_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    by_format(p.w.format, GemmLauncher<T>{p, st});
  });
}

void dequantize(const DequantProblem& p, void* stream) {
  DeviceGuard guard(device_of_pointer(p.out));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (quant_is_kquant(p.w.format)) {
    dispatch_float_dtype(p.dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      by_kquant(p.w.format, KqDequantLauncher<T>{p, st});
    });
    return;
  }
  dispatch_float_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    by_format(p.w.format, DequantLauncher<T>{p, st});
  });
}

}  // namespace memkernels::cuda_backend
