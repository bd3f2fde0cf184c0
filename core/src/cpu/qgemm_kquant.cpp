// CPU kernels of the K-quant super-block formats (q4_k, q5_k, q6_k; layout in memkernels/quant.h).
//
// On the CPU the matrices are in the row-interleaved layout (quant.h): per block of 16 rows and
// super-block, each 64-byte load holds 4 code bytes of the 16 rows, and the 16 rows' sub-scales,
// mins and super-scales are contiguous vectors. The VNNI kernel (ilv_vnni) reads it natively; the
// exact path, the AVX2 kernel and dequantize() work row by row on a block de-interleaved into the
// documented layout first (plain_rows), which is also what a matrix in the documented layout (a
// canonical() copy) gives them directly.
//
// Exact path (fp32 activations, every ISA): a tile of 16 rows x one super-block is dequantized to
// fp32 in L1 with the same arithmetic as dequantize() (bit-exact GGUF values), then dotted with
// every token's 256 activations.
//
// int8-activation path (1-64 tokens, AVX512-VNNI or AVX2): x is quantized to int8 with one scale
// per token and super-block (dx = max|x| / 127 over its 256 weights) and rearranged once into the order of the code bytes (per 128 weights:
// the 64 x of the low nibbles, then the 64 of the high nibbles). Per super-block and token the
// integer sub-block dot products are multiplied by the integer sub-scales and summed in int32
// (AVX2: vpmaddubsw, then vpmaddwd with the sub-scales instead of ones; VNNI, on the interleaved
// layout: vpdpbusd per sub-block, see ilv_vnni). The min term (q4_k / q5_k) is sum_j m_j * xsum_j
// from per-sub-block sums of the int8 x; q6_k's -32 offset is 32 * sum_j sc_j * xsum_j folded into
// the integer sums. Then float multiply-adds (AVX2: one per super-block by d and dmin; VNNI: one
// per sub-block by d * sc_j, an exact fp32 product, times the token's dx of the super-block). The integer sums are
// exact, so the only error against the exact path is the rounding of x (the bound documented in
// quant.h) and fp32 rounding of the sums.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../quant_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int QK = 256;
constexpr int VL = VecF::N;
constexpr int64_t ROWS = 16;
inline int threads_for(const QuantView& w, int64_t T) { return threads_for_macs(w.rows * w.cols * T); }

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// 32 bits -> 32 bytes: byte k is 0x10 where bit k is set (q5_k's bit 4), 0 elsewhere.
inline __m256i expand_bit4(uint32_t bits) {
  const __m256i bsel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                        3, 3, 3, 3, 3, 3);
  const __m256i bbit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int32_t(bits)), bsel);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bbit), bbit), _mm256_set1_epi8(0x10));
}
#endif

// The 256 codes of one super-block, in weight order, into q[].
template <QuantFormat F>
inline void unpack_codes(const uint8_t* sb, uint8_t* q) {
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  if constexpr (F != QuantFormat::Q4K) {  // 32-byte steps: chunks c, c + 1 of half h
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; ++h) {
      const __m256i hb = F == QuantFormat::Q6K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h))
                                               : _mm256_setzero_si256();
      for (int s = 0; s < 2; ++s) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * h + 32 * s));
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if constexpr (F == QuantFormat::Q5K) {
          lo = _mm256_or_si256(lo, expand_bit4(uint32_t(load_u64(sb + 128 + 16 * h) >> (32 * s))));
          hi = _mm256_or_si256(hi, expand_bit4(uint32_t(load_u64(sb + 128 + 16 * h + 8) >> (32 * s))));
        } else {
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * s)), m3), 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(4 + 2 * s)), m3), 4));
        }
        uint8_t* dst = q + 32 * (4 * h + 2 * s);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm256_castsi256_si128(hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_extracti128_si256(lo, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 48), _mm256_extracti128_si256(hi, 1));
      }
    }
    return;
  }
  const __m128i m4 = _mm_set1_epi8(0x0f);
  for (int c = 0; c < 8; ++c) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16 * c));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * c), _mm_and_si128(b, m4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * c + 16), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
  }
#else
  for (int c = 0; c < 8; ++c)
    for (int i = 0; i < 16; ++i) q[32 * c + i] = sb[16 * c + i] & 15, q[32 * c + 16 + i] = sb[16 * c + i] >> 4;
#endif
  if constexpr (F == QuantFormat::Q5K) {
    for (int h = 0; h < 2; ++h)
      for (int part = 0; part < 2; ++part) {  // part 0: low-nibble weights, 1: high-nibble weights
        const uint64_t bits = load_u64(sb + 128 + 16 * h + 8 * part);
        for (int j = 0; j < 64; ++j) q[32 * (4 * h + j / 16) + 16 * part + j % 16] |= uint8_t(((bits >> j) & 1) << 4);
      }
  } else if constexpr (F == QuantFormat::Q6K) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j) {
        const uint8_t hb = sb[128 + 32 * h + j];
        const int c0 = 4 * h + j / 16, c1 = c0 + 2, i = j % 16;
        q[32 * c0 + i] |= uint8_t((hb & 3) << 4);
        q[32 * c1 + i] |= uint8_t(((hb >> 2) & 3) << 4);
        q[32 * c0 + 16 + i] |= uint8_t(((hb >> 4) & 3) << 4);
        q[32 * c1 + 16 + i] |= uint8_t(((hb >> 6) & 3) << 4);
      }
  }
}

