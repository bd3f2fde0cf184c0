// CPU quantized GEMM: codes are unpacked in registers and multiplied with fp32 activations; the
// dequantized matrix never exists in memory.
//
// For row n, y[t][n] = sum_g s[n][g] * (sum_{k in g} T[q_k] x[t][k] - z[n][g] * xsum[t][g])
//                      + m[n][g] * xsum[t][g],
// where T[q] is the raw level of a code (the integer, or the NF4 value), xsum the per-group sum of x
// (computed once per call) and m the int4_min group minimum. So the inner loop is just "unpack 32
// codes to floats, FMA with x"; the scale, zero point and min are applied once per group (a vector
// FMA and a scalar term; the mins as one vector dot product per row), not per weight.
//
// 1-3 tokens: each thread walks blocks of rows, fused unpack + dot with the scale applied per group
// (the codes are 8x smaller than fp32 for int4). More tokens: each unpacked and scaled chunk stays
// in registers for a block of 4 or 8 tokens (x zero-padded to the block), K is walked in L1-sized
// slices, and on AVX-512 two rows share every x load. Threads split the rows. These exact paths read
// either layout (chunk_codes gathers a row's chunk from the row-interleaved one).
// Default of the Python API, 1-64 tokens, int4 / int4_sym / int4_min / int8 / int3* / int2* / nf4 on
// the CPU's row-interleaved layout (quant.h): x quantized to int8 (one scale per token and weight
// group, Int8X) and integer dot products,
// AVX512-VNNI or AVX2 (ilv_block_vnni, ilv_half_avx2; 2 / 3 bits: ilv_low_block_vnni,
// ilv_low_half_avx2; nf4: int8 levels looked up with vpshufb). Each 64-byte weight load holds 4 code bytes of 16 rows, and
// each row's sum builds up in its own 32-bit lane against x bytes broadcast to every lane: one
// streaming pass over the codes, no shuffle and no horizontal sum in the loop, the 16 rows' group
// scales one contiguous load per group, each weight load serving up to 8 (AVX2: 4) tokens.
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
constexpr int FR = 2;  // rows per register tile of the multi-token path (2 x 8 accumulators of 32 zmm)
#else
constexpr int FR = 1;  // 16 ymm registers: 8 accumulators + 4 weight vectors
#endif
constexpr int64_t ROWS = 16;  // rows per parallel task

// Threads for a call of T tokens on w (runtime_internal.h says when a call stays on one thread).
inline int threads_for(const QuantView& w, int64_t T) { return threads_for_macs(w.rows * w.cols * T); }

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

// The codes of chunk c of row n in the documented chunk layout (quant.h): in place, or, for the
// row-interleaved layout, its 4-byte pieces gathered into tmp (32 bytes) with one wide store.
template <int BITS>
inline const uint8_t* chunk_codes(const QuantView& w, int64_t n, int64_t c, uint8_t* tmp) {
  if (!w.ilv) return w.codes + n * w.row_bytes + c * (BITS * 4);
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  // w.ilv is always kInterleaveRows: a constant block size keeps a 64-bit division out of this
  // per-chunk call (the multi-token exact path makes one per row and chunk)
  const int64_t r = n % kInterleaveRows, n0 = n - r, R = std::min<int64_t>(kInterleaveRows, w.rows - n0);
  const uint8_t* p = w.codes + n0 * w.row_bytes + c * R * (BITS * 4) + r * 4;
  const int64_t st = R * 4;
  auto ld = [&](int j) { int32_t v; std::memcpy(&v, p + j * st, 4); return v; };
  if constexpr (BITS == 2) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(tmp), _mm_setr_epi32(ld(0), ld(1), 0, 0));
  } else if constexpr (BITS == 3) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), _mm_setr_epi32(ld(0), ld(1), ld(2), 0));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), _mm_setr_epi32(ld(0), ld(1), ld(2), ld(3)));
    if constexpr (BITS == 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp + 16), _mm_setr_epi32(ld(4), ld(5), ld(6), ld(7)));
  }
  return tmp;
#else
  return w.chunk(n, c, tmp);
#endif
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

// sum_g (s[n][g] * z[n][g] - m[n][g]) * xsum[g] over row n's groups: the zero-point and min terms
// of one output, vectorised over the groups (z includes the symmetric offset). Needs fp32 scales
// (every format with a zero point or a min has them).
inline float group_corr(const QuantView& w, int64_t n, const float* xsum) {
  const int64_t G = w.groups;
  if (w.ilv) {  // row-interleaved sections: (n, g) entries are R apart; the exact path only
    float tot = 0.0f;
    for (int64_t g = 0; g < G; ++g) tot += (w.scale(n, g) * w.zero(n, g) - w.min(n, g)) * xsum[g];
    return tot;
  }
  const float* s = w.scales + n * G;
  const uint8_t* z = w.zeros ? w.zeros + n * G : nullptr;
  const float* m = w.mins ? w.mins + n * G : nullptr;
  const float off = w.code_offset;
  int64_t g = 0;
  float tot = 0.0f;
#if defined(MK_ISA_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (G - g)) - 1);
    __m512 zv = _mm512_set1_ps(off);
    if (z) zv = _mm512_add_ps(zv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, z + g))));
    __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + g), zv);
    if (m) t = _mm512_sub_ps(t, _mm512_maskz_loadu_ps(k, m + g));
    acc = _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(k, xsum + g), acc);
  }
  tot = _mm512_reduce_add_ps(acc);
#elif defined(MK_ISA_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= G; g += 8) {
    __m256 zv = _mm256_set1_ps(off);
    if (z) zv = _mm256_add_ps(zv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                       reinterpret_cast<const __m128i*>(z + g)))));
    __m256 t = _mm256_mul_ps(_mm256_loadu_ps(s + g), zv);
    if (m) t = _mm256_sub_ps(t, _mm256_loadu_ps(m + g));
    acc = _mm256_fmadd_ps(t, _mm256_loadu_ps(xsum + g), acc);
  }
  tot = VecF{acc}.reduce_add();
#endif
  for (; g < G; ++g) tot += (s[g] * ((z ? float(z[g]) : 0.0f) + off) - (m ? m[g] : 0.0f)) * xsum[g];
  return tot;
}

// Fused unpack + dot over rows [n0, n1) for NT tokens: y[t * ldy + n].
template <int BITS, bool NF4, int NT>
void gemv_rows(const QuantView& w, const Table& tab, const float* x, int64_t ldx, const float* xsum, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
  const int64_t G = w.groups;
  const int chunks = w.group_size / 32;
  const bool has_corr = w.zeros != nullptr || w.code_offset != 0.0f || w.mins != nullptr;
  alignas(64) uint8_t tmp[32];
  for (int64_t n = n0; n < n1; ++n) {
    VecF tot[NT];
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) tot[t] = VecF::zero();
    for (int64_t g = 0; g < G; ++g) {
      VecF acc[NT][CV];
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t)
        #pragma GCC unroll 16
        for (int i = 0; i < CV; ++i) acc[t][i] = VecF::zero();
      const float* xg = x + g * w.group_size;
      for (int c = 0; c < chunks; ++c) {
        VecF wv[CV];
        decode<BITS, NF4>(chunk_codes<BITS>(w, n, g * chunks + c, tmp), tab, wv);
        #pragma GCC unroll 16
        for (int t = 0; t < NT; ++t)
          #pragma GCC unroll 16
          for (int i = 0; i < CV; ++i)
            acc[t][i] = VecF::fma(wv[i], VecF::load(xg + t * ldx + c * 32 + i * VL), acc[t][i]);
      }
      const float s = w.scale(n, g);
      const VecF vs = VecF::set1(s);
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        VecF a = acc[t][0];
        #pragma GCC unroll 16
        for (int i = 1; i < CV; ++i) a = a + acc[t][i];
        tot[t] = VecF::fma(vs, a, tot[t]);
      }
    }
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
      y[t * ldy + n] = tot[t].reduce_add() - (has_corr ? group_corr(w, n, xsum + t * G) : 0.0f);
  }
}

#if defined(MK_ISA_AVX512)
// 2- and 3-bit codes on the row-interleaved layout (quant.h): chunk c of a 16-row block is pieces
// v[0], v[1] of 2-bit codes (piece j: 4 bytes per row, byte m holding weights 4j + m + 8s at bits 2s,
// 2s + 1, s = 0..3) and, for 3 bits, each row's 32 third bits (bit i: weight i) in `hbits`. LowBits
// gives, per (s, j), the codes of weights 8s + 4j .. 8s + 4j + 3 of every row as bytes in the row's
// 32-bit lane: a shift and a mask, plus 4 where the third bit is set (the row's high-bit byte s
// broadcast to its 4 bytes, tested against bits 0-3 or 4-7: a byte mask).
struct LowBits {
  __m512i m2 = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  __m512i nib[2] = {_mm512_set1_epi32(0x08040201), _mm512_set1_epi32(int(0x80402010u))};
  __m512i bsel[4];  // byte s of each 32-bit lane to all 4 of its bytes (vpshufb indexes per 128 bits)
  LowBits() {
    for (int s = 0; s < 4; ++s) {
      alignas(64) int8_t ix[64];
      for (int b = 0; b < 64; ++b) ix[b] = int8_t((b % 16) / 4 * 4 + s);
      bsel[s] = _mm512_load_si512(ix);
    }
  }
  __m512i high(__m512i hbits, int s) const { return _mm512_shuffle_epi8(hbits, bsel[s]); }  // once per s
  template <int BITS>
  __m512i codes(const __m512i (&v)[2], __m512i hb, int s, int j) const {
    __m512i q = _mm512_and_si512(s == 0 ? v[j] : _mm512_srli_epi16(v[j], 2 * s), m2);
    if constexpr (BITS == 3) q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hb, nib[j]), q, four);
    return q;
  }
};

