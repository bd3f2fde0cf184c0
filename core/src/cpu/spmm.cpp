// CPU SpMM out (tokens, rows) = x (tokens, cols) @ W^T for the Bitmap, Semi24 and CSR formats.
//
// Bitmap / Semi24 ("load as sparse, compute as dense"): a 64-column tile is a uint64 mask plus its
// packed non-zeros. With AVX-512, 16 columns at a time are rebuilt in a register with one
// vexpandps (mask bits pick the lanes that take the next packed values, the rest become 0) and
// multiplied densely with 16 columns of x; AVX2 does the same 8 columns at a time with a table
// lookup + vpermps + blend. At 50-80% sparsity that costs a few instructions per 8-16 weights,
// while memory traffic shrinks to (1 - sparsity) values + 1 bit per weight. The generic build
// decodes a tile into a zeroed 64-float buffer and runs VecF FMAs on it.
//
// Blocking: the decode of one weight chunk is shared by NT tokens (NT <= 8 accumulators per row)
// and R rows share each load of x, so R * NT independent FMA chains hide the FMA latency. Tasks are
// blocks of RB rows (threads split the rows); a row block's weights stay in L2 while its token
// blocks run. x is first converted to fp32 rows padded to whole tiles (zeros), so the vector loads
// never leave the buffer, with a 64-byte skew so the NT token rows do not share one L1 set.
// CSR: per row, each non-zero scales x[., col] for NT tokens (scalar; an interchange format).
// int8 values (any format) are summed as integers-in-fp32 and scaled once per row at the end.
// AVX-512 with 16+ tokens: "sparse compute" instead (see spmm_sparse_compute): FMA work in
// proportion to the non-zeros, over x transposed into token-contiguous rows.
#include <omp.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "../sparse_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int TB = 8;     // tokens per block (accumulators per row)
constexpr int RB = 32;    // rows per task
constexpr int TC = 128;   // tokens per chunk: x of one chunk stays in L2/L3 while all rows pass
constexpr int VL = VecF::N;
static_assert(kSparseTile % VL == 0, "tile width");

template <DType VD>
inline float value_at(const void* base, int64_t k) {
  if constexpr (VD == DType::Float32) return static_cast<const float*>(base)[k];
  else if constexpr (VD == DType::Float16) return half_to_float(static_cast<const uint16_t*>(base)[k]);
  else if constexpr (VD == DType::Int8) return float(static_cast<const int8_t*>(base)[k]);  // row scale applied later
  else return bf16_to_float(static_cast<const uint16_t*>(base)[k]);
}

// x converted to fp32, 64-byte aligned (vector loads must not straddle cache lines) and reused
// across calls by the calling thread (a fresh large buffer per call costs page faults).
float* x_scratch(size_t n) {
  static thread_local std::vector<float> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  const uintptr_t a = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - a % 64) % 64) / sizeof(float);
}

using RowFn = void (*)(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t ldr);

// Mask rows and first value index of R bitmap rows from r; rows past the end repeat the last one
// (the caller drops their results).
template <int R>
inline void row_cursors(const SpmmProblem& p, int64_t r, const uint64_t* (&masks)[R], int64_t (&k)[R]) {
  for (int i = 0; i < R; ++i) {
    const int64_t ri = std::min(r + i, p.rows - 1);
    masks[i] = p.masks + ri * p.tiles;
    k[i] = p.row_ptr[ri];
  }
}

#if defined(MK_ISA_AVX512)
// 16 consecutive stored values as fp32 (reads up to 16 past k: values carry kValuePad of padding).
template <DType VD>
inline __m512 load16(const void* base, int64_t k) {
  if constexpr (VD == DType::Float32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + k);
  } else if constexpr (VD == DType::Int8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + k));
    if constexpr (VD == DType::Float16) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// R rows starting at r (rows past the end repeat the last one; their results are dropped by the
