// K-quant super-block formats (q4_k, q5_k, q6_k): quantize() with a search over sub-block scales
// and mins, lossless packing of GGUF Q4_K / Q5_K / Q6_K blocks, and payload checks. The layout is
// documented in memkernels/quant.h; the kernels are in cpu/qgemm_kquant.cpp and cuda/qgemm.cu.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/convert.h"
#include "quant_internal.h"

namespace memkernels {
namespace {

std::string str(int64_t x) { return std::to_string(x); }

constexpr int QK = kKQuantBlock;

// Our code bytes of one super-block (32 * bits bytes) from its 256 codes q (each < 2^bits).
void pack_super_block(QuantFormat f, const uint8_t* q, uint8_t* dst) {
  for (int c = 0; c < 8; ++c)
    for (int i = 0; i < 16; ++i) dst[16 * c + i] = uint8_t((q[32 * c + i] & 15) | ((q[32 * c + 16 + i] & 15) << 4));
  if (f == QuantFormat::Q5K) {
    for (int h = 0; h < 2; ++h) {
      uint64_t lo = 0, hi = 0;
      for (int j = 0; j < 64; ++j) {
        const int c = 4 * h + j / 16, i = j % 16;
        lo |= uint64_t((q[32 * c + i] >> 4) & 1) << j;
        hi |= uint64_t((q[32 * c + 16 + i] >> 4) & 1) << j;
      }
      std::memcpy(dst + 128 + 16 * h, &lo, 8);
      std::memcpy(dst + 128 + 16 * h + 8, &hi, 8);
    }
  } else if (f == QuantFormat::Q6K) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j) {
        const int c0 = 4 * h + j / 16, c1 = c0 + 2, i = j % 16;
        dst[128 + 32 * h + j] = uint8_t((q[32 * c0 + i] >> 4) | ((q[32 * c1 + i] >> 4) << 2) |
                                        ((q[32 * c0 + 16 + i] >> 4) << 4) | ((q[32 * c1 + 16 + i] >> 4) << 6));
      }
  }
}

// fp16 bits of the smallest half >= x (x >= 0, finite); returns false when x exceeds the fp16 range.
bool half_round_up(double x, uint16_t* out) {
  if (!(x <= 65504.0)) return false;
  uint16_t h = cpu::float_to_half(float(x));
  if (double(cpu::half_to_float(h)) < x) ++h;  // positive halves: the next bit pattern is the next value
  if (!(double(cpu::half_to_float(h)) >= x) || std::isinf(cpu::half_to_float(h))) return false;
  *out = h;
  return true;
}

// q4_k / q5_k: dequantized value exactly as the kernels and GGUF readers compute it.
inline float deq_min(float d, float dmin, int sc, int m, int q) {
  const float a = d * float(sc), b = dmin * float(m);  // exact: 11-bit d times 6-bit integers
  return a * float(q) - b;                              // a * q exact too: one rounding, fused or not
}

// Codes of one q4_k/q5_k sub-block for integer (sc, m) and its squared error.
double fit_min(const float* w, int n, int qmax, float d, float dmin, int sc, int m, uint8_t* q) {
  const double a = double(d * float(sc)), b = double(dmin * float(m));
  double sse = 0.0;
  for (int i = 0; i < n; ++i) {
    int v = a > 0.0 ? int(std::nearbyint((double(w[i]) + b) / a)) : 0;
    v = std::min(std::max(v, 0), qmax);
    // the neighbour may be nearer once the exact float result is taken (ties, rounding)
    double e = double(w[i]) - double(deq_min(d, dmin, sc, m, v));
    for (int u : {v - 1, v + 1}) {
      if (u < 0 || u > qmax) continue;
      const double e2 = double(w[i]) - double(deq_min(d, dmin, sc, m, u));
      if (e2 * e2 < e * e) e = e2, v = u;
    }
    q[i] = uint8_t(v);
    sse += e * e;
  }
  return sse;
}

