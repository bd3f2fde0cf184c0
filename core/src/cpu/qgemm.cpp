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
// slices, and on AVX-512 two rows share every x load. Threads split the rows. Opt-in, 1-64 tokens,
// int4 / int4_sym / int4_min / int8: x quantized to int8 and integer dot products, AVX512-VNNI or
// AVX2 (gemv_int4_int8x, gemv_int8_int8x), each weight load serving up to 8 (AVX2: 4) tokens.
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

// Threads for a call of T tokens on w: below about a million multiply-adds (a 576 x 1536 layer, one
// token) the whole product takes some tens of microseconds on one core, and starting an OpenMP team
// costs several (tens when the other cores are busy), so small problems stay on the calling thread.
constexpr int64_t kParallelMacs = int64_t(1) << 20;
inline int threads_for(const QuantView& w, int64_t T) {
  return w.rows * w.cols * T < kParallelMacs ? 1 : num_threads();
}

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

// sum_g (s[n][g] * z[n][g] - m[n][g]) * xsum[g] over row n's groups: the zero-point and min terms
// of one output, vectorised over the groups (z includes the symmetric offset). Needs fp32 scales
// (every format with a zero point or a min has them).
inline float group_corr(const QuantView& w, int64_t n, const float* xsum) {
  const int64_t G = w.groups;
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
  constexpr int CB = BITS * 4;  // bytes per chunk
  const bool has_corr = w.zeros != nullptr || w.code_offset != 0.0f || w.mins != nullptr;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    VecF tot[NT];
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) tot[t] = VecF::zero();
    for (int64_t g = 0; g < G; ++g) {
      VecF acc[NT][CV];
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t)
        #pragma GCC unroll 16
        for (int i = 0; i < CV; ++i) acc[t][i] = VecF::zero();
      const uint8_t* src = row + g * chunks * CB;
      const float* xg = x + g * w.group_size;
      for (int c = 0; c < chunks; ++c) {
        VecF wv[CV];
        decode<BITS, NF4>(src + c * CB, tab, wv);
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

// Row n dequantized to fp32 (scale and zero applied) into dst[0:K].
template <int BITS, bool NF4>
void dequant_row(const QuantView& w, const Table& tab, int64_t n, float* dst) {
  const int chunks = w.group_size / 32;
  constexpr int CB = BITS * 4;
  const uint8_t* row = w.codes + n * w.row_bytes;
  for (int64_t g = 0; g < w.groups; ++g) {
    const VecF vs = VecF::set1(w.scale(n, g)), vz = VecF::set1(w.zero(n, g)), vm = VecF::set1(w.min(n, g));
    for (int c = 0; c < chunks; ++c) {
      VecF wv[CV];
      decode<BITS, NF4>(row + (g * chunks + c) * CB, tab, wv);
      float* d = dst + (g * chunks + c) * 32;
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

// Several tokens: y[t * ldy + n] += partial dot over chunks [c0, c1) for rows [n0, n1) x NT tokens
// (x zero-padded to NT rows). Each chunk is unpacked and scaled once (w = T[q] * s + (m - z * s)) and
// reused by all NT tokens, and FR rows share each x load.
template <int BITS, bool NF4, int NT, int R>
void gemm_rows(const QuantView& w, const Table& tab, const float* x, int64_t ldx, int64_t c0, int64_t c1, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
  const int cpg = w.group_size / 32;
  constexpr int CB = BITS * 4;
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
        decode<BITS, NF4>(w.codes + (n + r) * w.row_bytes + ci * CB, tab, wv[r]);
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
// Activations quantized to int8 for the integer-dot paths: one scale per token (max|x| / 127).
struct Int8X {
  std::vector<int8_t> q;     // per token, `stride` bytes in the order the weight format needs
  std::vector<float> sum;    // per token, the per-group sums of its int8 values (zero / min terms)
  std::vector<float> scale;  // per token
  int64_t stride = 0, groups = 0;
  bool nonfinite = false;    // x holds NaN or +-inf: int8 codes cannot carry it (the caller runs exact)
  const int8_t* row(int64_t t) const { return q.data() + t * stride; }
  const float* sums(int64_t t) const { return sum.data() + t * groups; }
};

// int4 formats: VNNI block order (per 4-chunk block, the 64 "low" x then the 64 "high" x, see
// gemv_int4_int8x). int8: natural order, zero-padded to a multiple of 64.
Int8X prepare_int8_x(const float* x, int64_t ldx, int64_t T, int64_t K, int group, bool int4_order) {
  Int8X r;
  const int64_t chunks = K / 32;
  r.stride = int4_order ? (chunks + 3) / 4 * 128 : (K + 63) / 64 * 64;
  r.groups = K / group;
  r.q.assign(size_t(T * r.stride), 0);
  r.sum.assign(size_t(T * r.groups), 0.0f);
  r.scale.assign(size_t(T), 1.0f);
  // Vectorised per 32-weight chunk (a scalar lrint call and a division per element made this take
  // several microseconds at K = 576, as long as the whole small GEMV). Round to nearest even, as
  // lrint does; the sums are of integers below 2^24, so exact in any order.
  const int64_t cpg = group / 32;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    VecF vmax = VecF::zero(), vbad = VecF::zero();
    for (int64_t k = 0; k < K; k += VL) {
      const VecF v = VecF::load(xt + k);
      vmax = VecF::max(vmax, VecF::max(v, VecF::zero() - v));
      vbad = vbad + v * VecF::zero();  // NaN in a lane once x had NaN or inf there (inf * 0 = NaN)
    }
    float lanes[VL];
    vbad.store(lanes);
    for (int i = 0; i < VL; ++i) r.nonfinite |= lanes[i] != lanes[i];
    if (r.nonfinite) return r;
    const float amax = vmax.reduce_max();
    const float dx = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / dx;
    r.scale[size_t(t)] = dx;
    int8_t* xa = r.q.data() + t * r.stride;
    float* xs = r.sum.data() + t * r.groups;
    const VecF vinv = VecF::set1(inv);
    for (int64_t c = 0; c < chunks; ++c) {
      float qf[32];
      for (int i = 0; i < CV; ++i) VecF::round(VecF::load(xt + c * 32 + i * VL) * vinv).store(qf + i * VL);
      int8_t* dst = xa + (int4_order ? (c / 4) * 128 + (c % 4) * 16 : c * 32);
      float sum = 0.0f;
      for (int j = 0; j < 32; ++j) {
        dst[int4_order ? (j < 16 ? j : 64 + j - 16) : j] = int8_t(int(qf[j]));
        sum += qf[j];
      }
      xs[c / cpg] += sum;
    }
  }
  return r;
}
#endif

#if defined(MK_ISA_AVX512)
constexpr int kInt8xTokens = 8;  // tokens per pass of the integer-dot kernels (accumulators in zmm)

// int4 GEMV with x quantized to int8 (one scale dx per token) and VNNI u8 x s8 dot products.
// One 64-byte load holds 4 chunks (128 weights): its low nibbles are weights 0-15 of each chunk and
// its high nibbles weights 16-31, so x is rearranged once into the same order (xa: per 4-chunk
// block, 64 bytes of "low" x then 64 of "high" x). vpdpbusd sums 4 neighbouring bytes into a 32-bit
// lane, so lanes 4c..4c+3 belong to chunk c: one per-lane scale vector applies the group scales.
// y[n] = dx * (sum_c s_c * dot_c - sum_g (s_g * z_g - m_g) * xsum_g), z including the symmetric
// offset, m the int4_min mins (0 otherwise). NT tokens t0.. share every unpacked weight load.
template <int NT>
__attribute__((target("avx512vnni"))) void gemv_int4_int8x(const QuantView& w, const Int8X& xq, int64_t t0,
                                                             int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t chunks = w.cols / 32, G = w.groups;
  const int cpg = w.group_size / 32;
  const int64_t blocks = (chunks + 3) / 4;
  // lane l -> group offset within the block: (l / 4) / cpg
  alignas(64) int32_t gi[16];
  for (int l = 0; l < 16; ++l) gi[l] = (l / 4) / cpg;
  const __m512i gidx = _mm512_load_si512(gi);
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const int8_t* xa[NT];
  for (int t = 0; t < NT; ++t) xa[t] = xq.row(t0 + t);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    const float* srow = w.scales + n * G;
    __m512 accf[NT];
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t nc = std::min<int64_t>(4, chunks - 4 * b);
      const __mmask64 cm = nc == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * nc)) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(cm, row + b * 64);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      const int64_t g0 = 4 * b / cpg, ng = (nc + cpg - 1) / cpg;
      const __m512 sv = _mm512_permutexvar_ps(
          gidx, _mm512_castps128_ps512(_mm_maskz_loadu_ps(__mmask8((1u << ng) - 1), srow + g0)));
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xa[t] + b * 128));
        acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xa[t] + b * 128 + 64));
        accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, accf[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      y[(t0 + t) * ldy + n] =
          xq.scale[size_t(t0 + t)] * (_mm512_reduce_add_ps(accf[t]) - group_corr(w, n, xq.sums(t0 + t)));
  }
}

