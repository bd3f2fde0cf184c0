// CPU quantized GEMM: codes are unpacked in registers and multiplied with fp32 activations; the
// dequantized matrix never exists in memory.
//
// For row n, y[t][n] = sum_g s[n][g] * (sum_{k in g} T[q_k] x[t][k] - z[n][g] * xsum[t][g]), where
// T[q] is the raw level of a code (the integer, or the NF4 value) and xsum the per-group sum of x.
// So the inner loop is just "unpack 32 codes to floats, FMA with x"; the scale and zero point are
// applied once per group (a vector FMA and a scalar term), not per weight.
//
// Few tokens (<= 3): each thread walks whole rows, fused unpack + dot (memory bound on the codes,
// which are 8x smaller than fp32 for int4). More tokens: each thread dequantizes 4 rows into an
// fp32 tile once (L1/L2 resident) and reuses it for every token through a 4 x TB register tile.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../quant_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int VL = VecF::N;
constexpr int CV = 32 / VL;  // vectors per 32-weight chunk
#if defined(MK_ISA_AVX512)
constexpr int TB = 4;  // tokens per register tile of the dequantized path (4 x 4 accumulators)
#else
constexpr int TB = 2;  // 16 ymm registers: 4 x 2 accumulators + 4 weight vectors
#endif
constexpr int RB = 4;  // rows per dequantized tile

// The NF4 levels in the form each ISA looks them up from.
struct Table {
#if defined(MK_ISA_AVX512)
  __m512 t;
#elif defined(MK_ISA_AVX2)
  __m256 lo, hi;
#endif
  float f[16];
  explicit Table(const float* v) {
    std::memcpy(f, v, sizeof f);
#if defined(MK_ISA_AVX512)
    t = _mm512_loadu_ps(f);
#elif defined(MK_ISA_AVX2)
    lo = _mm256_loadu_ps(f);
    hi = _mm256_loadu_ps(f + 8);
#endif
  }
};

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Bytes of the 2-bit chunk layout: four 8-byte groups of codes (weights 8j .. 8j+7 in group j),
// with the third bit of 3-bit codes merged in.
template <int BITS>
inline void low_bit_codes(const uint8_t* src, uint64_t (&c)[4]) {
  const uint64_t v = load_u64(src);
  for (int j = 0; j < 4; ++j) c[j] = (v >> (2 * j)) & 0x0303030303030303ull;
  if constexpr (BITS == 3) {
    uint32_t h;
    std::memcpy(&h, src + 8, 4);
    for (int j = 0; j < 4; ++j) {
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
      c[j] |= _pdep_u64((h >> (8 * j)) & 0xffu, 0x0404040404040404ull);
#else
      for (int m = 0; m < 8; ++m) c[j] |= uint64_t((h >> (8 * j + m)) & 1u) << (8 * m + 2);
#endif
    }
  }
}

// Raw levels T[q] of the 32 weights of one chunk, as CV float vectors in weight order.
template <int BITS, bool NF4>
inline void decode(const uint8_t* src, const Table& tab, VecF (&w)[CV]) {
#if defined(MK_ISA_AVX512)
  if constexpr (BITS == 8) {
    w[0].v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    w[1].v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
  } else if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, m));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m));
    if constexpr (NF4) {
      w[0].v = _mm512_permutexvar_ps(lo, tab.t);
      w[1].v = _mm512_permutexvar_ps(hi, tab.t);
    } else {
      w[0].v = _mm512_cvtepi32_ps(lo);
      w[1].v = _mm512_cvtepi32_ps(hi);
    }
  } else {
    uint64_t c[4];
    low_bit_codes<BITS>(src, c);
    w[0].v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(int64_t(c[1]), int64_t(c[0]))));
    w[1].v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(int64_t(c[3]), int64_t(c[2]))));
  }
  (void)tab;
#elif defined(MK_ISA_AVX2)
  if constexpr (BITS == 8) {
    for (int i = 0; i < 4; ++i)
      w[i].v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * i))));
  } else if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    const __m256i idx[4] = {_mm256_cvtepu8_epi32(lo), _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                            _mm256_cvtepu8_epi32(hi), _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))};
    for (int i = 0; i < 4; ++i) {
      if constexpr (NF4) {  // 16-entry lookup: two 8-entry permutes, bit 3 of the code picks one
        const __m256 a = _mm256_permutevar8x32_ps(tab.lo, idx[i]), c = _mm256_permutevar8x32_ps(tab.hi, idx[i]);
        w[i].v = _mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32(idx[i], 28)));
      } else {
        w[i].v = _mm256_cvtepi32_ps(idx[i]);
      }
    }
  } else {
    uint64_t c[4];
    low_bit_codes<BITS>(src, c);
    for (int i = 0; i < 4; ++i)
      w[i].v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(c[i]))));
  }
  (void)tab;
