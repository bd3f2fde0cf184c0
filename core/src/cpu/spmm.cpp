// CPU SpMM out (tokens, rows) = x (tokens, cols) @ W^T for the Bitmap, Semi24 and CSR formats.
//
// Bitmap / Semi24 ("load as sparse, compute as dense"): a 64-column tile is a uint64 mask plus its
// packed non-zeros. With AVX-512, 16 columns at a time are rebuilt in a register with one
// vexpandps (mask bits pick the lanes that take the next packed values, the rest become 0) and
// multiplied densely with 16 columns of x. At 50-80% sparsity that costs a few instructions per 16
// weights, while memory traffic shrinks to (1 - sparsity) values + 1 bit per weight. Other ISAs
// decode a tile into a zeroed 64-float buffer and run VecF FMAs on it.
//
// Blocking: the decode of one weight chunk is shared by NT tokens (NT <= 8 accumulators per row)
// and R rows share each load of x, so R * NT independent FMA chains hide the FMA latency. Tasks are
// blocks of RB rows (threads split the rows); a row block's weights stay in L2 while its token
// blocks run. x is first converted to fp32 rows padded to whole tiles (zeros), so the vector loads
// never leave the buffer, with a 64-byte skew so the NT token rows do not share one L1 set.
// CSR: per row, each non-zero scales x[., col] for NT tokens (scalar; an interchange format).
// int8 values (any format) are summed as integers-in-fp32 and scaled once per row at the end.
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

using RowFn = void (*)(const SpmmProblem& p, int64_t r, const float* xp, int64_t ldx, float* res, int64_t ldr);

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
    for (int i = 0; i < R; ++i) {
      const int64_t ri = std::min(r + i, p.rows - 1);
      masks[i] = p.masks + ri * p.tiles;
      k[i] = p.row_ptr[ri];
    }
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

}  // namespace

void spmm(const SpmmProblem& p) {
  const Kernel kern = p.format == SparseFormat::CSR ? pick<CsrRows>(p.value_dtype) : pick<BitmapRows>(p.value_dtype);
  const int64_t ldx = p.tiles * kSparseTile + 16;  // padded, skewed by 64 bytes
  const int64_t chunk = std::min<int64_t>(p.tokens, TC);
  std::vector<float> xp(size_t(chunk * ldx));
  const int64_t row_blocks = (p.rows + RB - 1) / RB;
  const int xes = dtype_size(p.x_dtype);
  const char* x = static_cast<const char*>(p.x);
  char* out = static_cast<char*>(p.out);

#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> res(size_t(RB) * TB + size_t(4) * TB), tmp(RB);
    for (int64_t c0 = 0; c0 < p.tokens; c0 += chunk) {
      const int64_t nc = std::min(chunk, p.tokens - c0);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < nc; ++n) {
        float* dst = xp.data() + n * ldx;
        load_floats(x + (c0 + n) * p.x_row * xes, p.x_dtype, p.cols, dst);
        std::fill(dst + p.cols, dst + ldx, 0.0f);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < row_blocks; ++b) {
        const int64_t r0 = b * RB, nr = std::min<int64_t>(RB, p.rows - r0);
        for (int64_t n0 = 0; n0 < nc; n0 += TB) {
          const int nt = int(std::min<int64_t>(TB, nc - n0));
          const int R = kern.rows[nt];
          // res[(row - r0) * TB + token]
          for (int64_t i = 0; i < nr; i += R)
            kern.fn[nt](p, r0 + i, xp.data() + n0 * ldx, ldx, res.data() + i * TB, TB);
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
}

}  // namespace memkernels::cpu::MK_ISA_NS