// int8 weights x int8 activations (x in natural order, zero-padded to a multiple of 64).
// vpdpbusd multiplies unsigned by signed bytes, so the weights are offset to unsigned: w ^ 0x80 is
// the byte w + 128, and sum (w + 128) x = sum w x + 128 * xsum, the last term taken off per group
// with the x sums (group_corr with offset 128). Lanes 4j..4j+3 of a 64-byte step sum bytes 4j.. of
// it: lanes 0-7 are its first chunk, 8-15 its second. Integer sums run over at most kFlush steps
// (no int32 overflow: 4 * 255 * 127 per step and lane), then go to fp32 scaled.
constexpr int64_t kFlush = 1024;

template <int NT>
__attribute__((target("avx512vnni"))) void gemv_int8_int8x(const QuantView& w, const Int8X& xq, int64_t t0,
                                                             int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t K = w.cols, G = w.groups, gs = w.group_size;
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  QuantView w128 = w;  // the +128 offset of the weight bytes, as a symmetric offset
  w128.code_offset = 128.0f;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = reinterpret_cast<const int8_t*>(w.codes + n * w.row_bytes);
    const float* srow = w.scales + n * G;
    __m512 accf[NT];
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps();
    if (gs == 32) {  // one 64-byte step = 2 groups: lanes 0-7 take scale g, 8-15 scale g + 1
      const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
      for (int64_t k = 0; k < K; k += 64) {
        const bool full = K - k >= 64;
        // a 32-byte row tail: the missing half reads as 0 ^ 0x80 = 128, times the zero x padding
        const __m512i wu = _mm512_xor_si512(
            full ? _mm512_loadu_si512(row + k) : _mm512_maskz_loadu_epi8(0xffffffffull, row + k), flip);
        const __m512 sv = _mm512_permutexvar_ps(
            sel, _mm512_castps128_ps512(_mm_maskz_loadu_ps(full ? 3 : 1, srow + k / 32)));
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xr[t] + k));
          accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, accf[t]);
        }
      }
    } else {  // groups of 64, 128 or the whole row: whole 64-byte steps, except a 32-byte row tail
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k1 = (g + 1) * gs;
        for (int64_t k0 = g * gs; k0 < k1; k0 += 64 * kFlush) {
          const int64_t ke = std::min(k1, k0 + 64 * kFlush);
          __m512i acc[NT];
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_si512();
          for (int64_t k = k0; k < ke; k += 64) {
            // a 32-byte row tail meets zero x padding: whatever its other half holds adds 0
            const __m512i wu = _mm512_xor_si512(
                ke - k >= 64 ? _mm512_loadu_si512(row + k)
                             : _mm512_maskz_loadu_epi8((__mmask64(1) << (ke - k)) - 1, row + k),
                flip);
            #pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], wu, _mm512_loadu_si512(xr[t] + k));
          }
          const __m512 sv = _mm512_set1_ps(srow[g]);
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), sv, accf[t]);
        }
      }
    }
    for (int t = 0; t < NT; ++t)
      y[(t0 + t) * ldy + n] =
          xq.scale[size_t(t0 + t)] * (_mm512_reduce_add_ps(accf[t]) - group_corr(w128, n, xq.sums(t0 + t)));
  }
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