// Codes of one q6_k sub-block for integer sc and its squared error.
double fit_sym(const float* w, int n, float d, int sc, uint8_t* q) {
  const float a = d * float(sc);
  double sse = 0.0;
  for (int i = 0; i < n; ++i) {
    int v = a != 0.0f ? int(std::nearbyint(double(w[i]) / double(a))) : 0;
    v = std::min(std::max(v, -32), 31);
    const double e = double(w[i]) - double(a * float(v));
    q[i] = uint8_t(v + 32);
    sse += e * e;
  }
  return sse;
}

// One super-block of q4_k / q5_k: codes q[256], sub-scales sub[16], super-scales sup[2].
// Returns false when the weights are too large for fp16 super-scales.
bool quantize_min_block(const float* w, int qmax, uint8_t* q, uint8_t* sub, uint16_t* sup) {
  double lo[8], hi[8], dm_need = 0.0, d_need = 0.0;
  for (int j = 0; j < 8; ++j) {
    lo[j] = 0.0, hi[j] = -1e300;
    for (int i = 0; i < 32; ++i) lo[j] = std::min(lo[j], double(w[32 * j + i])), hi[j] = std::max(hi[j], double(w[32 * j + i]));
    dm_need = std::max(dm_need, -lo[j] / 63.0);
  }
  uint16_t hdmin, hd;
  if (!half_round_up(dm_need, &hdmin)) return false;
  const float dmin = cpu::half_to_float(hdmin);
  for (int j = 0; j < 8; ++j) d_need = std::max(d_need, (hi[j] - lo[j] + double(dmin)) / (double(qmax) * 63.0));
  if (!half_round_up(d_need, &hd)) return false;
  const float d = cpu::half_to_float(hd);
  sup[0] = hd, sup[1] = hdmin;
  uint8_t best_q[32], tq[32];
  for (int j = 0; j < 8; ++j) {
    const float* x = w + 32 * j;
    // The plain choice: m covers the minimum, sc the maximum (both within 63 by the choice of d, dmin).
    const int mp = dmin > 0.0f ? std::min(63, int(std::ceil(-lo[j] / double(dmin)))) : 0;
    const int scp = d > 0.0f ? std::min(63, int(std::ceil((hi[j] + double(dmin) * mp) / (double(qmax) * d)))) : 0;
    int bsc = scp, bm = mp;
    double best = fit_min(x, 32, qmax, d, dmin, scp, mp, best_q);
    auto consider = [&](int sc, int m) {
      sc = std::min(std::max(sc, 0), 63), m = std::min(std::max(m, 0), 63);
      if (dmin == 0.0f) m = 0;
      const double e = fit_min(x, 32, qmax, d, dmin, sc, m, tq);
      if (e < best) best = e, bsc = sc, bm = m, std::memcpy(best_q, tq, 32);
    };
    // Narrower and wider steps over the range, each refitted by least squares (w ~ a * q - b) on the
    // codes it gives, then rounded to the 6-bit grid with its neighbours.
    const double range = hi[j] - lo[j];
    if (range > 0.0 && d > 0.0f) {
      for (double delta : {-1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0}) {
        const double s = range / (double(qmax) + delta);
        double sq = 0, sw = 0, sqq = 0, sqw = 0;
        for (int i = 0; i < 32; ++i) {
          const double v = std::min(std::max(std::nearbyint((double(x[i]) - lo[j]) / s), 0.0), double(qmax));
          sq += v, sw += x[i], sqq += v * v, sqw += v * x[i];
        }
        const double den = 32.0 * sqq - sq * sq;
        if (den <= 0.0) continue;
        const double a = (32.0 * sqw - sq * sw) / den, b = (a * sq - sw) / 32.0;  // w ~ a q - b
        const int sc0 = int(std::nearbyint(a / d)), m0 = dmin > 0.0f ? int(std::nearbyint(b / dmin)) : 0;
        for (int ds = -1; ds <= 1; ++ds)
          for (int dmm = -1; dmm <= 1; ++dmm) consider(sc0 + ds, m0 + dmm);
      }
    }
    sub[j] = uint8_t(bsc), sub[8 + j] = uint8_t(bm);
    std::memcpy(q + 32 * j, best_q, 32);
  }
  return true;
}

