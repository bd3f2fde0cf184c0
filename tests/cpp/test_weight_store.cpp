// Weight store: write a small store, read tensors and neurons back, cache budget, bad files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

std::string scratch_path(const char* tag) {
  // Not tmpfs when possible, so O_DIRECT is exercised.
  std::string dir = access("/var/tmp", W_OK) == 0 ? "/var/tmp" : "/tmp";
  return dir + "/mk_ws_" + tag + "_" + std::to_string(getpid()) + ".mkws";
}

struct Model {
  int64_t n = 300, d = 40;
  std::vector<float> gate, up, down_t, emb;  // down_t: (d, n), HF layout, passed transposed
};

Model write_model(const std::string& path, int layers = 2) {
  Model m;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  WeightStoreWriter w(path);
  m.emb.resize(1000 * 3);
  for (auto& x : m.emb) x = u(rng);
  w.add_tensor("emb", TensorView(m.emb.data(), DType::Float32, {1000, 3}), 4096);
  m.gate.resize(size_t(m.n * m.d)), m.up.resize(size_t(m.n * m.d)), m.down_t.resize(size_t(m.n * m.d));
  for (auto* v : {&m.gate, &m.up, &m.down_t})
    for (auto& x : *v) x = u(rng);
  for (int l = 0; l < layers; ++l) {
    TensorView g(m.gate.data(), DType::Float32, {m.n, m.d}), up(m.up.data(), DType::Float32, {m.n, m.d});
    TensorView dn(m.down_t.data(), DType::Float32, {m.n, m.d});
    dn.strides[0] = 1, dn.strides[1] = m.n;  // transpose of the (d, n) array
    w.add_ffn_layer(l, &g, up, dn);
  }
  w.finish();
  return m;
}

}  // namespace

TEST(WeightStore, Crc32cKnownValues) {
  const char* s = "123456789";
  EXPECT_EQ(crc32c(s, 9), 0xE3069283u);  // the standard check value
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);  // RFC 3720 B.4
  // Incremental == one shot, across the 8-byte fast path and the byte tail.
  std::vector<uint8_t> v(1000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = uint8_t(i * 31 + 7);
  EXPECT_EQ(crc32c(v.data() + 13, 987, crc32c(v.data(), 13)), crc32c(v.data(), 1000));
}

TEST(WeightStore, RoundTripTensorsAndRows) {
  std::string path = scratch_path("rt");
  Model m = write_model(path);
  auto st = WeightStore::open(path, 1 << 20);
  std::vector<float> emb(m.emb.size(), -1.f);
  st->get("emb", TensorView(emb.data(), DType::Float32, {1000, 3}));
  EXPECT_EQ(emb, m.emb);
  std::vector<int64_t> ids = {5, 6, 7, 299, 0, 6, 150};
  std::vector<float> out(ids.size() * 3 * size_t(m.d), NAN);
  for (int rep = 0; rep < 2; ++rep) {
    st->get_rows(1, ids.data(), int64_t(ids.size()), TensorView(out.data(), DType::Float32, {int64_t(ids.size()), 3, m.d}));
    for (size_t k = 0; k < ids.size(); ++k)
      for (int64_t j = 0; j < m.d; ++j) {
        const int64_t i = ids[k];
        ASSERT_EQ(out[(k * 3 + 0) * m.d + j], m.gate[i * m.d + j]);
        ASSERT_EQ(out[(k * 3 + 1) * m.d + j], m.up[i * m.d + j]);
        ASSERT_EQ(out[(k * 3 + 2) * m.d + j], m.down_t[j * m.n + i]);
      }
  }
  auto s = st->stats();
  EXPECT_EQ(s.neuron_hits + s.neuron_misses, 2 * ids.size());
  EXPECT_EQ(s.neuron_misses, 6u);  // 6 distinct neurons, all resident on the second pass
  EXPECT_LE(s.peak_resident_bytes + s.staging_bytes, uint64_t(1 << 20));
  st.reset();
  std::remove(path.c_str());
}