// caller) times NT tokens. res[i * ldr + n] = row r + i, token n.
template <DType VD, int NT>
struct BitmapRows {
  static constexpr int R = NT <= 4 ? 4 : 2;
  static void run(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t ldr) {
    const uint64_t* masks[R];
    int64_t k[R];
    row_cursors(p, r, masks, k);
    __m512 acc[R][NT];
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < NT; ++n) acc[i][n] = _mm512_setzero_ps();
    for (int64_t t = 0; t < p.tiles; ++t) {
      uint64_t m[R];
      uint64_t any = 0;
      for (int i = 0; i < R; ++i) any |= m[i] = masks[i][t];
      if (!any) continue;  // common only at very high sparsity
      const float* xt = xp + t * kSparseTile;
      for (int q = 0; q < 4; ++q) {
        __m512 w[R];
        for (int i = 0; i < R; ++i) {
          const __mmask16 sub = __mmask16(m[i] >> (16 * q));
          w[i] = _mm512_maskz_expand_ps(sub, load16<VD>(p.values, k[i]));
          k[i] += __builtin_popcount(unsigned(sub));
        }
        for (int n = 0; n < NT; ++n) {
          const __m512 xv = _mm512_loadu_ps(xt + n * ldx + 16 * q);
          for (int i = 0; i < R; ++i) acc[i][n] = _mm512_fmadd_ps(w[i], xv, acc[i][n]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < NT; ++n) res[i * ldr + n] = _mm512_reduce_add_ps(acc[i][n]);
  }
};
#elif defined(MK_ISA_AVX2)
// AVX2 has no vexpandps: 8 columns at a time, a table indexed by the 8 mask bits gives the lane
// permutation that moves the next packed values into the lanes whose bit is set (vpermps), with
// the sign bit set in exactly those lanes so one blend zeroes the others.
struct Expand8Table {
  alignas(32) int32_t lanes[256][8];
  constexpr Expand8Table() : lanes{} {
    for (int b = 0; b < 256; ++b)
      for (int l = 0, rank = 0; l < 8; ++l)
        lanes[b][l] = (b >> l) & 1 ? int32_t(uint32_t(rank++) | 0x80000000u) : 0;
  }
};
constexpr Expand8Table kExpand8;

inline __m256 expand8(unsigned bits, __m256 packed) {
  const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand8.lanes[bits]));
  return _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(packed, lanes), _mm256_castsi256_ps(lanes));
}

// 8 consecutive stored values as fp32 (reads up to 8 past k: values carry kValuePad of padding).
template <DType VD>
inline __m256 load8(const void* base, int64_t k) {
  if constexpr (VD == DType::Float32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + k);
  } else if constexpr (VD == DType::Int8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + k));
    if constexpr (VD == DType::Float16) return _mm256_cvtph_ps(h);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// As the AVX-512 BitmapRows, 8 columns per step; R * NT accumulators + R weights + x fit in the