// One super-block of q6_k.
bool quantize_sym_block(const float* w, uint8_t* q, uint8_t* sub, uint16_t* sup) {
  double amax[16], need = 0.0;
  for (int j = 0; j < 16; ++j) {
    amax[j] = 0.0;
    for (int i = 0; i < 16; ++i) amax[j] = std::max(amax[j], std::fabs(double(w[16 * j + i])));
    need = std::max(need, amax[j] / (31.0 * 127.0));
  }
  uint16_t hd;
  if (!half_round_up(need, &hd)) return false;
  const float d = cpu::half_to_float(hd);
  sup[0] = hd, sup[1] = 0;
  uint8_t best_q[16], tq[16];
  for (int j = 0; j < 16; ++j) {
    const float* x = w + 16 * j;
    const int scp = d > 0.0f ? std::min(127, int(std::ceil(amax[j] / (31.0 * double(d))))) : 0;
    int bsc = scp;
    double best = fit_sym(x, 16, d, scp, best_q);
    auto consider = [&](int sc) {
      sc = std::min(std::max(sc, -128), 127);
      const double e = fit_sym(x, 16, d, sc, tq);
      if (e < best) best = e, bsc = sc, std::memcpy(best_q, tq, 16);
    };
    if (amax[j] > 0.0 && d > 0.0f) {
      for (double sign : {1.0, -1.0})
        for (double delta : {-1.0, -0.5, 0.5, 1.0, 1.5, 2.0}) {
          const double s = sign * amax[j] / (31.5 + delta);
          double sqq = 0, sqw = 0;
          for (int i = 0; i < 16; ++i) {
            const double v = std::min(std::max(std::nearbyint(double(x[i]) / s), -32.0), 31.0);
            sqq += v * v, sqw += v * x[i];
          }
          if (sqq <= 0.0) continue;
          const int sc0 = int(std::nearbyint(sqw / sqq / d));
          for (int ds = -1; ds <= 1; ++ds) consider(sc0 + ds);
        }
    }
    sub[j] = uint8_t(int8_t(bsc));
    std::memcpy(q + 16 * j, best_q, 16);
  }
  return true;
}

}  // namespace

void quantize_kquant(const TensorView& w, QuantizedMatrix& m) {
  const QuantFormat f = m.format();
  const int64_t N = m.rows(), K = m.cols(), SB = K / QK;
  const int bits = quant_bits(f);
  uint8_t* codes = m.mutable_data();
  uint8_t* subs = const_cast<uint8_t*>(m.sub_scales());
  uint16_t* sups = const_cast<uint16_t*>(m.super_scales());
  const int64_t rb = m.row_bytes();
  const int esize = dtype_size(w.dtype);
  bool finite = true;
  ParallelGuard guard;
#pragma omp parallel num_threads(num_threads()) reduction(&& : finite)
  {
    std::vector<float> row;
    const bool ok = guard.run([&] { row.resize(size_t(K)); });
    uint8_t q[QK];
#pragma omp for schedule(dynamic, 4)
    for (int64_t n = 0; n < N; ++n) {
      if (!ok || guard.failed()) continue;
      guard.run([&] {
        cpu::load_floats(static_cast<const char*>(w.data) + n * w.strides[0] * esize, w.dtype, K, row.data());
        for (int64_t k = 0; k < K; ++k)
          if (!std::isfinite(row[size_t(k)])) {
            finite = false;
            return;
          }
        for (int64_t b = 0; b < SB; ++b) {
          const float* x = row.data() + b * QK;
          uint8_t* sub = subs + (n * SB + b) * 16;
          uint16_t* sup = sups + (n * SB + b) * 2;
          const bool fits = f == QuantFormat::Q6K ? quantize_sym_block(x, q, sub, sup)
                                                  : quantize_min_block(x, f == QuantFormat::Q4K ? 15 : 31, q, sub, sup);
          if (!fits)
            throw Error(ErrorKind::Value, "quantize: w[" + str(n) + "] super-block " + str(b) +
                                              " holds weights too large for " + quant_format_name(f) +
                                              "'s fp16 super-block scales; scale the weights down");
          pack_super_block(f, q, codes + n * rb + b * (32 * bits));
        }
      });
    }
  }
  check(finite, ErrorKind::Value, "quantize: w contains NaN or infinity");
  guard.rethrow();
}

