// Regression checks for the bugs the hardening work found (see tests/BAD_INPUTS.md): each input
// used to crash or allocate far beyond its size; it must now be a clean Error. Run under ASan in CI.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

template <typename F>
ErrorKind kind_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  ADD_FAILURE() << "no Error thrown";
  return ErrorKind::Value;
}

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

TEST(Hardening, PagedCachePoolSizeOverflowIsRejected) {
  // The int64 pool size wrapped to 0 for these; append() then wrote past the empty pool.
  EXPECT_EQ(kind_of([] { PagedKVCache c(1 << 30, 4, 1 << 20, 1, 1 << 13, DType::Float32); }), ErrorKind::Value);
  EXPECT_EQ(kind_of([] { PagedKVCache c(1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, DType::Int8); }),
            ErrorKind::Value);
  PagedKVCache ok(2, 8, 16, 2, 64, DType::Float32);
  EXPECT_EQ(ok.stats().pool_bytes, int64_t(2) * 8 * 16 * 2 * 64 * 2 * 4);
}

TEST(Hardening, QuantizedBytesWithHugeShapeAreRejectedBeforeAllocating) {
  std::vector<float> w(2 * 128, 0.5f);
  QuantOptions o;
  o.group_size = 128;
  std::vector<uint8_t> b = quantize(TensorView(w.data(), DType::Float32, {2, 128}), QuantFormat::Int4, o).serialize();
  const int64_t rows = int64_t(1) << 24;  // a 1.1 GB matrix announced by a 328-byte input
  std::memcpy(b.data() + 16, &rows, 8);
  const uint64_t sum = fnv1a(b.data(), b.size() - 8);
  std::memcpy(b.data() + b.size() - 8, &sum, 8);
  try {
    QuantizedMatrix::deserialize(b.data(), b.size());
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
    EXPECT_NE(std::string(e.what()).find("too small for its shape"), std::string::npos) << e.what();
  }
}