// The exact 1-3 token path on the row-interleaved layout (quant.h), one 16-row block: each 64-byte
// load is 4 code bytes of 16 rows; its quarter q (rows 4q .. 4q+3) widens to 16 floats, lane 4i + l
// = row 4q + i, weight l of the 4, multiplied by the 4 x values broadcast to each 128-bit lane.
// Group scales go on per lane (a permute of the block's 16 scales); the 4 lanes of a row are summed
// once at the end, and the zero-point / min terms come off as in gemv_rows (group_corr).
template <int BITS, int NT, bool NF4 = false>
void gemv_block_ilv(const QuantView& w, const float* x, int64_t ldx, const float* xsum, int64_t n0, float* y,
                    int64_t ldy) {
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0);
  const int cpg = w.group_size / 32;
  constexpr int CB = BITS * 4;
  const __mmask64 bm = R == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * R)) - 1;
  const __mmask16 rm = R == 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  const uint8_t* blk = w.codes + n0 * w.row_bytes;
  const float* sb = w.scales + n0 * G;
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m512 lut = _mm512_loadu_ps(nf4_codebook());  // nf4: the level of each code
  const LowBits lb;
  __m512i sel[4];
  for (int q = 0; q < 4; ++q) {
    alignas(64) int32_t ix[16];
    for (int l = 0; l < 16; ++l) ix[l] = 4 * q + l / 4;
    sel[q] = _mm512_load_si512(ix);
  }
  __m512 tot[NT][4], corr[NT];
  for (int t = 0; t < NT; ++t) corr[t] = _mm512_setzero_ps();
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < 4; ++q) tot[t][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* p = blk + c * R * CB;
      if constexpr (BITS <= 3) {  // 2 / 3 bits: per (s, j) 4 weights of each row in its lane (LowBits)
        __m512i v[2], hbits = _mm512_setzero_si512();
        for (int j = 0; j < 2; ++j) v[j] = R == 16 ? _mm512_loadu_si512(p + j * 64) : _mm512_maskz_loadu_epi8(bm, p + j * R * 4);
        if constexpr (BITS == 3) hbits = R == 16 ? _mm512_loadu_si512(p + 128) : _mm512_maskz_loadu_epi8(bm, p + 2 * R * 4);
        #pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m512i hb = BITS == 3 ? lb.high(hbits, s) : hbits;
          #pragma GCC unroll 2
          for (int j = 0; j < 2; ++j) {
            const __m512i q = lb.codes<BITS>(v, hb, s, j);
            __m512 xb[NT];
            for (int t = 0; t < NT; ++t) xb[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * ldx + c * 32 + 8 * s + 4 * j));
            #pragma GCC unroll 4
            for (int qq = 0; qq < 4; ++qq) {
              const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, qq)));
              for (int t = 0; t < NT; ++t) acc[t][qq] = _mm512_fmadd_ps(f, xb[t], acc[t][qq]);
            }
          }
        }
        continue;
      }
      for (int j = 0; j < CB / 4; ++j) {
        const __m512i v = R == 16 ? _mm512_loadu_si512(p + j * 64) : _mm512_maskz_loadu_epi8(bm, p + j * R * 4);
        if constexpr (BITS == 4) {
          const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          __m512 xl[NT], xh[NT];
          for (int t = 0; t < NT; ++t) {
            xl[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * ldx + c * 32 + 4 * j));
            xh[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * ldx + c * 32 + 16 + 4 * j));
          }
          #pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const __m512i il = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(lo, q));
            const __m512i ih = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(hi, q));
            const __m512 fl = NF4 ? _mm512_permutexvar_ps(il, lut) : _mm512_cvtepi32_ps(il);
            const __m512 fh = NF4 ? _mm512_permutexvar_ps(ih, lut) : _mm512_cvtepi32_ps(ih);
            for (int t = 0; t < NT; ++t) acc[t][q] = _mm512_fmadd_ps(fh, xh[t], _mm512_fmadd_ps(fl, xl[t], acc[t][q]));
          }
        } else {
          __m512 xb[NT];
          for (int t = 0; t < NT; ++t) xb[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * ldx + c * 32 + 4 * j));
          #pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, q)));
            for (int t = 0; t < NT; ++t) acc[t][q] = _mm512_fmadd_ps(f, xb[t], acc[t][q]);
          }
        }
      }
    }
    const __m512 s16 = _mm512_maskz_loadu_ps(rm, sb + g * R);
    for (int q = 0; q < 4; ++q) {
      const __m512 sq = _mm512_permutexvar_ps(sel[q], s16);
      for (int t = 0; t < NT; ++t) tot[t][q] = _mm512_fmadd_ps(sq, acc[t][q], tot[t][q]);
    }
    // zero-point and min terms of the 16 rows: (s * z - m) * xsum_g, z including the symmetric offset
    __m512 zc = _mm512_set1_ps(w.code_offset);
    if (w.zeros) zc = _mm512_add_ps(zc, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(rm, w.zeros + n0 * G + g * R))));
    __m512 cg = _mm512_mul_ps(s16, zc);
    if (w.mins) cg = _mm512_sub_ps(cg, _mm512_maskz_loadu_ps(rm, w.mins + n0 * G + g * R));
    for (int t = 0; t < NT; ++t) corr[t] = _mm512_fmadd_ps(cg, _mm512_set1_ps(xsum[t * G + g]), corr[t]);
  }
  for (int t = 0; t < NT; ++t) {
    alignas(64) float lanes[64], cr[16];
    for (int q = 0; q < 4; ++q) _mm512_store_ps(lanes + 16 * q, tot[t][q]);
    _mm512_storeu_ps(cr, corr[t]);
    for (int64_t r = 0; r < R; ++r) {
      const float* l = lanes + 4 * r;  // quarter r / 4, lanes 4 (r % 4) ..: 16 (r / 4) + 4 (r % 4) = 4 r
      y[t * ldy + n0 + r] = (l[0] + l[1]) + (l[2] + l[3]) - cr[r];
    }
  }
}
#elif defined(MK_ISA_AVX2)
// AVX2 form of LowBits (AVX-512 above), 8 rows per register: the third bit through vpshufb, a byte
// compare and an or.
struct LowBits {
  __m256i m2 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
  __m256i nib[2] = {_mm256_set1_epi32(0x08040201), _mm256_set1_epi32(int(0x80402010u))};
  __m256i bsel[4];
  LowBits() {
    for (int s = 0; s < 4; ++s) {
      alignas(32) int8_t ix[32];
      for (int b = 0; b < 32; ++b) ix[b] = int8_t((b % 16) / 4 * 4 + s);
      bsel[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ix));
    }
  }
  __m256i high(__m256i hbits, int s) const { return _mm256_shuffle_epi8(hbits, bsel[s]); }
  template <int BITS>
  __m256i codes(const __m256i (&v)[2], __m256i hb, int s, int j) const {
    __m256i q = _mm256_and_si256(s == 0 ? v[j] : _mm256_srli_epi16(v[j], 2 * s), m2);
    if constexpr (BITS == 3)
      q = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, nib[j]), nib[j]), four));
    return q;
  }
};

