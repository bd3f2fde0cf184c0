// CPU paged attention (decode and prefill over cached pages), memory-bound design.
//
// A task is (sequence, block of query positions, range of kv heads, KV split); normally all kv
// heads, so a task sweeps whole tokens (kv_heads * head_dim contiguous elements) and memory is
// read in order, once. Its rows are every query head of those kv heads for those positions, so
// each K/V row is read once for the whole group. Keys are walked page by page in blocks of at most
// BK tokens (a block never crosses a page); for each block and kv head: S = q . k (vectorised over head_dim, one horizontal sum per row and key),
// mask (causal and sliding window; keys outside every row's window are skipped, not read),
// online softmax in base 2 (q is pre-scaled by scale * log2 e), O += P V with register
// accumulators. K/V are read straight from the pages in their own dtype (fp16/bf16 widened in
// registers) when head_dim is a multiple of the vector width; other head dims go through a small
// fp32 staging buffer. Long contexts with little other work are split across threads (split-KV):
// each piece keeps its unnormalised O, running max and sum, and a second pass merges them by LSE.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../paged_internal.h"
#include "../runtime_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int VL = VecF::N;
constexpr int RMAX = 64;  // rows per task (query heads x positions), unless one group is larger
constexpr int BK = 32;    // keys per online-softmax step
constexpr int MIN_SPLIT_KEYS = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };
struct I8 { int8_t v; };  // quantized pages (scaled outside the dot products)

template <typename T> inline float to_float1(const T& x);
template <> inline float to_float1<float>(const float& x) { return x; }
template <> inline float to_float1<F16>(const F16& x) { return half_to_float(x.bits); }
template <> inline float to_float1<BF16>(const BF16& x) { return bf16_to_float(x.bits); }
template <> inline float to_float1<I8>(const I8& x) { return float(x.v); }
template <typename T>
inline void row_to_floats(const T* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = to_float1(src[i]);
}

template <typename T> inline VecF load_vec(const T* p);
template <> inline VecF load_vec<float>(const float* p) { return VecF::load(p); }
template <> inline VecF load_vec<F16>(const F16* p) {
#if defined(MK_ISA_AVX512)
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
#elif defined(MK_ISA_AVX2)
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
#else
  float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = half_to_float(p[i].bits);
  return VecF::load(t);
#endif
}
template <> inline VecF load_vec<BF16>(const BF16* p) {
#if defined(MK_ISA_AVX512)
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
#elif defined(MK_ISA_AVX2)
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
#else
  float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = bf16_to_float(p[i].bits);
  return VecF::load(t);
#endif
}

// K/V rows of one kv head are head_dim elements every kv_heads * head_dim: a stride the hardware
// prefetcher does not follow across 4 KiB pages, so rows are prefetched by hand, a few keys ahead.
constexpr int PF = 8;
inline void prefetch_row(const void* p, int bytes) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

template <> inline VecF load_vec<I8>(const I8* p) {
#if defined(MK_ISA_AVX512)
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#elif defined(MK_ISA_AVX2)
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
#else
  float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = float(p[i].v);
  return VecF::load(t);
#endif
}

struct Task {
  int b, p0, p1, g0, g1;  // sequence, query positions [p0, p1), kv heads [g0, g1)
  int kv_lo, kv_hi;       // keys [kv_lo, kv_hi) of this split
  int split;              // index of this piece, -1 when the sequence is not split
  int64_t scratch;        // float offset of this piece's partial results
};

// Rows of a task are ordered (kv head, position, head in group): the rows of one kv head are
// contiguous, [gl * rpg, (gl + 1) * rpg) with rpg = positions * group.
struct State {
  int rows = 0, dp = 0;
  float* q;  // [rows][dp] pre-scaled
  float* o;  // [rows][dp]
  float* m;
  float* l;
  float* s;  // [rows][BK]
};