// VL consecutive uint8 as floats.
inline VecF load_u8(const uint8_t* p) {
#if defined(MK_ISA_AVX512)
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#elif defined(MK_ISA_AVX2)
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
#else
  VecF r;
  for (int i = 0; i < VL; ++i) r.v[i] = float(p[i]);
  return r;
#endif
}

// Super-block b of row n dequantized into dst[256]: the values of quant.h, bit for bit (every
// product is exact in fp32, so a contracted FMA gives the same result).
template <QuantFormat F>
inline void dequant_sb(const QuantView& w, int64_t n, int64_t b, float* dst) {
  const int64_t SB = w.cols / QK;
  const uint8_t* sb = w.codes + n * w.row_bytes + b * (32 * w.bits);
  const uint8_t* sub = w.sub_scales + (n * SB + b) * 16;
  const uint16_t* sup = w.super_scales + (n * SB + b) * 2;
  alignas(64) uint8_t q[QK];
  unpack_codes<F>(sb, q);
  const float d = half_to_float(sup[0]);
  if constexpr (F == QuantFormat::Q6K) {
    const VecF off = VecF::set1(32.0f);
    for (int j = 0; j < 16; ++j) {
      const VecF a = VecF::set1(d * float(int8_t(sub[j])));
      for (int i = 0; i < 16; i += VL) ((load_u8(q + 16 * j + i) - off) * a).store(dst + 16 * j + i);
    }
  } else {
    const float dmin = half_to_float(sup[1]);
    for (int j = 0; j < 8; ++j) {
      const VecF a = VecF::set1(d * float(sub[j])), m = VecF::set1(dmin * float(sub[8 + j]));
      for (int i = 0; i < 32; i += VL) (load_u8(q + 32 * j + i) * a - m).store(dst + 32 * j + i);
    }
  }
}

inline float dot256(const float* a, const float* b) {
  VecF s0 = VecF::zero(), s1 = VecF::zero(), s2 = VecF::zero(), s3 = VecF::zero();
  for (int i = 0; i < QK; i += 4 * VL) {
    s0 = VecF::fma(VecF::load(a + i), VecF::load(b + i), s0);
    s1 = VecF::fma(VecF::load(a + i + VL), VecF::load(b + i + VL), s1);
    s2 = VecF::fma(VecF::load(a + i + 2 * VL), VecF::load(b + i + 2 * VL), s2);
    s3 = VecF::fma(VecF::load(a + i + 3 * VL), VecF::load(b + i + 3 * VL), s3);
  }
  return ((s0 + s1) + (s2 + s3)).reduce_add();
}

// Writes out[t][n0:n1] = y[0:n1-n0] (+ bias) in the output dtype.
void store_rows(const QGemmProblem& p, const float* bias, int64_t t, int64_t n0, int64_t n1, const float* y) {
  float v[ROWS];
  for (int64_t n = n0; n < n1; ++n) v[n - n0] = y[n - n0] + (bias ? bias[n] : 0.0f);
  char* dst = static_cast<char*>(p.out) + (t * p.out_row + n0) * dtype_size(p.dtype);
  store_floats(v, p.dtype, n1 - n0, dst);
}

// Rows n0 .. n0 + R - 1 (R = 16, or the rest) of w as a matrix of their own in the documented
// layout, which the row kernels read: w's own bytes when w is in that layout, else a copy
// de-interleaved into buf (tile_bytes(w) bytes).
size_t tile_bytes(const QuantView& w) {
  const int64_t SB = w.cols / QK;
  return size_t(ROWS * (w.row_bytes + SB * 16 + SB * 4));
}

QuantView plain_rows(const QuantView& w, int64_t n0, uint8_t* buf) {
  const int64_t R = std::min(ROWS, w.rows - n0), SB = w.cols / QK;
  QuantView v = w;
  v.rows = R, v.ilv = 0;
  v.codes = w.codes + n0 * w.row_bytes;
  v.sub_scales = w.sub_scales + n0 * SB * 16;
  v.super_scales = w.super_scales + n0 * SB * 2;
  if (!w.ilv) return v;
  const KQuantSections src{const_cast<uint8_t*>(v.codes), const_cast<uint8_t*>(v.sub_scales),
                           const_cast<uint16_t*>(v.super_scales)};
  const KQuantSections dst{buf, buf + R * w.row_bytes, reinterpret_cast<uint16_t*>(buf + R * (w.row_bytes + SB * 16))};
  kquant_permute_block(w.format, SB, R, src, dst, false);
  v.codes = dst.codes, v.sub_scales = dst.sub, v.super_scales = dst.sup;
  return v;
}

