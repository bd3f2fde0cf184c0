// Quantized matrices: quantize -> dequantize error, qgemm against a double reference, serialisation.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<float> deq(const QuantizedMatrix& q) {
  std::vector<float> out(size_t(q.rows() * q.cols()), NAN);
  dequantize(q, TensorView(out.data(), DType::Float32, {q.rows(), q.cols()}));
  return out;
}

}  // namespace

TEST(Quant, DequantizeWithinBoundEveryFormat) {
  const int64_t N = 7, K = 256;
  std::vector<float> w = randn(size_t(N * K), 1);
  for (int f = 0; f < kNumQuantFormats; ++f) {
    const QuantFormat fmt = QuantFormat(f);
    // K-quants: a per-sub-block RMS bound (quant.h), checked in KQuantRmsBoundAndGgufLayout below
    if (quant_is_kquant(fmt)) continue;
    QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), fmt, {});
    std::vector<float> d = deq(q), s = q.effective_scales();
    const double rel = fmt == QuantFormat::NF4 ? 0.152 : 0.5;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double bound = rel * s[size_t(n * q.groups() + k / q.group_size())] * (1 + 1e-5) + 1e-6;
        ASSERT_LE(std::fabs(d[n * K + k] - w[n * K + k]), bound) << quant_format_name(fmt) << " n=" << n << " k=" << k;
      }
  }
}

TEST(Quant, QgemmMatchesDequantizedReference) {
  const int64_t N = 37, K = 384;
  std::vector<float> w = randn(size_t(N * K), 2), bias = randn(size_t(N), 3);
  for (int64_t T : {1, 2, 3, 5, 9}) {
    std::vector<float> x = randn(size_t(T * K), 4 + unsigned(T));
    for (int variant = 0; variant < 6; ++variant) {
      // int8 per channel and in groups of 32, the grouped formats with groups of 64
      const QuantFormat fmt = std::array<QuantFormat, 6>{QuantFormat::Int4, QuantFormat::NF4, QuantFormat::Int3Sym,
                                                         QuantFormat::Int8, QuantFormat::Int8,
                                                         QuantFormat::Int4Min}[size_t(variant)];
      const int group = variant == 3 ? 0 : variant == 4 ? 32 : 64;
      QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), fmt, {group, false});
      std::vector<float> d = deq(q), y(size_t(T * N), NAN);
      TensorView tb(bias.data(), DType::Float32, {N});
      qgemm(TensorView(x.data(), DType::Float32, {T, K}), q, &tb, TensorView(y.data(), DType::Float32, {T, N}));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
          double ref = bias[n], mag = std::fabs(bias[n]);
          for (int64_t k = 0; k < K; ++k) {
            ref += double(x[t * K + k]) * d[n * K + k];
            mag += std::fabs(double(x[t * K + k]) * d[n * K + k]);
          }
          ASSERT_NEAR(y[t * N + n], ref, 1e-5 * mag + 1e-6) << quant_format_name(fmt) << " T=" << T;
        }
    }
  }
}

TEST(Quant, SerialiseRoundTripAndCorruption) {
  const int64_t N = 5, K = 128;
  std::vector<float> w = randn(size_t(N * K), 9);
  QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), QuantFormat::NF4, {32, true});
  std::vector<uint8_t> b = q.serialize();
  QuantizedMatrix r = QuantizedMatrix::deserialize(b.data(), b.size());
  EXPECT_EQ(deq(r), deq(q));
  EXPECT_EQ(r.format(), QuantFormat::NF4);
  EXPECT_TRUE(r.double_quant());
  b[100] ^= 1;
  try {
    QuantizedMatrix::deserialize(b.data(), b.size());
    FAIL() << "corrupted bytes were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
  }
  try {
    QuantizedMatrix::deserialize(b.data(), 30);
    FAIL() << "truncated bytes were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
  }
}

TEST(Quant, BadArguments) {
  std::vector<float> w(100 * 10, 1.0f);
  try {
    quantize(TensorView(w.data(), DType::Float32, {10, 100}), QuantFormat::Int4, {48, false});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Value);
    EXPECT_NE(std::string(e.what()).find("group_size must be 32, 64 or 128"), std::string::npos) << e.what();
  }
  // any in_features: a partial last group is stored padded, the logical shape is kept
  QuantizedMatrix partial = quantize(TensorView(w.data(), DType::Float32, {10, 100}), QuantFormat::Int4, {});
  EXPECT_EQ(partial.cols(), 100);
  EXPECT_EQ(partial.padded_cols(), 128);
  EXPECT_EQ(partial.groups(), 1);
  std::vector<float> w2(128 * 4, 1.0f);
  EXPECT_THROW(quantize(TensorView(w2.data(), DType::Float32, {4, 128}), QuantFormat::Int4, {48, false}), Error);
  EXPECT_THROW(quantize(TensorView(w2.data(), DType::Float32, {4, 128}), QuantFormat::Int4, {128, true}), Error);
  QuantizedMatrix q = quantize(TensorView(w2.data(), DType::Float32, {4, 128}), QuantFormat::Int4, {});
  std::vector<float> x(64), y(4);
  EXPECT_THROW(qgemm(TensorView(x.data(), DType::Float32, {1, 64}), q, nullptr,
                     TensorView(y.data(), DType::Float32, {1, 4})),
               Error);
}