// AVX2 form of the exact 1-token path on the row-interleaved layout: half h (rows 8h .. 8h+7) of a
// 16-row block; each 32-byte load is 4 code bytes of 8 rows, its quarter q (rows 2q, 2q+1) widens to
// 8 floats against the 4 x values broadcast to both 128-bit lanes.
template <int BITS, bool NF4 = false>
void gemv_half_ilv(const QuantView& w, const float* x, const float* xsum, int64_t n0, int h, float* y) {
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0), Rh = std::min<int64_t>(8, R - 8 * h);
  if (Rh <= 0) return;
  const int cpg = w.group_size / 32;
  constexpr int CB = BITS * 4;
  alignas(32) int32_t mk[8];
  for (int i = 0; i < 8; ++i) mk[i] = i < Rh ? -1 : 0;
  const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(mk));
  const uint8_t* blk = w.codes + n0 * w.row_bytes + 32 * h;
  const int64_t so = n0 * G + 8 * h;
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const LowBits lb;
  const __m256 lut_lo = _mm256_loadu_ps(nf4_codebook()), lut_hi = _mm256_loadu_ps(nf4_codebook() + 8);
  // a 4-bit code as a float: the integer, or (nf4) its level, two 8-entry permutes and bit 3 picking one
  auto level = [&](__m256i u) {
    if constexpr (!NF4) return _mm256_cvtepi32_ps(u);
    const __m256 a = _mm256_permutevar8x32_ps(lut_lo, u), b = _mm256_permutevar8x32_ps(lut_hi, u);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(u, 28)));
  };
  __m256i sel[4];
  for (int q = 0; q < 4; ++q) sel[q] = _mm256_setr_epi32(2 * q, 2 * q, 2 * q, 2 * q, 2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1);
  __m256 tot[4], corr = _mm256_setzero_ps();
  for (int q = 0; q < 4; ++q) tot[q] = _mm256_setzero_ps();
  // the four 8-byte quarters of v widened to int32
  auto widen = [](__m256i v, __m256i (&o)[4]) {
    const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
    if constexpr (BITS != 8) {  // unsigned codes
      o[0] = _mm256_cvtepu8_epi32(a), o[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8));
      o[2] = _mm256_cvtepu8_epi32(b), o[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    } else {
      o[0] = _mm256_cvtepi8_epi32(a), o[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8));
      o[2] = _mm256_cvtepi8_epi32(b), o[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
    }
  };
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* p = blk + c * R * CB;
      if constexpr (BITS <= 3) {  // 2 / 3 bits: per (s, j) 4 weights of each row in its lane (LowBits)
        auto load = [&](const uint8_t* src) {
          return Rh == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                         : _mm256_maskload_epi32(reinterpret_cast<const int*>(src), lm);
        };
        const __m256i v[2] = {load(p), load(p + R * 4)};
        const __m256i hbits = BITS == 3 ? load(p + 2 * R * 4) : _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
          const __m256i hb = BITS == 3 ? lb.high(hbits, s) : hbits;
          for (int j = 0; j < 2; ++j) {
            __m256i u[4];
            widen(lb.codes<BITS>(v, hb, s, j), u);
            const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + c * 32 + 8 * s + 4 * j));
            for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u[q]), xb, acc[q]);
          }
        }
        continue;
      }
      for (int j = 0; j < CB / 4; ++j) {
        const __m256i* src = reinterpret_cast<const __m256i*>(p + j * R * 4);
        const __m256i v = Rh == 8 ? _mm256_loadu_si256(src) : _mm256_maskload_epi32(reinterpret_cast<const int*>(src), lm);
        __m256i u[4];
        if constexpr (BITS == 4) {
          const __m256 xl = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + c * 32 + 4 * j));
          const __m256 xh = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + c * 32 + 16 + 4 * j));
          widen(_mm256_and_si256(v, m4), u);
          for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(level(u[q]), xl, acc[q]);
          widen(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), u);
          for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(level(u[q]), xh, acc[q]);
        } else {
          const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + c * 32 + 4 * j));
          widen(v, u);
          for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u[q]), xb, acc[q]);
        }
      }
    }
    const __m256 s8 = _mm256_maskload_ps(w.scales + so + g * R, lm);
    for (int q = 0; q < 4; ++q) tot[q] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s8, sel[q]), acc[q], tot[q]);
    __m256 zc = _mm256_set1_ps(w.code_offset);
    if (w.zeros) {
      uint8_t zt[8] = {};
      std::memcpy(zt, w.zeros + so + g * R, size_t(Rh));
      zc = _mm256_add_ps(zc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt)))));
    }
    __m256 cg = _mm256_mul_ps(s8, zc);
    if (w.mins) cg = _mm256_sub_ps(cg, _mm256_maskload_ps(w.mins + so + g * R, lm));
    corr = _mm256_fmadd_ps(cg, _mm256_set1_ps(xsum[g]), corr);
  }
  alignas(32) float lanes[32], cr[8];
  for (int q = 0; q < 4; ++q) _mm256_store_ps(lanes + 8 * q, tot[q]);
  _mm256_store_ps(cr, corr);
  for (int64_t r = 0; r < Rh; ++r) {
    const float* l = lanes + 4 * r;  // quarter r / 2, lanes 4 (r % 2) ..: 8 (r / 2) + 4 (r % 2) = 4 r
    y[8 * h + r] = (l[0] + l[1]) + (l[2] + l[3]) - cr[r];
  }
}
#endif

// v, which the compiler must materialise: keeps a * b + c from being contracted into one FMA where
// the result must be float32(float32(a * b) + c) bit for bit (int4_min, as GGUF readers compute it).
inline VecF opaque(VecF v) {
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  __asm__("" : "+x"(v.v));
#else
  __asm__("" : "+m"(v));
#endif
  return v;
}

// Several tokens: y[t * ldy + n] += partial dot over chunks [c0, c1) for rows [n0, n1) x NT tokens
// (x zero-padded to NT rows). Each chunk is unpacked and scaled once (w = T[q] * s + (m - z * s)) and
// reused by all NT tokens, and FR rows share each x load.
template <int BITS, bool NF4, int NT, int R>
void gemm_rows(const QuantView& w, const Table& tab, const float* x, int64_t ldx, int64_t c0, int64_t c1, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
  const int cpg = w.group_size / 32;
  alignas(64) uint8_t tmp[R][32];
  for (int64_t n = n0; n + R <= n1; n += R) {
    VecF acc[R][NT];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) acc[r][t] = VecF::zero();
    VecF vs[R], vb[R];
    int64_t gcur = -1;
    for (int64_t ci = c0; ci < c1; ++ci) {
      if (ci / cpg != gcur) {
        gcur = ci / cpg;
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const float sc = w.scale(n + r, gcur);
          vs[r] = VecF::set1(sc), vb[r] = VecF::set1(w.min(n + r, gcur) - sc * w.zero(n + r, gcur));
        }
      }
      VecF wv[R][CV];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        decode<BITS, NF4>(chunk_codes<BITS>(w, n + r, ci, tmp[r]), tab, wv[r]);
        #pragma GCC unroll 16
        for (int i = 0; i < CV; ++i) wv[r][i] = VecF::fma(wv[r][i], vs[r], vb[r]);
      }
      const float* xc = x + ci * 32;
      #pragma GCC unroll 16
      for (int i = 0; i < CV; ++i)
        #pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) {
          const VecF xv = VecF::load(xc + t * ldx + i * VL);
          #pragma GCC unroll 16
          for (int r = 0; r < R; ++r) acc[r][t] = VecF::fma(wv[r][i], xv, acc[r][t]);
        }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) y[t * ldy + n + r] += acc[r][t].reduce_add();
  }
}

template <int BITS, bool NF4, int NT>
void gemm_block(const QuantView& w, const Table& tab, const float* x, int64_t ldx, int64_t c0, int64_t c1,
                int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t whole = n0 + (n1 - n0) / FR * FR;
  gemm_rows<BITS, NF4, NT, FR>(w, tab, x, ldx, c0, c1, n0, whole, y, ldy);
  if (whole < n1) gemm_rows<BITS, NF4, NT, 1>(w, tab, x, ldx, c0, c1, whole, n1, y, ldy);
}

// Writes out[t][n0:n1] = y[0:n1-n0] (+ bias) in the output dtype.
void store_rows(const QGemmProblem& p, const float* bias, int64_t t, int64_t n0, int64_t n1, const float* y) {
  float v[ROWS];
  for (int64_t n = n0; n < n1; ++n) v[n - n0] = y[n - n0] + (bias ? bias[n] : 0.0f);
  char* dst = static_cast<char*>(p.out) + (t * p.out_row + n0) * dtype_size(p.dtype);
  store_floats(v, p.dtype, n1 - n0, dst);
}

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// Activations quantized to int8 for the integer-dot paths, in natural order (the row-interleaved
// weights take 4 consecutive x bytes per 32-bit lane). One scale per token and block of `part`
// weights (max|x| of the block / 127): the block is the weights' group, so the float multiply each
// group already has absorbs it (s[n][g] * dx[t][g]); a per-channel int8 matrix uses blocks of
// kInt8XBlock. One scale per token instead let a few large activations (the outlier channels of
// LLM hidden states) coarsen every other x of the token: SmolLM2-135M, 512-token prompt on this
// path, top-1 agreement with the exact logits 88.7% (mean KL 4.5e-2) against 95.3% (3.7e-3) per
// group (bench/qgemm_quality.py).
struct Int8X {
  std::vector<int8_t> q;     // per token, K bytes
  std::vector<int32_t> sum;  // per token and part: the sum of its int8 values (zero-point / min terms)
  std::vector<float> scale;  // per token and part: dx, x ~= dx * q
  std::vector<int32_t> off;  // per token and part: -offset * sum, the symmetric code offset's term (or empty)
  int64_t K = 0, parts = 0, part = 0;
  bool nonfinite = false;    // x holds NaN or +-inf: int8 codes cannot carry it (the caller runs exact)
  const int8_t* row(int64_t t) const { return q.data() + t * K; }
  const int32_t* sums(int64_t t) const { return sum.data() + t * parts; }
  const float* scales(int64_t t) const { return scale.data() + t * parts; }
  const int32_t* offs(int64_t t) const { return off.data() + t * parts; }
};

// part: the weights of one x scale and one int32 sum (a multiple of 32 dividing K, or K's last part
// shorter); offset: the code offset whose term -offset * sum the kernels start their int32 sums with.
Int8X prepare_int8_x(const float* x, int64_t ldx, int64_t T, int64_t K, int64_t part, int32_t offset = 0) {
  Int8X r;
  r.K = K, r.part = part, r.parts = (K + part - 1) / part;
  r.q.resize(size_t(T * K));
  r.sum.assign(size_t(T * r.parts), 0);
  r.scale.assign(size_t(T * r.parts), 1.0f);
  // Vectorised per 32-weight chunk; round to nearest even (as lrint). Sums of integers: exact.
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    int8_t* xa = r.q.data() + t * K;
    int32_t* xs = r.sum.data() + t * r.parts;
    float* sc = r.scale.data() + t * r.parts;
    // Non-finite x first: NaN / inf would round to INT_MIN and overflow the int32 code sums.
    VecF vbad = VecF::zero();
    for (int64_t k = 0; k < K; k += VL) vbad = vbad + VecF::load(xt + k) * VecF::zero();  // inf * 0 = NaN
    float lanes[VL];
    vbad.store(lanes);
    for (int i = 0; i < VL; ++i) r.nonfinite |= lanes[i] != lanes[i];
    if (r.nonfinite) return r;
    for (int64_t pi = 0; pi < r.parts; ++pi) {
      const int64_t k0 = pi * part, k1 = std::min(K, k0 + part);
      VecF vmax = VecF::zero();
      for (int64_t k = k0; k < k1; k += VL) {
        const VecF v = VecF::load(xt + k);
        vmax = VecF::max(vmax, VecF::max(v, VecF::zero() - v));
      }
      const float amax = vmax.reduce_max();
      const float dx = amax > 0.0f ? amax / 127.0f : 1.0f;
      sc[pi] = dx;
      const VecF vinv = VecF::set1(1.0f / dx);
      int32_t s = 0;
      for (int64_t c = k0 / 32; c < k1 / 32; ++c) {
#if defined(MK_ISA_AVX512)
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xt + c * 32), vinv.v));
        const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xt + c * 32 + 16), vinv.v));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xa + c * 32), _mm512_cvtsepi32_epi8(a));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xa + c * 32 + 16), _mm512_cvtsepi32_epi8(b));
        s += _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
