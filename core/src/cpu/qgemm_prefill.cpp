// CPU prefill GEMM for quantized weights (tens to hundreds of tokens): dequantize each weight once
// per call, then run a register-blocked dense micro-kernel over every token.
//
// The decode paths of qgemm.cpp unpack the codes inside the dot product, which is right for a few
// tokens but redoes the unpacking and the per-group scale work for every pass of 4-8 tokens. Here a
// task owns a block of RB weight rows; K is cut into slices of KC weights, and each slice of the
// block is dequantized once, in one call for the RB rows (so a CPU row-interleaved 16-row block is
// never split between calls), into a tile that stays in L1/L2 while every token streams over it,
// kAcc rows per micro-kernel pass. Weights come only through the layout's own entry points
// (quant_internal.h): dequantize_rows (fp32, every format) or, for bf16, dequantize_rows_bf16 where
// the layout has a fast route (int8, and 4-bit codes: a 16-entry bf16 table per group and one
// permute per 32 weights), else dequantize_rows then a conversion. So every format works, whatever
// its packing.
//
// Micro-kernel layout: output lanes are tokens. x is transposed once per call into blocks of L
// tokens (L = the vector width: 16 on AVX-512, 8 otherwise): xT[block][k][lane]. One step of the
// micro-kernel broadcasts the weight w[r][k] of each of R rows and multiplies it with the TB token
// vectors of x[k], so the weight tile is read in its natural row order (no transposition of the
// dequantized weights) and the accumulators acc[r][tb] hold finished outputs (no horizontal sums).
//   - bf16 (AVX512-BF16, approximate activations allowed): the tile and x are rounded to bf16 and
//     vdpbf16ps takes two k at a time: the tile's 32-bit word (w[r][2j], w[r][2j+1]) is broadcast,
//     and xT holds the pair (x[t][2j], x[t][2j+1]) per lane. Products of two bf16 are exact in fp32.
//   - fp32 (every ISA; the exact path): fp32 tile and x, one FMA per k. Exact up to fp32 rounding.
// Tokens are padded to whole blocks with zeros; a last bf16 block of 8 tokens or fewer runs on 8
// lanes (ymm). Threads split the row blocks. Error bound of the bf16 path: memkernels/quant.h.
// Token counts where this path takes over from qgemm.cpp's: min_tokens below.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../quant_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int L = VecF::N;     // tokens per vector
constexpr int64_t KC = 256;    // weights per K slice (dequantize_rows takes 256-aligned slices)
constexpr int64_t DR = 4;      // rows per dequantize_rows call when staging fp32 for bf16 (in L1)
#if defined(MK_ISA_AVX512)
constexpr int kAcc = 24;       // accumulators per micro-kernel (32 zmm: 24 + token vectors + broadcast)
#else
constexpr int kAcc = 12;       // 16 ymm
#endif
constexpr int kMaxTB = 4;      // token blocks per micro-kernel call at most
constexpr int64_t RB = 2 * kAcc;  // rows per task (a multiple of every R = kAcc / TB)

// y[r * ldy + tb * L + lane] += sum_k w[r * KC + k] * xb[tb * xstride + k * L + lane],
// r < R, tb < TB, k < kn: fp32 FMA.
template <int R, int TB>
void micro_f32(const float* w, const float* xb, int64_t xstride, int64_t kn, float* y, int64_t ldy) {
  VecF acc[R][TB];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) acc[r][tb] = VecF::zero();
  for (int64_t k = 0; k < kn; ++k) {
    VecF xv[TB];
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) xv[tb] = VecF::load(xb + tb * xstride + k * L);
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const VecF wb = VecF::set1(w[r * KC + k]);
      #pragma GCC unroll 4
      for (int tb = 0; tb < TB; ++tb) acc[r][tb] = VecF::fma(wb, xv[tb], acc[r][tb]);
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) {
      float* d = y + r * ldy + tb * L;
      (VecF::load(d) + acc[r][tb]).store(d);
    }
}