// 1-4 tokens, fp32: the codes of a super-block are unpacked once, each sub-block's partial dot
// q . x stays in a vector that is scaled by d * sc_j (an FMA per sub-block, no tile in memory); the
// min (q4_k / q5_k) and the -32 offset (q6_k) come from per-sub-block sums of x.
template <QuantFormat F, int NT>
void gemv_exact(const QuantView& w, const float* x, int64_t ldx, const float* xs, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  constexpr int SZ = F == QuantFormat::Q6K ? 16 : 32;  // weights per sub-block
  constexpr int NS = QK / SZ;
  const int64_t SB = w.cols / QK, nsub = w.cols / SZ;
  alignas(64) uint8_t q[QK];
  for (int64_t n = n0; n < n1; ++n) {
    VecF acc[NT];
    float corr[NT];
    for (int t = 0; t < NT; ++t) acc[t] = VecF::zero(), corr[t] = 0.0f;
    for (int64_t b = 0; b < SB; ++b) {
      const uint8_t* sub = w.sub_scales + (n * SB + b) * 16;
      const uint16_t* sup = w.super_scales + (n * SB + b) * 2;
      unpack_codes<F>(w.codes + n * w.row_bytes + b * (32 * w.bits), q);
      const float d = half_to_float(sup[0]);
      const float dmin = F == QuantFormat::Q6K ? 0.0f : half_to_float(sup[1]);
      for (int j = 0; j < NS; ++j) {
        const float a = F == QuantFormat::Q6K ? d * float(int8_t(sub[j])) : d * float(sub[j]);
        // q6_k: a * (q - 32) = a * q - 32 a; q4_k / q5_k: a * q - dmin * m_j
        const float off = F == QuantFormat::Q6K ? 32.0f * a : dmin * float(sub[8 + j]);
        VecF wv[SZ / VL];
        for (int i = 0; i < SZ / VL; ++i) wv[i] = load_u8(q + j * SZ + i * VL);
        const VecF va = VecF::set1(a);
        for (int t = 0; t < NT; ++t) {
          const float* xt = x + t * ldx + b * QK + j * SZ;
          VecF s = wv[0] * VecF::load(xt);
          for (int i = 1; i < SZ / VL; ++i) s = VecF::fma(wv[i], VecF::load(xt + i * VL), s);
          acc[t] = VecF::fma(va, s, acc[t]);
          corr[t] += off * xs[t * nsub + b * NS + j];
        }
      }
    }
    for (int t = 0; t < NT; ++t) y[t * ldy + n] = acc[t].reduce_add() - corr[t];
  }
}

template <QuantFormat F>
void qgemm_exact(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, T = p.tokens, SB = w.cols / QK;
  constexpr int SZ = F == QuantFormat::Q6K ? 16 : 32;
  const int64_t nsub = w.cols / SZ;
  std::vector<float> xs;  // 1-4 tokens: per-sub-block sums of x
  if (T <= 4) {
    xs.resize(static_cast<size_t>(T * nsub));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < nsub; ++j) {
        float s = 0.0f;
        for (int i = 0; i < SZ; ++i) s += x[t * ldx + j * SZ + i];
        xs[size_t(t * nsub + j)] = s;
      }
  }
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);
  ParallelGuard guard;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> tile, y;
    std::vector<uint8_t> rows;
    const bool ok = guard.run([&] {
      tile.resize(T <= 4 ? 0 : size_t(ROWS * QK)), y.resize(size_t(T * ROWS));
      if (w.ilv) rows.resize(tile_bytes(w));
    });
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!ok) continue;
      const int64_t n0 = blk * ROWS, n1 = std::min(N, n0 + ROWS), nr = n1 - n0;
      const QuantView v = plain_rows(w, n0, rows.data());
      if (T <= 4) {
        switch (T) {
          case 1: gemv_exact<F, 1>(v, x, ldx, xs.data(), 0, nr, y.data(), ROWS); break;
          case 2: gemv_exact<F, 2>(v, x, ldx, xs.data(), 0, nr, y.data(), ROWS); break;
          case 3: gemv_exact<F, 3>(v, x, ldx, xs.data(), 0, nr, y.data(), ROWS); break;
          default: gemv_exact<F, 4>(v, x, ldx, xs.data(), 0, nr, y.data(), ROWS); break;
        }
      } else {
        std::fill(y.begin(), y.end(), 0.0f);
        for (int64_t b = 0; b < SB; ++b) {
          for (int64_t r = 0; r < nr; ++r) dequant_sb<F>(v, r, b, tile.data() + r * QK);
          for (int64_t t = 0; t < T; ++t) {
            const float* xt = x + t * ldx + b * QK;
            for (int64_t r = 0; r < nr; ++r) y[size_t(t * ROWS + r)] += dot256(tile.data() + r * QK, xt);
          }
        }
      }
      for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * ROWS);
    }
  }
  guard.rethrow();
}