#else
        int32_t qi[32];
        for (int i = 0; i < CV; ++i)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(qi + i * VL),
                              _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xt + c * 32 + i * VL), vinv.v)));
        for (int j = 0; j < 32; ++j) xa[c * 32 + j] = int8_t(qi[j]), s += qi[j];
#endif
      }
      xs[pi] = s;
    }
  }
  if (offset) {
    r.off.resize(r.sum.size());
    for (size_t i = 0; i < r.sum.size(); ++i) r.off[i] = -offset * r.sum[i];
  }
  return r;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Software prefetch of the codes this far ahead of the loads (every line of the stream): with one
// core streaming the weights, the hardware prefetcher alone left it at 15-20 GB/s, this at 25-30 GB/s
// (11008 x 4096 int4, 1 token, 1 thread; 0, 2, 4, 6 and 8 KiB tried, the machine loaded).
constexpr int64_t kPrefetch = 6144;

// x block of a per-channel int8 matrix (one x scale, one int32 sum per lane, one float multiply-add
// per token and block): 256 weights. On SmolLM2-135M's layer inputs the product's relative error is
// 1.6e-2 with 256, 1.3e-2 with 128, 2.4e-2 with one scale per token (bench/qgemm_quality.py
// --blocks); 128 made 8-token calls 7-10% slower than per-token scales (bench/qgemm_alternate.py --ab,
// L3-resident 4096 x 1024 and 1024 x 4096), 256 about half that. Its int32 sums cannot overflow:
// 256 * 255 * 127 < 2^31.
constexpr int64_t kInt8XBlock = 256;

// nf4 on the integer path: each level L as the int8 round(127 L) (the 1/127 goes on with the token's
// x scale). The levels move by at most 0.0037 (of the group scale): quant.h documents the bound.
struct Nf4Int8 {
  int8_t v[16];
  Nf4Int8() {
    for (int i = 0; i < 16; ++i) v[i] = int8_t(std::lrint(127.0f * nf4_codebook()[i]));
  }
};
inline const Nf4Int8& nf4_int8() {
  static const Nf4Int8 t;
  return t;
}
#endif

#if defined(MK_ISA_AVX512)
constexpr int kInt8xTokens = 8;  // tokens per pass (accumulators in zmm)

// Integer-dot kernels on the row-interleaved layout (quant.h): a 64-byte load holds 4 code bytes of
// each of 16 rows; vpdpbusd against the 4 x bytes broadcast to every lane leaves row r's partial
// sum in lane r, so a row block's 16 outputs build up in one register per token with no shuffle.
// Per part (group) p: y_r += s[r][p] * (dot_r - z[r][p] * xsum_p) (+ m[r][p] * xsum_p for int4_min),
// z being the zero point (plus 8 for int4_sym); s[r][p] times the token's x scale of block p.
// FMT: 0 int4 (zero points), 1 int4_sym, 2 int4_min, 3 int8, 8 nf4 (the levels as int8 + 128 through
// a vpshufb lookup, Nf4Int8; 4-7, int3 / int2: ilv_low_block_vnni).
template <int FMT, int NT>
__attribute__((target("avx512vnni"))) void ilv_block_vnni(const QuantView& w, const Int8X& xq, int64_t t0,
                                                            int64_t n0, float* y, int64_t ldy) {
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0), K = w.cols;
  constexpr bool I8 = FMT == 3, NF = FMT == 8;
  constexpr int CB = I8 ? 32 : 16;  // bytes per chunk and row
  constexpr int NA = NT == 1 ? 2 : 1;  // independent accumulator chains per token
  const bool pc = I8 && G == 1;  // per-channel int8: one scale per row, applied once at the end
  const __mmask16 rm = R == 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  const __mmask64 bm = R == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * R)) - 1;
  const uint8_t* blk = w.codes + n0 * w.row_bytes;
  const float* sb = w.scales + n0 * G;
  const uint8_t* zb = w.zeros ? w.zeros + n0 * G : nullptr;
  const float* mb = w.mins ? w.mins + n0 * G : nullptr;
  const __m512i m4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  // nf4: level + 128 (unsigned) of each code, in every 128-bit lane for vpshufb
  const __m512i lut = _mm512_xor_si512(
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nf4_int8().v))), flip);
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  __m512 accf[NT];
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps();
  const int64_t P = xq.part, parts = xq.parts;
  for (int64_t pi = 0; pi < parts; ++pi) {
    const int64_t c0 = pi * P / 32, c1 = std::min(K, (pi + 1) * P) / 32, g = pi * P / w.group_size;
    __m512i acc[NA][NT], acch[NA][NT];
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      #pragma GCC unroll 2
      for (int a = 0; a < NA; ++a) acc[a][t] = acch[a][t] = _mm512_setzero_si512();
    // the code offset of the symmetric forms (int4_sym: 8, int8 and nf4 through vpdpbusd: 128)
    // times the part's x sum starts the first chain
    constexpr int OFF = FMT == 1 ? 8 : (FMT == 3 || NF) ? 128 : 0;
    if constexpr (OFF != 0) {
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[0][t] = _mm512_set1_epi32(xq.offs(t0 + t)[pi]);  // a broadcast load
    }
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* p = blk + c * R * CB;
      for (int64_t j = 0; j < R * CB; j += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + j + kPrefetch, _MM_HINT_T0);
      #pragma GCC unroll 8
      for (int j = 0; j < CB / 4; ++j) {
        const __m512i v = R == 16 ? _mm512_loadu_si512(p + j * 64) : _mm512_maskz_loadu_epi8(bm, p + j * R * 4);
        constexpr int A = 0;
        const int a = NA == 1 ? A : (j & 1);
        if constexpr (I8) {
          const __m512i wu = _mm512_xor_si512(v, flip);  // w + 128, unsigned; the 128 * xsum comes off below
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t)
            acc[a][t] = _mm512_dpbusd_epi32(acc[a][t], wu, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j)));
        } else if constexpr (NF) {
          const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m4));
          const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            acc[a][t] = _mm512_dpbusd_epi32(acc[a][t], lo, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j)));
            acch[a][t] = _mm512_dpbusd_epi32(acch[a][t], hi, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 16 + 4 * j)));
          }
        } else {
          // low nibbles: weights 4j.. of the chunk; v & 0xf0 is 16 x the high nibbles (weights 16 + 4j..),
          // summed apart and divided by 16 (exactly) per part: one op fewer per load than shift + mask
          const __m512i lo = _mm512_and_si512(v, m4), hi16 = _mm512_andnot_si512(m4, v);
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            acc[a][t] = _mm512_dpbusd_epi32(acc[a][t], lo, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j)));
            acch[a][t] = _mm512_dpbusd_epi32(acch[a][t], hi16, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 16 + 4 * j)));
          }
        }
      }
    }
    const __m512 sv = _mm512_maskz_loadu_ps(rm, sb + g * R);
    __m512 zf = _mm512_setzero_ps(), mv = _mm512_setzero_ps();
    if constexpr (FMT == 0) zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(rm, zb + g * R)));
    if constexpr (FMT == 2) mv = _mm512_maskz_loadu_ps(rm, mb + g * R);
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      __m512i a = acc[0][t];
      if constexpr (NF) a = _mm512_add_epi32(a, acch[0][t]);
      else if constexpr (!I8) a = _mm512_add_epi32(a, _mm512_srai_epi32(acch[0][t], 4));
      if constexpr (NA == 2) {
        a = _mm512_add_epi32(a, acc[1][t]);
        if constexpr (NF) a = _mm512_add_epi32(a, acch[1][t]);
        else if constexpr (!I8) a = _mm512_add_epi32(a, _mm512_srai_epi32(acch[1][t], 4));
      }
      const int32_t xs = xq.sums(t0 + t)[pi];
      __m512 af = _mm512_cvtepi32_ps(a);
      if constexpr (FMT == 0) af = _mm512_fnmadd_ps(zf, _mm512_set1_ps(float(xs)), af);
      const float dx = xq.scales(t0 + t)[pi];  // the block's x scale joins the group scale
      if (pc) accf[t] = _mm512_fmadd_ps(_mm512_set1_ps(dx), af, accf[t]);  // per-channel int8: s at the end
      else accf[t] = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_set1_ps(dx)), af, accf[t]);
      if constexpr (FMT == 2) accf[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(float(xs) * dx), accf[t]);
    }
  }
  const float unit = NF ? 1.0f / 127.0f : 1.0f;  // nf4: the int8 levels are 127 L
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
    _mm512_mask_storeu_ps(y + (t0 + t) * ldy + n0, rm,
                          pc ? _mm512_mul_ps(accf[t], _mm512_maskz_loadu_ps(rm, sb))
                                 : NF ? _mm512_mul_ps(accf[t], _mm512_set1_ps(unit)) : accf[t]);
}