// int8 x int8 on AVX2: vpmaddubsw takes |w| (unsigned; |-128| = 128) and sign(w) * x (vpsignb), pair
// sums at most 2 * 128 * 127 (no saturation), then vpmaddwd with ones gives 8 int32 lanes per chunk.
constexpr int64_t kFlush = 2048;  // chunks summed in int32 before going to fp32 (no overflow)

template <int NT>
void gemv_int8_int8x(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  const int64_t G = w.groups, gs = w.group_size;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[NT];
  for (int t = 0; t < NT; ++t) xr[t] = xq.row(t0 + t);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = reinterpret_cast<const int8_t*>(w.codes + n * w.row_bytes);
    const float* srow = w.scales + n * G;
    __m256 accf[NT];
    for (int t = 0; t < NT; ++t) accf[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k1 = (g + 1) * gs;
      for (int64_t k0 = g * gs; k0 < k1; k0 += 32 * kFlush) {
        const int64_t ke = std::min(k1, k0 + 32 * kFlush);
        __m256i acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
        for (int64_t k = k0; k < ke; k += 32) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
          const __m256i wabs = _mm256_abs_epi8(wv);
          for (int t = 0; t < NT; ++t) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[t] + k));
            const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
          }
        }
        const __m256 sv = _mm256_set1_ps(srow[g]);
        for (int t = 0; t < NT; ++t) accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), sv, accf[t]);
      }
    }
    for (int t = 0; t < NT; ++t) y[(t0 + t) * ldy + n] = xq.scale[size_t(t0 + t)] * VecF{accf[t]}.reduce_add();
  }
}