// S[r][j] = q_r . k_j for r in [ra, rb), j < nk; key j at kp[j] (a block may span pages).
// Prefetches the V rows of the block and the K rows PF keys ahead.
template <typename T>
inline void scores(State& st, int ra, int rb, const T* const* kp, int nk, const T* const* vp) {
  const int nv = st.dp / VL;
  const int row_bytes = st.dp * int(sizeof(T));
  for (int j = 0; j < nk; ++j) {
    const T* kj = kp[j];
    if (j + PF < nk) prefetch_row(kp[j + PF], row_bytes);
    if (vp) prefetch_row(vp[j], row_bytes);
    int r = ra;
    for (; r + 4 <= rb; r += 4) {
      VecF a0 = VecF::zero(), a1 = VecF::zero(), a2 = VecF::zero(), a3 = VecF::zero();
      const float* q0 = st.q + r * st.dp;
      for (int c = 0; c < nv; ++c) {
        VecF kv = load_vec(kj + c * VL);
        a0 = VecF::fma(VecF::load(q0 + c * VL), kv, a0);
        a1 = VecF::fma(VecF::load(q0 + st.dp + c * VL), kv, a1);
        a2 = VecF::fma(VecF::load(q0 + 2 * st.dp + c * VL), kv, a2);
        a3 = VecF::fma(VecF::load(q0 + 3 * st.dp + c * VL), kv, a3);
      }
      st.s[r * BK + j] = a0.reduce_add();
      st.s[(r + 1) * BK + j] = a1.reduce_add();
      st.s[(r + 2) * BK + j] = a2.reduce_add();
      st.s[(r + 3) * BK + j] = a3.reduce_add();
    }
    for (; r < rb; ++r) {
      VecF a = VecF::zero();
      const float* qr = st.q + r * st.dp;
      for (int c = 0; c < nv; ++c) a = VecF::fma(VecF::load(qr + c * VL), load_vec(kj + c * VL), a);
      st.s[r * BK + j] = a.reduce_add();
    }
  }
}