// 16 ymm registers.
template <DType VD, int NT>
struct BitmapRows {
  static constexpr int R = NT <= 2 ? 4 : NT <= 4 ? 2 : 1;
  static void run(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t ldr) {
    const uint64_t* masks[R];
    int64_t k[R];
    row_cursors(p, r, masks, k);
    __m256 acc[R][NT];
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < NT; ++n) acc[i][n] = _mm256_setzero_ps();
    for (int64_t t = 0; t < p.tiles; ++t) {
      uint64_t m[R];
      uint64_t any = 0;
      for (int i = 0; i < R; ++i) any |= m[i] = masks[i][t];
      if (!any) continue;
      const float* xt = xp + t * kSparseTile;
      for (int q = 0; q < 8; ++q) {
        __m256 w[R];
        for (int i = 0; i < R; ++i) {
          const unsigned sub = reinterpret_cast<const uint8_t*>(&masks[i][t])[q];  // little-endian byte q
          w[i] = expand8(sub, load8<VD>(p.values, k[i]));
          k[i] += __builtin_popcount(sub);
        }
        for (int n = 0; n < NT; ++n) {
          const __m256 xv = _mm256_loadu_ps(xt + n * ldx + 8 * q);
          for (int i = 0; i < R; ++i) acc[i][n] = _mm256_fmadd_ps(w[i], xv, acc[i][n]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < NT; ++n) res[i * ldr + n] = VecF{acc[i][n]}.reduce_add();
  }
};
#else
// Portable path: one row; a tile is decoded into a zeroed buffer, then multiplied densely.
template <DType VD, int NT>
struct BitmapRows {
  static constexpr int R = 1;
  static void run(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t) {
    const uint64_t* masks = p.masks + r * p.tiles;
    int64_t k = p.row_ptr[r];
    VecF acc[NT];
    for (int n = 0; n < NT; ++n) acc[n] = VecF::zero();
    alignas(64) float tile[kSparseTile];
    for (int64_t t = 0; t < p.tiles; ++t) {
      uint64_t m = masks[t];
      if (!m) continue;
      std::fill(tile, tile + kSparseTile, 0.0f);
      for (; m; m &= m - 1) tile[__builtin_ctzll(m)] = value_at<VD>(p.values, k++);
      const float* xt = xp + t * kSparseTile;
      for (int j = 0; j < kSparseTile; j += VL) {
        const VecF w = VecF::load(tile + j);
        for (int n = 0; n < NT; ++n) acc[n] = VecF::fma(w, VecF::load(xt + n * ldx + j), acc[n]);
      }
    }
    for (int n = 0; n < NT; ++n) res[n] = acc[n].reduce_add();
  }
};
#endif

template <DType VD, int NT>
struct CsrRows {
  static constexpr int R = 1;
  static void run(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t) {
    float acc[NT] = {};
    for (int64_t k = p.row_ptr[r], e = p.row_ptr[r + 1]; k < e; ++k) {
      const float v = value_at<VD>(p.values, k);
      const float* xc = xp + p.indices[k];
      for (int n = 0; n < NT; ++n) acc[n] += v * xc[n * ldx];
    }
    for (int n = 0; n < NT; ++n) res[n] = acc[n];
  }
};

struct Kernel {
  std::array<RowFn, TB + 1> fn{};  // fn[nt] handles nt tokens
  std::array<int, TB + 1> rows{};  // rows per call
};

template <template <DType, int> class Rows, DType VD, size_t... I>
Kernel make_kernel(std::index_sequence<I...>) {
  Kernel k;
  ((k.fn[I + 1] = &Rows<VD, int(I) + 1>::run, k.rows[I + 1] = Rows<VD, int(I) + 1>::R), ...);
  return k;
}

template <template <DType, int> class Rows>
Kernel pick(DType vd) {
  using Seq = std::make_index_sequence<TB>;
  if (vd == DType::Float32) return make_kernel<Rows, DType::Float32>(Seq{});
  if (vd == DType::Float16) return make_kernel<Rows, DType::Float16>(Seq{});
  if (vd == DType::Int8) return make_kernel<Rows, DType::Int8>(Seq{});
  return make_kernel<Rows, DType::BFloat16>(Seq{});
}

#if defined(MK_ISA_AVX512)
// ---- AVX-512, 4+ tokens: sparse compute over a transposed x -----------------------------------
// Computing as dense spends one FMA lane per stored *or zero* weight and token; from a few tokens
// on, that FMA work, not memory, bounds the time. Here x is transposed per block of W = 16 * NV
// tokens into xt[col][W], and each non-zero costs one broadcast and NV FMAs over W tokens: work
// proportional to the non-zeros. A row's column indices come from vpcompressd on its masks (CSR
// has them already); 16-bit / int8 values are widened to fp32 16 at a time first.
// Measured here (2-core Zen 4): below 16 tokens the expand kernel is faster; from 16 on this one.
constexpr int kSparseComputeMinTokens = 16;

template <DType VD>
inline const float* row_values_f32(const SpmmProblem& p, int64_t k, int64_t n, float* scratch) {
  if constexpr (VD == DType::Float32) {
    return static_cast<const float*>(p.values) + k;
  } else {
    for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(scratch + j, load16<VD>(p.values, k + j));
    return scratch;
  }
}

// Column indices of row r's stored values in tiles [t0, t1) into cols (room for n + 16); returns n.
inline int64_t bitmap_row_columns(const SpmmProblem& p, int64_t r, int64_t t0, int64_t t1, int32_t* cols) {
  const uint64_t* masks = p.masks + r * p.tiles;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const uint64_t m = masks[t];
    if (!m) continue;
    for (int q = 0; q < 4; ++q) {
      const __mmask16 sub = __mmask16(m >> (16 * q));
      const __m512i c = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(t * kSparseTile + 16 * q)));
      _mm512_storeu_si512(cols + n, _mm512_maskz_compress_epi32(sub, c));
      n += __builtin_popcount(unsigned(sub));
    }
  }
  return n;
}

