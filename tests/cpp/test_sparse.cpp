// SparseMatrix + spmm: a few C++ checks (the thorough ones are in tests/python/test_sparse.py).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "memkernels/memkernels.h"

using namespace memkernels;

namespace {

std::vector<float> random_sparse(int64_t rows, int64_t cols, double sparsity, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), p(0.0f, 1.0f);
  std::vector<float> w(size_t(rows * cols));
  for (float& v : w) v = p(rng) < sparsity ? 0.0f : u(rng);
  return w;
}

void check_spmm(SparseFormat f, DType vdt, int64_t rows, int64_t cols, int64_t tokens, double sparsity) {
  std::vector<float> w = random_sparse(rows, cols, sparsity, 7);
  if (f == SparseFormat::Semi24)  // keep at most 2 of every 4
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        if (c % 4 >= 2) w[size_t(r * cols + c)] = 0.0f;
  SparseMatrix sp = SparseMatrix::from_dense(TensorView(w.data(), DType::Float32, {rows, cols}), f, vdt);
  std::vector<float> wd(w.size());
  sp.to_dense(TensorView(wd.data(), DType::Float32, {rows, cols}));
  std::vector<float> x = random_sparse(tokens, cols, 0.0, 3), out(size_t(tokens * rows), NAN);
  spmm(sp, TensorView(x.data(), DType::Float32, {tokens, cols}), TensorView(out.data(), DType::Float32, {tokens, rows}));
  for (int64_t n = 0; n < tokens; ++n)
    for (int64_t r = 0; r < rows; ++r) {
      double ref = 0, mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        ref += double(x[size_t(n * cols + c)]) * wd[size_t(r * cols + c)];
        mag += std::fabs(double(x[size_t(n * cols + c)]) * wd[size_t(r * cols + c)]);
      }
      ASSERT_NEAR(out[size_t(n * rows + r)], ref, 1e-5 * mag + 1e-6) << "row " << r << " token " << n;
    }
}

}  // namespace

TEST(Sparse, BitmapMatchesReference) {
  for (DType vdt : {DType::Float32, DType::Float16, DType::BFloat16})
    for (int64_t tokens : {1, 3, 9}) check_spmm(SparseFormat::Bitmap, vdt, 37, 131, tokens, 0.7);
}

TEST(Sparse, CsrAnd24MatchReference) {
  check_spmm(SparseFormat::CSR, DType::Float32, 21, 70, 5, 0.6);
  check_spmm(SparseFormat::Semi24, DType::Float16, 19, 66, 4, 0.3);
}

TEST(Sparse, EveryIsaAgrees) {
  const CpuIsa best = best_cpu_isa();
  for (CpuIsa isa : {CpuIsa::Generic, CpuIsa::AVX2, CpuIsa::AVX512}) {
    if (int(isa) > int(best)) continue;
    set_cpu_isa(isa);
    check_spmm(SparseFormat::Bitmap, DType::Float32, 33, 200, 10, 0.8);
  }
  set_cpu_isa(best);
}

TEST(Sparse, CorruptCsrRaisesValueError) {
  std::vector<int64_t> indptr = {0, 2, 1};  // decreasing
  std::vector<int32_t> indices = {0, 1};
  std::vector<float> vals = {1, 2};
  auto make = [&] {
    return SparseMatrix::from_csr(2, 4, TensorView(indptr.data(), DType::Int64, {3}),
                                  TensorView(indices.data(), DType::Int32, {2}),
                                  TensorView(vals.data(), DType::Float32, {2}), SparseFormat::Bitmap, DType::Float32);
  };
  try {
    make();
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Value);
    EXPECT_NE(std::string(e.what()).find("non-decreasing"), std::string::npos);
  }
  indptr = {0, 1, 2};
  indices = {0, 4};  // out of range
  EXPECT_THROW(make(), Error);
}

TEST(Sparse, BytesRoundTripAndDamageDetected) {
  std::vector<float> w = random_sparse(10, 90, 0.7, 1);
  SparseMatrix sp = SparseMatrix::from_dense(TensorView(w.data(), DType::Float32, {10, 90}), SparseFormat::Bitmap,
                                             DType::Float32);
  std::string b = sp.to_bytes();
  SparseMatrix back = SparseMatrix::from_bytes(b.data(), b.size());
  std::vector<float> wd(w.size());
  back.to_dense(TensorView(wd.data(), DType::Float32, {10, 90}));
  EXPECT_EQ(wd, w);
  b[b.size() / 2] ^= 0x10;
  try {
    SparseMatrix::from_bytes(b.data(), b.size());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::CorruptData);
  }
  EXPECT_THROW(SparseMatrix::from_bytes(b.data(), 20), Error);
}
