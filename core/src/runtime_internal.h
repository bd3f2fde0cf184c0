// Internal runtime helpers shared by the dispatch files (not installed).
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>

#include "memkernels/runtime.h"
#include "memkernels/tensor.h"

namespace memkernels {

// Throws a clear Error(Device) when `device` is CUDA but this build or machine cannot run CUDA.
void require_cuda_usable(const char* op, const Device& device);

// Threads for a kernel call of `macs` multiply-adds (the qgemm kernels): below 16 million (a 3072 x
// 4096 layer at one token, ~0.2 ms on one core) the call stays on the calling thread. A decode step
// makes many small calls with Python work in between, so each parallel call wakes a sleeping OpenMP
// team (tens of microseconds) and, when other processes hold the cores, waits for a descheduled
// thread: SmolLM2-135M decode with 2 threads on a loaded 2-core machine ran 26-41 ms per token with
// a threshold of 1 million (its 3072 x 576 gate/up layers split) and 17-19 ms with 16 million, where
// a quiet machine showed no difference.
inline int threads_for_macs(int64_t macs) {
  constexpr int64_t kParallelMacs = int64_t(1) << 24;
  return macs < kParallelMacs ? 1 : num_threads();
}

// An exception leaving an OpenMP parallel region calls std::terminate. Code inside a region that may
// throw (a scratch allocation) runs through guard.run(f); the first exception is kept, the other
// threads skip their remaining work (guard.failed()), and guard.rethrow() after the region raises it.
class ParallelGuard {
 public:
  template <class F>
  bool run(F&& f) noexcept {
    if (failed()) return false;
    try {
      f();
      return true;
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
      return false;
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() const {
    std::exception_ptr e;
    {
      // The region's closing barrier already orders this read; the lock makes that visible to
      // ThreadSanitizer, which cannot see libgomp's barriers.
      std::lock_guard<std::mutex> lk(mu_);
      e = error_;
    }
    if (e) std::rethrow_exception(e);
  }

 private:
  mutable std::mutex mu_;
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

namespace cuda_backend {
// Implemented in cuda/runtime.cu; only called when MEMKERNELS_WITH_CUDA is set.
int device_count();
std::string device_name(int device);
void* malloc_device(int device, size_t bytes);
void free_device(int device, void* ptr) noexcept;
void memcpy_any(void* dst, const void* src, size_t bytes, void* stream);  // cudaMemcpyDefault
void memset_zero(int device, void* dst, size_t bytes, void* stream);
void* malloc_pinned(size_t bytes);
void free_pinned(void* ptr) noexcept;
void synchronize(int device, void* stream);
// Stream-ordered scratch (cudaMallocAsync / cudaFreeAsync on `stream`): the memory may be reused by
// later work on that stream as soon as the work enqueued before the free is done.
void* malloc_async(int device, size_t bytes, void* stream);
void free_async(int device, void* ptr, void* stream) noexcept;
void memset_async(int device, void* dst, size_t bytes, void* stream);  // zeros; never synchronises
// cudaMemcpy2DAsync(cudaMemcpyDefault): `height` rows of `width` bytes, pitches in bytes.
void copy_2d(int device, void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height,
             void* stream);
// dst[i] = src[i] converted (float32/float16/bfloat16 both), n elements on the device, on `stream`.
void convert_floats(int device, const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, void* stream);
}  // namespace cuda_backend

}  // namespace memkernels

// Calls a CPU kernel compiled for the active ISA level: MK_CPU_DISPATCH(flash_attention, problem)
// calls memkernels::cpu::<level>::flash_attention(problem). Each level is the same source compiled
// with different flags (see CMakeLists.txt, MEMKERNELS_CPU_ISAS).
#define MK_CPU_DISPATCH(fn, ...)                                                     \
  do {                                                                               \
    switch (::memkernels::active_cpu_isa()) {                                        \
      case ::memkernels::CpuIsa::AVX512: ::memkernels::cpu::avx512::fn(__VA_ARGS__); break; \
      case ::memkernels::CpuIsa::AVX2: ::memkernels::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: ::memkernels::cpu::generic::fn(__VA_ARGS__); break;                   \
    }                                                                                \
  } while (0)

// Declares `decl` (a function declaration) in each ISA namespace.
#define MK_DECLARE_CPU_KERNEL(decl)              \
  namespace memkernels::cpu::generic { decl; }   \
  namespace memkernels::cpu::avx2 { decl; }      \
  namespace memkernels::cpu::avx512 { decl; }