// int3 / int3_sym / int2 / int2_sym (FMT 4 / 5 / 6 / 7) on the row-interleaved layout: a chunk of
// 16 rows is two 64-byte loads of 2-bit codes and, for int3, one of third bits; each (s, j) gives 4
// weights of every row in its lane (LowBits), then vpdpbusd against x bytes 8s + 4j .. of each token.
// Per group: y_r += s[r][g] * (dot_r - z[r][g] * xsum_g), z the zero point or 2^(b-1).
template <int FMT, int NT>
__attribute__((target("avx512vnni"))) void ilv_low_block_vnni(const QuantView& w, const Int8X& xq, int64_t t0,
                                                                int64_t n0, float* y, int64_t ldy) {
  constexpr int BITS = FMT < 6 ? 3 : 2;
  constexpr bool SYM = FMT == 5 || FMT == 7;
  constexpr int CB = BITS * 4;
  constexpr int NA = NT == 1 ? 4 : NT == 2 ? 2 : 1;  // independent accumulator chains per token
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0);
  const int cpg = w.group_size / 32;
  const __mmask16 rm = R == 16 ? __mmask16(0xffff) : __mmask16((1u << R) - 1);
  const __mmask64 bm = R == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * R)) - 1;
  const uint8_t* blk = w.codes + n0 * w.row_bytes;
  const float* sb = w.scales + n0 * G;
  const uint8_t* zb = w.zeros ? w.zeros + n0 * G : nullptr;
  const LowBits lb;
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  __m512 accf[NT];
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[NA][NT];
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      #pragma GCC unroll 4
      for (int a = 0; a < NA; ++a) acc[a][t] = _mm512_setzero_si512();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* p = blk + c * R * CB;
      for (int64_t j = 0; j < R * CB; j += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + j + kPrefetch, _MM_HINT_T0);
      __m512i v[2], hbits = _mm512_setzero_si512();
      for (int j = 0; j < 2; ++j) v[j] = R == 16 ? _mm512_loadu_si512(p + j * 64) : _mm512_maskz_loadu_epi8(bm, p + j * R * 4);
      if constexpr (BITS == 3) hbits = R == 16 ? _mm512_loadu_si512(p + 128) : _mm512_maskz_loadu_epi8(bm, p + 2 * R * 4);
      #pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m512i hb = BITS == 3 ? lb.high(hbits, s) : hbits;
        #pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          const __m512i q = lb.codes<BITS>(v, hb, s, j);
          const int a = NA == 4 ? s : NA == 2 ? j : 0;
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t)
            acc[a][t] = _mm512_dpbusd_epi32(acc[a][t], q, _mm512_set1_epi32(load_i32(xr[t] + c * 32 + 8 * s + 4 * j)));
        }
      }
    }
    const __m512 sv = _mm512_maskz_loadu_ps(rm, sb + g * R);
    __m512 zf = _mm512_setzero_ps();
    if constexpr (!SYM) zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(rm, zb + g * R)));
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      __m512i a = acc[0][t];
      #pragma GCC unroll 4
      for (int i = 1; i < NA; ++i) a = _mm512_add_epi32(a, acc[i][t]);
      const int32_t xs = xq.sums(t0 + t)[g];
      if constexpr (SYM) a = _mm512_sub_epi32(a, _mm512_set1_epi32((1 << (BITS - 1)) * xs));
      __m512 af = _mm512_cvtepi32_ps(a);
      if constexpr (!SYM) af = _mm512_fnmadd_ps(zf, _mm512_set1_ps(float(xs)), af);
      accf[t] = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_set1_ps(xq.scales(t0 + t)[g])), af, accf[t]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
    _mm512_mask_storeu_ps(y + (t0 + t) * ldy + n0, rm, accf[t]);
}

template <int FMT, int NT>
inline void ilv_block(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, float* y, int64_t ldy) {
  if constexpr (FMT >= 4 && FMT <= 7) ilv_low_block_vnni<FMT, NT>(w, xq, t0, n0, y, ldy);
  else ilv_block_vnni<FMT, NT>(w, xq, t0, n0, y, ldy);
}

bool int8_dots_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return ok;
}

#elif defined(MK_ISA_AVX2)
constexpr int kInt8xTokens = 4;  // 16 ymm registers
inline bool int8_dots_available() { return true; }

// AVX2 form of ilv_block_vnni, 8 rows (one half of a 16-row block) per register: vpmaddubsw
// (u8 x s8 -> pairs summed in s16) then vpmaddwd with ones sums 4 neighbouring bytes per 32-bit
// lane. int4: codes are unsigned nibbles (pair sums at most 2 * 15 * 127, low + high at most twice
// that: no saturation). int8: |w| against sign(w) * x (vpsignb), pair sums at most 2 * 128 * 127.
template <int FMT, int NT>
void ilv_half_avx2(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, int h, float* y, int64_t ldy) {
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0), K = w.cols;
  const int64_t Rh = std::min<int64_t>(8, R - 8 * h);
  if (Rh <= 0) return;
  constexpr bool I8 = FMT == 3, NF = FMT == 8;
  constexpr int CB = I8 ? 32 : 16;
  alignas(32) int32_t mk[8];
  for (int i = 0; i < 8; ++i) mk[i] = i < Rh ? -1 : 0;
  const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(mk));
  const uint8_t* blk = w.codes + n0 * w.row_bytes + 32 * h;
  const float* sb = w.scales + n0 * G + 8 * h;
  const uint8_t* zb = w.zeros ? w.zeros + n0 * G + 8 * h : nullptr;
  const float* mb = w.mins ? w.mins + n0 * G + 8 * h : nullptr;
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nf4_int8().v)));
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  __m256 accf[NT];
  for (int t = 0; t < NT; ++t) accf[t] = _mm256_setzero_ps();
  const int64_t P = xq.part, parts = xq.parts;
  for (int64_t pi = 0; pi < parts; ++pi) {
    const int64_t c0 = pi * P / 32, c1 = std::min(K, (pi + 1) * P) / 32, g = pi * P / w.group_size;
    __m256i acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* p = blk + c * R * CB;
      if (h == 0)
        for (int64_t j = 0; j < R * CB; j += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + j + kPrefetch, _MM_HINT_T0);
      for (int j = 0; j < CB / 4; ++j) {
        const __m256i* src = reinterpret_cast<const __m256i*>(p + j * R * 4);
        const __m256i v = Rh == 8 ? _mm256_loadu_si256(src) : _mm256_maskload_epi32(reinterpret_cast<const int*>(src), lm);
        if constexpr (I8) {
          const __m256i wa = _mm256_abs_epi8(v);
          for (int t = 0; t < NT; ++t) {
            const __m256i xb = _mm256_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j));
            const __m256i pr = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, v));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(pr, ones));
          }
        } else if constexpr (NF) {  // signed int8 levels: |L| against sign(L) * x, as int8 above
          const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m4));
          const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
          const __m256i la = _mm256_abs_epi8(lo), ha = _mm256_abs_epi8(hi);
          for (int t = 0; t < NT; ++t) {
            const __m256i pl = _mm256_maddubs_epi16(la, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j)), lo));
            const __m256i ph = _mm256_maddubs_epi16(ha, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xr[t] + c * 32 + 16 + 4 * j)), hi));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones)));
          }
        } else {
          const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          for (int t = 0; t < NT; ++t) {
            const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xr[t] + c * 32 + 4 * j)));
            const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xr[t] + c * 32 + 16 + 4 * j)));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
          }
        }
      }
    }
    const __m256 sv = _mm256_maskload_ps(sb + g * R, lm);
    __m256 zf = _mm256_setzero_ps(), mv = _mm256_setzero_ps();
    if constexpr (FMT == 0) {
      uint8_t zt[8] = {};
      std::memcpy(zt, zb + g * R, size_t(Rh));
      zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt))));
    }
    if constexpr (FMT == 2) mv = _mm256_maskload_ps(mb + g * R, lm);
    for (int t = 0; t < NT; ++t) {
      __m256i a = acc[t];
      const int32_t xs = xq.sums(t0 + t)[pi];
      if constexpr (FMT == 1) a = _mm256_sub_epi32(a, _mm256_set1_epi32(8 * xs));
      __m256 af = _mm256_cvtepi32_ps(a);
      if constexpr (FMT == 0) af = _mm256_fnmadd_ps(zf, _mm256_set1_ps(float(xs)), af);
      const float dx = xq.scales(t0 + t)[pi];  // the block's x scale joins the group scale
      accf[t] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(dx)), af, accf[t]);
      if constexpr (FMT == 2) accf[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(float(xs) * dx), accf[t]);
    }
  }
  const float unit = NF ? 1.0f / 127.0f : 1.0f;  // nf4: the int8 levels are 127 L
  for (int t = 0; t < NT; ++t)
    _mm256_maskstore_ps(y + (t0 + t) * ldy + n0 + 8 * h, lm, NF ? _mm256_mul_ps(accf[t], _mm256_set1_ps(unit)) : accf[t]);
}

