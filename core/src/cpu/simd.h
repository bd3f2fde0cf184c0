// SIMD vector of floats for the CPU kernels, one definition per ISA level.
//
// Every file under core/src/cpu is compiled once per level with MK_ISA_AVX512, MK_ISA_AVX2 or
// neither defined, and MK_ISA_NS naming the namespace (generic / avx2 / avx512). Kernels are written
// once against VecF; the dispatch in core/src picks the namespace at run time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#if defined(MK_ISA_AVX512) || defined(MK_ISA_AVX2)
#include <immintrin.h>
#endif

#ifndef MK_ISA_NS
#error "core/src/cpu files must be compiled with MK_ISA_NS set (see CMakeLists.txt)"
#endif

namespace memkernels::cpu::MK_ISA_NS {

// std::vector whose data starts on a cache line, for scratch that kernels stream with full-vector
// loads: a 64-byte load that straddles two lines costs two, and malloc aligns to 16 bytes only.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

#if defined(MK_ISA_AVX512)
struct VecF {
  static constexpr int N = 16;
  __m512 v;
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a*b+c
  static VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
  static VecF min(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  // lanes where x < limit become 0
  static VecF zero_below(VecF x, VecF value, float limit) {
    __mmask16 keep = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(limit), _CMP_GE_OQ);
    return {_mm512_maskz_mov_ps(keep, value.v)};
  }
  static VecF round(VecF x) { return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // 2^n for integral-valued n in [-126, 127]
  static VecF pow2i(VecF n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
    return {_mm512_castsi512_ps(e)};
  }
};
#elif defined(MK_ISA_AVX2)
struct VecF {
  static constexpr int N = 8;
  __m256 v;
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
  static VecF min(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static VecF zero_below(VecF x, VecF value, float limit) {
    __m256 keep = _mm256_cmp_ps(x.v, _mm256_set1_ps(limit), _CMP_GE_OQ);
    return {_mm256_and_ps(keep, value.v)};
  }
  static VecF round(VecF x) { return {_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static VecF pow2i(VecF n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_castsi256_ps(e)};
  }
};
#else
// Portable fallback: plain arrays the compiler may vectorise for whatever the baseline ISA is.
struct VecF {
  static constexpr int N = 8;
  float v[N];
  static VecF zero() { return set1(0.0f); }
  static VecF set1(float x) { VecF r; for (int i = 0; i < N; ++i) r.v[i] = x; return r; }
  static VecF load(const float* p) { VecF r; std::memcpy(r.v, p, sizeof r.v); return r; }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
  template <typename Op>
  static VecF map2(VecF a, VecF b, Op op) { VecF r; for (int i = 0; i < N; ++i) r.v[i] = op(a.v[i], b.v[i]); return r; }
  friend VecF operator+(VecF a, VecF b) { return map2(a, b, [](float x, float y) { return x + y; }); }
  friend VecF operator-(VecF a, VecF b) { return map2(a, b, [](float x, float y) { return x - y; }); }
  friend VecF operator*(VecF a, VecF b) { return map2(a, b, [](float x, float y) { return x * y; }); }
  static VecF fma(VecF a, VecF b, VecF c) { VecF r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
  static VecF max(VecF a, VecF b) { return map2(a, b, [](float x, float y) { return x > y ? x : y; }); }
  static VecF min(VecF a, VecF b) { return map2(a, b, [](float x, float y) { return x < y ? x : y; }); }
  float reduce_add() const { float s = 0; for (float x : v) s += x; return s; }
  float reduce_max() const { float m = v[0]; for (float x : v) m = x > m ? x : m; return m; }
  static VecF zero_below(VecF x, VecF value, float limit) {
    VecF r; for (int i = 0; i < N; ++i) r.v[i] = x.v[i] >= limit ? value.v[i] : 0.0f; return r;
  }
  static VecF round(VecF x) { VecF r; for (int i = 0; i < N; ++i) r.v[i] = std::nearbyint(x.v[i]); return r; }
  static VecF pow2i(VecF n) {
    VecF r;
    for (int i = 0; i < N; ++i) {
      uint32_t bits = uint32_t(int32_t(n.v[i]) + 127) << 23;
      std::memcpy(&r.v[i], &bits, 4);
    }
    return r;
  }
};
#endif

// 2^x for x <= 127, relative error about 1e-7; exactly 0 for x < -126 (masked -inf scores give 0).
inline VecF exp2(VecF x) {
  VecF xc = VecF::min(VecF::max(x, VecF::set1(-126.0f)), VecF::set1(127.0f));
  VecF n = VecF::round(xc);
  VecF t = (xc - n) * VecF::set1(0.6931471805599453f);  // |t| <= 0.347
  // exp(t) by its Taylor series to t^7: truncation error < 6e-9
  VecF p = VecF::set1(1.0f / 5040);
  p = VecF::fma(p, t, VecF::set1(1.0f / 720));
  p = VecF::fma(p, t, VecF::set1(1.0f / 120));
  p = VecF::fma(p, t, VecF::set1(1.0f / 24));
  p = VecF::fma(p, t, VecF::set1(1.0f / 6));
  p = VecF::fma(p, t, VecF::set1(0.5f));
  p = VecF::fma(p, t, VecF::set1(1.0f));
  p = VecF::fma(p, t, VecF::set1(1.0f));
  return VecF::zero_below(x, p * VecF::pow2i(n), -126.0f);
}

// One row's online-softmax step in base 2 (flash attention and paged attention): the scores
// srow[0, width) (width a multiple of VecF::N, masked keys -inf) become exp2(s - m_new) in place, the
// running max m and sum l are updated, and the output row orow[0, dp) is rescaled by
// exp2(m - m_new). A row that has seen no visible key yet gets P = 0 and keeps m = -inf.
inline void online_softmax_row(float* srow, int width, float& m, float& l, float* orow, int dp) {
  VecF vmax = VecF::set1(-INFINITY);
  for (int c = 0; c < width; c += VecF::N) vmax = VecF::max(vmax, VecF::load(srow + c));
  const float m_new = std::fmax(m, vmax.reduce_max());
  if (m_new == -INFINITY) {
    std::memset(srow, 0, sizeof(float) * size_t(width));
    return;
  }
  const VecF vm = VecF::set1(m_new);
  VecF vsum = VecF::zero();
  for (int c = 0; c < width; c += VecF::N) {
    VecF e = exp2(VecF::load(srow + c) - vm);
    e.store(srow + c);
    vsum = vsum + e;
  }
  const float alpha = std::exp2(m - m_new);  // 0 when m was -inf
  l = l * alpha + vsum.reduce_add();
  m = m_new;
  if (alpha != 1.0f) {
    const VecF va = VecF::set1(alpha);
    for (int c = 0; c < dp; c += VecF::N) (VecF::load(orow + c) * va).store(orow + c);
  }
}

}  // namespace memkernels::cpu::MK_ISA_NS