// AVX2 form of the VNNI gemv_int4_int8x over the same x layout: vpmaddubsw (u8 x s8 -> pairs summed in s16;
// at most 2 * 15 * 127, no saturation) then vpmaddwd with ones also sums 4 neighbouring bytes per
// 32-bit lane. A 32-byte step holds 2 chunks (half h of a 4-chunk block): lanes 0-3 chunk c, 4-7
// chunk c + 1. Groups of 2+ chunks sum integers over the group and apply its scale once.
template <int NT>
void gemv_int4_int8x(const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  const int64_t chunks = w.cols / 32, G = w.groups;
  const int cpg = w.group_size / 32;
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const int8_t* xa[NT];
  for (int t = 0; t < NT; ++t) xa[t] = xq.row(t0 + t);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    const float* srow = w.scales + n * G;
    __m256 accf[NT];
    for (int t = 0; t < NT; ++t) accf[t] = _mm256_setzero_ps();
    // int32 lane sums of chunks c (and c + 1 when it exists) against each token's x
    auto step = [&](int64_t c, __m256i (&d)[NT]) {
      const __m256i v = c + 1 < chunks ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 16))
                                       : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const int64_t off = (c / 4) * 128 + ((c % 4) / 2) * 32;
      for (int t = 0; t < NT; ++t) {
        const int8_t* xb = xa[t] + off;
        const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
        const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64)));
        d[t] = _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones));
      }
    };
    __m256i d[NT];
    if (cpg >= 2) {  // chunks per group even: whole steps per group
      for (int64_t g = 0; g < G; ++g) {
        __m256i acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c += 2) {
          step(c, d);
          for (int t = 0; t < NT; ++t) acc[t] = _mm256_add_epi32(acc[t], d[t]);
        }
        const __m256 sv = _mm256_set1_ps(srow[g]);
        for (int t = 0; t < NT; ++t) accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), sv, accf[t]);
      }
    } else {  // group 32: each half of a step has its own scale
      for (int64_t c = 0; c < chunks; c += 2) {
        const __m256 sv = _mm256_set_m128(_mm_set1_ps(c + 1 < chunks ? srow[c + 1] : 0.0f), _mm_set1_ps(srow[c]));
        step(c, d);
        for (int t = 0; t < NT; ++t) accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[t]), sv, accf[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      y[(t0 + t) * ldy + n] =
          xq.scale[size_t(t0 + t)] * (VecF{accf[t]}.reduce_add() - group_corr(w, n, xq.sums(t0 + t)));
  }
}
#endif

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// One pass of the integer-dot kernel instantiated for nt tokens (1 .. kInt8xTokens).
template <bool INT4, int NT = kInt8xTokens>
void int8x_pass(int64_t nt, const QuantView& w, const Int8X& xq, int64_t t0, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  if (nt == NT) {
    if constexpr (INT4) gemv_int4_int8x<NT>(w, xq, t0, n0, n1, y, ldy);
    else gemv_int8_int8x<NT>(w, xq, t0, n0, n1, y, ldy);
  } else if constexpr (NT > 1) {
    int8x_pass<INT4, NT - 1>(nt, w, xq, t0, n0, n1, y, ldy);
  }
}

