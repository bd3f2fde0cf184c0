// CPU flash attention: tiled online softmax (FlashAttention-2 order) over fp32 register tiles.
//
// Work is split into tasks of BQ query rows of one (batch, head). K and V of one (batch, kv_head)
// are first converted to fp32 and packed once, shared by every query head of the group:
//   K^T in panels of NR keys: [panel][d][NR], so S = Q K^T streams it linearly;
//   V   row-major with the head dim padded to the vector width: [key][Dp].
// Each task then walks key blocks of BK: S = Q K^T (MR x NR register tiles), mask, online softmax
// in base 2 (Q is pre-scaled by scale*log2(e)), O += P V (MR x 2 vectors tiles). Extra memory is
// O(seq_k * head_dim) for the packed K/V plus O(BQ * (BK + head_dim)) per thread.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../attention_internal.h"
#include "convert.h"
#include "simd.h"

namespace memkernels::cpu::MK_ISA_NS {
namespace {

constexpr int VL = VecF::N;
constexpr int NR = 2 * VL;  // keys per K^T panel = columns of one S register tile
#if defined(MK_ISA_AVX512)
constexpr int MR = 8;       // query rows per register tile (8 x 2 accumulators of 32 zmm)
#else
constexpr int MR = 4;       // 16 ymm registers: 4 x 2 accumulators
#endif
constexpr int BQ = 64;      // query rows per task
constexpr int BK = 64;      // keys per online-softmax step (multiple of NR)
static_assert(BK % NR == 0 && BQ % MR == 0, "tile sizes");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// S[r][0:NR] = sum_d Q[r][d] * Kt[d][0:NR] for r < MR.
inline void qk_tile(const float* q, int64_t ldq, const float* kt, int head_dim, float* s, int lds) {
  VecF acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = VecF::zero();
  for (int d = 0; d < head_dim; ++d) {
    VecF k0 = VecF::load(kt + int64_t(d) * NR), k1 = VecF::load(kt + int64_t(d) * NR + VL);
    for (int r = 0; r < MR; ++r) {
      VecF qv = VecF::set1(q[r * ldq + d]);
      acc[r][0] = VecF::fma(qv, k0, acc[r][0]);
      acc[r][1] = VecF::fma(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    acc[r][0].store(s + r * lds);
    acc[r][1].store(s + r * lds + VL);
  }
}

// O[r][0:NV*VL] += sum_j P[r][j] * V[j][0:NV*VL] for r < MR, j < nkeys.
template <int NV>
inline void pv_tile(const float* p, int ldp, const float* v, int64_t ldv, int nkeys, float* o, int64_t ldo) {
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = VecF::load(o + r * ldo + c * VL);
  for (int j = 0; j < nkeys; ++j) {
    VecF vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = VecF::load(v + int64_t(j) * ldv + c * VL);
    for (int r = 0; r < MR; ++r) {
      VecF pj = VecF::set1(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = VecF::fma(pj, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c].store(o + r * ldo + c * VL);
}

const char* elem_ptr(const void* base, DType t, int64_t offset) {
  return static_cast<const char*>(base) + offset * dtype_size(t);
}

// Packs K^T panels and padded V rows of one (batch, kv_head) for keys [j0, j1). Keys the key mask
// drops are packed as zeros, never read: padding often holds garbage (NaN, inf), and a masked key's
// weight 0 times a NaN value would still poison the row.
void pack_kv(const AttentionProblem& p, int b, int kvh, int j0, int j1, int dp, float* kt, float* vp, float* row) {
  const int D = p.head_dim;
  const int64_t k_base = b * p.k_batch + p.row0_k(b) * p.k_row + kvh * p.k_head;
  const int64_t v_base = b * p.v_batch + p.row0_k(b) * p.v_row + kvh * p.v_head;
  const uint8_t* mask = p.mask_row(b);
  for (int j = j0; j < j1; ++j) {
    float* panel = kt + int64_t(j / NR) * D * NR + j % NR;
    float* vrow = vp + int64_t(j) * dp;
    if (mask && !mask[j * p.mask_col]) {
      for (int d = 0; d < D; ++d) panel[int64_t(d) * NR] = 0.0f;
      std::fill(vrow, vrow + dp, 0.0f);
      continue;
    }
    load_floats(elem_ptr(p.k, p.dtype, k_base + j * p.k_row), p.dtype, D, row);
    for (int d = 0; d < D; ++d) panel[int64_t(d) * NR] = row[d];
    load_floats(elem_ptr(p.v, p.dtype, v_base + j * p.v_row), p.dtype, D, vrow);
    std::fill(vrow + D, vrow + dp, 0.0f);
  }
}

// Key mask over keys [kb, kb + nk): 0 when every key is dropped (the block is skipped), 1 when
// every key is kept (nothing to mask), 2 when mixed (`keep` gets one flag per key).
inline int mask_block(const uint8_t* mask, int64_t stride, int kb, int nk, uint8_t* keep) {
  int kept = 0;
  for (int c = 0; c < nk; ++c) kept += (keep[c] = mask[(kb + c) * stride] != 0);
  return kept == 0 ? 0 : kept == nk ? 1 : 2;
}

// A float buffer left uninitialised: every scratch row below is written before it is read, and
// zero-filling them (tens of KB) was a visible part of a decode-sized call.
struct Buf {
  std::unique_ptr<float[]> p;
  size_t n = 0;
  explicit Buf(size_t size) : p(new float[size]), n(size) {}
  float* data() { return p.get(); }
  float* begin() { return p.get(); }
  float* end() { return p.get() + n; }
  float& operator[](size_t i) { return p[i]; }
};

struct Scratch {
  Buf q, s, o, m, l, row;
  std::vector<uint8_t> nonfinite;  // per row: a visible score was NaN or +inf
  uint8_t keep[BK];                // key mask flags of the current key block
  int head_dim, dp;
  Scratch(int head_dim_, int dp_)
      : q(size_t(BQ) * head_dim_), s(size_t(BQ) * BK), o(size_t(BQ) * dp_), m(BQ), l(BQ), row(std::max(head_dim_, dp_)),
        nonfinite(BQ), head_dim(head_dim_), dp(dp_) {}
};

// True when a score of the row is NaN or +inf (masked keys are -inf). In float64 such a score makes
// the whole softmax row NaN (max - max = NaN); the base-2 exp below would turn it into a finite
// weight, so the caller records it and writes NaN.
inline bool has_nan_or_posinf(const float* srow, int width) {
  bool bad = false;
  for (int c = 0; c < width; ++c) bad |= !(srow[c] < std::numeric_limits<float>::infinity());
  return bad;
}

// One task: query rows [i0, i0 + BQ) of head h in batch b, against packed K/V of its kv head.
// Rows are (position, head) pairs, position-major: row r is query i0 + r / ng of head h0 + r % ng.
// Heads h0 .. h0 + ng - 1 share one kv head; grouping them fills the register tiles when there are
// few positions (a decode step: one position, `group` heads), one head per task otherwise.
void attend_block(const AttentionProblem& p, int b, int h0, int ng, int i0, int npos, const float* kt, const float* vp,
                  int dp, Scratch& w) {
  const int D = p.head_dim, Sq = p.seq_q(b), Sk = p.seq_k(b), off = Sk - Sq;
  const int nrows = npos * ng, rows_pad = int(round_up(nrows, MR));
  const bool capped = p.softcap > 0.0f;
  const float q_scale = capped ? p.scale : p.scale * kLog2e;

  // Q rows, pre-scaled, zero-padded to a multiple of MR rows.
  const int64_t q_base = b * p.q_batch + p.row0_q(b) * p.q_row;
  for (int r = 0; r < rows_pad; ++r) {
    float* dst = w.q.data() + int64_t(r) * D;
    if (r < nrows)
      load_floats(elem_ptr(p.q, p.dtype, q_base + int64_t(i0 + r / ng) * p.q_row + int64_t(h0 + r % ng) * p.q_head),
                  p.dtype, D, dst, q_scale);
    else
      std::fill(dst, dst + D, 0.0f);
  }
  std::fill(w.o.begin(), w.o.begin() + size_t(rows_pad) * dp, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.nonfinite.begin(), w.nonfinite.end(), uint8_t(0));

  // Keys any row of this block may see. Window bounds are in 64-bit: near INT_MAX they mean
  // "unbounded" and must not wrap around (which masked every key).
  const int64_t first = int64_t(i0) + off, last = first + npos - 1;  // positions of the first/last row
  const int64_t wl = p.window_left, wr = p.window_right;
  const int lo = wl >= 0 ? int(std::max<int64_t>(0, first - wl)) : 0;
  const int hi = wr >= 0 ? int(std::max<int64_t>(0, std::min<int64_t>(Sk, last + wr + 1))) : Sk;

  const uint8_t* kmask = p.mask_row(b);
  for (int kb = lo / BK * BK; kb < hi; kb += BK) {
    const int nk = std::min(BK, Sk - kb);
    const int kmode = kmask ? mask_block(kmask, p.mask_col, kb, nk, w.keep) : 1;
    if (kmode == 0) continue;  // every key of the block is padding
    float* S = w.s.data();
    // Columns past the last key's panel are not computed: the mask below sets them to -inf.
    const int ncols = int(round_up(nk, NR));
    for (int r = 0; r < rows_pad; r += MR)
      for (int c = 0; c < ncols; c += NR)
        qk_tile(w.q.data() + int64_t(r) * D, D, kt + int64_t((kb + c) / NR) * D * NR, D, S + r * BK + c, BK);

    if (capped) {  // softcap * tanh(s / softcap), then to base-2 units
      for (int r = 0; r < nrows; ++r)
        for (int c = 0; c < nk; ++c) S[r * BK + c] = p.softcap * std::tanh(S[r * BK + c] / p.softcap) * kLog2e;
    }
    const bool needs_mask = kb + BK > Sk || (wl >= 0 && kb < last - wl) || (wr >= 0 && kb + BK - 1 > first + wr);
    if (needs_mask) {
      for (int r = 0; r < nrows; ++r) {
        const int64_t i = first + r / ng;  // this row's position
        const int64_t jlo = wl >= 0 ? i - wl : kb;
        const int64_t jhi = std::min<int64_t>(Sk - 1, wr >= 0 ? i + wr : Sk - 1);
        float* srow = S + r * BK;
        for (int c = 0; c < BK; ++c)
          if (kb + c < jlo || kb + c > jhi) srow[c] = kNegInf;
      }
    }
    if (kmode == 2)
      for (int c = 0; c < nk; ++c)
        if (!w.keep[c])
          for (int r = 0; r < nrows; ++r) S[r * BK + c] = kNegInf;

    // Online softmax, row by row; P overwrites S. Padding rows get P = 0.
    for (int r = 0; r < rows_pad; ++r) {
      float* srow = S + r * BK;
      if (r >= nrows) {
        std::fill(srow, srow + BK, 0.0f);
        continue;
      }
      if (has_nan_or_posinf(srow, BK)) w.nonfinite[r] = 1;
      online_softmax_row(srow, BK, w.m[r], w.l[r], w.o.data() + size_t(r) * dp, dp);
    }

    const float* vblock = vp + int64_t(kb) * dp;
    for (int r = 0; r < rows_pad; r += MR) {
      int c = 0;
      for (; c + 2 * VL <= dp; c += 2 * VL)
        pv_tile<2>(S + r * BK, BK, vblock + c, dp, nk, w.o.data() + size_t(r) * dp + c, dp);
      if (c < dp) pv_tile<1>(S + r * BK, BK, vblock + c, dp, nk, w.o.data() + size_t(r) * dp + c, dp);
    }
  }

  // Normalise and write out; rows that saw no key get 0 and lse -inf.
  const int64_t o_base = b * p.o_batch + p.row0_q(b) * p.o_row;
  char* out = static_cast<char*>(p.out);
  const int esize = dtype_size(p.dtype);
  // Rows with a NaN or +inf score are NaN (output and lse), as in float64.
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  for (int r = 0; r < nrows; ++r) {
    const float l = w.l[r];
    const bool nan_row = w.nonfinite[r] != 0;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* orow = w.o.data() + size_t(r) * dp;
    for (int d = 0; d < D; ++d) w.row[d] = nan_row ? kNaN : orow[d] * inv;
    const int pos = i0 + r / ng, h = h0 + r % ng;
    store_floats(w.row.data(), p.dtype, D, out + (o_base + int64_t(pos) * p.o_row + int64_t(h) * p.o_head) * esize);
    if (p.lse)
      p.lse[b * p.lse_batch + h * p.lse_head + p.row0_q(b) + pos] =
          nan_row ? kNaN : l > 0.0f ? w.m[r] * kLn2 + std::log(l) : kNegInf;
  }
}

}  // namespace

namespace {

// Scratch of the single-threaded path, kept by the calling thread between calls: a decode-sized
// call takes a few microseconds, and allocating (and first touching) its buffers was a visible
// part of that. Only small problems take this path, so what stays allocated is small too.
struct SerialCache {
  std::unique_ptr<Scratch> scratch;
  std::unique_ptr<float[]> kv;
  size_t kv_size = 0;
  float* kv_buffer(size_t n) {
    if (n > kv_size) {
      kv.reset();
      kv.reset(new float[n]);
      kv_size = n;
    }
    return kv.get();
  }
  Scratch& scratch_for(int D, int dp) {
    if (!scratch || scratch->head_dim != D || scratch->dp != dp) {
      scratch.reset();
      scratch.reset(new Scratch(D, dp));
    }
    return *scratch;
  }
};
constexpr size_t kSerialCacheMax = size_t(1) << 20;  // floats kept past a call (4 MB)

// The shape of one call's work: units of (batch, kv_head), each with its packed K/V.
struct Plan {
  int D, dp, group, qblocks;
  int heads_per_task, positions_per_task, hblocks;  // a task: positions x heads <= BQ rows
  int64_t units, sk_pad, slices, tasks_per_unit;
};

// Packs slice t (BK keys of one unit) of the chunk starting at unit u0.
void pack_slice(const AttentionProblem& p, const Plan& pl, int64_t u0, int64_t t, float* kt, float* vp, float* row) {
  const int64_t u = t / pl.slices;
  const int j0 = int(t % pl.slices) * BK, b = int((u0 + u) / p.kv_heads), kvh = int((u0 + u) % p.kv_heads);
  const int Sk = p.seq_k(b), D = pl.D, dp = pl.dp;
  float* ktu = kt + size_t(u) * pl.sk_pad * D;
  float* vpu = vp + size_t(u) * pl.sk_pad * dp;
  const int j1 = std::min(j0 + BK, Sk);
  if (j0 < j1) pack_kv(p, b, kvh, j0, j1, dp, ktu, vpu, row);
  // Keys past the end: the rest of a partly used K^T panel is zeroed (its scores are computed with
  // the panel, then masked to -inf; zeros keep the products finite and defined). Panels wholly past
  // the end are never read (attend_block stops at the last panel with a key), nor are V rows past
  // the end (P V stops at the last key): zeroing them was most of a short call.
  const int j = std::max(j0, Sk);
  if (j < j0 + BK && j % NR) {
    float* panel = ktu + int64_t(j / NR) * D * NR;
    for (int d = 0; d < D; ++d) std::fill(panel + int64_t(d) * NR + j % NR, panel + int64_t(d + 1) * NR, 0.0f);
  }
}

// Runs task t (one query block of one head) of the chunk of nunits units starting at u0.
void run_task(const AttentionProblem& p, const Plan& pl, int64_t u0, int64_t nunits, int64_t t, const float* kt,
              const float* vp, Scratch& scratch) {
  const int64_t u = t % nunits, rest = t / nunits;
  const int hb = int(rest % pl.hblocks), qb = pl.qblocks - 1 - int(rest / pl.hblocks);
  const int b = int((u0 + u) / p.kv_heads), kvh = int((u0 + u) % p.kv_heads);
  const int i0 = qb * pl.positions_per_task, g0 = hb * pl.heads_per_task;
  if (i0 >= p.seq_q(b)) return;
  attend_block(p, b, kvh * pl.group + g0, std::min(pl.heads_per_task, pl.group - g0), i0,
               std::min(pl.positions_per_task, p.seq_q(b) - i0), kt + size_t(u) * pl.sk_pad * pl.D,
               vp + size_t(u) * pl.sk_pad * pl.dp, pl.dp, scratch);
}

}  // namespace

void flash_attention(const AttentionProblem& p) {
  // Below ~256K multiply-adds (a decode step over a short context) the call takes microseconds on
  // one core, less than starting an OpenMP team: stay on the calling thread.
  const int64_t macs = int64_t(p.batch) * p.heads * p.seqlen_q * std::max(p.seqlen_k, 1) * p.head_dim * 2;
  const int threads = macs < (int64_t(1) << 18) ? 1 : num_threads();
  Plan pl;
  pl.D = p.head_dim, pl.dp = int(round_up(pl.D, VL));
  pl.group = p.heads / p.kv_heads;
  // 64-bit counts: group x q-blocks alone passes 2^31 with 2^25 query heads (stride-0 views).
  pl.units = int64_t(p.batch) * p.kv_heads;  // one unit = one (batch, kv_head) with its packed K/V
  pl.sk_pad = round_up(std::max(p.seqlen_k, 1), BK);
  pl.slices = pl.sk_pad / BK;
  // Short queries (decode, small chunks): the heads of a group share a task, so its BQ rows are
  // filled with (position, head) pairs instead of a few positions padded to a register tile.
  // With several threads, grouping stops where it would leave fewer than two tasks per thread.
  auto plan_heads = [&](int hpt) {
    pl.heads_per_task = hpt;
    pl.positions_per_task = BQ / hpt;
    pl.hblocks = (pl.group + hpt - 1) / hpt;
    pl.qblocks = int((p.seqlen_q + pl.positions_per_task - 1) / pl.positions_per_task);
  };
  int hpt = std::max(1, std::min(pl.group, BQ / std::max(p.seqlen_q, 1)));
  plan_heads(hpt);
  while (threads > 1 && hpt > 1 && pl.units * pl.hblocks * pl.qblocks < 2 * int64_t(threads)) plan_heads(hpt /= 2);
  pl.tasks_per_unit = std::max<int64_t>(1, int64_t(pl.hblocks) * pl.qblocks);
  const int D = pl.D, dp = pl.dp;
  const int64_t units = pl.units, sk_pad = pl.sk_pad;

  if (threads == 1) {
    // No OpenMP region at all (entering one, even with if(false), costs microseconds), one unit
    // at a time, buffers reused from the previous call.
    thread_local SerialCache cache;
    const size_t kt_size = size_t(sk_pad) * D, need = kt_size + size_t(sk_pad) * dp;
    float* kt = cache.kv_buffer(need);
    float* vp = kt + kt_size;
    Scratch& scratch = cache.scratch_for(D, dp);
    for (int64_t u0 = 0; u0 < units; ++u0) {
      for (int64_t t = 0; t < pl.slices; ++t) pack_slice(p, pl, u0, t, kt, vp, scratch.row.data());
      for (int64_t t = 0; t < pl.tasks_per_unit; ++t) run_task(p, pl, u0, 1, t, kt, vp, scratch);
    }
    if (cache.kv_size > kSerialCacheMax) cache = SerialCache();  // a large one-off: give it back
    return;
  }

  // Pack enough units at once to give every thread a few tasks, no more (bounds the memory).
  const int64_t chunk =
      std::min(units, std::max<int64_t>(1, (4 * int64_t(threads) + pl.tasks_per_unit - 1) / pl.tasks_per_unit));
  Buf kt(size_t(chunk) * sk_pad * D), vp(size_t(chunk) * sk_pad * dp);  // every key slice is packed or zeroed
  for (int64_t u0 = 0; u0 < units; u0 += chunk) {
    const int64_t nunits = std::min(chunk, units - u0);
    ParallelGuard guard;
#pragma omp parallel num_threads(threads)
    {
      std::unique_ptr<Scratch> scratch;  // allocated inside: first touch by its own thread
      const bool ok = guard.run([&] { scratch.reset(new Scratch(D, dp)); });
      // 1. Pack K^T and V of the chunk's units, in slices of BK keys.
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nunits * pl.slices; ++t) {
        if (!ok) continue;
        pack_slice(p, pl, u0, t, kt.data(), vp.data(), scratch->row.data());
      }
      // 2. Attention tasks; longest (last, under a causal mask) query blocks first.
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < nunits * pl.tasks_per_unit; ++t) {
        if (!ok || guard.failed()) continue;
        run_task(p, pl, u0, nunits, t, kt.data(), vp.data(), *scratch);
      }
    }
    guard.rethrow();
  }
}

}  // namespace memkernels::cpu::MK_ISA_NS