template <QuantFormat F>
void dequantize_impl(const DequantProblem& p) {
  const int64_t K = p.w.cols, SB = K / QK, blocks = (p.w.rows + ROWS - 1) / ROWS;
  char* out = static_cast<char*>(p.out);
  const int es = dtype_size(p.dtype);
  ParallelGuard guard;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> row;
    std::vector<uint8_t> rows;
    const bool ok = guard.run([&] {
      row.resize(size_t(K));
      if (p.w.ilv) rows.resize(tile_bytes(p.w));
    });
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!ok) continue;
      const QuantView v = plain_rows(p.w, blk * ROWS, rows.data());
      for (int64_t r = 0; r < v.rows; ++r) {
        for (int64_t b = 0; b < SB; ++b) dequant_sb<F>(v, r, b, row.data() + b * QK);
        store_floats(row.data(), p.dtype, K, out + (blk * ROWS + r) * K * es);
      }
    }
  }
  guard.rethrow();
}

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// x quantized to int8 for the integer paths, one scale per token and super-block. The super-block
// rather than the 16/32-weight sub-block: its scale is one float multiply-add per token and
// super-block (q4_k / q5_k; q6_k one multiply per sub-block dot) and the min term stays an integer
// dot. Measured on SmolLM2-135M's layer inputs (bench/qgemm_quality.py --blocks), the product's
// relative error is 1.6e-2 with blocks of 256, 7.5e-3 with 32, 2.4e-2 with one scale per token;
// blocks of 32 (a float min term, one more multiply per sub-block and token) made the VNNI kernel
// 12-18% slower on an L2-resident 256 x 4096 q4_k (1 and 8 tokens), 256 costs about 1-2%.
struct KX {
  std::vector<int8_t> q;      // [T][K], per 128 weights: the 64 low-nibble x, then the 64 high-nibble x
  std::vector<int16_t> s16;   // [T][K / 16] sums of the int8 x per 16 weights (q6_k sub-blocks)
  std::vector<int16_t> s32;   // [T][K / 32] per 32 weights (q4_k / q5_k sub-blocks)
  std::vector<float> scale;   // [T][K / 256]
  int64_t K = 0;
  bool nonfinite = false;
};

constexpr int kPrefetch = 1024;     // bytes ahead in the code stream (software prefetch), row kernel
constexpr int kIlvPrefetch = 4096;  // the same for the interleaved layout's block stream

KX prepare_x(const float* x, int64_t ldx, int64_t T, int64_t K) {
  KX r;
  r.K = K;
  r.q.resize(size_t(T * K));
  r.s16.resize(size_t(T * K / 16));
  r.s32.resize(size_t(T * K / 32));
  r.scale.resize(size_t(T * (K / QK)));
  std::vector<int8_t> nat(static_cast<size_t>(K));
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    VecF vbad = VecF::zero();
    for (int64_t k = 0; k < K; k += VL) vbad = vbad + VecF::load(xt + k) * VecF::zero();  // NaN once x holds NaN or inf
    float lanes[VL];
    vbad.store(lanes);
    for (int i = 0; i < VL; ++i) r.nonfinite |= lanes[i] != lanes[i];
    if (r.nonfinite) return r;
    for (int64_t b = 0; b < K / QK; ++b) {
      VecF bmax = VecF::zero();
      for (int64_t k = b * QK; k < (b + 1) * QK; k += VL) {
        const VecF v = VecF::load(xt + k);
        bmax = VecF::max(bmax, VecF::max(v, VecF::zero() - v));
      }
      const float amax = bmax.reduce_max();
      const float dx = amax > 0.0f ? amax / 127.0f : 1.0f;
      const VecF inv = VecF::set1(1.0f / dx);
      r.scale[size_t(t * (K / QK) + b)] = dx;
      for (int64_t k = b * QK; k < (b + 1) * QK; k += VL) {  // round to nearest even, as lrint
        float f[VL];
        VecF::round(VecF::load(xt + k) * inv).store(f);
        for (int i = 0; i < VL; ++i) nat[size_t(k + i)] = int8_t(int(f[i]));
      }
    }
    int16_t* s16 = r.s16.data() + t * (K / 16);
    int16_t* s32 = r.s32.data() + t * (K / 32);
    for (int64_t j = 0; j < K / 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += nat[size_t(16 * j + i)];
      s16[j] = int16_t(s);
    }
    for (int64_t j = 0; j < K / 32; ++j) s32[j] = int16_t(s16[2 * j] + s16[2 * j + 1]);
    int8_t* dst = r.q.data() + t * K;
    for (int64_t k0 = 0; k0 < K; k0 += 128)
      for (int c = 0; c < 4; ++c) {
        std::memcpy(dst + k0 + 16 * c, nat.data() + k0 + 32 * c, 16);
        std::memcpy(dst + k0 + 64 + 16 * c, nat.data() + k0 + 32 * c + 16, 16);
      }
  }
  return r;
}

