// Flash attention from C++: against a double-precision reference, every ISA level, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

// out[i][h][d] for one batch element, q (Sq, H, D), k/v (Sk, Hkv, D), causal aligned to the end.
std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                              int sq, int sk, int h, int hkv, int d, bool causal) {
  std::vector<double> out(size_t(sq) * h * d, 0.0);
  const int group = h / hkv;
  for (int hi = 0; hi < h; ++hi)
    for (int i = 0; i < sq; ++i) {
      std::vector<double> s(sk, -INFINITY);
      double m = -INFINITY;
      for (int j = 0; j < sk; ++j) {
        if (causal && j > i + sk - sq) continue;
        double dot = 0;
        for (int x = 0; x < d; ++x) dot += double(q[(size_t(i) * h + hi) * d + x]) * k[(size_t(j) * hkv + hi / group) * d + x];
        s[j] = dot / std::sqrt(double(d));
        m = std::max(m, s[j]);
      }
      if (m == -INFINITY) continue;
      double l = 0;
      for (int j = 0; j < sk; ++j) l += (s[j] = std::exp(s[j] - m));
      for (int j = 0; j < sk; ++j)
        for (int x = 0; x < d; ++x) out[(size_t(i) * h + hi) * d + x] += s[j] / l * v[(size_t(j) * hkv + hi / group) * d + x];
    }
  return out;
}

struct Case {
  int sq, sk, h, hkv, d;
  bool causal;
};

void check_case(const Case& c) {
  std::mt19937 gen(c.sq * 131 + c.sk * 7 + c.d);
  std::normal_distribution<float> dist;
  std::vector<float> q(size_t(c.sq) * c.h * c.d), k(size_t(c.sk) * c.hkv * c.d), v(k.size());
  for (auto* a : {&q, &k, &v})
    for (float& x : *a) x = dist(gen);
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN()), lse(size_t(c.h) * c.sq);
  TensorView tq(q.data(), DType::Float32, {1, c.sq, c.h, c.d}), tk(k.data(), DType::Float32, {1, c.sk, c.hkv, c.d}),
      tv(v.data(), DType::Float32, {1, c.sk, c.hkv, c.d}), to(out.data(), DType::Float32, {1, c.sq, c.h, c.d}),
      tl(lse.data(), DType::Float32, {1, c.h, c.sq});
  AttentionOptions opts;
  opts.causal = c.causal;
  flash_attention(tq, tk, tv, to, &tl, opts);
  std::vector<double> ref = reference(q, k, v, c.sq, c.sk, c.h, c.hkv, c.d, c.causal);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 2e-5) << "element " << i;
}

}  // namespace

TEST(FlashAttention, MatchesReferenceOnEveryIsa) {
  const CpuIsa before = active_cpu_isa();
  for (CpuIsa isa : {CpuIsa::Generic, CpuIsa::AVX2, CpuIsa::AVX512}) {
    if (int(isa) > int(best_cpu_isa())) continue;
    set_cpu_isa(isa);
    SCOPED_TRACE(cpu_isa_name(isa));
    for (Case c : {Case{1, 1, 1, 1, 64, false}, Case{37, 53, 4, 2, 64, true}, Case{65, 129, 2, 1, 80, true},
                   Case{9, 5, 2, 2, 7, true}, Case{70, 70, 2, 2, 128, false}})
      check_case(c);
  }
  set_cpu_isa(before);
}

TEST(FlashAttention, RejectsBadArguments) {
  std::vector<float> buf(4 * 8 * 64, 1.0f);
  TensorView q(buf.data(), DType::Float32, {1, 8, 4, 64});
  TensorView k3(buf.data(), DType::Float32, {1, 8, 3, 64});
  TensorView out(buf.data(), DType::Float32, {1, 8, 4, 64});
  try {
    flash_attention(q, k3, k3, out, nullptr, {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Value);
    EXPECT_NE(std::string(e.what()).find("multiple of k/v heads"), std::string::npos) << e.what();
  }
  TensorView half(buf.data(), DType::Float16, {1, 8, 4, 64});
  EXPECT_THROW(flash_attention(q, half, half, out, nullptr, {}), Error);
  TensorView cuda_q = q;
  cuda_q.device = Device{DeviceType::CUDA, 0};
  EXPECT_THROW(flash_attention(cuda_q, q, q, out, nullptr, {}), Error);  // mixed devices
}

TEST(Runtime, InfoAndThreads) {
  EXPECT_NE(info_string().find("memkernels"), std::string::npos);
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
  set_num_threads(0);
  EXPECT_GT(num_threads(), 0);
  EXPECT_THROW(set_cpu_isa(CpuIsa(7)), Error);
}
