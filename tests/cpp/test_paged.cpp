// PagedKVCache and paged attention: allocator behaviour, all-or-nothing append, and attention
// against a plain double-precision reference over the same contiguous K/V.
#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <random>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// softmax(q k^T * scale) v over keys lo..len-1 of one sequence, q: (heads, D), k/v: (len, kvh, D).
std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                              int heads, int kvh, int D, int len, int lo = 0) {
  std::vector<double> out(size_t(heads) * D, 0.0);
  const int group = heads / kvh;
  for (int h = 0; h < heads; ++h) {
    const int g = h / group;
    std::vector<double> s(len);
    double mx = -1e300;
    for (int j = 0; j < lo; ++j) s[j] = -INFINITY;
    for (int j = lo; j < len; ++j) {
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += double(q[h * D + d]) * k[(size_t(j) * kvh + g) * D + d];
      s[j] = acc / std::sqrt(double(D));
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < len; ++j) sum += (s[j] = std::exp(s[j] - mx));
    for (int j = 0; j < len; ++j)
      for (int d = 0; d < D; ++d) out[h * D + d] += s[j] / sum * v[(size_t(j) * kvh + g) * D + d];
  }
  return out;
}

}  // namespace

TEST(Paged, DecodeMatchesReference) {
  const int L = 2, P = 64, ps = 16, kvh = 2, heads = 8, D = 64;
  PagedKVCache cache(L, P, ps, kvh, D, DType::Float32);
  std::mt19937 rng(1);
  const std::vector<int> lens = {1, 37, 100};
  std::vector<int64_t> ids;
  std::vector<std::vector<float>> ks, vs;
  for (int len : lens) {
    int64_t id = cache.add_sequence();
    ids.push_back(id);
    auto k = randn(size_t(len) * kvh * D, rng), v = randn(size_t(len) * kvh * D, rng);
    for (int layer = 0; layer < L; ++layer)
      cache.append({id}, layer, TensorView(k.data(), DType::Float32, {len, kvh, D}),
                   TensorView(v.data(), DType::Float32, {len, kvh, D}), {len});
    ks.push_back(k), vs.push_back(v);
  }
  cache.check_invariants();
  auto q = randn(size_t(lens.size()) * heads * D, rng);
  std::vector<float> out(q.size(), NAN);
  const int64_t B = int64_t(lens.size());
  cache.attention(TensorView(q.data(), DType::Float32, {B, heads, D}), 1, ids, {},
                  TensorView(out.data(), DType::Float32, {B, heads, D}), nullptr, PagedAttentionOptions{});
  for (size_t b = 0; b < lens.size(); ++b) {
    std::vector<float> qb(q.begin() + b * heads * D, q.begin() + (b + 1) * heads * D);
    auto ref = reference(qb, ks[b], vs[b], heads, kvh, D, lens[b]);
    for (int i = 0; i < heads * D; ++i) EXPECT_NEAR(out[b * heads * D + i], ref[i], 1e-4) << "seq " << b;
  }
}

TEST(Paged, AppendIsAllOrNothing) {
  PagedKVCache cache(1, 4, 4, 1, 16, DType::Float32);
  std::vector<float> kv(20 * 16, 1.0f);
  const int64_t a = cache.add_sequence(), b = cache.add_sequence();
  cache.append({a}, 0, TensorView(kv.data(), DType::Float32, {10, 1, 16}),
               TensorView(kv.data(), DType::Float32, {10, 1, 16}), {10});  // 3 pages
  try {
    cache.append({a, b}, 0, TensorView(kv.data(), DType::Float32, {8, 1, 16}),
                 TensorView(kv.data(), DType::Float32, {8, 1, 16}), {3, 5});  // needs 1 + 2 > 1 free
    FAIL() << "expected CacheFull";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CacheFull);
  }
  EXPECT_EQ(cache.length(a), 10);
  EXPECT_EQ(cache.length(b), 0);
  EXPECT_EQ(cache.stats().pages_free, 1);
  cache.check_invariants();
}