TEST(Quant, EveryHeaderByteFlipIsRejected) {
  const int64_t N = 3, K = 64;
  std::vector<float> w = randn(size_t(N * K), 21);
  for (QuantFormat fmt : {QuantFormat::Int3, QuantFormat::NF4}) {
    QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), fmt, {32, fmt == QuantFormat::NF4});
    const std::vector<uint8_t> good = q.serialize();
    for (size_t i = 0; i < good.size(); i += (i < 64 ? 1 : 7)) {
      std::vector<uint8_t> bad = good;
      bad[i] ^= 0x80;
      EXPECT_THROW(QuantizedMatrix::deserialize(bad.data(), bad.size()), Error) << "byte " << i;
    }
    for (size_t n = 0; n < good.size(); n += 5)
      EXPECT_THROW(QuantizedMatrix::deserialize(good.data(), n), Error) << "length " << n;
  }
}

TEST(Quant, HalfPrecisionActivations) {
  const int64_t N = 21, K = 96, T = 6;
  std::vector<float> w = randn(size_t(N * K), 22), xf = randn(size_t(T * K), 23);
  QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), QuantFormat::Int2, {32, false});
  std::vector<float> d = deq(q);
  std::vector<_Float16> x(xf.size()), y(size_t(T * N), _Float16(NAN));
  for (size_t i = 0; i < x.size(); ++i) x[i] = _Float16(xf[i]);
  qgemm(TensorView(x.data(), DType::Float16, {T, K}), q, nullptr, TensorView(y.data(), DType::Float16, {T, N}));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        ref += double(float(x[t * K + k])) * d[n * K + k];
        mag += std::fabs(double(float(x[t * K + k])) * d[n * K + k]);
      }
      ASSERT_NEAR(float(y[t * N + n]), ref, 1e-3 * std::fabs(ref) + 1e-4 * mag + 1e-5);
    }
}

TEST(Quant, Int8ActivationsWithinBound) {
  for (int64_t K : {96, 160, 4128}) {
    const int64_t N = 9;
    std::vector<float> w = randn(size_t(N * K), 24), x = randn(size_t(K), 25), y(size_t(N), NAN);
    QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), QuantFormat::Int4, {32, false});
    std::vector<float> d = deq(q);
    QGemmOptions o;
    o.int8_activations = true;
    qgemm(TensorView(x.data(), DType::Float32, {1, K}), q, nullptr, TensorView(y.data(), DType::Float32, {1, N}),
          nullptr, o);
    // quant.h: x rounded per token and block of K (here the group of 32) to multiples of max|x| / 127
    // of the block: per block, sum |w| * max|x| / 254
    float xmax = 0;
    for (float v : x) xmax = std::max(xmax, std::fabs(v));
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, l1 = 0, bound = 0;
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        double bl1 = 0, bmax = 0;
        for (int64_t k = k0; k < std::min(K, k0 + 32); ++k) {
          ref += double(d[n * K + k]) * x[k], bl1 += std::fabs(d[n * K + k]);
          bmax = std::max(bmax, double(std::fabs(x[k])));
        }
        l1 += bl1, bound += bl1 * bmax / 254;
      }
      ASSERT_NEAR(y[n], ref, bound * 1.001 + 1e-4 * l1 * xmax) << "K=" << K;
    }
  }
}

