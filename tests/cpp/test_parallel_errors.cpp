// A throw inside an OpenMP region calls std::terminate. Every region in the kernels must catch
// failures (a scratch allocation running out of memory) and rethrow them after the region.
// This binary replaces operator new: while `g_fail_workers` is set, any allocation made by a
// thread other than the test's own (an OpenMP worker) throws std::bad_alloc.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

#include "memkernels/memkernels.h"

namespace {
std::atomic<bool> g_fail_workers{false};
std::thread::id g_main_thread;
}  // namespace

void* operator new(std::size_t n) {
  if (g_fail_workers.load(std::memory_order_relaxed) && std::this_thread::get_id() != g_main_thread)
    throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace memkernels {
namespace {

// Sets up the failing allocator for one scope, with several threads so workers exist.
struct FailWorkerAllocations {
  int threads_before;
  FailWorkerAllocations() : threads_before(num_threads()) {
    set_num_threads(4);
    g_main_thread = std::this_thread::get_id();
    g_fail_workers = true;
  }
  ~FailWorkerAllocations() {
    g_fail_workers = false;
    set_num_threads(threads_before);
  }
};

std::vector<float> filled(size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = float((i * 7919) % 13) - 6.0f + 0.25f;
  return v;
}

TEST(ParallelErrors, FlashAttentionScratchFailureThrows) {
  const int64_t S = 200, H = 4, D = 32;
  auto q = filled(size_t(S * H * D)), o = filled(size_t(S * H * D));
  TensorView tq(q.data(), DType::Float32, {1, S, H, D}), to(o.data(), DType::Float32, {1, S, H, D});
  {
    FailWorkerAllocations fail;
    EXPECT_ANY_THROW(flash_attention(tq, tq, tq, to, nullptr, AttentionOptions{}));
  }
  EXPECT_NO_THROW(flash_attention(tq, tq, tq, to, nullptr, AttentionOptions{}));
}

TEST(ParallelErrors, SparseFromDenseAndSpmmScratchFailureThrows) {
  const int64_t R = 300, C = 200, N = 5;
  auto w = filled(size_t(R * C)), x = filled(size_t(N * C)), o = filled(size_t(N * R));
  TensorView tw(w.data(), DType::Float32, {R, C});
  for (SparseFormat f : {SparseFormat::Bitmap, SparseFormat::CSR}) {
    {
      FailWorkerAllocations fail;
      EXPECT_ANY_THROW(SparseMatrix::from_dense(tw, f, DType::Float32));
    }
    SparseMatrix sp = SparseMatrix::from_dense(tw, f, DType::Float32);
    TensorView tx(x.data(), DType::Float32, {N, C}), to(o.data(), DType::Float32, {N, R});
    {
      FailWorkerAllocations fail;
      EXPECT_ANY_THROW(spmm(sp, tx, to));
    }
    EXPECT_NO_THROW(spmm(sp, tx, to));
  }
}

}  // namespace
}  // namespace memkernels