// The quantized x of tokens t0 .. t0 + NT - 1, as the int8 kernels read it.
template <int NT>
struct KXTokens {
  const int8_t* q[NT];     // rearranged int8 x (KX::q)
  const int16_t* s16[NT];  // sums per 16 weights
  const int16_t* s32[NT];  // sums per 32 weights
  const float* scale[NT];  // [K / 256] per token
  KXTokens(const KX& xq, int64_t t0) {
    const int64_t K = xq.K;
    for (int t = 0; t < NT; ++t) {
      q[t] = xq.q.data() + (t0 + t) * K;
      s16[t] = xq.s16.data() + (t0 + t) * (K / 16);
      s32[t] = xq.s32.data() + (t0 + t) * (K / 32);
      scale[t] = xq.scale.data() + (t0 + t) * (K / QK);
    }
  }
};

// AVX2 (also the AVX-512 level's path when the CPU lacks VNNI): vpmaddubsw (u8 codes x s8 x, pairs
// summed in s16: at most 2 * 63 * 127, and for q4_k/q5_k the two nibble halves of a sub-block add
// to at most 4 * 31 * 127, no saturation) then vpmaddwd by the sub-scales (int32).
template <QuantFormat F, int NT>
__attribute__((target("avx2,fma,f16c"))) void gemv_avx2(const QuantView& w, const KX& xq, int64_t t0, int64_t n0,
                                                        int64_t n1, float* y, int64_t ldy) {
  const int64_t K = w.cols, SB = K / QK;
  const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
  auto expand = [](uint32_t bits) { return expand_bit4(bits); };  // q5_k's bit 4
  const KXTokens<NT> xt(xq, t0);
  const int8_t* const* xa = xt.q;
  const int16_t* const* xs16 = xt.s16;
  const int16_t* const* xs32 = xt.s32;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 accf[NT], accm[NT];
    for (int t = 0; t < NT; ++t) accf[t] = _mm256_setzero_ps(), accm[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < SB; ++b) {
      const uint8_t* sb = w.codes + n * w.row_bytes + b * (32 * w.bits);
      const uint8_t* sub = w.sub_scales + (n * SB + b) * 16;
      const uint16_t* sup = w.super_scales + (n * SB + b) * 2;
      for (int l = 0; l < w.bits / 2; ++l) _mm_prefetch(reinterpret_cast<const char*>(sb + kPrefetch + 64 * l), _MM_HINT_T0);
      __m256i isum[NT];
      for (int t = 0; t < NT; ++t) isum[t] = _mm256_setzero_si256();
      __m256i sc16;  // the sub-scales as int16 (q6_k: lane h holds sub-blocks 8h..8h+7)
      if constexpr (F == QuantFormat::Q6K)
        sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sub)));
      else
        sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub))));
      for (int h = 0; h < 2; ++h) {
        __m256i bc = sc16;
        if constexpr (F == QuantFormat::Q6K)
          bc = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        __m256i hb;
        if constexpr (F == QuantFormat::Q6K) hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h));
        for (int s = 0; s < 2; ++s) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * h + 32 * s));
          __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          const int c = 4 * h + 2 * s;  // chunks c (bytes 0-15 of the step) and c + 1 (16-31)
          if constexpr (F == QuantFormat::Q5K) {
            lo = _mm256_or_si256(lo, expand(uint32_t(load_u64(sb + 128 + 16 * h) >> (32 * s))));
            hi = _mm256_or_si256(hi, expand(uint32_t(load_u64(sb + 128 + 16 * h + 8) >> (32 * s))));
          } else if constexpr (F == QuantFormat::Q6K) {
            const __m128i sl = _mm_cvtsi32_si128(2 * s), sh = _mm_cvtsi32_si128(4 + 2 * s);
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, sl), m3), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, sh), m3), 4));
          }
          const int8_t* xo[NT];
          for (int t = 0; t < NT; ++t) xo[t] = xa[t] + b * QK + 128 * h + 32 * s;
          if constexpr (F == QuantFormat::Q6K) {
            // sub-blocks 2c, 2c + 2 (low nibbles) and 2c + 1, 2c + 3 (high): words 4s.. of lane h
            const __m256i clo = _mm256_setr_epi8(8 * s, 8 * s + 1, 8 * s, 8 * s + 1, 8 * s, 8 * s + 1, 8 * s, 8 * s + 1,
                                                 8 * s, 8 * s + 1, 8 * s, 8 * s + 1, 8 * s, 8 * s + 1, 8 * s, 8 * s + 1,
                                                 8 * s + 4, 8 * s + 5, 8 * s + 4, 8 * s + 5, 8 * s + 4, 8 * s + 5, 8 * s + 4,
                                                 8 * s + 5, 8 * s + 4, 8 * s + 5, 8 * s + 4, 8 * s + 5, 8 * s + 4, 8 * s + 5,
                                                 8 * s + 4, 8 * s + 5);
            const __m256i slo = _mm256_shuffle_epi8(bc, clo);
            const __m256i shi = _mm256_shuffle_epi8(bc, _mm256_add_epi8(clo, _mm256_set1_epi8(2)));
            for (int t = 0; t < NT; ++t) {
              const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo[t]));
              const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo[t] + 64));
              isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), slo));
              isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), shi));
            }
          } else {
            // words c and c + 1 of the 8 sub-scales
            const int8_t a = int8_t(2 * c), a1 = int8_t(2 * c + 1), e = int8_t(2 * c + 2), e1 = int8_t(2 * c + 3);
            const __m256i ctl = _mm256_setr_epi8(a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, e, e1, e, e1, e,
                                                 e1, e, e1, e, e1, e, e1, e, e1, e, e1);
            const __m256i sv = _mm256_shuffle_epi8(bc, ctl);
            for (int t = 0; t < NT; ++t) {
              const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo[t]));
              const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo[t] + 64));
              const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
              isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, sv));
            }
          }
        }
      }
      // d and dmin times the token's x scale of this super-block
      const float d = half_to_float(sup[0]);
      if constexpr (F == QuantFormat::Q6K) {
        for (int t = 0; t < NT; ++t) {
          const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs16[t] + b * 16)));
          isum[t] = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(off, 5));
          accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * xt.scale[t][b]), accf[t]);
        }
      } else {
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + 8)));
        const float dmin = half_to_float(sup[1]);
        for (int t = 0; t < NT; ++t) {
          const float dx = xt.scale[t][b];
          accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * dx), accf[t]);
          const __m128i mt = _mm_madd_epi16(m16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs32[t] + b * 8)));
          accm[t] = _mm256_castps128_ps256(
              _mm_fmadd_ps(_mm_cvtepi32_ps(mt), _mm_set1_ps(dmin * dx), _mm256_castps256_ps128(accm[t])));
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      float f[8], g[4];
      _mm256_storeu_ps(f, accf[t]);
      _mm_storeu_ps(g, _mm256_castps256_ps128(accm[t]));
      const float s = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
      const float m = (g[0] + g[1]) + (g[2] + g[3]);
      y[(t0 + t) * ldy + n] = s - m;
    }
  }
}
#endif

