// CPU kernels of the K-quant super-block formats (q4_k, q5_k, q6_k; layout in memkernels/quant.h).
//
// Exact path (fp32 activations, every ISA): a tile of 16 rows x one super-block is dequantized to
// fp32 in L1 with the same arithmetic as dequantize() (bit-exact GGUF values), then dotted with
// every token's 256 activations.
//
// int8-activation path (1-64 tokens, AVX512-VNNI or AVX2): x is quantized per token to int8 (one
// scale dx = max|x| / 127) and rearranged once into the order of the code bytes (per 128 weights:
// the 64 x of the low nibbles, then the 64 of the high nibbles). Per super-block and token the
// integer sub-block dot products are multiplied by the integer sub-scales and summed in int32
// (VNNI: vpdpbusd into lanes of one sub-block, then vpmulld by the lane's sub-scale; AVX2:
// vpmaddubsw, then vpmaddwd with the sub-scales instead of ones). The min term (q4_k / q5_k) is
// sum_j m_j * xsum_j from per-sub-block sums of the int8 x; q6_k's -32 offset is 32 * sum_j sc_j *
// xsum_j folded into the same int32 sum. Then one float multiply-add per super-block (d, and dmin
// for the mins), and dx once per output. The integer sums are exact, so the only error against the
// exact path is the rounding of x: the bound documented in quant.h.
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
constexpr int64_t kParallelMacs = int64_t(1) << 20;  // below this a call stays on one thread (see qgemm.cpp)

inline int threads_for(const QuantView& w, int64_t T) {
  return w.rows * w.cols * T < kParallelMacs ? 1 : num_threads();
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
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
  if (T <= 4) {
    constexpr int SZ = F == QuantFormat::Q6K ? 16 : 32;
    const int64_t nsub = w.cols / SZ;
    std::vector<float> xs(static_cast<size_t>(T * nsub)), y(static_cast<size_t>(T * N));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < nsub; ++j) {
        float s = 0.0f;
        for (int i = 0; i < SZ; ++i) s += x[t * ldx + j * SZ + i];
        xs[size_t(t * nsub + j)] = s;
      }
    const int64_t blocks = (N + ROWS - 1) / ROWS;
    const int threads = threads_for(w, T);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * ROWS, n1 = std::min(N, n0 + ROWS);
      switch (T) {
        case 1: gemv_exact<F, 1>(w, x, ldx, xs.data(), n0, n1, y.data(), N); break;
        case 2: gemv_exact<F, 2>(w, x, ldx, xs.data(), n0, n1, y.data(), N); break;
        case 3: gemv_exact<F, 3>(w, x, ldx, xs.data(), n0, n1, y.data(), N); break;
        default: gemv_exact<F, 4>(w, x, ldx, xs.data(), n0, n1, y.data(), N); break;
      }
      for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
    }
    return;
  }
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);
  ParallelGuard guard;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> tile, y;
    const bool ok = guard.run([&] { tile.resize(size_t(ROWS * QK)), y.resize(size_t(T * ROWS)); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!ok) continue;
      const int64_t n0 = blk * ROWS, n1 = std::min(N, n0 + ROWS), nr = n1 - n0;
      std::fill(y.begin(), y.end(), 0.0f);
      for (int64_t b = 0; b < SB; ++b) {
        for (int64_t r = 0; r < nr; ++r) dequant_sb<F>(w, n0 + r, b, tile.data() + r * QK);
        for (int64_t t = 0; t < T; ++t) {
          const float* xt = x + t * ldx + b * QK;
          for (int64_t r = 0; r < nr; ++r) y[size_t(t * ROWS + r)] += dot256(tile.data() + r * QK, xt);
        }
      }
      for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * ROWS);
    }
  }
  guard.rethrow();
}