TEST(Paged, ForkCopyOnWrite) {
  PagedKVCache cache(1, 8, 4, 1, 16, DType::Float32);
  std::vector<float> kv(6 * 16, 2.0f);
  const int64_t a = cache.add_sequence();
  cache.append({a}, 0, TensorView(kv.data(), DType::Float32, {6, 1, 16}),
               TensorView(kv.data(), DType::Float32, {6, 1, 16}), {6});
  const int64_t b = cache.fork(a);
  EXPECT_EQ(cache.page_table(a), cache.page_table(b));
  EXPECT_EQ(cache.refcount(cache.page_table(a)[1]), 2);
  cache.append({b}, 0, TensorView(kv.data(), DType::Float32, {1, 1, 16}),
               TensorView(kv.data(), DType::Float32, {1, 1, 16}));
  EXPECT_EQ(cache.page_table(a)[0], cache.page_table(b)[0]);  // full page still shared
  EXPECT_NE(cache.page_table(a)[1], cache.page_table(b)[1]);  // partly filled page copied
  cache.free(a);
  cache.free(b);
  EXPECT_EQ(cache.stats().pages_free, 8);
  EXPECT_THROW(cache.free(a), Error);
  cache.check_invariants();
}

TEST(Paged, RawRejectsBadIndices) {
  std::vector<float> pages(4 * 4 * 1 * 16, 0.0f), q(16), out(16);
  int32_t indptr[2] = {0, 1}, indices[1] = {7}, last[1] = {2};
  TensorView kp(pages.data(), DType::Float32, {4, 4, 1, 16});
  try {
    paged_attention_raw(TensorView(q.data(), DType::Float32, {1, 1, 16}), kp, kp, nullptr,
                        TensorView(indptr, DType::Int32, {2}), TensorView(indices, DType::Int32, {1}),
                        TensorView(last, DType::Int32, {1}), TensorView(out.data(), DType::Float32, {1, 1, 16}),
                        nullptr, PagedAttentionOptions{});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Value);
    EXPECT_NE(std::string(e.what()).find("kv_indices"), std::string::npos);
  }
}

TEST(Paged, Int8PagesCloseToFloat) {
  const int ps = 8, kvh = 2, heads = 4, D = 32, len = 50;
  PagedKVCache f32(1, 16, ps, kvh, D, DType::Float32), i8(1, 16, ps, kvh, D, DType::Int8);
  std::mt19937 rng(5);
  auto k = randn(size_t(len) * kvh * D, rng), v = randn(size_t(len) * kvh * D, rng);
  auto q = randn(size_t(heads) * D, rng);
  std::vector<float> o32(q.size(), NAN), o8(q.size(), NAN);
  for (PagedKVCache* c : {&f32, &i8}) {
    const int64_t id = c->add_sequence();
    c->append({id}, 0, TensorView(k.data(), DType::Float32, {len, kvh, D}),
              TensorView(v.data(), DType::Float32, {len, kvh, D}), {len});
    c->attention(TensorView(q.data(), DType::Float32, {1, heads, D}), 0, {id}, {},
                 TensorView((c == &f32 ? o32 : o8).data(), DType::Float32, {1, heads, D}), nullptr,
                 PagedAttentionOptions{});
  }
  EXPECT_EQ(i8.stats().bytes_per_token, 2 * kvh * (D + 4));
  for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(o8[i], o32[i], 3e-2);
}

TEST(Paged, CudaCacheWithoutDeviceRaises) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  try {
    PagedKVCache c(1, 4, 4, 1, 16, DType::Float16, Device{DeviceType::CUDA, 0});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Device);
  }
}

// Causal chunk of queries over cached keys, odd head_dim (staging path), forced split-KV.
TEST(Paged, PrefillSplitOddHeadDim) {
  const int ps = 5, kvh = 1, heads = 3, D = 40, len = 61, nq = 7;
  PagedKVCache cache(1, 20, ps, kvh, D, DType::Float32);
  std::mt19937 rng(9);
  auto k = randn(size_t(len) * kvh * D, rng), v = randn(size_t(len) * kvh * D, rng);
  auto q = randn(size_t(nq) * heads * D, rng);
  const int64_t id = cache.add_sequence();
  cache.append({id}, 0, TensorView(k.data(), DType::Float32, {len, kvh, D}),
               TensorView(v.data(), DType::Float32, {len, kvh, D}), {len});
  std::vector<float> out(q.size(), NAN), lse(size_t(heads) * nq, NAN);
  PagedAttentionOptions o;
  o.num_splits = 3;
  TensorView tl(lse.data(), DType::Float32, {heads, nq});
  cache.attention(TensorView(q.data(), DType::Float32, {nq, heads, D}), 0, {id}, {nq},
                  TensorView(out.data(), DType::Float32, {nq, heads, D}), &tl, o);
  for (int i = 0; i < nq; ++i) {  // query i sees keys 0 .. len - nq + i
    std::vector<float> qi(q.begin() + size_t(i) * heads * D, q.begin() + size_t(i + 1) * heads * D);
    auto ref = reference(qi, k, v, heads, kvh, D, len - nq + i + 1);
    for (int j = 0; j < heads * D; ++j) EXPECT_NEAR(out[size_t(i) * heads * D + j], ref[j], 1e-4) << "row " << i;
  }
  for (float x : lse) EXPECT_TRUE(std::isfinite(x));
}