#if defined(MK_ISA_AVX512)
bool vnni_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return ok;
}

// AVX512-VNNI on the row-interleaved layout, one block of R <= 16 rows (lane r = row n0 + r): per
// super-block and chunk c (32 weights, bytes 16c..16c+15 of each row's codes), 4 loads of 64 bytes
// (4 code bytes of 16 rows each); vpdpbusd against 4 x bytes broadcast to every lane sums each row's
// low-nibble and high-nibble weights in their own lanes, with no shuffle. q4_k / q5_k: a chunk is
// sub-block c; its exact int32 dot goes to fp32 and one FMA by the 16 rows' d * sc_c (a vector
// computed once per chunk for every token: exact in fp32) adds it to the token's sum (an int32 sum
// per super-block, vpmulld by the sub-scales, needed a third set of registers and spilled at 8
// tokens); the mins term sum_j m_j * xsum_j is vpdpwssd of the rows' (m_2i, m_2i+1) pairs against
// the token's two sub-block sums, times dmin. q6_k: the chunk's low nibbles are sub-block 2c, the
// high ones 2c + 1, each dot started at -32 * xsum (the code offset). q5_k's bit 4: byte k of each row's piece in the
// bit-4 section holds the bits of 8 code bytes; vpshufb puts that byte under each code byte and
// vptestmb turns the bit into a mask for a masked add of 16. q6_k's bits 4-5 are in byte-aligned
// pieces too (quant.h), shifted into place by a shift and a vpternlogd.
template <QuantFormat F, int NT>
__attribute__((target("avx512vnni"))) void ilv_vnni(const QuantView& w, const KX& xq, int64_t t0, int64_t n0, float* y,
                                                    int64_t ldy) {
  const int64_t SB = w.cols / QK, R = std::min(ROWS, w.rows - n0), pb = 4 * R;  // pb: bytes per piece
  const int cb = 32 * w.bits;  // code bytes per row and super-block
  const __mmask16 rm = R == 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  const __mmask64 bm = R == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * R)) - 1;
  const __mmask32 pm = R == 16 ? ~__mmask32(0) : (__mmask32(1) << (2 * R)) - 1;
  const uint8_t* codes = w.codes + n0 * w.row_bytes;
  const uint8_t* subs = w.sub_scales + n0 * SB * 16;
  const uint16_t* sups = w.super_scales + n0 * SB * 2;
  const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30), b16 = _mm512_set1_epi8(0x10);
  // q5_k: byte 4L + k of a lane reads byte s of the lane (vpshufb indexes within 16 bytes)
  const __m512i lane_base = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0);  // 4 (L % 4) per byte
  const __m512i bit_lo = _mm512_set1_epi32(0x08040201), bit_hi = _mm512_set1_epi32(int32_t(0x80402010u));
  const KXTokens<NT> xt(xq, t0);
  // always masked (all ones for 16 rows): a choice per load made the compiler branch around each one
  auto load = [&](const uint8_t* p) { return _mm512_maskz_loadu_epi8(bm, p); };
  __m512 accf[NT];
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < SB; ++b) {
    const uint8_t* p = codes + b * R * cb;
    const uint8_t* sub = subs + b * R * 16;
    const uint16_t* sup = sups + b * R * 2;
    const int64_t lines = R * cb / 64;  // cache lines of the super-block's codes (16 rows: 2 x bits + 4)
    const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(rm, sup));
    // q4_k / q5_k: the super-block's sum before the token's x scale (one FMA per token and
    // super-block); q6_k (two int32 chains per token already) scales each sub-block dot instead
    __m512 accb[F == QuantFormat::Q6K ? 1 : NT];
    #pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const int h = c / 4;
      const int64_t xo = b * QK + 128 * h + 16 * (c % 4);  // the chunk's low-nibble x (KX order); + 64: high
      // one int32 chain per token and sub-block (q6_k: two sub-blocks per chunk), started at the code
      // offset's -32 * xsum for q6_k; across tokens and chunks the chains are independent
      // a decode step is bandwidth bound: more misses in flight than the hardware prefetcher keeps,
      // spread over the chunks (a burst of them per super-block stalled on the miss buffers)
      for (int64_t l = c * lines / 8; l < (c + 1) * lines / 8; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(p + kIlvPrefetch + 64 * l), _MM_HINT_T0);
      __m512i al[NT], ah[F == QuantFormat::Q6K ? NT : 1];
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        if constexpr (F == QuantFormat::Q6K) {
          al[t] = _mm512_set1_epi32(-32 * xt.s16[t][b * 16 + 2 * c]);
          ah[t] = _mm512_set1_epi32(-32 * xt.s16[t][b * 16 + 2 * c + 1]);
        } else {
          al[t] = _mm512_setzero_si512();
        }
      }
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int o = 16 * (c % 4) + 4 * i;  // the piece's first byte within half h's 64 code bytes
        const __m512i v = load(p + (4 * c + i) * pb);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        if constexpr (F == QuantFormat::Q5K) {
          // bits o % 32 .. of piece 32 + 4h + o / 32 (low nibbles; + 2: high nibbles), byte (o % 32) / 8
          const int s = (o % 32) / 8;
          const __m512i ctl = _mm512_add_epi8(lane_base, _mm512_set1_epi8(char(s)));
          const __m512i sel = o % 8 ? bit_hi : bit_lo;
          const __m512i hl = load(p + (32 + 4 * h + o / 32) * pb), hh = load(p + (34 + 4 * h + o / 32) * pb);
          lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(_mm512_shuffle_epi8(hl, ctl), sel), lo, b16);
          hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(_mm512_shuffle_epi8(hh, ctl), sel), hi, b16);
        } else if constexpr (F == QuantFormat::Q6K) {
          // piece 32 + 8h + (o % 32) / 4; bits 0-1 / 4-5 (o < 32) or 2-3 / 6-7 of each byte
          const __m512i H = load(p + (32 + 8 * h + (o % 32) / 4) * pb);
          const __m512i hl = o < 32 ? _mm512_slli_epi16(H, 4) : _mm512_slli_epi16(H, 2);
          const __m512i hh = o < 32 ? H : _mm512_srli_epi16(H, 2);
          lo = _mm512_ternarylogic_epi32(lo, hl, m30, 0xF8);  // lo | (hl & 0x30)
          hi = _mm512_ternarylogic_epi32(hi, hh, m30, 0xF8);
        }
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          al[t] = _mm512_dpbusd_epi32(al[t], lo, _mm512_set1_epi32(load_i32(xt.q[t] + xo + 4 * i)));
          if constexpr (F == QuantFormat::Q6K)
            ah[t] = _mm512_dpbusd_epi32(ah[t], hi, _mm512_set1_epi32(load_i32(xt.q[t] + xo + 64 + 4 * i)));
          else
            al[t] = _mm512_dpbusd_epi32(al[t], hi, _mm512_set1_epi32(load_i32(xt.q[t] + xo + 64 + 4 * i)));
        }
      }
      // d * sub-scale per row (exact in fp32), times the sub-block's integer dot (q6_k: times the
      // token's x scale of the super-block, one multiply per token)
      if constexpr (F == QuantFormat::Q6K) {
        const __m512 sl = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(rm, sub + 2 * c * R))));
        const __m512 sh = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(rm, sub + (2 * c + 1) * R))));
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          const __m512 dx = _mm512_set1_ps(xt.scale[t][b]);
          accf[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ah[t]), dx), sh,
                                    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(al[t]), dx), sl, accf[t]));
        }
      } else {
        const __m512 sc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(rm, sub + c * R))));
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t)
          accb[t] = c == 0 ? _mm512_mul_ps(_mm512_cvtepi32_ps(al[t]), sc) : _mm512_fmadd_ps(_mm512_cvtepi32_ps(al[t]), sc, accb[t]);
      }
    }
    if constexpr (F != QuantFormat::Q6K) {
      __m512i msum[NT];
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) msum[t] = _mm512_setzero_si512();
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512i mp = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(pm, sub + 8 * R + 2 * R * i));
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          int32_t pair;
          std::memcpy(&pair, xt.s32[t] + b * 8 + 2 * i, 4);
          msum[t] = _mm512_dpwssd_epi32(msum[t], mp, _mm512_set1_epi32(pair));
        }
      }
      const __m512 dm = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(rm, sup + R));
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t)
        accf[t] = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[t]), dm, accb[t]), _mm512_set1_ps(xt.scale[t][b]),
                                  accf[t]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
    _mm512_mask_storeu_ps(y + (t0 + t) * ldy + n0, rm, accf[t]);
}
#endif

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
#if defined(MK_ISA_AVX512)
constexpr int kTokens = 8;  // tokens sharing each unpacked code load
#else
constexpr int kTokens = 4;
#endif
constexpr int64_t kMaxTokens = 64;