template <QuantFormat F>
void dequantize_impl(const DequantProblem& p) {
  const int64_t K = p.w.cols, SB = K / QK;
  char* out = static_cast<char*>(p.out);
  const int es = dtype_size(p.dtype);
  ParallelGuard guard;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> row;
    const bool ok = guard.run([&] { row.resize(size_t(K)); });
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < p.w.rows; ++n) {
      if (!ok) continue;
      for (int64_t b = 0; b < SB; ++b) dequant_sb<F>(p.w, n, b, row.data() + b * QK);
      store_floats(row.data(), p.dtype, K, out + n * K * es);
    }
  }
  guard.rethrow();
}

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
// x quantized to int8 per token for the integer paths.
struct KX {
  std::vector<int8_t> q;      // [T][K], per 128 weights: the 64 low-nibble x, then the 64 high-nibble x
  std::vector<int16_t> s16;   // [T][K / 16] sums of the int8 x per 16 weights (q6_k sub-blocks)
  std::vector<int16_t> s32;   // [T][K / 32] per 32 weights (q4_k / q5_k sub-blocks)
  std::vector<float> scale;   // [T]
  int64_t K = 0;
  bool nonfinite = false;
};

constexpr int kPrefetch = 1024;  // bytes ahead in the code stream (software prefetch)

KX prepare_x(const float* x, int64_t ldx, int64_t T, int64_t K) {
  KX r;
  r.K = K;
  r.q.resize(size_t(T * K));
  r.s16.resize(size_t(T * K / 16));
  r.s32.resize(size_t(T * K / 32));
  r.scale.resize(size_t(T));
  std::vector<int8_t> nat(static_cast<size_t>(K));
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    VecF vmax = VecF::zero(), vbad = VecF::zero();
    for (int64_t k = 0; k < K; k += VL) {
      const VecF v = VecF::load(xt + k);
      vmax = VecF::max(vmax, VecF::max(v, VecF::zero() - v));
      vbad = vbad + v * VecF::zero();  // NaN once x holds NaN or inf
    }
    float lanes[VL];
    vbad.store(lanes);
    for (int i = 0; i < VL; ++i) r.nonfinite |= lanes[i] != lanes[i];
    if (r.nonfinite) return r;
    const float amax = vmax.reduce_max();
    const float dx = amax > 0.0f ? amax / 127.0f : 1.0f;
    const VecF inv = VecF::set1(1.0f / dx);
    r.scale[size_t(t)] = dx;
    for (int64_t k = 0; k < K; k += VL) {  // round to nearest even, as lrint
      float f[VL];
      VecF::round(VecF::load(xt + k) * inv).store(f);
      for (int i = 0; i < VL; ++i) nat[size_t(k + i)] = int8_t(int(f[i]));
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

// AVX2 (also the AVX-512 level's path when the CPU lacks VNNI): vpmaddubsw (u8 codes x s8 x, pairs
// summed in s16: at most 2 * 63 * 127, and for q4_k/q5_k the two nibble halves of a sub-block add
// to at most 4 * 31 * 127, no saturation) then vpmaddwd by the sub-scales (int32).
template <QuantFormat F, int NT>
__attribute__((target("avx2,fma,f16c"))) void gemv_avx2(const QuantView& w, const KX& xq, int64_t t0, int64_t n0,
                                                        int64_t n1, float* y, int64_t ldy) {
  const int64_t K = w.cols, SB = K / QK;
  const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
  auto expand = [](uint32_t bits) { return expand_bit4(bits); };  // q5_k's bit 4
  const int8_t* xa[NT];
  const int16_t *xs16[NT], *xs32[NT];
  for (int t = 0; t < NT; ++t) {
    xa[t] = xq.q.data() + (t0 + t) * K;
    xs16[t] = xq.s16.data() + (t0 + t) * (K / 16);
    xs32[t] = xq.s32.data() + (t0 + t) * (K / 32);
  }
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
      const __m256 vd = _mm256_set1_ps(half_to_float(sup[0]));
      if constexpr (F == QuantFormat::Q6K) {
        for (int t = 0; t < NT; ++t) {
          const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs16[t] + b * 16)));
          isum[t] = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(off, 5));
          accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), vd, accf[t]);
        }
      } else {
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + 8)));
        const __m128 vdm = _mm_set1_ps(half_to_float(sup[1]));
        for (int t = 0; t < NT; ++t) {
          accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), vd, accf[t]);
          const __m128i mt = _mm_madd_epi16(m16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs32[t] + b * 8)));
          accm[t] = _mm256_castps128_ps256(
              _mm_fmadd_ps(_mm_cvtepi32_ps(mt), vdm, _mm256_castps256_ps128(accm[t])));
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      float f[8], g[4];
      _mm256_storeu_ps(f, accf[t]);
      _mm_storeu_ps(g, _mm256_castps256_ps128(accm[t]));
      const float s = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
      const float m = (g[0] + g[1]) + (g[2] + g[3]);
      y[(t0 + t) * ldy + n] = xq.scale[size_t(t0 + t)] * (s - m);
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