// The integer-dot path (up to kInt8xMaxTokens tokens): x quantized once per token, rows split over
// the threads, every unpacked weight used by kInt8xTokens tokens.
// Up to 64 tokens (each pass of kInt8xTokens re-reads a row block's codes, which stay in cache);
// longer inputs take the exact path, whose buffers do not grow with the token count.
constexpr int64_t kInt8xMaxTokens = 64;
// Returns false, computing nothing, when x holds NaN or inf: the exact path then propagates them.
template <bool INT4>
bool qgemm_int8x(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, T = p.tokens;
  const Int8X xq = prepare_int8_x(x, ldx, T, w.cols, w.group_size, INT4);
  if (xq.nonfinite) return false;
  std::vector<float> y(static_cast<size_t>(T * N));
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * ROWS, n1 = std::min(N, n0 + ROWS);
    for (int64_t t0 = 0; t0 < T; t0 += kInt8xTokens)
      int8x_pass<INT4>(std::min<int64_t>(kInt8xTokens, T - t0), w, xq, t0, n0, n1, y.data(), N);
    for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
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
  if (p.int8_activations && T <= kInt8xMaxTokens && int8_dots_available()) {
    if constexpr (BITS == 8) { if (qgemm_int8x<false>(p, x, ldx, bias)) return; }
    if constexpr (BITS == 4 && !NF4) { if (qgemm_int8x<true>(p, x, ldx, bias)) return; }
  }
#endif
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
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * ROWS, n1 = std::min(N, n0 + ROWS);
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

// Rows [n0, n1), weights [k0, k1) (whole chunks) dequantized to fp32 as dequant_row does:
// dst[(n - n0) * ld + k - k0]. The prefill GEMM's only view of the layout (quant_internal.h).
template <int BITS, bool NF4>
void dequant_rows_range(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst, int64_t ld) {
  const Table tab(nf4_codebook());
  const int64_t gs = w.group_size;
  constexpr int CB = BITS * 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    float* drow = dst + (n - n0) * ld - k0;
    // The caller walks K in slices, each for a block of rows: too many streams for the hardware
    // prefetcher, so fetch the codes of this row's next slice (same length) now.
    for (int64_t b = k1 / 32 * CB; b < std::min(w.row_bytes, (2 * k1 - k0) / 32 * CB); b += 64)
      __builtin_prefetch(row + b, 0, 2);  // to L2: a burst of these must not stall on L1 misses
    if (k1 / gs < w.groups) {  // and its scales, zeros and mins
      const int64_t j = n * w.groups + k1 / gs;
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
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * CB)));
          _mm512_storeu_ps(drow + c * 32, _mm512_permutexvar_ps(b, t16));
          _mm512_storeu_ps(drow + c * 32 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t16));
        }
        continue;
      }
#endif
      for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
        VecF wv[CV];
        decode<BITS, NF4>(row + c * CB, tab, wv);
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
  if (qgemm_prefill(p, x, ldx, bias)) return;  // many tokens: dequantize-once GEMM (qgemm_prefill.cpp)
  MK_BY_FORMAT(p.w.format, qgemm_impl, p, x, ldx, bias)
}

void dequantize(const DequantProblem& p) { MK_BY_FORMAT(p.w.format, dequantize_impl, p) }