// res[16 v ..] += sum_j vals[j] * xt[cols[j] - c0][16 v ..]; 4 chains hide the FMA latency.
template <int NV>
inline void sparse_dot(const int32_t* cols, const float* vals, int64_t n, const float* xt, float* res) {
  constexpr int W = 16 * NV;
  __m512 a[4][NV];
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < NV; ++v) a[u][v] = u ? _mm512_setzero_ps() : _mm512_loadu_ps(res + 16 * v);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int u = 0; u < 4; ++u) {
      const __m512 w = _mm512_set1_ps(vals[j + u]);
      const float* xr = xt + int64_t(cols[j + u]) * W;
      for (int v = 0; v < NV; ++v) a[u][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * v), a[u][v]);
    }
  for (; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(vals[j]);
    const float* xr = xt + int64_t(cols[j]) * W;
    for (int v = 0; v < NV; ++v) a[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * v), a[0][v]);
  }
  for (int v = 0; v < NV; ++v)
    _mm512_storeu_ps(res + 16 * v, _mm512_add_ps(_mm512_add_ps(a[0][v], a[1][v]), _mm512_add_ps(a[2][v], a[3][v])));
}


template <DType VD, int NV>
void spmm_sparse_compute(const SpmmProblem& p) {
  constexpr int W = 16 * NV;
  // Columns per block: the block's slice of xt (kColTiles * 64 * W floats = 16 KiB) stays in L1
  // while the RB rows of a task walk it; every x row is then fetched from L2 once per row block.
  constexpr int64_t kColTiles = 4 / NV;
  const int64_t kp = std::max<int64_t>(p.tiles * kSparseTile, 1);  // xt rows (every stored column < kp)
  float* xtp = x_scratch(size_t(kp * W));
  const int64_t row_blocks = (p.rows + RB - 1) / RB;
  const int xes = dtype_size(p.x_dtype);
  const char* x = static_cast<const char*>(p.x);
  char* out = static_cast<char*>(p.out);
  constexpr int64_t kColBlock = 256;
  ParallelGuard guard;  // a failed scratch allocation is rethrown after the region
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<int32_t> cols;
    std::vector<float> vals, res, tmp, xrow;
    const bool ok = guard.run([&] {
      cols.resize(size_t(kColTiles * kSparseTile) + 16);
      vals.resize(size_t(kColTiles * kSparseTile) + 16);
      res.resize(size_t(RB) * W), tmp.resize(RB), xrow.resize(kColBlock);
    });
    int64_t kcur[RB];
    for (int64_t n0 = 0; n0 < p.tokens; n0 += W) {
      const int nt = int(std::min<int64_t>(W, p.tokens - n0));
      // Transpose x[n0 : n0 + nt, :] into xt (zeros for missing tokens and padding columns).
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < kp; c0 += kColBlock) {
        if (!ok) continue;
        const int64_t nc = std::min<int64_t>(kColBlock, kp - c0), valid = std::max<int64_t>(0, std::min(nc, p.cols - c0));
        std::fill(xtp + c0 * W, xtp + (c0 + nc) * W, 0.0f);
        for (int n = 0; n < nt && valid > 0; ++n) {
          load_floats(x + ((n0 + n) * p.x_row + c0) * xes, p.x_dtype, valid, xrow.data());
          for (int64_t c = 0; c < valid; ++c) xtp[(c0 + c) * W + n] = xrow[size_t(c)];
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < row_blocks; ++b) {
        if (!ok || guard.failed()) continue;
        const int64_t r0 = b * RB, nr = std::min<int64_t>(RB, p.rows - r0);
        std::fill(res.begin(), res.end(), 0.0f);
        for (int64_t i = 0; i < nr; ++i) kcur[i] = p.row_ptr[r0 + i];
        for (int64_t t0 = 0; t0 < p.tiles; t0 += kColTiles) {
          const int64_t t1 = std::min(p.tiles, t0 + kColTiles);
          const int64_t c1 = t1 * kSparseTile;
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i, k = kcur[i];
            const int32_t* ci;
            int64_t n;
            if (p.format == SparseFormat::CSR) {  // sorted indices: this block's entries come next
              const int64_t e = p.row_ptr[r + 1];
              n = 0;
              while (k + n < e && p.indices[k + n] < c1) ++n;
              ci = p.indices + k;
            } else {
              n = bitmap_row_columns(p, r, t0, t1, cols.data());
              ci = cols.data();
            }
            if (n == 0) continue;
            kcur[i] = k + n;
            sparse_dot<NV>(ci, row_values_f32<VD>(p, k, n, vals.data()), n, xtp, res.data() + i * W);
          }
        }
        for (int n = 0; n < nt; ++n) {
          for (int64_t i = 0; i < nr; ++i) tmp[i] = res[i * W + n] * (p.row_scale ? p.row_scale[r0 + i] : 1.0f);
          store_floats(tmp.data(), p.x_dtype, nr, out + ((n0 + n) * p.out_row + r0) * xes);
        }
      }
    }
  }
  guard.rethrow();
}