// AVX512-VNNI: a 64-byte code load holds 4 sub-blocks of 32 (q6_k: low nibbles 4 sub-blocks of 16,
// high nibbles the 4 others); vpdpbusd leaves lanes 4c..4c+3 with chunk c's partial dots, so
// vpmulld by a vector of per-lane sub-scales weights them before the int32 sum over the super-block.
template <QuantFormat F, int NT>
__attribute__((target("avx512vnni"))) void gemv_vnni(const QuantView& w, const KX& xq, int64_t t0, int64_t n0,
                                                     int64_t n1, float* y, int64_t ldy) {
  const int64_t K = w.cols, SB = K / QK;
  const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(0x03), b16 = _mm512_set1_epi8(0x10);
  // lane l -> the sub-scale index it needs: half h, chunk l / 4
  alignas(64) int32_t ix[4][16];
  for (int l = 0; l < 16; ++l) {
    ix[0][l] = l / 4, ix[1][l] = 4 + l / 4;                   // q4_k / q5_k halves 0, 1
    ix[2][l] = 2 * (l / 4), ix[3][l] = 8 + 2 * (l / 4);       // q6_k low nibbles, halves 0, 1 (+1: high)
  }
  const __m512i i0 = _mm512_load_si512(ix[0]), i1 = _mm512_load_si512(ix[1]);
  const __m512i i2 = _mm512_load_si512(ix[2]), i3 = _mm512_load_si512(ix[3]), one = _mm512_set1_epi32(1);
  // q6_k: bits 4-5 of the low-nibble weights of bytes 0-31 sit at bits 0-1 of the 32 high-bit bytes,
  // of bytes 32-63 at bits 2-3 (high nibbles: 4-5, 6-7): per-16-bit-lane shift counts
  const __m512i cnt_lo = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  const __m512i cnt_hi = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  const int8_t* xa[NT];
  const int16_t *xs16[NT], *xs32[NT];
  for (int t = 0; t < NT; ++t) {
    xa[t] = xq.q.data() + (t0 + t) * K;
    xs16[t] = xq.s16.data() + (t0 + t) * (K / 16);
    xs32[t] = xq.s32.data() + (t0 + t) * (K / 32);
  }
  for (int64_t n = n0; n < n1; ++n) {
    __m512 accf[NT];
    __m128 accm[NT];
    #pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) accf[t] = _mm512_setzero_ps(), accm[t] = _mm_setzero_ps();
    const uint8_t* row = w.codes + n * w.row_bytes;
    for (int64_t b = 0; b < SB; ++b) {
      const uint8_t* sb = row + b * (32 * w.bits);
      const uint8_t* sub = w.sub_scales + (n * SB + b) * 16;
      const uint16_t* sup = w.super_scales + (n * SB + b) * 2;
      // a decode step is bandwidth bound: keep more misses in flight than the hardware prefetcher
      // does (the codes run on into the next row; a prefetch never faults)
      for (int l = 0; l < w.bits / 2; ++l) _mm_prefetch(reinterpret_cast<const char*>(sb + kPrefetch + 64 * l), _MM_HINT_T0);
      const __m128i sraw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sub));
      const __m512i s32 = F == QuantFormat::Q6K ? _mm512_cvtepi8_epi32(sraw) : _mm512_cvtepu8_epi32(sraw);
      __m512i isum[NT];
      #pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) isum[t] = _mm512_setzero_si512();
      #pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i v = _mm512_loadu_si512(sb + 64 * h);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        if constexpr (F == QuantFormat::Q5K) {
          lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(__mmask64(load_u64(sb + 128 + 16 * h)), b16));
          hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(__mmask64(load_u64(sb + 128 + 16 * h + 8)), b16));
        } else if constexpr (F == QuantFormat::Q6K) {
          const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h)));
          lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, cnt_lo), m3), 4));
          hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, cnt_hi), m3), 4));
        }
        if constexpr (F == QuantFormat::Q6K) {
          const __m512i il = h ? i3 : i2;
          const __m512i slo = _mm512_permutexvar_epi32(il, s32), shi = _mm512_permutexvar_epi32(_mm512_add_epi32(il, one), s32);
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            const int8_t* xo = xa[t] + b * QK + 128 * h;
            const __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xo));
            const __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(xo + 64));
            isum[t] = _mm512_add_epi32(isum[t], _mm512_add_epi32(_mm512_mullo_epi32(a, slo), _mm512_mullo_epi32(c, shi)));
          }
        } else {
          const __m512i sv = _mm512_permutexvar_epi32(h ? i1 : i0, s32);
          #pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            const int8_t* xo = xa[t] + b * QK + 128 * h;
            __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xo));
            a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512(xo + 64));
            isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(a, sv));
          }
        }
      }
      const __m512 vd = _mm512_set1_ps(half_to_float(sup[0]));
      if constexpr (F == QuantFormat::Q6K) {
        const __m256i sc16 = _mm256_cvtepi8_epi16(sraw);
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs16[t] + b * 16)));
          isum[t] = _mm512_sub_epi32(isum[t], _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
          accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), vd, accf[t]);
        }
      } else {
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + 8)));
        const __m128 vdm = _mm_set1_ps(half_to_float(sup[1]));
        #pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), vd, accf[t]);
          const __m128i mt = _mm_madd_epi16(m16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs32[t] + b * 8)));
          accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(mt), vdm, accm[t]);
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      float g[4];
      _mm_storeu_ps(g, accm[t]);
      y[(t0 + t) * ldy + n] =
          xq.scale[size_t(t0 + t)] * (_mm512_reduce_add_ps(accf[t]) - ((g[0] + g[1]) + (g[2] + g[3])));
    }
  }
}
#endif

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
#if defined(MK_ISA_AVX512)
constexpr int kTokens = 8;  // tokens sharing each unpacked code load
#else
constexpr int kTokens = 4;
#endif
constexpr int64_t kMaxTokens = 64;