// One pass of nt tokens (1 .. kTokens) over rows n0 .. n0 + 15: the VNNI kernel on the interleaved
// layout, else the AVX2 row kernel on the block in the documented layout (v, from plain_rows).
template <QuantFormat F, int NT = kTokens>
void pass(int64_t nt, const QuantView& w, const QuantView& v, const KX& xq, int64_t t0, int64_t n0, float* y,
          int64_t ldy) {
  if (nt == NT) {
#if defined(MK_ISA_AVX512)
    if (w.ilv && vnni_available()) return ilv_vnni<F, NT>(w, xq, t0, n0, y, ldy);
#endif
    // AVX2 handles 4 tokens at a time (16 ymm registers)
    for (int64_t t = t0; t < t0 + NT; t += 4) {
      const int64_t m = std::min<int64_t>(4, t0 + NT - t);
      if (m == 4) gemv_avx2<F, 4>(v, xq, t, 0, v.rows, y + n0, ldy);
      else if (m == 3) gemv_avx2<F, 3>(v, xq, t, 0, v.rows, y + n0, ldy);
      else if (m == 2) gemv_avx2<F, 2>(v, xq, t, 0, v.rows, y + n0, ldy);
      else gemv_avx2<F, 1>(v, xq, t, 0, v.rows, y + n0, ldy);
    }
  } else if constexpr (NT > 1) {
    pass<F, NT - 1>(nt, w, v, xq, t0, n0, y, ldy);
  }
}