// AVX2 form of ilv_low_block_vnni, 8 rows (half h of a 16-row block) per register: vpmaddubsw of
// the 2- or 3-bit codes (unsigned, LowBits) against x bytes; the 8 (s, j) pair sums of a chunk stay
// in 16 bits (at most 8 * 2 * 7 * 127 < 2^15), then one vpmaddwd per chunk and token.
template <int FMT, int NT>
void ilv_low_half_avx2(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, int h, float* y, int64_t ldy) {
  constexpr int BITS = FMT < 6 ? 3 : 2;
  constexpr bool SYM = FMT == 5 || FMT == 7;
  constexpr int CB = BITS * 4;
  const int64_t G = w.groups, R = std::min<int64_t>(16, w.rows - n0);
  const int64_t Rh = std::min<int64_t>(8, R - 8 * h);
  if (Rh <= 0) return;
  const int cpg = w.group_size / 32;
  alignas(32) int32_t mk[8];
  for (int i = 0; i < 8; ++i) mk[i] = i < Rh ? -1 : 0;
  const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(mk));
  const uint8_t* blk = w.codes + n0 * w.row_bytes + 32 * h;
  const float* sb = w.scales + n0 * G + 8 * h;
  const uint8_t* zb = w.zeros ? w.zeros + n0 * G + 8 * h : nullptr;
  const __m256i ones = _mm256_set1_epi16(1);
  const LowBits lb;
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  __m256 accf[NT];
  for (int t = 0; t < NT; ++t) accf[t] = _mm256_setzero_ps();
  auto load = [&](const uint8_t* src) {
    return Rh == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                   : _mm256_maskload_epi32(reinterpret_cast<const int*>(src), lm);
  };
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* p = blk + c * R * CB;
      if (h == 0)
        for (int64_t j = 0; j < R * CB; j += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + j + kPrefetch, _MM_HINT_T0);
      const __m256i v[2] = {load(p), load(p + R * 4)};
      __m256i hbits = _mm256_setzero_si256();
      if constexpr (BITS == 3) hbits = load(p + 2 * R * 4);
      __m256i s16[NT];
      for (int t = 0; t < NT; ++t) s16[t] = _mm256_setzero_si256();
      for (int s = 0; s < 4; ++s) {
        const __m256i hb = BITS == 3 ? lb.high(hbits, s) : hbits;
        for (int j = 0; j < 2; ++j) {
          const __m256i q = lb.codes<BITS>(v, hb, s, j);
          for (int t = 0; t < NT; ++t)
            s16[t] = _mm256_add_epi16(
                s16[t], _mm256_maddubs_epi16(q, _mm256_set1_epi32(load_i32(xr[t] + c * 32 + 8 * s + 4 * j))));
        }
      }
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], ones));
    }
    const __m256 sv = _mm256_maskload_ps(sb + g * R, lm);
    __m256 zf = _mm256_setzero_ps();
    if constexpr (!SYM) {
      uint8_t zt[8] = {};
      std::memcpy(zt, zb + g * R, size_t(Rh));
      zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt))));
    }
    for (int t = 0; t < NT; ++t) {
      __m256i a = acc[t];
      const int32_t xs = xq.sums(t0 + t)[g];
      if constexpr (SYM) a = _mm256_sub_epi32(a, _mm256_set1_epi32((1 << (BITS - 1)) * xs));
      __m256 af = _mm256_cvtepi32_ps(a);
      if constexpr (!SYM) af = _mm256_fnmadd_ps(zf, _mm256_set1_ps(float(xs)), af);
      accf[t] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(xq.scales(t0 + t)[g])), af, accf[t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    _mm256_maskstore_ps(y + (t0 + t) * ldy + n0 + 8 * h, lm, accf[t]);
}

template <int FMT, int NT>
inline void ilv_block(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, float* y, int64_t ldy) {
  if constexpr (FMT >= 4 && FMT <= 7) {
    ilv_low_half_avx2<FMT, NT>(w, xq, t0, n0, 0, y, ldy);
    ilv_low_half_avx2<FMT, NT>(w, xq, t0, n0, 1, y, ldy);
  } else {
    ilv_half_avx2<FMT, NT>(w, xq, t0, n0, 0, y, ldy);
    ilv_half_avx2<FMT, NT>(w, xq, t0, n0, 1, y, ldy);
  }
}
#endif

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// One pass of the integer-dot kernel instantiated for nt tokens (1 .. kInt8xTokens).
template <int FMT, int NT = kInt8xTokens>
void int8x_pass(int64_t nt, const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, float* y, int64_t ldy) {
  if (nt == NT) ilv_block<FMT, NT>(w, xq, t0, n0, y, ldy);
  else if constexpr (NT > 1) int8x_pass<FMT, NT - 1>(nt, w, xq, t0, n0, y, ldy);
}

// The integer-dot path (up to kInt8xMaxTokens tokens), on the row-interleaved layout only: x
// quantized once per token, blocks of 16 rows split over the threads, every loaded weight used by
// kInt8xTokens tokens. Up to 64 tokens (each pass re-reads a row block's codes, which stay in
// cache). Longer inputs take the bf16 / fp32 prefill (qgemm_prefill.cpp): this path was 1.6-2.5x
// faster there (32-128 tokens), but int8 x costs accuracy that prefill exposes (SmolLM2-135M,
// 512-token prompt: top-1 agreement with exact 95.3% with per-group x scales, 88.7% with one
// per token, against bf16's 99.2%; bench/qgemm_quality.py).
constexpr int64_t kInt8xMaxTokens = 64;
// Returns false, computing nothing, when x holds NaN or inf: the exact path then propagates them.
template <int FMT>
bool qgemm_int8x(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, T = p.tokens;
  const int64_t part = FMT == 3 ? std::min<int64_t>(w.group_size, kInt8XBlock) : w.group_size;
  // the symmetric code offsets the VNNI kernel starts its sums with (ilv_block_vnni)
#if defined(MK_ISA_AVX512)
  constexpr int32_t offset = FMT == 1 ? 8 : (FMT == 3 || FMT == 8) ? 128 : 0;
#else
  constexpr int32_t offset = 0;  // the AVX2 kernels apply theirs themselves
#endif
  const Int8X xq = prepare_int8_x(x, ldx, T, w.cols, part, offset);
  if (xq.nonfinite) return false;
  const int64_t blocks = (N + kInterleaveRows - 1) / kInterleaveRows;
  const int threads = threads_for(w, T);
  // The output goes straight to `out` when it is fp32 with no bias; else through a buffer.
  const bool direct = p.dtype == DType::Float32 && bias == nullptr;
  std::vector<float> ybuf(direct ? 0 : static_cast<size_t>(T * N));
  float* y = direct ? static_cast<float*>(p.out) : ybuf.data();
  const int64_t ldy = direct ? p.out_row : N;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 2) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * kInterleaveRows, n1 = std::min(N, n0 + kInterleaveRows);
    for (int64_t t0 = 0; t0 < T; t0 += kInt8xTokens)
      int8x_pass<FMT>(std::min<int64_t>(kInt8xTokens, T - t0), w, xq, t0, n0, y, ldy);
    if (!direct)
      for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y + t * N + n0);
  }
  return true;
}
#endif

template <int BITS, bool NF4>
void qgemm_impl(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const Table tab(nf4_codebook());
  const int64_t N = w.rows, K = w.cols, G = w.groups, T = p.tokens;
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  const int64_t int8_max = int8_max_tokens_override() ? int8_max_tokens_override() : kInt8xMaxTokens;
  if (p.int8_activations && T <= int8_max && int8_dots_available()) {
    if (w.ilv) {  // the integer kernels read the row-interleaved layout only
      if constexpr (BITS == 8) { if (qgemm_int8x<3>(p, x, ldx, bias)) return; }
      if constexpr (BITS == 4 && !NF4) {
        const int fmt = w.format == QuantFormat::Int4 ? 0 : w.format == QuantFormat::Int4Sym ? 1 : 2;
        if (fmt == 0 ? qgemm_int8x<0>(p, x, ldx, bias)
                     : fmt == 1 ? qgemm_int8x<1>(p, x, ldx, bias) : qgemm_int8x<2>(p, x, ldx, bias))
          return;
      }
      if constexpr (BITS == 4 && NF4) { if (qgemm_int8x<8>(p, x, ldx, bias)) return; }
      if constexpr (BITS == 3 || BITS == 2) {  // FMT 4 / 5 (int3, int3_sym), 6 / 7 (int2, int2_sym)
        constexpr int F = BITS == 3 ? 4 : 6;
        const bool sym = w.format == QuantFormat::Int3Sym || w.format == QuantFormat::Int2Sym;
        if (sym ? qgemm_int8x<F + 1>(p, x, ldx, bias) : qgemm_int8x<F>(p, x, ldx, bias)) return;
      }
    }
  }
#endif
  // AVX-512, row-interleaved layout: the exact lanes-per-row kernel (gemv_block_ilv) also serves 4 to
  // 11 tokens (the fp32 prefill kernel takes over from 12), in passes of 4 over each 16-row block
  // (its codes stay in L2): per 64-byte load, 4 weights of 16 rows widen once for 4 tokens, where
  // the multi-token path below gathers each row's chunk first (1.2-1.5x slower there).
#if defined(MK_ISA_AVX512)
  const bool ilv_multi = w.ilv && T <= 11;
#else
  const bool ilv_multi = false;
#endif
  if (T <= 3 || ilv_multi) {
    // Per-group sums of x for the zero-point term.
    std::vector<float> xsum(static_cast<size_t>(T * G));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int k = 0; k < w.group_size; ++k) s += x[t * ldx + g * w.group_size + k];
        xsum[t * G + g] = s;
      }
    std::vector<float> y(static_cast<size_t>(T * N));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * ROWS, n1 = std::min(N, n0 + ROWS);
#if defined(MK_ISA_AVX512)
      {
        if (w.ilv) {  // the row-interleaved layout, read natively
          for (int64_t t0 = 0; t0 < T;) {
            const int64_t nt = T - t0 >= 4 && T > 3 ? 4 : T - t0 >= 2 ? 2 : 1;
            const float* xt = x + t0 * ldx;
            const float* st = xsum.data() + t0 * G;
            if (nt == 4) gemv_block_ilv<BITS, 4, NF4>(w, xt, ldx, st, n0, y.data() + t0 * N, N);
            else if (nt == 2) gemv_block_ilv<BITS, 2, NF4>(w, xt, ldx, st, n0, y.data() + t0 * N, N);
            else gemv_block_ilv<BITS, 1, NF4>(w, xt, ldx, st, n0, y.data() + t0 * N, N);
            t0 += nt;
          }
          for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
          continue;
        }
      }
#elif defined(MK_ISA_AVX2)
      {
        if (w.ilv) {  // the row-interleaved layout, read natively, one token and 8 rows at a time
          for (int64_t t = 0; t < T; ++t) {
            for (int h = 0; h < 2; ++h)
              gemv_half_ilv<BITS, NF4>(w, x + t * ldx, xsum.data() + t * G, n0, h, y.data() + t * N + n0);
            store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
          }
          continue;
        }
      }