#if defined(MK_ISA_AVX512)
bool bf16_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
}

// The bf16 form: w is a bf16 tile (rows KC apart), xb holds 32-bit pairs of bf16 per token lane:
// xb[tb * xstride + j * 16 + lane] = (x[2j], x[2j + 1]); kp = pairs in the slice.
template <int R, int TB>
__attribute__((target("avx512bf16"))) void micro_bf16(const uint16_t* w, const uint32_t* xb, int64_t xstride,
                                                      int64_t kp, float* y, int64_t ldy) {
  __m512 acc[R][TB];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) acc[r][tb] = _mm512_setzero_ps();
  for (int64_t j = 0; j < kp; ++j) {
    __m512bh xv[TB];
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) xv[tb] = (__m512bh)_mm512_loadu_si512(xb + tb * xstride + j * 16);
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, w + r * KC + 2 * j, 4);
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(pair);
      #pragma GCC unroll 4
      for (int tb = 0; tb < TB; ++tb) acc[r][tb] = _mm512_dpbf16_ps(acc[r][tb], wb, xv[tb]);
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int tb = 0; tb < TB; ++tb) {
      float* d = y + r * ldy + tb * 16;
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[r][tb]));
    }
}

// The last token block when it holds 8 tokens or fewer: the same step on 8 lanes (ymm, half the
// work of a 16-lane block on Zen 4's 256-bit pipes), R rows, y lanes 0-7.
template <int R>
__attribute__((target("avx512bf16,avx512vl"))) void micro_bf16_half(const uint16_t* w, const uint32_t* xb, int64_t kp,
                                                                     float* y, int64_t ldy) {
  __m256 acc[R];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < kp; ++j) {
    const __m256bh xv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j * 16));
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, w + r * KC + 2 * j, 4);
      acc[r] = _mm256_dpbf16_ps(acc[r], (__m256bh)_mm256_set1_epi32(pair), xv);
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(_mm256_loadu_ps(y + r * ldy), acc[r]));
}

// n floats (a multiple of 32) to bf16, round to nearest even (vcvtne2ps2bf16).
__attribute__((target("avx512bf16"))) void to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
}
#else
inline bool bf16_available() { return false; }
#endif

// Calls micro<R = kAcc / TB, TB> for a runtime TB in [1, kMaxTB] over the kAcc tile rows from g0,
// for the token blocks tb0 .. tb0 + TB.
template <bool BF16, int TB>
void micro_rows(const void* tile, int64_t g0, const void* xT, int64_t xstride, int64_t k0, int64_t kn, int64_t tb0,
                float* yacc, int64_t ldy) {
  constexpr int R = kAcc / TB;
  for (int64_t r0 = g0; r0 < g0 + kAcc; r0 += R) {
    float* y = yacc + r0 * ldy + tb0 * L;
    if constexpr (BF16) {
#if defined(MK_ISA_AVX512)
      micro_bf16<R, TB>(static_cast<const uint16_t*>(tile) + r0 * KC,
                        static_cast<const uint32_t*>(xT) + tb0 * xstride + k0 / 2 * 16, xstride, kn / 2, y, ldy);
#endif
    } else {
      micro_f32<R, TB>(static_cast<const float*>(tile) + r0 * KC,
                       static_cast<const float*>(xT) + tb0 * xstride + k0 * L, xstride, kn, y, ldy);
    }
  }
}