// GGUF-style blocks: scales of any sign and 0, int8 codes -128..127, int4_min mins; dequantize is
// the formula in float32 bit for bit (a product, then a sum), qgemm matches it in double.
TEST(Quant, PackQuantizedGroupWiseInt8AndInt4Min) {
  const int64_t N = 9, K = 256, G = K / 32;
  std::mt19937 rng(40);
  std::uniform_int_distribution<int> code8(-128, 127), code4(0, 15);
  std::vector<int8_t> c8(size_t(N * K));
  std::vector<uint8_t> c4(size_t(N * K));
  for (auto& c : c8) c = int8_t(code8(rng));
  for (auto& c : c4) c = uint8_t(code4(rng));
  std::vector<float> s = randn(size_t(N * G), 41), m = randn(size_t(N * G), 42);
  s[0] = 0.0f, s[1] = -std::fabs(s[1]), s[5] = -0.0f;
  QuantOptions o;
  o.group_size = 32;
  TensorView ts(s.data(), DType::Float32, {N, G}), tm(m.data(), DType::Float32, {N, G});
  QuantizedMatrix q8 = pack_quantized(QuantFormat::Int8, TensorView(c8.data(), DType::Int8, {N, K}), ts, nullptr, o);
  QuantizedMatrix q4 = pack_quantized(QuantFormat::Int4Min, TensorView(c4.data(), DType::UInt8, {N, K}), ts, nullptr,
                                      &tm, o);
  EXPECT_EQ(q8.group_size(), 32);
  ASSERT_NE(q4.mins(), nullptr);
  EXPECT_EQ(q8.mins(), nullptr);
  const std::vector<float> d8 = deq(q8), d4 = deq(q4);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const size_t j = size_t(n * G + k / 32), i = size_t(n * K + k);
      volatile float prod = s[j] * float(c4[i]);  // rounded to float32 before the sum
      ASSERT_EQ(d8[i], s[j] * float(c8[i])) << n << "," << k;
      ASSERT_EQ(d4[i], prod + m[j]) << n << "," << k;
    }
  const std::vector<uint8_t> b = q4.serialize();
  QuantizedMatrix r = QuantizedMatrix::deserialize(b.data(), b.size());
  EXPECT_EQ(r.format(), QuantFormat::Int4Min);
  EXPECT_EQ(deq(r), d4);
  for (const std::vector<float>* d : {&d8, &d4}) {
    const QuantizedMatrix& q = d == &d8 ? q8 : q4;
    for (int64_t T : {1, 4, 7}) {
      std::vector<float> x = randn(size_t(T * K), 43 + unsigned(T)), y(size_t(T * N), NAN);
      qgemm(TensorView(x.data(), DType::Float32, {T, K}), q, nullptr, TensorView(y.data(), DType::Float32, {T, N}));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            ref += double(x[size_t(t * K + k)]) * (*d)[size_t(n * K + k)];
            mag += std::fabs(double(x[size_t(t * K + k)]) * (*d)[size_t(n * K + k)]);
          }
          ASSERT_NEAR(y[size_t(t * N + n)], ref, 2e-5 * mag + 1e-6) << quant_format_name(q.format()) << " T=" << T;
        }
    }
  }
  // NaN scales, missing or misshapen mins, mins on another format: Error(Value)
  std::vector<float> bad = s;
  bad[3] = NAN;
  TensorView tbad(bad.data(), DType::Float32, {N, G}), tm2(m.data(), DType::Float32, {N, G - 1});
  for (int c = 0; c < 4; ++c) {
    try {
      if (c == 0) pack_quantized(QuantFormat::Int8, TensorView(c8.data(), DType::Int8, {N, K}), tbad, nullptr, o);
      if (c == 1) pack_quantized(QuantFormat::Int4Min, TensorView(c4.data(), DType::UInt8, {N, K}), ts, nullptr, o);
      if (c == 2)
        pack_quantized(QuantFormat::Int4Min, TensorView(c4.data(), DType::UInt8, {N, K}), ts, nullptr, &tm2, o);
      if (c == 3)
        pack_quantized(QuantFormat::Int4Sym, TensorView(c4.data(), DType::UInt8, {N, K}), ts, nullptr, &tm, o);
      FAIL() << "case " << c << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Value);
      EXPECT_NE(std::string(e.what()).find(c == 0 ? "scales" : "mins"), std::string::npos) << e.what();
    }
  }
}

// Runs on a GPU machine only: CUDA qgemm (GEMV and mma paths) against the CPU result.
TEST(Quant, CudaMatchesCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Device gpu{DeviceType::CUDA, 0};
  const int64_t N = 70, K = 256;
  std::vector<float> w = randn(size_t(N * K), 30);
  for (int variant = 0; variant < 6; ++variant) {
    const QuantFormat fmt = std::array<QuantFormat, 6>{QuantFormat::Int4, QuantFormat::NF4, QuantFormat::Int3,
                                                       QuantFormat::Int8, QuantFormat::Int8,
                                                       QuantFormat::Int4Min}[size_t(variant)];
    QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), fmt,
                                 {variant == 3 ? 0 : variant == 4 ? 32 : 64, false});
    QuantizedMatrix g = q.to(gpu);
    std::vector<float> d = deq(q);
    for (int64_t T : {1, 3, 16}) {
      std::vector<float> xf = randn(size_t(T * K), 31);
      std::vector<_Float16> xh(xf.size()), yh(size_t(T * N));
      for (size_t i = 0; i < xf.size(); ++i) xh[i] = _Float16(xf[i]);
      void* dx = device_malloc(gpu, xh.size() * 2);
      void* dy = device_malloc(gpu, yh.size() * 2);
      device_memcpy(dx, gpu, xh.data(), Device{}, xh.size() * 2);
      qgemm(TensorView(dx, DType::Float16, {T, K}, gpu), g, nullptr, TensorView(dy, DType::Float16, {T, N}, gpu));
      device_memcpy(yh.data(), Device{}, dy, gpu, yh.size() * 2);
      device_free(gpu, dx);
      device_free(gpu, dy);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            ref += double(float(xh[t * K + k])) * d[n * K + k];
            mag += std::fabs(double(float(xh[t * K + k])) * d[n * K + k]);
          }
          ASSERT_NEAR(float(yh[t * N + n]), ref, 2e-3 * std::fabs(ref) + 1e-3 * mag)
              << quant_format_name(fmt) << " T=" << T << " n=" << n;
        }
    }
  }
}