#else
  float f[32];
  if constexpr (BITS == 8) {
    for (int i = 0; i < 32; ++i) f[i] = float(int8_t(src[i]));
  } else if constexpr (BITS == 4) {
    for (int i = 0; i < 16; ++i) {
      const int a = src[i] & 15, b = src[i] >> 4;
      f[i] = NF4 ? tab.f[a] : float(a);
      f[i + 16] = NF4 ? tab.f[b] : float(b);
    }
  } else {
    uint64_t c[4];
    low_bit_codes<BITS>(src, c);
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 8; ++m) f[8 * j + m] = float((c[j] >> (8 * m)) & 0xff);
  }
  for (int i = 0; i < CV; ++i) w[i] = VecF::load(f + i * VL);
#endif
}

// Fused unpack + dot over rows [n0, n1) for NT tokens: y[t * ldy + n].
template <int BITS, bool NF4, int NT>
void gemv_rows(const QuantView& w, const Table& tab, const float* x, int64_t ldx, const float* xsum, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
  const int64_t G = w.groups;
  const int chunks = w.group_size / 32;
  constexpr int CB = BITS * 4;  // bytes per chunk
  const bool has_zero = w.zeros != nullptr || w.code_offset != 0.0f;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    VecF tot[NT];
    float corr[NT];
    for (int t = 0; t < NT; ++t) tot[t] = VecF::zero(), corr[t] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      VecF acc[NT][CV];
      for (int t = 0; t < NT; ++t)
        for (int i = 0; i < CV; ++i) acc[t][i] = VecF::zero();
      const uint8_t* src = row + g * chunks * CB;
      const float* xg = x + g * w.group_size;
      for (int c = 0; c < chunks; ++c) {
        VecF wv[CV];
        decode<BITS, NF4>(src + c * CB, tab, wv);
        for (int t = 0; t < NT; ++t)
          for (int i = 0; i < CV; ++i)
            acc[t][i] = VecF::fma(wv[i], VecF::load(xg + t * ldx + c * 32 + i * VL), acc[t][i]);
      }
      const float s = w.scale(n, g);
      const VecF vs = VecF::set1(s);
      for (int t = 0; t < NT; ++t) {
        VecF a = acc[t][0];
        for (int i = 1; i < CV; ++i) a = a + acc[t][i];
        tot[t] = VecF::fma(vs, a, tot[t]);
      }
      if (has_zero) {
        const float sz = s * w.zero(n, g);
        for (int t = 0; t < NT; ++t) corr[t] += sz * xsum[t * G + g];
      }
    }
    for (int t = 0; t < NT; ++t) y[t * ldy + n] = tot[t].reduce_add() - corr[t];
  }
}

// Row n dequantized to fp32 (scale and zero applied) into dst[0:K].
template <int BITS, bool NF4>
void dequant_row(const QuantView& w, const Table& tab, int64_t n, float* dst) {
  const int chunks = w.group_size / 32;
  constexpr int CB = BITS * 4;
  const uint8_t* row = w.codes + n * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    const VecF vs = VecF::set1(w.scale(n, g)), vz = VecF::set1(w.zero(n, g));
    for (int c = 0; c < chunks; ++c) {
      VecF wv[CV];
      decode<BITS, NF4>(row + (g * chunks + c) * CB, tab, wv);
      float* d = dst + (g * chunks + c) * 32;
      for (int i = 0; i < CV; ++i) ((wv[i] - vz) * vs).store(d + i * VL);
    }
  }
}