template <bool BF16>
void prefill(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const QuantView& w = p.w;
  const int64_t N = w.rows, K = w.cols, T = p.tokens;
  const int64_t nb = (T + L - 1) / L, ldy = nb * L;  // token blocks; tokens padded with zeros
  // x transposed into token blocks. bf16: xT[b][K / 2][16] words of two bf16; fp32: xT[b][K][L].
  const int64_t xstride = BF16 ? K / 2 * 16 : K * L;  // per token block, in words / floats
  AlignedVector<uint32_t> xT32;
  AlignedVector<float> xTf;
  const void* xT;
  if constexpr (BF16) {
#if defined(MK_ISA_AVX512)
    xT32.assign(size_t(nb * xstride), 0u);
    std::vector<uint16_t> row(static_cast<size_t>(K));
    for (int64_t t = 0; t < T; ++t) {
      to_bf16(x + t * ldx, K, row.data());
      uint32_t* d = xT32.data() + (t / L) * xstride + t % L;
      for (int64_t j = 0; j < K / 2; ++j) d[j * 16] = uint32_t(row[2 * j]) | uint32_t(row[2 * j + 1]) << 16;
    }
#endif
    xT = xT32.data();
  } else {
    xTf.assign(size_t(nb * xstride), 0.0f);
    for (int64_t t = 0; t < T; ++t) {
      float* d = xTf.data() + (t / L) * xstride + t % L;
      for (int64_t k = 0; k < K; ++k) d[k * L] = x[t * ldx + k];
    }
    xT = xTf.data();
  }

  const int64_t blocks = (N + RB - 1) / RB;
  const int threads = threads_for_macs(N * K * T);
  ParallelGuard guard;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    AlignedVector<float> ftile, yacc;
    AlignedVector<uint16_t> btile;
    guard.run([&] {
      ftile.resize(size_t((BF16 ? DR : RB) * KC));
      if (BF16) btile.resize(size_t(RB * KC));
      yacc.resize(size_t(RB * ldy));
    });
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      if (guard.failed()) continue;
      const int64_t n0 = b * RB, n1 = std::min(N, n0 + RB), nr = n1 - n0;
      const int64_t rows = (nr + kAcc - 1) / kAcc * kAcc;  // micro-kernel rows; the padding is zeros
      std::fill(yacc.begin(), yacc.begin() + rows * ldy, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kn = std::min(KC, K - k0);
        // fp32, or bf16 with a direct route: the whole block's rows in one call (blocks start on
        // multiples of 48, so interleaved 16-row blocks are never split between two calls)
        bool direct = !BF16;
        if constexpr (BF16) {
#if defined(MK_ISA_AVX512)
          direct = dequantize_rows_bf16(w, n0, n1, k0, k0 + kn, btile.data(), KC);
          for (int64_t i = nr; direct && i < rows; ++i) std::memset(btile.data() + i * KC, 0, size_t(kn) * 2);
#endif
        } else {
          dequantize_rows(w, n0, n1, k0, k0 + kn, ftile.data(), KC);
          for (int64_t i = nr; i < rows; ++i) std::memset(ftile.data() + i * KC, 0, size_t(kn) * 4);
        }
        for (int64_t g0 = 0; g0 < rows; g0 += kAcc) {
          const int64_t ge = std::min(nr, g0 + kAcc);  // rows past nr: zeros
          const void* tile;
          if constexpr (BF16) {
#if defined(MK_ISA_AVX512)
            for (int64_t r = g0; !direct && r < g0 + kAcc; r += DR) {
              const int64_t re = std::min(ge, r + DR);
              if (r < re) dequantize_rows(w, n0 + r, n0 + re, k0, k0 + kn, ftile.data(), KC);
              for (int64_t i = r; i < r + DR; ++i) {
                uint16_t* d = btile.data() + i * KC;
                if (i < ge) to_bf16(ftile.data() + (i - r) * KC, kn, d);
                else std::memset(d, 0, size_t(kn) * 2);
              }
            }
#endif
            tile = btile.data();
          } else {
            tile = ftile.data();
          }
          // every token block against these rows, kMaxTB blocks per micro-kernel call (bf16: a last
          // block of 8 tokens or fewer on its own, 8 lanes wide)
          const bool half = BF16 && T - (nb - 1) * L <= 8;
          const int64_t nbf = half ? nb - 1 : nb;
#if defined(MK_ISA_AVX512)
          if (half)
            micro_bf16_half<kAcc>(static_cast<const uint16_t*>(tile) + g0 * KC,
                                  xT32.data() + (nb - 1) * xstride + k0 / 2 * 16, kn / 2,
                                  yacc.data() + g0 * ldy + (nb - 1) * L, ldy);
#endif
          int64_t tb0 = 0;
          for (; tb0 + kMaxTB <= nbf; tb0 += kMaxTB)
            micro_rows<BF16, kMaxTB>(tile, g0, xT, xstride, k0, kn, tb0, yacc.data(), ldy);
          switch (nbf - tb0) {
            case 1: micro_rows<BF16, 1>(tile, g0, xT, xstride, k0, kn, tb0, yacc.data(), ldy); break;
            case 2: micro_rows<BF16, 2>(tile, g0, xT, xstride, k0, kn, tb0, yacc.data(), ldy); break;
            case 3: micro_rows<BF16, 3>(tile, g0, xT, xstride, k0, kn, tb0, yacc.data(), ldy); break;
            default: break;
          }
        }
      }
      // out[t][n0 + i] = yacc[i][t] (+ bias)
      float v[RB];
      const int es = dtype_size(p.dtype);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < nr; ++i) v[i] = yacc[size_t(i * ldy + t)] + (bias ? bias[n0 + i] : 0.0f);
        store_floats(v, p.dtype, nr, static_cast<char*>(p.out) + (t * p.out_row + n0) * es);
      }
    }
  }
  guard.rethrow();
}