#endif
      if (T == 1) gemv_rows<BITS, NF4, 1>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      else if (T == 2) gemv_rows<BITS, NF4, 2>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      else gemv_rows<BITS, NF4, 3>(w, tab, x, ldx, xsum.data(), n0, n1, y.data(), N);
      for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
    }
    return;
  }

  // Tokens in blocks of NT (4 when T <= 4, else 8), the last block zero-padded. K is walked in
  // slices of KS chunks so that the x slice of a token block (NT * KS * 128 bytes) stays in L1
  // while the 16 rows of a task stream through it.
  const int nt = T <= 4 ? 4 : 8;
  const int64_t KS = nt == 4 ? 32 : 16;
  const int64_t tp = (T + nt - 1) / nt * nt, nchunks = K / 32;
  std::vector<float> xp(static_cast<size_t>(tp * K), 0.0f);
  for (int64_t t = 0; t < T; ++t) std::memcpy(xp.data() + t * K, x + t * ldx, size_t(K) * 4);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> y(static_cast<size_t>(nt * ROWS));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * ROWS, n1 = std::min(N, n0 + ROWS);
      for (int64_t t0 = 0; t0 < T; t0 += nt) {
        std::fill(y.begin(), y.end(), 0.0f);
        float* yb = y.data() - n0;  // gemm_rows indexes rows by n
        const float* xt = xp.data() + t0 * K;
        for (int64_t c0 = 0; c0 < nchunks; c0 += KS) {
          const int64_t c1 = std::min(nchunks, c0 + KS);
          if (nt == 4) gemm_block<BITS, NF4, 4>(w, tab, xt, K, c0, c1, n0, n1, yb, ROWS);
          else gemm_block<BITS, NF4, 8>(w, tab, xt, K, c0, c1, n0, n1, yb, ROWS);
        }
        for (int64_t t = t0; t < std::min(T, t0 + nt); ++t)
          store_rows(p, bias, t, n0, n1, y.data() + (t - t0) * ROWS);
      }
    }
  }
}

#if defined(MK_ISA_AVX512)
// Chunk c of a whole 16-row block of the CPU row-interleaved layout, put back into rows in registers:
// out[q][k], 128-bit lane L = bytes 16q .. 16q + 15 of the chunk's codes of row 4L + k (the layout
// stores 4-byte piece j of row r at byte j * 64 + r * 4; a 4 x 16 transpose of 4-byte pieces).
template <int BITS>
inline void block_chunk_rows(const uint8_t* blk, int64_t c, __m512i out[BITS / 4][4]) {
  constexpr int CB = BITS * 4;
  const uint8_t* p = blk + c * 16 * CB;
  for (int q = 0; q < BITS / 4; ++q) {
    const __m512i v0 = _mm512_loadu_si512(p + (4 * q + 0) * 64), v1 = _mm512_loadu_si512(p + (4 * q + 1) * 64);
    const __m512i v2 = _mm512_loadu_si512(p + (4 * q + 2) * 64), v3 = _mm512_loadu_si512(p + (4 * q + 3) * 64);
    const __m512i a = _mm512_unpacklo_epi32(v0, v1), b = _mm512_unpackhi_epi32(v0, v1);
    const __m512i cc = _mm512_unpacklo_epi32(v2, v3), d = _mm512_unpackhi_epi32(v2, v3);
    out[q][0] = _mm512_unpacklo_epi64(a, cc), out[q][1] = _mm512_unpackhi_epi64(a, cc);
    out[q][2] = _mm512_unpacklo_epi64(b, d), out[q][3] = _mm512_unpackhi_epi64(b, d);
  }
}

// The 16 rows' 16-byte pieces of one transposed column t (block_chunk_rows): rows[r] for r < 16.
inline void block_rows16(const __m512i t[4], __m128i rows[16]) {
  for (int k = 0; k < 4; ++k) {
    rows[k] = _mm512_extracti32x4_epi32(t[k], 0), rows[4 + k] = _mm512_extracti32x4_epi32(t[k], 1);
    rows[8 + k] = _mm512_extracti32x4_epi32(t[k], 2), rows[12 + k] = _mm512_extracti32x4_epi32(t[k], 3);
  }
}

#endif

// One row n into drow[k - k0] (either layout; a row of an interleaved block is gathered chunk by chunk).
template <int BITS, bool NF4>
void dequant_row_range(const QuantView& w, const Table& tab, int64_t n, int64_t k0, int64_t k1, float* drow) {
  const int64_t gs = w.group_size;
  constexpr int CB = BITS * 4;
  alignas(64) uint8_t tmp[32];
  const uint8_t* row = w.codes + n * w.row_bytes;
  drow -= k0;
  // The caller walks K in slices, each for a block of rows: too many streams for the hardware
  // prefetcher, so fetch the codes of this row's next slice (same length) now (documented layout;
  // the interleaved one streams blocks of 16 rows, which the hardware prefetcher follows).
  if (!w.ilv)
    for (int64_t b = k1 / 32 * CB; b < std::min(w.row_bytes, (2 * k1 - k0) / 32 * CB); b += 64)
      __builtin_prefetch(row + b, 0, 2);  // to L2: a burst of these must not stall on L1 misses
  if (k1 / gs < w.groups) {  // and its scales, zeros and mins
    const int64_t j = w.sidx(n, k1 / gs);
    if (w.scales) __builtin_prefetch(w.scales + j);
    if (w.zeros) __builtin_prefetch(w.zeros + j);
    if (w.mins) __builtin_prefetch(w.mins + j);
  }
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {  // groups meeting [k0, k1), whole chunks of each
    const VecF vs = VecF::set1(w.scale(n, g)), vz = VecF::set1(w.zero(n, g)), vm = VecF::set1(w.min(n, g));
    const int64_t c1 = std::min(k1, (g + 1) * gs) / 32;
#if defined(MK_ISA_AVX512)
    if constexpr (BITS == 4) {
      // The group's 16 possible weights, computed as below (so the same floats), then one
      // permute per 16 weights: vpermps reads only the low 4 bits of each index, so the byte
      // zero-extended to 32 bits indexes with its low nibble and, shifted by 4, with its high one.
      const VecF lv{NF4 ? tab.t : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)};
      const __m512 t16 = w.mins ? (opaque(lv * vs) + vm).v : ((lv - vz) * vs).v;
      for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk_codes<BITS>(w, n, c, tmp))));
        _mm512_storeu_ps(drow + c * 32, _mm512_permutexvar_ps(b, t16));
        _mm512_storeu_ps(drow + c * 32 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t16));
      }
      continue;
    }
#endif
    for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
      VecF wv[CV];
      decode<BITS, NF4>(chunk_codes<BITS>(w, n, c, tmp), tab, wv);
      float* d = drow + c * 32;
      if (w.mins) {
        #pragma GCC unroll 16
        for (int i = 0; i < CV; ++i) (opaque(wv[i] * vs) + vm).store(d + i * VL);
      } else {
        #pragma GCC unroll 16
        for (int i = 0; i < CV; ++i) ((wv[i] - vz) * vs).store(d + i * VL);
      }
    }
  }
}

#if defined(MK_ISA_AVX512)
// A whole 16-row block [nb, nb + 16) of the interleaved layout (4- and 8-bit codes): each chunk's
// codes transposed in registers and expanded straight into the rows of dst, the values
// dequant_row_range gives (the same float operations).
template <int BITS, bool NF4>
void dequant_block_range(const QuantView& w, const Table& tab, int64_t nb, int64_t k0, int64_t k1, float* dst,
                         int64_t ld) {
  constexpr int CB = BITS * 4;
  const uint8_t* blk = w.codes + nb * w.row_bytes;
  const int64_t nch = (k1 - k0) / 32, c0 = k0 / 32, gs = w.group_size;
  for (int64_t b = (c0 + nch) * 16 * CB; b < std::min(16 * w.row_bytes, (c0 + 2 * nch) * 16 * CB); b += 64)
    __builtin_prefetch(blk + b, 0, 2);  // this block's next slice, one contiguous run, into L2
  const VecF lv{NF4 ? tab.t : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)};
  __m512 t16[16];  // per row: the group's 16 possible weights (4-bit) or {scale, zero} (int8)
  VecF vz[16];
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {
    const int64_t j0 = nb * w.groups + g * 16;  // a whole block keeps row r's (scale, zero, min) at j0 + r
    for (int r = 0; r < 16; ++r) {
      const VecF vs = VecF::set1(w.scale_at(j0 + r));
      vz[r] = VecF::set1(w.zero_at(j0 + r));
      t16[r] = BITS == 8 ? vs.v : w.mins ? (opaque(lv * vs) + VecF::set1(w.min_at(j0 + r))).v : ((lv - vz[r]) * vs).v;
    }
    const int64_t c1 = std::min(k1, (g + 1) * gs) / 32;
    for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
      __m512i t[BITS / 4][4];
      block_chunk_rows<BITS>(blk, c, t);
      float* d = dst - k0 + c * 32;  // + r * ld: row nb + r
      __m128i lo[16];
      block_rows16(t[0], lo);
      if constexpr (BITS == 4) {
        for (int r = 0; r < 16; ++r) {
          const __m512i b = _mm512_cvtepu8_epi32(lo[r]);
          _mm512_storeu_ps(d + r * ld, _mm512_permutexvar_ps(b, t16[r]));
          _mm512_storeu_ps(d + r * ld + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t16[r]));
        }
      } else {
        __m128i hi[16];
        block_rows16(t[1], hi);
        for (int r = 0; r < 16; ++r) {
          const VecF vs{t16[r]};
          ((VecF{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo[r]))} - vz[r]) * vs).store(d + r * ld);
          ((VecF{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi[r]))} - vz[r]) * vs).store(d + r * ld + 16);
        }
      }
    }
  }
}
#endif