// O[r0:r0+R][c0:c0+NC vectors] += sum_j P[r][j] v_j, all in registers (compile-time tile).
template <int R, int NC, typename T>
inline void pv_tile(State& st, int r0, int c0, const T* const* vp, int nk) {
  VecF acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = VecF::load(st.o + (r0 + r) * st.dp + (c0 + c) * VL);
  for (int j = 0; j < nk; ++j) {
    const T* vj = vp[j] + c0 * VL;
    VecF vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load_vec(vj + c * VL);
    for (int r = 0; r < R; ++r) {
      VecF pj = VecF::set1(st.s[(r0 + r) * BK + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = VecF::fma(pj, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c].store(st.o + (r0 + r) * st.dp + (c0 + c) * VL);
}

template <int R, typename T>
inline void pv_rows(State& st, int r0, const T* const* vp, int nk) {
  const int nv = st.dp / VL;
  int c0 = 0;
  for (; c0 + 4 <= nv; c0 += 4) pv_tile<R, 4>(st, r0, c0, vp, nk);
  for (; c0 < nv; ++c0) pv_tile<R, 1>(st, r0, c0, vp, nk);
}

template <typename T>
inline void pv(State& st, int ra, int rb, const T* const* vp, int nk) {
  int r = ra;
  for (; r + 4 <= rb; r += 4) pv_rows<4>(st, r, vp, nk);
  for (; r + 2 <= rb; r += 2) pv_rows<2>(st, r, vp, nk);
  for (; r < rb; ++r) pv_rows<1>(st, r, vp, nk);
}

// Online-softmax update of rows [ra, rb) for a block of nk keys: P overwrites S, O is rescaled.
// A visible score that is NaN or +inf (NaN in q or k, q.k overflowing float32; masked keys are
// -inf) makes the whole row NaN in float64 (max - max = NaN), but the base-2 exp would turn it into
// a finite weight: the row is marked by a NaN sum instead, which every later update keeps (NaN *
// alpha + sum), and finish_task / the split merge write NaN output and lse for it.
inline void softmax_block(State& st, int ra, int rb, int nk) {
  for (int r = ra; r < rb; ++r) {
    float* srow = st.s + r * BK;
    for (int j = nk; j < BK; ++j) srow[j] = kNegInf;
    bool bad = false;
    for (int j = 0; j < nk; ++j) bad |= !(srow[j] < kInf);
    online_softmax_row(srow, BK, st.m[r], st.l[r], st.o + r * st.dp, st.dp);
    if (bad) st.l[r] = kNaN;
  }
}

struct RowMap {  // row r of a task -> (position, q head); the keys the task may see
  int p0, g0, group, rpg;
  int kv_lo = 0, kv_hi = 0;  // keys [kv_lo, kv_hi) of this split visible to some row of the task
  int all_lo = 0, all_hi = 0;  // keys [all_lo, all_hi) visible to every row (no mask needed)
  const PagedProblem* p = nullptr;
  int b = 0;
  int pos(int r) const { return p0 + (r % rpg) / group; }
  int head(int r) const { return (g0 + r / rpg) * group + (r % rpg) % group; }
  // Sets S to -inf for the keys [j0, j0 + nk) that rows [ra, rb) must not see.
  void mask(State& st, int ra, int rb, int j0, int nk) const {
    if (j0 >= all_lo && j0 + nk <= all_hi) return;
    for (int r = ra; r < rb; ++r) {
      const KeyRange k = p->keys(b, pos(r));
      float* srow = st.s + r * BK;
      for (int j = 0; j < nk; ++j)
        if (j0 + j < k.lo || j0 + j >= k.hi) srow[j] = kNegInf;
    }
  }
};

// Loads the task's query rows (pre-scaled, zero-padded to dp), resets its softmax state and
// returns its row map and visible key range. Rows are ordered by position, whose visible ranges
// only move right: the task sees [lo of its first position, hi of its last).
RowMap start_task(const PagedProblem& p, const Task& t, State& st) {
  const int D = p.head_dim, group = p.heads / p.kv_heads, dp = st.dp;
  const int rpg = (t.p1 - t.p0) * group;
  RowMap rm{t.p0, t.g0, group, rpg};
  const KeyRange first = p.keys(t.b, t.p0), last = p.keys(t.b, t.p1 - 1);
  rm.kv_lo = std::max(t.kv_lo, first.lo), rm.kv_hi = std::min(t.kv_hi, last.hi);
  rm.all_lo = last.lo, rm.all_hi = first.hi;
  rm.p = &p, rm.b = t.b;
  st.rows = rpg * (t.g1 - t.g0);
  const float q_scale = p.softcap > 0.0f ? p.scale : p.scale * kLog2e;
  const int esize = dtype_size(p.dtype);
  const char* qbase = static_cast<const char*>(p.q);
  for (int r = 0; r < st.rows; ++r) {
    float* dst = st.q + r * dp;
    load_floats(qbase + (int64_t(p.q0(t.b) + rm.pos(r)) * p.q_row + rm.head(r) * p.q_head) * esize, p.dtype, D, dst,
                q_scale);
    std::fill(dst + D, dst + dp, 0.0f);
    std::fill(st.o + r * dp, st.o + (r + 1) * dp, 0.0f);
    st.m[r] = kNegInf;
    st.l[r] = 0.0f;
  }
  return rm;
}

// Writes a task's result: a split's partial (unnormalised O, max in base 2, sum) to its scratch
// rows for the merge, or a whole task's normalised rows (and LSE, natural log) to the output.
void finish_task(const PagedProblem& p, const Task& t, const State& st, const RowMap& rm, float* scratch,
                 float* row) {
  const int D = p.head_dim, dp = st.dp, esize = dtype_size(p.dtype);
  if (t.split >= 0) {
    for (int r = 0; r < st.rows; ++r) {
      float* dst = scratch + t.scratch + int64_t(r) * (dp + 2);
      std::copy(st.o + r * dp, st.o + r * dp + D, dst);
      dst[D] = st.m[r];
      dst[D + 1] = st.l[r];
    }
    return;
  }
  char* out = static_cast<char*>(p.out);
  for (int r = 0; r < st.rows; ++r) {
    const int h = rm.head(r);
    const float l = st.l[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
    const bool nan_row = std::isnan(l);  // see softmax_block
    for (int d = 0; d < D; ++d) row[d] = nan_row ? kNaN : st.o[r * dp + d] * inv;
    const int64_t qrow = p.q0(t.b) + rm.pos(r);
    store_floats(row, p.dtype, D, out + (qrow * p.o_row + h * p.o_head) * esize);
    if (p.lse) p.lse[h * p.total_q + qrow] = nan_row ? kNaN : l > 0.0f ? st.m[r] * kLn2 + std::log(l) : kNegInf;
  }
}

template <typename T>
void run_task(const PagedProblem& p, const Task& t, State& st, float* kbuf, float* vbuf, float* scratch,
              float* row) {
  const int D = p.head_dim, dp = st.dp;
  const RowMap rm = start_task(p, t, st);
  const int rpg = rm.rpg, hi = rm.kv_hi;
  const bool capped = p.softcap > 0.0f;
  const int32_t* pages = p.kv_indices + p.kv_indptr[t.b];
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const bool direct = D % VL == 0;
  // Blocks of up to BK keys, gathered across pages through per-key offsets.
  int64_t koff[BK], voff[BK], kso[BK], vso[BK];
  const T* kps[BK];
  const T* vps[BK];
  const float* kfs[BK];
  const float* vfs[BK];
  for (int j = 0; j < BK; ++j) kfs[j] = kbuf + j * dp, vfs[j] = vbuf + j * dp;
  for (int j0 = rm.kv_lo; j0 < hi;) {  // keys outside the window are never read
    const int nk = std::min(BK, hi - j0);
    for (int j = 0; j < nk; ++j) {
      const int tok = j0 + j, page = pages[tok / p.page_size], in_page = tok % p.page_size;
      koff[j] = page * p.k_page + int64_t(in_page) * p.k_tok;
      voff[j] = page * p.v_page + int64_t(in_page) * p.v_tok;
      if (p.k_scale) kso[j] = page * p.ks_page + int64_t(in_page) * p.ks_tok, vso[j] = page * p.vs_page + int64_t(in_page) * p.vs_tok;
    }
    for (int g = t.g0; g < t.g1; ++g) {
      const int ra = (g - t.g0) * rpg, rb = ra + rpg;
      for (int j = 0; j < nk; ++j) kps[j] = kbase + koff[j] + g * p.k_head, vps[j] = vbase + voff[j] + g * p.v_head;
      if (direct) {
        scores(st, ra, rb, kps, nk, vps);
      } else {
        for (int j = 0; j < nk; ++j) {
          row_to_floats(kps[j], D, kbuf + j * dp);
          std::fill(kbuf + j * dp + D, kbuf + (j + 1) * dp, 0.0f);
          row_to_floats(vps[j], D, vbuf + j * dp);
          std::fill(vbuf + j * dp + D, vbuf + (j + 1) * dp, 0.0f);
        }
        scores(st, ra, rb, kfs, nk, static_cast<const float* const*>(nullptr));
      }
      if (p.k_scale)  // int8 pages: s = scale_k * (q . k_int8)
        for (int r = ra; r < rb; ++r)
          for (int j = 0; j < nk; ++j) st.s[r * BK + j] *= p.k_scale[kso[j] + g];
      if (capped)
        for (int r = ra; r < rb; ++r)
          for (int j = 0; j < nk; ++j) st.s[r * BK + j] = p.softcap * std::tanh(st.s[r * BK + j] / p.softcap) * kLog2e;
      rm.mask(st, ra, rb, j0, nk);
      if (direct && j0 + nk < hi) {  // the next block's first keys of this head
        const int nj = j0 + nk, cnt = std::min(PF, hi - nj);
        for (int j = 0; j < cnt; ++j) {
          const int tok = nj + j;
          prefetch_row(kbase + pages[tok / p.page_size] * p.k_page + int64_t(tok % p.page_size) * p.k_tok + g * p.k_head,
                       D * int(sizeof(T)));
        }
      }
      softmax_block(st, ra, rb, nk);
      if (p.v_scale)  // O += (p * scale_v) v_int8; the softmax sum already has the unscaled p
        for (int r = ra; r < rb; ++r)
          for (int j = 0; j < nk; ++j) st.s[r * BK + j] *= p.v_scale[vso[j] + g];
      if (direct)
        pv(st, ra, rb, vps, nk);
      else
        pv(st, ra, rb, vfs, nk);
    }
    j0 += nk;
  }

  finish_task(p, t, st, rm, scratch, row);
}

inline void unpack_codes(const uint8_t* src, int D, int bits, float* dst) {
  const int per_byte = 8 / bits, mask = (1 << bits) - 1;
  for (int d = 0; d < D; ++d) dst[d] = float((src[d / per_byte] >> ((d % per_byte) * bits)) & mask);
}

// KIVI pages: keys < nfull are packed codes (keys per channel: s = (q * k_scale) . code + q . k_zero;
// values per token: O += (p * v_scale) code + (sum p * v_zero)); later keys are float32 rows of the
// sequence's recent window. Codes are unpacked block by block into the fp32 staging rows.
void run_task_kivi(const PagedProblem& p, const Task& t, State& st, float* kbuf, float* vbuf, float* scratch,
                   float* row, float* qsbuf) {
  const int D = p.head_dim, dp = st.dp, ps = p.page_size;
  const int nfull = p.kv_len(t.b) / ps * ps;  // keys in whole (quantized) pages
  const RowMap rm = start_task(p, t, st);
  const int rpg = rm.rpg, hi = rm.kv_hi;
  const bool capped = p.softcap > 0.0f;
  const int32_t* pages = p.kv_indices + p.kv_indptr[t.b];
  const uint8_t* base = static_cast<const uint8_t*>(p.k);
  const int64_t code_row = int64_t(D) * p.kivi_bits / 8, row_elems = int64_t(p.kv_heads) * D;
  const float* kfs[BK];
  const float* vfs[BK];
  for (int j = 0; j < BK; ++j) kfs[j] = kbuf + j * dp, vfs[j] = vbuf + j * dp;
  std::vector<float> qz(size_t(st.rows)), vz_sum(size_t(st.rows));
  State sq = st;  // the same state with q replaced by q * k_scale
  sq.q = qsbuf;
  for (int j0 = rm.kv_lo; j0 < hi;) {
    const bool quant = j0 < nfull;
    const int nk = quant ? std::min({BK, hi - j0, ps - j0 % ps, nfull - j0}) : std::min(BK, hi - j0);
    const uint8_t* blk = base + pages[j0 / ps] * p.k_page;
    const float* ks = reinterpret_cast<const float*>(blk + p.kv_ks);
    const float* kz = reinterpret_cast<const float*>(blk + p.kv_kz);
    const float* vs = reinterpret_cast<const float*>(blk + p.kv_vs);
    const float* vz = reinterpret_cast<const float*>(blk + p.kv_vz);
    for (int g = t.g0; g < t.g1; ++g) {
      const int ra = (g - t.g0) * rpg, rb = ra + rpg;
      for (int j = 0; j < nk; ++j) {
        const int tok = (j0 + j) % ps;
        float* kd = kbuf + j * dp;
        float* vd = vbuf + j * dp;
        if (quant) {
          unpack_codes(blk + (int64_t(tok) * p.kv_heads + g) * code_row, D, p.kivi_bits, kd);
          unpack_codes(blk + p.kv_vc + (int64_t(tok) * p.kv_heads + g) * code_row, D, p.kivi_bits, vd);
        } else {
          const float* win = p.resid[t.b];
          std::copy(win + tok * row_elems + g * D, win + tok * row_elems + (g + 1) * D, kd);
          std::copy(win + int64_t(ps) * row_elems + tok * row_elems + g * D,
                    win + int64_t(ps) * row_elems + tok * row_elems + (g + 1) * D, vd);
        }
        std::fill(kd + D, kd + dp, 0.0f);
        std::fill(vd + D, vd + dp, 0.0f);
      }
      if (quant) {
        for (int r = ra; r < rb; ++r) {
          float z = 0.0f;
          for (int d = 0; d < D; ++d) {
            qsbuf[r * dp + d] = st.q[r * dp + d] * ks[g * D + d];
            z += st.q[r * dp + d] * kz[g * D + d];
          }
          std::fill(qsbuf + r * dp + D, qsbuf + (r + 1) * dp, 0.0f);
          qz[r] = z;
        }
        scores(sq, ra, rb, kfs, nk, static_cast<const float* const*>(nullptr));
        for (int r = ra; r < rb; ++r)
          for (int j = 0; j < nk; ++j) st.s[r * BK + j] += qz[r];
      } else {
        scores(st, ra, rb, kfs, nk, static_cast<const float* const*>(nullptr));
      }
      if (capped)
        for (int r = ra; r < rb; ++r)
          for (int j = 0; j < nk; ++j) st.s[r * BK + j] = p.softcap * std::tanh(st.s[r * BK + j] / p.softcap) * kLog2e;
      rm.mask(st, ra, rb, j0, nk);
      softmax_block(st, ra, rb, nk);
      if (quant) {
        for (int r = ra; r < rb; ++r) {
          float z = 0.0f;
          for (int j = 0; j < nk; ++j) {
            const int tok = (j0 + j) % ps;
            z += st.s[r * BK + j] * vz[tok * p.kv_heads + g];
            st.s[r * BK + j] *= vs[tok * p.kv_heads + g];
          }
          vz_sum[r] = z;
        }
      }
      pv(st, ra, rb, vfs, nk);
      if (quant)
        for (int r = ra; r < rb; ++r)
          for (int d = 0; d < D; ++d) st.o[r * dp + d] += vz_sum[r];
    }
    j0 += nk;
  }
  finish_task(p, t, st, rm, scratch, row);
}

}  // namespace

namespace {

// One thread's working rows: q, o, scores, running max / sum, staged K/V rows, KIVI's scaled q.
struct Buffers {
  std::vector<float> qbuf, obuf, sbuf, mbuf, lbuf, kbuf, vbuf, row, qsbuf;
  static void grow(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }
  void ensure(int max_rows, int dp, bool kivi) {  // sizes only grow: a reused buffer is not refilled
    grow(qbuf, size_t(max_rows) * dp), grow(obuf, size_t(max_rows) * dp), grow(sbuf, size_t(max_rows) * BK);
    grow(mbuf, size_t(max_rows)), grow(lbuf, size_t(max_rows)), grow(kbuf, size_t(BK) * dp);
    grow(vbuf, size_t(BK) * dp), grow(row, size_t(dp));
    if (kivi) grow(qsbuf, size_t(max_rows) * dp);
  }
  size_t floats() const {
    return qbuf.size() + obuf.size() + sbuf.size() + mbuf.size() + lbuf.size() + kbuf.size() + vbuf.size() +
           row.size() + qsbuf.size();
  }
  State state(int dp) {
    State st;
    st.dp = dp;
    st.q = qbuf.data(), st.o = obuf.data(), st.s = sbuf.data(), st.m = mbuf.data(), st.l = lbuf.data();
    return st;
  }
};
constexpr size_t kBuffersKept = size_t(1) << 20;  // floats a thread keeps between calls (4 MB)

}  // namespace

void paged_attention(const PagedProblem& p) {
  const int D = p.head_dim, dp = (D + VL - 1) / VL * VL;
  const int group = p.heads / p.kv_heads;
  // Rows per task: all heads for a few positions; kv heads split only when the heads exceed RMAX.
  const int nkv = std::max(1, std::min(p.kv_heads, RMAX / group));
  const int npos = std::max(1, RMAX / (nkv * group));
  const int max_rows = std::max(RMAX, group);
  const int kv_tasks = (p.kv_heads + nkv - 1) / nkv;
  // Keys [lo, hi) that positions [p0, p1) of sequence b see (visible ranges only move right).
  auto span = [&](int b, int p0, int p1) { return KeyRange{p.keys(b, p0).lo, p.keys(b, p1 - 1).hi}; };
  int64_t base_tasks = 0;
  int max_span = 0;  // the widest key range a sequence's queries see: a window bounds it, not the context
  int64_t macs = 0;  // q k^T and p v multiply-adds
  for (int b = 0; b < p.batch; ++b) {
    macs += int64_t(p.q_len(b)) * p.kv_len(b) * p.heads * D * 2;
    base_tasks += int64_t(kv_tasks) * ((p.q_len(b) + npos - 1) / npos);
    if (p.q_len(b) > 0) {
      const KeyRange k = span(b, 0, p.q_len(b));
      max_span = std::max(max_span, k.hi - k.lo);
    }
  }
  // A decode step over a short context (under ~256K multiply-adds) takes microseconds on one core,
  // less than starting an OpenMP team: it stays on the calling thread.
  const int threads = macs < (int64_t(1) << 18) ? 1 : num_threads();
  int splits = p.num_splits > 0 ? p.num_splits : 1;
  if (p.num_splits <= 0 && base_tasks < 2 * threads)
    splits = int(std::min<int64_t>((2 * threads + base_tasks - 1) / std::max<int64_t>(base_tasks, 1),
                                   std::max(1, max_span / MIN_SPLIT_KEYS)));
  splits = std::max(1, std::min(splits, std::max(1, max_span)));

  std::vector<Task> tasks;
  tasks.reserve(size_t(base_tasks) * splits);
  int64_t scratch_floats = 0;
  struct Merge { Task t; int nsplit; };
  std::vector<Merge> merges;
  for (int b = 0; b < p.batch; ++b) {
    const int qlen = p.q_len(b), kvlen = p.kv_len(b);
    for (int g0 = 0; g0 < p.kv_heads; g0 += nkv)
      for (int p0 = 0; p0 < qlen; p0 += npos) {
        const int p1 = std::min(qlen, p0 + npos), g1 = std::min(p.kv_heads, g0 + nkv);
        // Split the keys this task sees (not the whole context) into pieces of at least BK keys.
        const KeyRange k = span(b, p0, p1);
        const int n = k.hi - k.lo;
        const int ns = splits > 1 ? std::max(1, std::min(splits, (n + BK - 1) / BK)) : 1;
        if (ns == 1) {
          tasks.push_back({b, p0, p1, g0, g1, 0, kvlen, -1, 0});
          continue;
        }
        const int chunk = (n + ns - 1) / ns;
        const int64_t piece = int64_t(p1 - p0) * (g1 - g0) * group * (dp + 2);
        merges.push_back({{b, p0, p1, g0, g1, 0, kvlen, -1, scratch_floats}, ns});
        for (int s = 0; s < ns; ++s) {  // a piece that sees no key leaves l = 0: the merge skips it
          tasks.push_back({b, p0, p1, g0, g1, k.lo + int(std::min<int64_t>(n, int64_t(s) * chunk)),
                           k.lo + int(std::min<int64_t>(n, int64_t(s + 1) * chunk)), s,
                           scratch_floats});
          scratch_floats += piece;
        }
      }
  }
  std::vector<float> scratch(static_cast<size_t>(scratch_floats));
  const int ntasks = int(tasks.size()), nmerge = int(merges.size());

  auto run_one = [&](int i, Buffers& bf, State& st) {
    const Task& t = tasks[i];
    if (p.kivi_bits) {
      run_task_kivi(p, t, st, bf.kbuf.data(), bf.vbuf.data(), scratch.data(), bf.row.data(), bf.qsbuf.data());
      return;
    }
    switch (p.kv_dtype) {
      case DType::Int8: run_task<I8>(p, t, st, bf.kbuf.data(), bf.vbuf.data(), scratch.data(), bf.row.data()); break;
      case DType::Float16: run_task<F16>(p, t, st, bf.kbuf.data(), bf.vbuf.data(), scratch.data(), bf.row.data()); break;
      case DType::BFloat16: run_task<BF16>(p, t, st, bf.kbuf.data(), bf.vbuf.data(), scratch.data(), bf.row.data()); break;
      default: run_task<float>(p, t, st, bf.kbuf.data(), bf.vbuf.data(), scratch.data(), bf.row.data()); break;
    }
  };
  // Merges split pieces by their log-sum-exp.
  auto merge_one = [&](int i, Buffers& bf) {
    const Merge& mg = merges[i];
    const Task& t = mg.t;
    const int rpg = (t.p1 - t.p0) * group, rows = rpg * (t.g1 - t.g0);
    const RowMap rm{t.p0, t.g0, group, rpg};
    const int64_t piece = int64_t(rows) * (dp + 2);
    const int esize = dtype_size(p.dtype);
    float* row = bf.row.data();
    for (int r = 0; r < rows; ++r) {
      float mmax = kNegInf;
      bool nan_row = false;  // a piece saw a NaN or +inf score (see softmax_block)
      for (int s = 0; s < mg.nsplit; ++s) {
        const float* src = scratch.data() + t.scratch + s * piece + int64_t(r) * (dp + 2);
        if (src[D + 1] > 0.0f) mmax = std::max(mmax, src[D]);
        nan_row |= std::isnan(src[D + 1]);
      }
      std::fill(row, row + D, 0.0f);
      float l = 0.0f;
      if (mmax != kNegInf) {
        for (int s = 0; s < mg.nsplit; ++s) {
          const float* src = scratch.data() + t.scratch + s * piece + int64_t(r) * (dp + 2);
          if (!(src[D + 1] > 0.0f)) continue;
          const float w = std::exp2(src[D] - mmax);
          l += src[D + 1] * w;
          for (int d = 0; d < D; ++d) row[d] += src[d] * w;
        }
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (int d = 0; d < D; ++d) row[d] = nan_row ? kNaN : row[d] * inv;
      const int h = rm.head(r);
      const int64_t qrow = p.q0(t.b) + rm.pos(r);
      store_floats(row, p.dtype, D, static_cast<char*>(p.out) + (qrow * p.o_row + h * p.o_head) * esize);
      if (p.lse) p.lse[h * p.total_q + qrow] = nan_row ? kNaN : l > 0.0f ? mmax * kLn2 + std::log(l) : kNegInf;
    }
  };

  if (threads == 1) {
    // No OpenMP region (entering one costs microseconds even with one thread), and the buffers of
    // the previous call on this thread: a decode step over a short context takes a few microseconds.
    thread_local Buffers cache;
    cache.ensure(max_rows, dp, p.kivi_bits != 0);
    State st = cache.state(dp);
    for (int i = 0; i < ntasks; ++i) run_one(i, cache, st);
    for (int i = 0; i < nmerge; ++i) merge_one(i, cache);
    if (cache.floats() > kBuffersKept) cache = Buffers();  // a huge group: give it back
    return;
  }

  // An exception leaving the region would call std::terminate: the per-thread buffers (a group of
  // 2^26 query heads needs tens of GiB) and the tasks run through the guard, rethrown after it.
  ParallelGuard guard;
#pragma omp parallel num_threads(threads)
  {
    Buffers bf;
    const bool ok = guard.run([&] { bf.ensure(max_rows, dp, p.kivi_bits != 0); });
    State st = bf.state(dp);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < ntasks; ++i) {
      if (!ok || guard.failed()) continue;
      guard.run([&] { run_one(i, bf, st); });  // run_task_kivi allocates
    }
#pragma omp for schedule(static)
    for (int i = 0; i < nmerge; ++i) {
      if (!ok || guard.failed()) continue;
      merge_one(i, bf);
    }
  }
  guard.rethrow();
}

}  // namespace memkernels::cpu::MK_ISA_NS