// q4_k / q5_k / q6_k: quantize() keeps each sub-block's RMS error within half its plain step (quant.h),
// qgemm's exact path matches the float64 product of the dequantized weights, and K % 256 != 0 is refused.
TEST(Quant, KQuantRmsBoundAndQgemm) {
  const int64_t N = 9, K = 512, T = 3;
  std::vector<float> w = randn(size_t(N * K), 31), x = randn(size_t(T * K), 32);
  for (QuantFormat fmt : {QuantFormat::Q4K, QuantFormat::Q5K, QuantFormat::Q6K}) {
    QuantizedMatrix q = quantize(TensorView(w.data(), DType::Float32, {N, K}), fmt);
    ASSERT_EQ(q.group_size(), 256);
    std::vector<float> d = deq(q);
    const QuantizedMatrix plain = q.canonical();  // the documented layout (the CPU one is interleaved)
    const int sz = fmt == QuantFormat::Q6K ? 16 : 32, qmax = fmt == QuantFormat::Q4K ? 15 : 31;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < K / sz; ++j) {
        const int64_t b = j * sz / 256;
        const uint16_t* sup = plain.super_scales() + (n * (K / 256) + b) * 2;
        _Float16 hd, hm;
        std::memcpy(&hd, &sup[0], 2);
        std::memcpy(&hm, &sup[1], 2);
        double lo = 0, hi = -1e30, amax = 0, sse = 0;
        for (int i = 0; i < sz; ++i) {
          const double v = w[size_t(n * K + j * sz + i)];
          lo = std::min(lo, v), hi = std::max(hi, v), amax = std::max(amax, std::fabs(v));
          sse += (v - d[size_t(n * K + j * sz + i)]) * (v - d[size_t(n * K + j * sz + i)]);
        }
        const double step = fmt == QuantFormat::Q6K ? amax / 31 + double(hd) : (hi - lo + double(hm)) / qmax + double(hd);
        ASSERT_LE(std::sqrt(sse / sz), step / 2 * (1 + 1e-6)) << quant_format_name(fmt) << " n=" << n << " j=" << j;
      }
    std::vector<float> y(size_t(T * N), NAN);
    qgemm(TensorView(x.data(), DType::Float32, {T, K}), q, nullptr, TensorView(y.data(), DType::Float32, {T, N}));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          ref += double(x[size_t(t * K + k)]) * d[size_t(n * K + k)];
          mag += std::fabs(double(x[size_t(t * K + k)]) * d[size_t(n * K + k)]);
        }
        ASSERT_NEAR(y[size_t(t * N + n)], ref, 1e-5 * mag + 1e-6) << quant_format_name(fmt);
      }
    // the documented layout (a canonical() copy, not interleaved) computes the same, on every path
    ASSERT_EQ(q.interleaved(), quant_cpu_interleaved(fmt));  // K-quants: where the CPU has AVX512-VNNI
    ASSERT_FALSE(plain.interleaved());
    for (bool exact : {true, false}) {
      QGemmOptions o;
      o.int8_activations = !exact;
      std::vector<float> a(size_t(T * N), NAN), b(size_t(T * N), NAN);
      qgemm(TensorView(x.data(), DType::Float32, {T, K}), q, nullptr, TensorView(a.data(), DType::Float32, {T, N}),
            nullptr, o);
      qgemm(TensorView(x.data(), DType::Float32, {T, K}), plain, nullptr, TensorView(b.data(), DType::Float32, {T, N}),
            nullptr, o);
      for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5 * (std::fabs(b[i]) + 1.0)) << exact;
    }
    EXPECT_EQ(deq(plain), d);
  }
  std::vector<float> w2(size_t(4 * 320), 1.0f);
  EXPECT_THROW(quantize(TensorView(w2.data(), DType::Float32, {4, 320}), QuantFormat::Q4K), Error);
}