// y[t][r] = dot(wt[r], x[t]) for R rows of the fp32 tile and NTB tokens.
template <int R, int NTB>
inline void tile_dot(const float* wt, int64_t K, const float* x, int64_t ldx, float (*y)[TB]) {
  VecF acc[R][NTB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NTB; ++t) acc[r][t] = VecF::zero();
  for (int64_t k = 0; k < K; k += VL) {
    VecF wv[R];
    for (int r = 0; r < R; ++r) wv[r] = VecF::load(wt + r * K + k);
    for (int t = 0; t < NTB; ++t) {
      const VecF xv = VecF::load(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = VecF::fma(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NTB; ++t) y[r][t] = acc[r][t].reduce_add();
}

template <int NTB>
void tile_dot_rows(int rows, const float* wt, int64_t K, const float* x, int64_t ldx, float (*y)[TB]) {
  switch (rows) {
    case 4: tile_dot<4, NTB>(wt, K, x, ldx, y); break;
    case 3: tile_dot<3, NTB>(wt, K, x, ldx, y); break;
    case 2: tile_dot<2, NTB>(wt, K, x, ldx, y); break;
    default: tile_dot<1, NTB>(wt, K, x, ldx, y); break;
  }
}

// Writes y (fp32, + bias) for rows [n0, n0 + rows) of token t into out.
void store_out(const QGemmProblem& p, const float* bias, int64_t t, int64_t n0, int rows, const float* vals) {
  float v[RB];
  for (int r = 0; r < rows; ++r) v[r] = vals[r] + (bias ? bias[n0 + r] : 0.0f);
  char* dst = static_cast<char*>(p.out) + (t * p.out_row + n0) * dtype_size(p.dtype);
  store_floats(v, p.dtype, rows, dst);
}

template <int BITS, bool NF4>
void qgemm_impl(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const Table tab(nf4_codebook());
  const int64_t N = w.rows, K = w.cols, G = w.groups, T = p.tokens;
  const int threads = num_threads();

  if (T <= 3) {
    // Per-group sums of x for the zero-point term.
    std::vector<float> xsum(static_cast<size_t>(T * G));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int k = 0; k < w.group_size; ++k) s += x[t * ldx + g * w.group_size + k];
        xsum[t * G + g] = s;
      }
    std::vector<float> y(static_cast<size_t>(T * N));
    constexpr int64_t ROWS = 16;
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * ROWS, n1 = std::min(N, n0 + ROWS);
      if (T == 1) gemv_rows<BITS, NF4, 1>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      else if (T == 2) gemv_rows<BITS, NF4, 2>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      else gemv_rows<BITS, NF4, 3>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = n0; n < n1; n += RB)
          store_out(p, bias, t, n, int(std::min<int64_t>(RB, n1 - n)), y.data() + t * N + n);
    }
    return;
  }

  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tile(static_cast<size_t>(RB * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB;
      const int rows = int(std::min<int64_t>(RB, N - n0));
      for (int r = 0; r < rows; ++r) dequant_row<BITS, NF4>(w, tab, n0 + r, tile.data() + r * K);
      float y[RB][TB];
      for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int nt = int(std::min<int64_t>(TB, T - t0));
        const float* xt = x + t0 * ldx;
        if (nt == TB) tile_dot_rows<TB>(rows, tile.data(), K, xt, ldx, y);
        else if (nt == 3) tile_dot_rows<(3 < TB ? 3 : 1)>(rows, tile.data(), K, xt, ldx, y);
        else if (nt == 2) tile_dot_rows<(2 < TB ? 2 : 1)>(rows, tile.data(), K, xt, ldx, y);
        else tile_dot_rows<1>(rows, tile.data(), K, xt, ldx, y);
        for (int t = 0; t < nt; ++t) {
          float v[RB];
          for (int r = 0; r < rows; ++r) v[r] = y[r][t];
          store_out(p, bias, t0 + t, n0, rows, v);
        }
      }
    }
  }
}

template <int BITS, bool NF4>
void dequantize_impl(const DequantProblem& p) {
  const Table tab(nf4_codebook());
  const int64_t K = p.w.cols;
  char* out = static_cast<char*>(p.out);
  const int es = dtype_size(p.dtype);
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < p.w.rows; ++n) {
      dequant_row<BITS, NF4>(p.w, tab, n, row.data());
      store_floats(row.data(), p.dtype, K, out + n * K * es);
    }
  }
}

// Calls IMPL<bits, nf4>(args...) for the format's code width.
#define MK_BY_FORMAT(fmt, IMPL, ...)                                                \
  switch (fmt) {                                                                    \
    case QuantFormat::Int8: IMPL<8, false>(__VA_ARGS__); break;                     \
    case QuantFormat::Int3:                                                         \
    case QuantFormat::Int3Sym: IMPL<3, false>(__VA_ARGS__); break;                  \
    case QuantFormat::Int2:                                                         \
    case QuantFormat::Int2Sym: IMPL<2, false>(__VA_ARGS__); break;                  \
    case QuantFormat::NF4: IMPL<4, true>(__VA_ARGS__); break;                       \
    default: IMPL<4, false>(__VA_ARGS__); break;                                    \
  }

}  // namespace

void qgemm(const QGemmProblem& p) {
  const int64_t K = p.w.cols, T = p.tokens;
  // x as fp32 rows (a copy only when it is not fp32 already), bias as fp32.
  std::vector<float> xbuf, bbuf;
  const float* x = static_cast<const float*>(p.x);
  int64_t ldx = p.x_row;
  if (p.dtype != DType::Float32) {
    xbuf.resize(size_t(T * K));
    for (int64_t t = 0; t < T; ++t)
      load_floats(static_cast<const char*>(p.x) + t * p.x_row * dtype_size(p.dtype), p.dtype, K, xbuf.data() + t * K);
    x = xbuf.data(), ldx = K;
  }
  const float* bias = nullptr;
  if (p.bias) {
    bbuf.resize(size_t(p.w.rows));
    load_floats(p.bias, p.dtype, p.w.rows, bbuf.data());
    bias = bbuf.data();
  }
  MK_BY_FORMAT(p.w.format, qgemm_impl, p, x, ldx, bias)
}

void dequantize(const DequantProblem& p) { MK_BY_FORMAT(p.w.format, dequantize_impl, p) }

}  // namespace memkernels::cpu::MK_ISA_NS