TEST(Paged, Kivi4CloseToFloatAndWindowExact) {
  const int ps = 8, kvh = 2, heads = 4, D = 32, len = 45;
  PagedKVCache f32(2, 16, ps, kvh, D, DType::Float32), kv4(2, 16, ps, kvh, D, DType::UInt8, Device{}, 4);
  std::mt19937 rng(11);
  auto k = randn(size_t(len) * kvh * D, rng), v = randn(size_t(len) * kvh * D, rng);
  auto q = randn(size_t(heads) * D, rng);
  std::vector<float> o32(q.size(), NAN), o4(q.size(), NAN);
  for (PagedKVCache* c : {&f32, &kv4}) {
    const int64_t id = c->add_sequence();
    for (int layer = 0; layer < 2; ++layer)
      c->append({id}, layer, TensorView(k.data(), DType::Float32, {len, kvh, D}),
                TensorView(v.data(), DType::Float32, {len, kvh, D}), {len});
    c->attention(TensorView(q.data(), DType::Float32, {1, heads, D}), 1, {id}, {},
                 TensorView((c == &f32 ? o32 : o4).data(), DType::Float32, {1, heads, D}), nullptr,
                 PagedAttentionOptions{});
    std::vector<float> kr(k.size()), vr(v.size());
    c->read_kv(id, 1, kr.data(), vr.data());
    for (size_t i = size_t(40) * kvh * D; i < k.size(); ++i) ASSERT_EQ(kr[i], k[i]);  // recent window
  }
  for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(o4[i], o32[i], 0.15);
  EXPECT_THROW(PagedKVCache(1, 4, 4, 1, 16, DType::UInt8, Device{}, 3), Error);
}

// Sliding window over a chunk of queries: row i (position len - nq + i) sees keys
// [pos - window_left, pos]; split or not; a window near INT_MAX acts as no window.
TEST(Paged, SlidingWindowPrefillAndDecode) {
  const int ps = 6, kvh = 2, heads = 4, D = 48, len = 150, nq = 9;
  PagedKVCache cache(1, 40, ps, kvh, D, DType::Float32);
  std::mt19937 rng(13);
  auto k = randn(size_t(len) * kvh * D, rng), v = randn(size_t(len) * kvh * D, rng);
  auto q = randn(size_t(nq) * heads * D, rng);
  const int64_t id = cache.add_sequence();
  cache.append({id}, 0, TensorView(k.data(), DType::Float32, {len, kvh, D}),
               TensorView(v.data(), DType::Float32, {len, kvh, D}), {len});
  for (int window : {0, 7, 40, INT_MAX - 1, INT_MAX}) {
    for (int splits : {1, 3, 0}) {
      for (int rows : {1, nq}) {  // decode, chunked prefill
        std::vector<float> out(size_t(rows) * heads * D, NAN);
        PagedAttentionOptions o;
        o.window_left = window, o.window_right = 5;  // right is ignored: causal
        o.num_splits = splits;
        cache.attention(TensorView(q.data(), DType::Float32, {rows, heads, D}), 0, {id}, {rows},
                        TensorView(out.data(), DType::Float32, {rows, heads, D}), nullptr, o);
        for (int i = 0; i < rows; ++i) {
          const int pos = len - rows + i, lo = window >= pos ? 0 : pos - window;
          std::vector<float> qi(q.begin() + size_t(i) * heads * D, q.begin() + size_t(i + 1) * heads * D);
          auto ref = reference(qi, k, v, heads, kvh, D, pos + 1, lo);
          for (int j = 0; j < heads * D; ++j)
            ASSERT_NEAR(out[size_t(i) * heads * D + j], ref[j], 1e-4)
                << "window " << window << " splits " << splits << " rows " << rows << " row " << i;
        }
      }
    }
  }
}