template <QuantFormat F, int NT = kTokens>
void pass(int64_t nt, const QuantView& w, const KX& xq, int64_t t0, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (nt == NT) {
#if defined(MK_ISA_AVX512)
    if (vnni_available()) return gemv_vnni<F, NT>(w, xq, t0, n0, n1, y, ldy);
#endif
    // AVX2 handles 4 tokens at a time (16 ymm registers)
    for (int64_t t = t0; t < t0 + NT; t += 4) {
      const int64_t m = std::min<int64_t>(4, t0 + NT - t);
      if (m == 4) gemv_avx2<F, 4>(w, xq, t, n0, n1, y, ldy);
      else if (m == 3) gemv_avx2<F, 3>(w, xq, t, n0, n1, y, ldy);
      else if (m == 2) gemv_avx2<F, 2>(w, xq, t, n0, n1, y, ldy);
      else gemv_avx2<F, 1>(w, xq, t, n0, n1, y, ldy);
    }
  } else if constexpr (NT > 1) {
    pass<F, NT - 1>(nt, w, xq, t0, n0, n1, y, ldy);
  }
}

// Returns false (computing nothing) when x holds NaN or inf: the exact path propagates them.
template <QuantFormat F>
bool qgemm_int8x(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, T = p.tokens;
  const KX xq = prepare_x(x, ldx, T, w.cols);
  if (xq.nonfinite) return false;
  std::vector<float> y(static_cast<size_t>(T * N));
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  const int threads = threads_for(w, T);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * ROWS, n1 = std::min(N, n0 + ROWS);
    for (int64_t t0 = 0; t0 < T; t0 += kTokens)
      pass<F>(std::min<int64_t>(kTokens, T - t0), w, xq, t0, n0, n1, y.data(), N);
    for (int64_t t = 0; t < T; ++t) store_rows(p, bias, t, n0, n1, y.data() + t * N + n0);
  }
  return true;
}
#endif

template <QuantFormat F>
void qgemm_impl(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
  if (p.int8_activations && p.tokens <= kMaxTokens && qgemm_int8x<F>(p, x, ldx, bias)) return;
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