void dequantize_rows(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst, int64_t ld) {
  MK_BY_FORMAT(w.format, dequant_rows_range, w, n0, n1, k0, k1, dst, ld)
}

#if defined(MK_ISA_AVX512)
// Called only by the bf16 prefill kernel, which runs only on CPUs with AVX512-BF16.
__attribute__((target("avx512bf16")))
#endif
bool dequantize_rows_bf16(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* dst,
                          int64_t ld) {
#if defined(MK_ISA_AVX512)
  // 4-bit formats: per group, the 16 possible weights (as dequant_rows_range computes them) rounded
  // to bf16 and repeated to 32 words; one vpermw per 32 weights, whose word index holds the code in
  // bits 0-3 (bit 4, the other nibble's low bit, picks the same entry in the repeated table).
  const QuantFormat f = w.format;  // the 4-bit formats of this chunk layout (not other 4-bit layouts)
  if (f == QuantFormat::Int8) {
    // int8: s * q in fp32 as dequant_rows_range computes it, rounded straight to bf16 (no fp32 tile)
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = reinterpret_cast<const int8_t*>(w.codes + n * w.row_bytes);
      uint16_t* drow = dst + (n - n0) * ld - k0;
      for (int64_t b = k1; b < std::min(w.row_bytes, 2 * k1 - k0); b += 64) __builtin_prefetch(row + b, 0, 2);
      for (int64_t g = k0 / w.group_size; g * w.group_size < k1; ++g) {
        const __m512 vs = _mm512_set1_ps(w.scale(n, g));
        const int64_t c1 = std::min(k1, (g + 1) * w.group_size);
        for (int64_t k = std::max(k0, g * w.group_size); k < c1; k += 32) {
          const __m512 a = _mm512_mul_ps(
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), vs);
          const __m512 b = _mm512_mul_ps(
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)))),
              vs);
          _mm512_storeu_si512(drow + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
      }
    }
    return true;
  }
  if (f != QuantFormat::Int4 && f != QuantFormat::Int4Sym && f != QuantFormat::Int4Min && f != QuantFormat::NF4)
    return false;
  const bool nf4 = f == QuantFormat::NF4;
  const __m512 levels = nf4 ? _mm512_loadu_ps(nf4_codebook())
                            : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t gs = w.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * w.row_bytes;
    uint16_t* drow = dst + (n - n0) * ld - k0;
    const int64_t next = (2 * k1 - k0) / 2;  // the next slice's codes, spread over this slice's chunks
    if (k1 / gs < w.groups) {  // and its scales, zeros and mins (rows apart: no stream for the hardware)
      const int64_t j = n * w.groups + k1 / gs;
      if (w.scales) __builtin_prefetch(w.scales + j);
      if (w.zeros) __builtin_prefetch(w.zeros + j);
      if (w.mins) __builtin_prefetch(w.mins + j);
    }
    for (int64_t g = k0 / gs; g * gs < k1; ++g) {
      const VecF lv{levels}, vs = VecF::set1(w.scale(n, g));
      const __m512 t = w.mins ? (opaque(lv * vs) + VecF::set1(w.min(n, g))).v : ((lv - VecF::set1(w.zero(n, g))) * vs).v;
      // rounded as the other formats' floats are (vcvtneps2bf16: nearest even)
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(t);
      const __m512i tab = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
      const int64_t c1 = std::min(k1, (g + 1) * gs) / 32;
      for (int64_t c = std::max(k0, g * gs) / 32; c < c1; ++c) {
        if ((c & 3) == 0 && c * 16 + (k1 - k0) / 2 < std::min(w.row_bytes, next))
          __builtin_prefetch(row + c * 16 + (k1 - k0) / 2, 0, 2);
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
        const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_srli_epi16(lo, 4), 1);
        _mm512_storeu_si512(drow + c * 32, _mm512_permutexvar_epi16(idx, tab));
      }
    }
  }
  return true;
#else
  (void)w, (void)n0, (void)n1, (void)k0, (void)k1, (void)dst, (void)ld;
  return false;
#endif
}

}  // namespace memkernels::cpu::MK_ISA_NS