template <int NV>
void spmm_sparse_compute_any(const SpmmProblem& p) {
  switch (p.value_dtype) {
    case DType::Float32: spmm_sparse_compute<DType::Float32, NV>(p); break;
    case DType::Float16: spmm_sparse_compute<DType::Float16, NV>(p); break;
    case DType::Int8: spmm_sparse_compute<DType::Int8, NV>(p); break;
    default: spmm_sparse_compute<DType::BFloat16, NV>(p); break;
  }
}
#endif

}  // namespace

void spmm(const SpmmProblem& p) {
#if defined(MK_ISA_AVX512)
  if (p.tokens >= kSparseComputeMinTokens) {
    if (p.tokens > 16) spmm_sparse_compute_any<2>(p);
    else spmm_sparse_compute_any<1>(p);
    return;
  }
#endif
  const Kernel kern = p.format == SparseFormat::CSR ? pick<CsrRows>(p.value_dtype) : pick<BitmapRows>(p.value_dtype);
  const int64_t ldx = p.tiles * kSparseTile + 16;  // padded, skewed by 64 bytes
  const int64_t chunk = std::min<int64_t>(p.tokens, TC);
  float* xpp = x_scratch(size_t(chunk * ldx));
  const int64_t row_blocks = (p.rows + RB - 1) / RB;
  const int xes = dtype_size(p.x_dtype);
  const char* x = static_cast<const char*>(p.x);
  char* out = static_cast<char*>(p.out);

  ParallelGuard guard;  // a failed scratch allocation is rethrown after the region
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> res, tmp;
    const bool ok = guard.run([&] { res.resize(size_t(RB) * TB + size_t(4) * TB), tmp.resize(RB); });
    for (int64_t c0 = 0; c0 < p.tokens; c0 += chunk) {
      const int64_t nc = std::min(chunk, p.tokens - c0);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < nc; ++n) {
        if (!ok) continue;
        float* dst = xpp + n * ldx;
        load_floats(x + (c0 + n) * p.x_row * xes, p.x_dtype, p.cols, dst);
        std::fill(dst + p.cols, dst + ldx, 0.0f);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < row_blocks; ++b) {
        if (!ok || guard.failed()) continue;
        const int64_t r0 = b * RB, nr = std::min<int64_t>(RB, p.rows - r0);
        for (int64_t n0 = 0; n0 < nc; n0 += TB) {
          const int nt = int(std::min<int64_t>(TB, nc - n0));
          const int R = kern.rows[nt];
          // res[(row - r0) * TB + token]
          for (int64_t i = 0; i < nr; i += R)
            kern.fn[nt](p, r0 + i, xpp + n0 * ldx, ldx, res.data() + i * TB, TB);
          for (int n = 0; n < nt; ++n) {
            for (int64_t i = 0; i < nr; ++i) tmp[i] = res[i * TB + n];
            if (p.row_scale)  // int8 values: sums were taken over the unscaled integers
              for (int64_t i = 0; i < nr; ++i) tmp[i] *= p.row_scale[r0 + i];
            store_floats(tmp.data(), p.x_dtype, nr, out + ((c0 + n0 + n) * p.out_row + r0) * xes);
          }
        }
      }
    }
  }
  guard.rethrow();
}

}  // namespace memkernels::cpu::MK_ISA_NS