// Returns false (computing nothing) when x holds NaN or inf: the exact path propagates them.
template <QuantFormat F>
bool qgemm_int8x(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, T = p.tokens;
  const KX xq = prepare_x(x, ldx, T, w.cols);
  if (xq.nonfinite) return false;
#if defined(MK_ISA_AVX512)
  const bool native = w.ilv && vnni_available();
#else
  const bool native = false;
#endif
  // The output goes straight to `out` when it is fp32 with no bias; else through a buffer.
  const bool direct = p.dtype == DType::Float32 && bias == nullptr;
  std::vector<float> ybuf(direct ? 0 : static_cast<size_t>(T * N));
  float* y = direct ? static_cast<float*>(p.out) : ybuf.data();
  const int64_t ldy = direct ? p.out_row : N;
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);
  ParallelGuard guard;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> rows;
    const bool ok = guard.run([&] {
      if (!native && w.ilv) rows.resize(tile_bytes(w));
    });
#pragma omp for schedule(dynamic, 2)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!ok) continue;
      const int64_t n0 = blk * ROWS, n1 = std::min(N, n0 + ROWS);
      const QuantView v = native ? w : plain_rows(w, n0, rows.data());
      for (int64_t t0 = 0; t0 < T; t0 += kTokens)
        pass<F>(std::min<int64_t>(kTokens, T - t0), w, v, xq, t0, n0, y, ldy);
      if (!direct)
        for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y + t * N + n0);
    }
  }
  guard.rethrow();
  return true;
}
#endif

template <QuantFormat F>
void qgemm_impl(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  const int64_t int8_max = int8_max_tokens_override() ? int8_max_tokens_override() : kMaxTokens;
  if (p.int8_activations && p.tokens <= int8_max && qgemm_int8x<F>(p, x, ldx, bias)) return;
#endif
  qgemm_exact<F>(p, x, ldx, bias);
}

}  // namespace

void qgemm_kquant(const QGemmProblem& p) {
  const Fp32Operands ops(p);
  const float *x = ops.x, *bias = ops.bias;
  const int64_t ldx = ops.ldx;
  switch (p.w.format) {
    case QuantFormat::Q4K: qgemm_impl<QuantFormat::Q4K>(p, x, ldx, bias); break;
    case QuantFormat::Q5K: qgemm_impl<QuantFormat::Q5K>(p, x, ldx, bias); break;
    default: qgemm_impl<QuantFormat::Q6K>(p, x, ldx, bias); break;
  }
}

void dequantize_kquant(const DequantProblem& p) {
  switch (p.w.format) {
    case QuantFormat::Q4K: dequantize_impl<QuantFormat::Q4K>(p); break;
    case QuantFormat::Q5K: dequantize_impl<QuantFormat::Q5K>(p); break;
    default: dequantize_impl<QuantFormat::Q6K>(p); break;
  }
}

}  // namespace memkernels::cpu::MK_ISA_NS