// Rows [n0, n1), weights [k0, k1) (whole chunks) dequantized to fp32, the values dequantize() gives:
// dst[(n - n0) * ld + k - k0]. dequantize() runs it row by row; the prefill GEMM reads weights only through it.
template <int BITS, bool NF4>
void dequant_rows_range(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst, int64_t ld) {
  const Table tab(nf4_codebook());
  for (int64_t n = n0; n < n1;) {
#if defined(MK_ISA_AVX512)
    if constexpr (BITS == 4 || BITS == 8) {
      if (w.ilv == 16 && n % 16 == 0 && n + 16 <= std::min(n1, w.rows)) {  // a whole interleaved block
        dequant_block_range<BITS, NF4>(w, tab, n, k0, k1, dst + (n - n0) * ld, ld);
        n += 16;
        continue;
      }
    }
#endif
    dequant_row_range<BITS, NF4>(w, tab, n, k0, k1, dst + (n - n0) * ld);
    ++n;
  }
}


template <int BITS, bool NF4>
void dequantize_impl(const DequantProblem& p) {
  const int64_t K = p.w.cols;
  char* out = static_cast<char*>(p.out);
  const int es = dtype_size(p.dtype);
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < p.w.rows; ++n) {
      dequant_rows_range<BITS, NF4>(p.w, n, n + 1, 0, K, row.data(), K);
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
  const Fp32Operands ops(p);  // x as fp32 rows (a copy only when it is not fp32 already), bias as fp32
  const float *x = ops.x, *bias = ops.bias;
  const int64_t ldx = ops.ldx;
  if (qgemm_prefill(p, x, ldx, bias)) return;  // many tokens: dequantize-once GEMM (qgemm_prefill.cpp)
  MK_BY_FORMAT(p.w.format, qgemm_impl, p, x, ldx, bias)
}

void dequantize(const DequantProblem& p) { MK_BY_FORMAT(p.w.format, dequantize_impl, p) }

void dequantize_rows(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst, int64_t ld) {
  MK_BY_FORMAT(w.format, dequant_rows_range, w, n0, n1, k0, k1, dst, ld)
}

#if defined(MK_ISA_AVX512)
namespace {

// The bf16 table of the 16 possible weights of group g of row n (4-bit formats, as
// dequant_rows_range computes them, rounded nearest-even) repeated to 32 words: vpermw's word index
// holds the code in bits 0-3 (bit 4, the other nibble's low bit, picks the same entry).
// j = w.sidx(n, g).
__attribute__((target("avx512bf16"))) inline __m512i bf16_table4(const QuantView& w, __m512 levels, int64_t j) {
  const VecF lv{levels}, vs = VecF::set1(w.scale_at(j));
  const __m512 t = w.mins ? (opaque(lv * vs) + VecF::set1(w.min_at(j))).v : ((lv - VecF::set1(w.zero_at(j))) * vs).v;
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(t);
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// The 32 codes of a 4-bit chunk (16 bytes: weights 0-15 in the low nibbles, 16-31 in the high
// ones) -> 32 bf16 through the group's table.
inline __m512i expand4_bf16(__m128i codes, __m512i tab) {
  const __m256i lo = _mm256_cvtepu8_epi16(codes);
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_srli_epi16(lo, 4), 1);
  return _mm512_permutexvar_epi16(idx, tab);
}

// The 32 int8 codes of a chunk (two halves of 16) times the scale, as dequant_rows_range computes
// them, rounded to bf16.
__attribute__((target("avx512bf16"))) inline __m512i expand8_bf16(__m128i lo16, __m128i hi16, __m512 vs) {
  const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo16)), vs);
  const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi16)), vs);
  return (__m512i)_mm512_cvtne2ps_pbh(b, a);
}

// One whole 16-row block [nb, nb + 16) of the interleaved layout over weights [k0, k1): codes
// transposed in registers and expanded straight into dst's rows (no de-interleaved copy).
template <int BITS>
__attribute__((target("avx512bf16"))) void block_rows_bf16(const QuantView& w, __m512 levels, int64_t nb, int64_t k0,
                                                           int64_t k1, uint16_t* dst, int64_t ld) {
  constexpr int CB = BITS * 4;
  const uint8_t* blk = w.codes + nb * w.row_bytes;
  // The caller walks K in slices: fetch this block's next slice (one contiguous run) into L2 now.
  const int64_t nch = (k1 - k0) / 32, c0 = k0 / 32;
  for (int64_t b = (c0 + nch) * 16 * CB; b < std::min(16 * w.row_bytes, (c0 + 2 * nch) * 16 * CB); b += 64)
    __builtin_prefetch(blk + b, 0, 2);
  const int64_t gs = w.group_size;
  alignas(64) __m512i tabs[16];  // per row: the bf16 table (4-bit) or the broadcast scale (int8)
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {
    const int64_t j0 = nb * w.groups + g * 16;  // a whole block keeps row r's (scale, zero, min) at j0 + r
    for (int r = 0; r < 16; ++r)
      tabs[r] = BITS == 4 ? bf16_table4(w, levels, j0 + r) : (__m512i)_mm512_set1_ps(w.scale_at(j0 + r));
    const int64_t c1 = std::min(k1, (g + 1) * gs) / 32;
    for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
      __m512i t[BITS / 4][4];
      block_chunk_rows<BITS>(blk, c, t);
      uint16_t* d = dst - k0 + c * 32;  // + r * ld: row nb + r
      __m128i lo[16];
      block_rows16(t[0], lo);
      if constexpr (BITS == 4) {
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(d + r * ld, expand4_bf16(lo[r], tabs[r]));
      } else {  // int8: a row's 32 codes are column q = 0 (bytes 0-15) and q = 1 (bytes 16-31)
        __m128i hi[16];
        block_rows16(t[1], hi);
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(d + r * ld, expand8_bf16(lo[r], hi[r], (__m512)tabs[r]));
      }
    }
  }
}

// One row of either layout over [k0, k1) (the documented layout, or a row of a partial block).
template <int BITS>
__attribute__((target("avx512bf16"))) void row_bf16(const QuantView& w, __m512 levels, int64_t n, int64_t k0,
                                                    int64_t k1, uint16_t* drow) {
  constexpr int CB = BITS * 4;
  const uint8_t* row = w.codes + n * w.row_bytes;
  if (!w.ilv)  // the next slice's codes (rows apart: too many streams for the hardware prefetcher)
    for (int64_t b = k1 / 32 * CB; b < std::min(w.row_bytes, (2 * k1 - k0) / 32 * CB); b += 64)
      __builtin_prefetch(row + b, 0, 2);
  const int64_t gs = w.group_size;
  if (k1 / gs < w.groups) {  // and its scales, zeros and mins
    const int64_t j = w.sidx(n, k1 / gs);
    if (w.scales) __builtin_prefetch(w.scales + j);
    if (w.zeros) __builtin_prefetch(w.zeros + j);
    if (w.mins) __builtin_prefetch(w.mins + j);
  }
  alignas(64) uint8_t tmp[32];
  drow -= k0;
  for (int64_t g = k0 / gs; g * gs < k1; ++g) {
    const int64_t j = w.sidx(n, g);
    const __m512i tab = BITS == 4 ? bf16_table4(w, levels, j) : (__m512i)_mm512_set1_ps(w.scale_at(j));
    const int64_t c1 = std::min(k1, (g + 1) * gs) / 32;
    for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
      const uint8_t* ck = chunk_codes<BITS>(w, n, c, tmp);  // in place, or gathered from a partial block
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ck));
      if constexpr (BITS == 4) {
        _mm512_storeu_si512(drow + c * 32, expand4_bf16(lo, tab));
      } else {
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ck + 16));
        _mm512_storeu_si512(drow + c * 32, expand8_bf16(lo, hi, (__m512)tab));
      }
    }
  }
}

template <int BITS>
__attribute__((target("avx512bf16"))) void rows_bf16(const QuantView& w, __m512 levels, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* dst,
               int64_t ld) {
  for (int64_t n = n0; n < n1;) {
    if (w.ilv == 16 && n % 16 == 0 && n + 16 <= std::min(n1, w.rows)) {  // a whole interleaved block
      block_rows_bf16<BITS>(w, levels, n, k0, k1, dst + (n - n0) * ld, ld);
      n += 16;
    } else {
      row_bf16<BITS>(w, levels, n, k0, k1, dst + (n - n0) * ld);
      ++n;
    }
  }
}

}  // namespace
#endif

#if defined(MK_ISA_AVX512)
// Called only by the bf16 prefill kernel, which runs only on CPUs with AVX512-BF16.
__attribute__((target("avx512bf16")))
#endif
bool dequantize_rows_bf16(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* dst,
                          int64_t ld) {
#if defined(MK_ISA_AVX512)
  // The formats of this chunk layout with a direct route: int8 (s * q in fp32, rounded straight to
  // bf16) and the 4-bit ones (a 16-entry bf16 table per group, one vpermw per 32 weights).
  const QuantFormat f = w.format;
  if (f == QuantFormat::Int8) {
    rows_bf16<8>(w, _mm512_setzero_ps(), n0, n1, k0, k1, dst, ld);
    return true;
  }
  if (f != QuantFormat::Int4 && f != QuantFormat::Int4Sym && f != QuantFormat::Int4Min && f != QuantFormat::NF4)
    return false;
  const __m512 levels = f == QuantFormat::NF4 ? _mm512_loadu_ps(nf4_codebook())
                                              : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  rows_bf16<4>(w, levels, n0, n1, k0, k1, dst, ld);
  return true;
#else
  (void)w, (void)n0, (void)n1, (void)k0, (void)k1, (void)dst, (void)ld;
  return false;
#endif
}

}  // namespace memkernels::cpu::MK_ISA_NS