// Token counts from which this path runs (measured against the other paths on Zen 4, one thread,
// bench/qgemm.py --prefill): the dequantize-once fp32 kernel beats the exact decode path from one
// full token block (8 lanes; on AVX-512 from 12, a 16-token block half used). With approximate
// activations allowed, formats with an int8 integer-dot path (those in the CPU row-interleaved
// layout, on CPUs with AVX512-VNNI or AVX2) keep it up to 64 tokens; on AVX512-BF16 the bf16 kernel
// takes over from 32. The int8 path is 1.6-2.5x faster than bf16 at 32-128 tokens, but its int8 x
// costs accuracy that a prompt exposes (SmolLM2-135M, 512 tokens on the int8 path, bench/
// qgemm_quality.py: top-1 agreement with the exact logits 95.3%, mean KL 3.7e-3 with one x scale
// per token and weight group; 88.7%, 4.5e-2 with one per token; bf16: 99.2%, 2.0e-4).
// MEMKERNELS_INT8_MAX_TOKENS=n (int8_max_tokens_override) moves the boundary to n + 1 for such
// measurements. Formats without an int8 path take the bf16 / fp32 kernel from 12 / 8 tokens.
int64_t min_tokens(const QGemmProblem& p, bool bf16) {
  // the matrices with an int8-activation kernel: those in the CPU row-interleaved layout (cpu/qgemm.cpp)
  const bool int8_format = p.w.ilv != 0;
  const int64_t fp32_min = L == 16 ? 12 : 8;
  if (!p.int8_activations) return fp32_min;
#if defined(MK_ISA_AVX512)
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  const bool int8_path = vnni;
#elif defined(MK_ISA_AVX2)
  const bool int8_path = true;
#else
  const bool int8_path = false;
#endif
  const int64_t forced = int8_max_tokens_override();  // MEMKERNELS_INT8_MAX_TOKENS (quant_internal.h)
  if (forced && int8_format && int8_path) return forced + 1;
  if (bf16) return int8_format ? 32 : 12;
  return int8_format && int8_path ? 65 : fp32_min;
}

}  // namespace

bool qgemm_prefill(const QGemmProblem& p, const float* x, int64_t ldx, const float* bias) {
  const bool bf16 = p.int8_activations && bf16_available();
  if (p.tokens < min_tokens(p, bf16)) return false;
  if (bf16) prefill<true>(p, x, ldx, bias);
  else prefill<false>(p, x, ldx, bias);
  return true;
}

}  // namespace memkernels::cpu::MK_ISA_NS
