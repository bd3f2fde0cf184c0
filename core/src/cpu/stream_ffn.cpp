// The streamed FFN on 4-bit neuron bundles, straight from the cache slots (issue 17). Per neuron:
// z_t = a[t] * (h_t . up), y_t += z_t * down. The up dot product runs on the codes, without a float
// copy of the row: per group of 32, sum(code * h) * scale + min * sum(h), with h de-interleaved once
// per call so that a group's low nibbles meet its even positions and the high nibbles the odd ones.
#include <cstring>

#include "cpu/convert.h"
#include "cpu/simd.h"
#include "stream_ffn_internal.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int N = VecF::N;  // 16 (AVX-512) or 8: a group's 16 nibble pairs are 1 or 2 vectors

// Low and high nibbles of N bytes at p as floats.
inline void nibbles(const uint8_t* p, VecF& lo, VecF& hi) {
#if defined(MK_ISA_AVX512)
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#elif defined(MK_ISA_AVX2)
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#else
  for (int i = 0; i < N; ++i) {
    lo.v[i] = float(p[i] & 15);
    hi.v[i] = float(p[i] >> 4);
  }
#endif
}

// N int8 codes at p as floats.
inline VecF int8s(const int8_t* p) {
#if defined(MK_ISA_AVX512)
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#elif defined(MK_ISA_AVX2)
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
#else
  VecF r;
  for (int i = 0; i < N; ++i) r.v[i] = float(p[i]);
  return r;
#endif
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// h_t . up for one 4-bit part (ng groups) against the de-interleaved hq and the group sums.
inline float dot_int4(const uint8_t* part, int64_t ng, const float* hq, const float* hsum) {
  const uint8_t* sc = part + ng * 16;
  const uint8_t* mn = sc + 2 * ng;
  VecF acc0 = VecF::zero(), acc1 = VecF::zero();  // two chains: groups alternate
  float macc = 0.0f;
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c = part + g * 16;
    const float* x = hq + g * 32;
    VecF t = VecF::zero();
    for (int j = 0; j < 16; j += N) {
      VecF lo, hi;
      nibbles(c + j, lo, hi);
      t = VecF::fma(lo, VecF::load(x + j), t);
      t = VecF::fma(hi, VecF::load(x + 16 + j), t);
    }
    if (g & 1)
      acc1 = VecF::fma(t, VecF::set1(f16_at(sc + 2 * g)), acc1);
    else
      acc0 = VecF::fma(t, VecF::set1(f16_at(sc + 2 * g)), acc0);
    macc += f16_at(mn + 2 * g) * hsum[g];
  }
  return (acc0 + acc1).reduce_add() + macc;
}

// y += z * down for a 4-bit down part (y de-interleaved per group).
inline void axpy_int4(const uint8_t* part, int64_t ng, float z, float* y) {
  const uint8_t* sc = part + ng * 16;
  const uint8_t* mn = sc + 2 * ng;
  for (int64_t g = 0; g < ng; ++g) {
    const VecF zs = VecF::set1(z * f16_at(sc + 2 * g)), zm = VecF::set1(z * f16_at(mn + 2 * g));
    const uint8_t* c = part + g * 16;
    float* yg = y + g * 32;
    for (int j = 0; j < 16; j += N) {
      VecF lo, hi;
      nibbles(c + j, lo, hi);
      VecF::fma(lo, zs, VecF::load(yg + j) + zm).store(yg + j);
      VecF::fma(hi, zs, VecF::load(yg + 16 + j) + zm).store(yg + 16 + j);
    }
  }
}

// y += z * down for an int8 down part ([d codes][float32 scale]; y in natural order). Only the
// part's own bytes are read (a vector tail past d would read the next bundle, or past the array).
inline void axpy_int8(const uint8_t* part, int64_t d, float z, float* y) {
  float s;
  std::memcpy(&s, part + d, 4);
  const float zs = z * s;
  const int8_t* c = reinterpret_cast<const int8_t*>(part);
  const VecF vz = VecF::set1(zs);
  int64_t j = 0;
  for (; j + N <= d; j += N) VecF::fma(int8s(c + j), vz, VecF::load(y + j)).store(y + j);
  for (; j < d; ++j) y[j] += zs * float(c[j]);
}