// Byte offsets of the K-quant CPU row-interleaved layout (quant.h) within one block of R rows: each
// pair is (documented, interleaved) for row r, super-block b (SB per row), byte j.
void kquant_permute_block(QuantFormat f, int64_t SB, int64_t R, const KQuantSections& src, const KQuantSections& dst,
                          bool to_ilv) {
  const int cb = 32 * quant_bits(f);  // code bytes per super-block and row
  const int64_t rb = SB * cb;
  const bool mins = f != QuantFormat::Q6K;
  for (int64_t b = 0; b < SB; ++b)
    for (int64_t r = 0; r < R; ++r) {
      // codes: 4-byte piece j of each row's super-block at j * R * 4 + r * 4
      for (int j = 0; j < cb / 4; ++j) {
        const int64_t plain = r * rb + b * cb + 4 * j, ilv = b * R * cb + j * R * 4 + r * 4;
        std::memcpy(dst.codes + (to_ilv ? ilv : plain), src.codes + (to_ilv ? plain : ilv), 4);
      }
      // sub-scales: byte j of 16 rows contiguous (sc_j at j * R + r); q4_k / q5_k mins as pairs
      // (m_2i, m_2i+1) of each row at 8R + 2R * i + 2r: an int16 pair per 32-bit lane
      for (int j = 0; j < 16; ++j) {
        const int64_t plain = (r * SB + b) * 16 + j;
        const int64_t ilv = b * R * 16 + (mins && j >= 8 ? 8 * R + 2 * R * ((j - 8) / 2) + 2 * r + (j - 8) % 2 : j * R + r);
        dst.sub[to_ilv ? ilv : plain] = src.sub[to_ilv ? plain : ilv];
      }
      // super-scales: d of 16 rows, then dmin of 16 rows
      for (int e = 0; e < 2; ++e) {
        const int64_t plain = (r * SB + b) * 2 + e, ilv = b * R * 2 + e * R + r;
        dst.sup[to_ilv ? ilv : plain] = src.sup[to_ilv ? plain : ilv];
      }
    }
}

void kquant_validate(const QuantizedMatrix& m, ErrorKind kind, const char* what) {
  const int64_t nb = m.rows() * m.groups();
  const uint8_t* sub = m.sub_scales();
  const uint16_t* sup = m.super_scales();
  const int64_t SB = m.groups();
  auto where = [&](int64_t j) { return "row " + str(j / SB) + ", super-block " + str(j % SB); };
  for (int64_t j = 0; j < nb; ++j) {
    for (int i = 0; i < 2; ++i)
      if (!std::isfinite(cpu::half_to_float(sup[2 * j + i])))
        throw Error(kind, std::string(what) + ": " + where(j) + " of " + quant_format_name(m.format()) +
                              " has a non-finite " + (i ? "dmin" : "d") + " (fp16 bits " + str(sup[2 * j + i]) + ")");
    if (m.format() != QuantFormat::Q6K)
      for (int i = 0; i < 16; ++i)
        if (sub[16 * j + i] >= 64)
          throw Error(kind, std::string(what) + ": " + where(j) + " has a sub-block " + (i < 8 ? "scale " : "min ") +
                                str(sub[16 * j + i]) + " (6-bit values expected)");
  }
}

int gguf_kquant_block_bytes(QuantFormat f) {
  switch (f) {
    case QuantFormat::Q4K: return 144;
    case QuantFormat::Q5K: return 176;
    case QuantFormat::Q6K: return 210;
    default:
      throw Error(ErrorKind::Value, std::string("gguf blocks: ") + quant_format_name(f) +
                                        " is not a K-quant format (q4_k, q5_k or q6_k)");
  }
}