TEST(WeightStore, BudgetTooSmallAndCorruptFiles) {
  std::string path = scratch_path("bad");
  write_model(path);
  EXPECT_THROW(
      {
        try {
          WeightStore::open(path, 1000);
        } catch (const Error& e) {
          EXPECT_EQ(e.kind(), ErrorKind::Value);
          EXPECT_NE(std::string(e.what()).find("largest single read"), std::string::npos);
          throw;
        }
      },
      Error);
  // Truncate: CorruptData.
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  in.close();
  {
    std::ofstream o(path, std::ios::binary | std::ios::trunc);
    o.write(bytes.data(), std::streamsize(bytes.size() - 10));
  }
  try {
    WeightStore::open(path, 1 << 20);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
  }
  // Flip a data byte of layer 0, neuron 0: open works, reading it reports a checksum mismatch.
  bytes[4096 + 3 * 1000 * 4 + 4096 - (3 * 1000 * 4) % 4096 + 5] ^= 0x40;
  {
    std::ofstream o(path, std::ios::binary | std::ios::trunc);
    o.write(bytes.data(), std::streamsize(bytes.size()));
  }
  auto st = WeightStore::open(path, 1 << 20);
  std::vector<float> out(3 * 40);
  int64_t id = 0;
  try {
    st->get_rows(0, &id, 1, TensorView(out.data(), DType::Float32, {1, 3, 40}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos);
  }
  id = 1;  // a neighbour still reads fine
  st->get_rows(0, &id, 1, TensorView(out.data(), DType::Float32, {1, 3, 40}));
  st.reset();
  std::remove(path.c_str());
}

TEST(WeightStore, WindowPrefetchAndBudget) {
  std::string path = scratch_path("win");
  Model m = write_model(path, 1);
  const int64_t budget = 64 << 10;  // ~40 neurons of 480 B after staging
  WeightStoreOptions o;
  o.window_tokens = 1;
  o.io_threads = 2;
  o.max_read_bytes = 8192;
  auto st = WeightStore::open(path, budget, o);
  std::vector<int64_t> ids(120);
  for (int64_t i = 0; i < 120; ++i) ids[size_t(i)] = (i * 7) % m.n;
  std::vector<float> out(ids.size() * 3 * size_t(m.d));
  st->prefetch(0, ids.data(), 30);
  st->get_rows(0, ids.data(), int64_t(ids.size()), TensorView(out.data(), DType::Float32, {int64_t(ids.size()), 3, m.d}));
  st->wait_prefetch();
  for (size_t k = 0; k < ids.size(); ++k) ASSERT_EQ(out[(k * 3 + 1) * size_t(m.d)], m.up[size_t(ids[k] * m.d)]);
  auto s = st->stats();
  EXPECT_LE(s.peak_resident_bytes + s.staging_bytes, uint64_t(budget));
  EXPECT_EQ(s.neuron_hits + s.neuron_misses, ids.size());
  EXPECT_GT(s.resident_bytes, 0u);
  st->next_token();  // window of 1 token: everything used in token 0 leaves
  EXPECT_EQ(st->stats().resident_bytes, 0u);
  st.reset();
  std::remove(path.c_str());
}

// Both read engines: Linux AIO (where the kernel gives it) and the pread threads.
TEST(WeightStore, PrefetchStressUnderSmallBudget) {
 for (bool aio : {true, false}) {
  SCOPED_TRACE(aio ? "async_io" : "threads");
  std::string path = scratch_path("stress");
  Model m = write_model(path, 3);
  WeightStoreOptions o;
  o.window_tokens = 2;
  o.io_threads = 3;
  o.max_read_bytes = 4096;
  o.async_io = aio;
  auto st = WeightStore::open(path, 48 << 10, o);  // room for a few dozen neurons only
  if (!aio) EXPECT_STREQ(st->io_engine(), "threads");
  std::mt19937 rng(3);
  std::vector<float> out;
  for (int token = 0; token < 40; ++token) {
    for (int layer = 0; layer < 3; ++layer) {
      std::vector<int64_t> ids(size_t(rng() % 90));
      for (auto& i : ids) i = int64_t(rng() % uint32_t(m.n));
      if (layer < 2) st->prefetch(layer + 1, ids.data(), int64_t(ids.size()));
      out.assign(ids.size() * 3 * size_t(m.d), NAN);
      st->get_rows(layer, ids.data(), int64_t(ids.size()),
                   TensorView(out.data(), DType::Float32, {int64_t(ids.size()), 3, m.d}));
      for (size_t k = 0; k < ids.size(); ++k) {
        ASSERT_EQ(out[(k * 3) * size_t(m.d) + 1], m.gate[size_t(ids[k] * m.d + 1)]);
        ASSERT_EQ(out[(k * 3 + 2) * size_t(m.d) + 3], m.down_t[size_t(3 * m.n + ids[k])]);
      }
    }
    st->next_token();
    auto s = st->stats();
    ASSERT_LE(s.peak_resident_bytes + s.staging_bytes, uint64_t(48 << 10));
  }
  st.reset();  // with prefetches possibly still queued: must drain cleanly
  std::remove(path.c_str());
 }
}