// y += z * down for a 7-bit down column: groups of 8 codes in 7 bytes (code k of a group in bits
// [7k, 7k + 7) of the group's little-endian word, stored + 64), then the float32 scale. The last
// group's 8-byte load reaches one byte into the scale, still inside the column.
inline void axpy_int7(const uint8_t* part, int64_t d, float z, float* y) {
  const int64_t groups = (d + 7) / 8;
  float s;
  std::memcpy(&s, part + 7 * groups, 4);
  const float zs = z * s;
  int64_t g = 0;
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  // Code k of a group starts at bit 7k: it lies in the 16-bit word at byte 7k/8, shifted by 7k%8.
  // A byte shuffle puts that word in each 32-bit lane, a variable shift and a mask give the code.
  // Each step reads 16 bytes from group g's start: inside the column while groups g and g + 1 exist
  // (7g + 16 <= 7 * groups + 2, and the 4-byte scale follows the last group).
#if defined(MK_ISA_AVX512)
  // 16 codes (two groups, 14 bytes) per step.
  const __m512i shuf = _mm512_setr_epi32(0x80800100, 0x80800100, 0x80800201, 0x80800302, 0x80800403, 0x80800504,
                                         0x80800605, 0x80800706, 0x80800807, 0x80800807, 0x80800908, 0x80800a09,
                                         0x80800b0a, 0x80800c0b, 0x80800d0c, 0x80800e0d);
  const __m512i shift = _mm512_setr_epi32(0, 7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1);
  const __m512i m127 = _mm512_set1_epi32(127), c64 = _mm512_set1_epi32(64);
  const __m512 vz = _mm512_set1_ps(zs);
  for (; 8 * g + 16 <= d; g += 2) {  // (implies g + 2 <= groups)
    const __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(part + 7 * g)));
    __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, shuf), shift), m127);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(c, c64));
    _mm512_storeu_ps(y + 8 * g, _mm512_fmadd_ps(v, vz, _mm512_loadu_ps(y + 8 * g)));
  }
#else
  // 8 codes (one group, 7 bytes) per step.
  const __m256i shuf = _mm256_setr_epi32(0x80800100, 0x80800100, 0x80800201, 0x80800302, 0x80800403, 0x80800504,
                                         0x80800605, 0x80800706);
  const __m256i shift = _mm256_setr_epi32(0, 7, 6, 5, 4, 3, 2, 1);
  const __m256i m127 = _mm256_set1_epi32(127), c64 = _mm256_set1_epi32(64);
  const __m256 vz = _mm256_set1_ps(zs);
  for (; g + 2 <= groups && 8 * g + 8 <= d; ++g) {  // 16-byte load: group g + 1 must exist
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(part + 7 * g)));
    __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, shuf), shift), m127);
    const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(c, c64));
    _mm256_storeu_ps(y + 8 * g, _mm256_fmadd_ps(v, vz, _mm256_loadu_ps(y + 8 * g)));
  }
#endif
#endif
  for (; g < groups; ++g) {
    uint64_t w;
    std::memcpy(&w, part + 7 * g, 8);
    float* yg = y + 8 * g;
    const int n = int(d - 8 * g < 8 ? d - 8 * g : 8);
    for (int k = 0; k < n; ++k) yg[k] += zs * float(int((w >> (7 * k)) & 127u) - 64);
  }
}

}  // namespace

void stream_ffn_accumulate(const StreamFfnProblem& p, const uint8_t* const* bundles, int64_t n, const float* a,
                           int64_t lda, const int64_t* cols) {
  const int64_t ng = p.dp / 32;
  const int64_t P = p.dp / 2 + 4 * ng;  // bytes of a 4-bit part
  for (int64_t i = 0; i < n; ++i) {
    const int64_t col = cols ? cols[i] : i;
    const uint8_t* b = bundles[i];
    for (int64_t t = 0; t < p.T; ++t) {
      const float at = a[t * lda + col];
      if (at == 0.0f) continue;  // masked off for this token: nothing to add
      if (p.down_only) {
        if (p.down_int7)
          axpy_int7(b, p.d, at, p.y + t * p.dp);
        else
          axpy_int8(b, p.d, at, p.y + t * p.dp);
        continue;
      }
      const float z = at * dot_int4(b, ng, p.hq + t * p.dp, p.hsum + t * ng);
      if (p.down_int8)
        axpy_int8(b + P, p.d, z, p.y + t * p.dp);
      else
        axpy_int4(b + P, ng, z, p.y + t * p.dp);
    }
  }
}

}  // namespace memkernels::cpu::MK_ISA_NS