QuantizedMatrix pack_gguf_kquant(QuantFormat f, const TensorView& blocks, int64_t cols) {
  const int bb = gguf_kquant_block_bytes(f);
  expect_ndim(blocks, "blocks", 2);
  expect_dtype(blocks, "blocks", {DType::UInt8, DType::Int8});
  expect_contiguous(blocks, "blocks");
  expect_not_null(blocks, "blocks");
  check(blocks.device.is_cpu(), ErrorKind::Value, "pack_gguf_kquant: blocks must be a CPU array");
  const int64_t N = blocks.size(0);
  QuantizedMatrix m = QuantizedMatrix::allocate(f, N, cols, 0, false);  // checks cols % 256
  const int64_t SB = cols / QK;
  check(blocks.size(1) == SB * bb, ErrorKind::Value,
        "blocks: expected (" + str(N) + ", " + str(SB * bb) + ") bytes (" + str(SB) + " " + quant_format_name(f) +
            " blocks of " + str(bb) + " bytes per row of " + str(cols) + " weights), got " + blocks.shape_str());
  const uint8_t* src = blocks.ptr<const uint8_t>();
  uint8_t* codes = m.mutable_data();
  uint8_t* subs = const_cast<uint8_t*>(m.sub_scales());
  uint16_t* sups = const_cast<uint16_t*>(m.super_scales());
  const int64_t rb = m.row_bytes();
  const int bits = quant_bits(f);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    uint8_t q[QK];
    for (int64_t b = 0; b < SB; ++b) {
      const uint8_t* blk = src + (n * SB + b) * bb;
      uint8_t* sub = subs + (n * SB + b) * 16;
      uint16_t* sup = sups + (n * SB + b) * 2;
      if (f == QuantFormat::Q6K) {
        // ql[128] (bits 0-3), qh[64] (bits 4-5), int8 scales[16], fp16 d
        const uint8_t *ql = blk, *qh = blk + 128;
        for (int h = 0; h < 2; ++h)
          for (int l = 0; l < 64; ++l) {
            q[h * 128 + l] = ql[h * 64 + l] & 15;
            q[h * 128 + 64 + l] = ql[h * 64 + l] >> 4;
          }
        for (int h = 0; h < 2; ++h)
          for (int k = 0; k < 4; ++k)
            for (int l = 0; l < 32; ++l) q[h * 128 + k * 32 + l] |= uint8_t(((qh[h * 32 + l] >> (2 * k)) & 3) << 4);
        std::memcpy(sub, blk + 192, 16);
        std::memcpy(&sup[0], blk + 208, 2);
        sup[1] = 0;
      } else {
        // fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, (Q5_K: qh[32]), qs[128]
        std::memcpy(&sup[0], blk, 2);
        std::memcpy(&sup[1], blk + 2, 2);
        const uint8_t* s = blk + 4;
        for (int j = 0; j < 4; ++j) {
          sub[j] = s[j] & 63, sub[8 + j] = s[j + 4] & 63;
          sub[j + 4] = uint8_t((s[j + 8] & 15) | ((s[j] >> 6) << 4));
          sub[8 + j + 4] = uint8_t((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
        }
        const uint8_t* qs = blk + (f == QuantFormat::Q5K ? 48 : 16);
        for (int i = 0; i < 4; ++i)
          for (int l = 0; l < 32; ++l) {
            q[64 * i + l] = qs[32 * i + l] & 15;
            q[64 * i + 32 + l] = qs[32 * i + l] >> 4;
          }
        if (f == QuantFormat::Q5K) {
          const uint8_t* qh = blk + 16;
          for (int w = 0; w < QK; ++w) q[w] |= uint8_t(((qh[w % 32] >> (w / 32)) & 1) << 4);
        }
      }
      pack_super_block(f, q, codes + n * rb + b * (32 * bits));
    }
  }
  kquant_validate(m, ErrorKind::Value, "pack_gguf_kquant");
  m.interleave();
  return m;
}

}  // namespace memkernels
