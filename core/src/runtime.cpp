#include <omp.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>

#include "runtime_internal.h"

#ifndef MEMKERNELS_VERSION
#define MEMKERNELS_VERSION "0.0.0"
#endif
#ifndef MEMKERNELS_CUDA_ARCHS
#define MEMKERNELS_CUDA_ARCHS ""
#endif
#ifndef MEMKERNELS_BUILD_TYPE
#define MEMKERNELS_BUILD_TYPE ""
#endif

namespace memkernels {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::AVX512: return "avx512";
    case CpuIsa::AVX2: return "avx2";
    default: return "generic";
  }
}

CpuIsa best_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return CpuIsa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::AVX2;
#endif
  return CpuIsa::Generic;
}

static CpuIsa initial_isa() {
  CpuIsa best = best_cpu_isa();
  if (const char* env = std::getenv("MEMKERNELS_ISA")) {
    for (CpuIsa isa : {CpuIsa::Generic, CpuIsa::AVX2, CpuIsa::AVX512})
      if (std::strcmp(env, cpu_isa_name(isa)) == 0 && int(isa) <= int(best)) return isa;
  }
  return best;
}

static std::atomic<int> g_active_isa{int(initial_isa())};
static std::atomic<int> g_num_threads{0};

CpuIsa active_cpu_isa() { return CpuIsa(g_active_isa.load(std::memory_order_relaxed)); }

void set_cpu_isa(CpuIsa isa) {
  CpuIsa best = best_cpu_isa();
  check(int(isa) >= 0 && int(isa) <= int(best), ErrorKind::Value,
        std::string("set_cpu_isa: this CPU supports at most '") + cpu_isa_name(best) + "'");
  g_active_isa.store(int(isa));
}

static int default_threads() {
  // Cached: omp_get_num_procs() asks the kernel for the affinity mask, and this runs on every call.
  // MEMKERNELS_NUM_THREADS=n (1..kMaxThreads) overrides the core count (sanitizer runs use 1).
  static const int n = [] {
    if (const char* env = std::getenv("MEMKERNELS_NUM_THREADS")) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (end != env && *end == '\0' && v >= 1 && v <= kMaxThreads) return int(v);
    }
    int p = omp_get_num_procs();
    return p > 0 ? p : int(std::thread::hardware_concurrency());
  }();
  return n;
}

// fork() after an OpenMP region ran: the child inherits the runtime's thread pool state (GNU
// libgomp) but not its threads, and its first multithreaded region waits for them forever. Such a
// child runs the kernels on one thread (a region of one thread never touches the pool).
static std::atomic<bool> g_pool_started{false};
static std::atomic<bool> g_forked_after_pool{false};
static void after_fork_in_child() {
  if (g_pool_started.load(std::memory_order_relaxed)) g_forked_after_pool.store(true, std::memory_order_relaxed);
}
static const bool g_atfork_registered = [] { return ::pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0; }();

int num_threads() {
  (void)g_atfork_registered;
  if (g_forked_after_pool.load(std::memory_order_relaxed)) return 1;
  // Every kernel asks for its thread count right before its parallel region.
  g_pool_started.store(true, std::memory_order_relaxed);
  int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) {
  check(n <= kMaxThreads, ErrorKind::Value,
        "set_num_threads: n must be <= " + std::to_string(kMaxThreads) + " (or <= 0 for the default of " +
            std::to_string(default_threads()) + " cores), got " + std::to_string(n));
  g_num_threads.store(n > 0 ? n : 0);
}

bool cuda_built() {
#if MEMKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#if MEMKERNELS_WITH_CUDA
  return cuda_backend::device_count();
#else
  return 0;
#endif
}

std::string cuda_device_name(int device) {
#if MEMKERNELS_WITH_CUDA
  return cuda_device_count() > device ? cuda_backend::device_name(device) : std::string();
#else
  (void)device;
  return {};
#endif
}

void require_cuda_usable(const char* op, const Device& device) {
  if (!device.is_cuda()) return;
  if (!cuda_built())
    throw_error(ErrorKind::Device, std::string(op) +
                                       ": got CUDA arrays but this memkernels build has no CUDA backend "
                                       "(rebuild with nvcc available or -DMEMKERNELS_CUDA=ON)");
  int n = cuda_device_count();
  if (device.index < 0 || device.index >= n)
    throw_error(ErrorKind::Device, std::string(op) + ": CUDA device " + std::to_string(device.index) +
                                       " is not available (" + std::to_string(n) + " visible)");
}

void* device_malloc(const Device& device, size_t bytes) {
  if (device.is_cuda()) {
    require_cuda_usable("device_malloc", device);
#if MEMKERNELS_WITH_CUDA
    return cuda_backend::malloc_device(device.index, bytes);
#endif
  }
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  check(p != nullptr, ErrorKind::Memory, "out of host memory allocating " + std::to_string(bytes) + " bytes");
  return p;
}

void device_free(const Device& device, void* ptr) noexcept {
  if (!ptr) return;
#if MEMKERNELS_WITH_CUDA
  if (device.is_cuda()) return cuda_backend::free_device(device.index, ptr);
#endif
  (void)device;
  std::free(ptr);
}

void device_memcpy(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes,
                   void* stream) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
  require_cuda_usable("device_memcpy", dst_device.is_cuda() ? dst_device : src_device);
#if MEMKERNELS_WITH_CUDA
  cuda_backend::memcpy_any(dst, src, bytes, stream);
#else
  (void)stream;
#endif
}

void device_memset_zero(void* dst, const Device& device, size_t bytes, void* stream) {
  if (bytes == 0) return;
  if (device.is_cpu()) {
    std::memset(dst, 0, bytes);
    return;
  }
  require_cuda_usable("device_memset_zero", device);
#if MEMKERNELS_WITH_CUDA
  cuda_backend::memset_zero(device.index, dst, bytes, stream);
#else
  (void)stream;
#endif
}

void* host_malloc_pinned(size_t bytes) {
#if MEMKERNELS_WITH_CUDA
  if (cuda_device_count() > 0) return cuda_backend::malloc_pinned(bytes);
#endif
  return device_malloc(Device{}, bytes);
}

void host_free_pinned(void* ptr) noexcept {
#if MEMKERNELS_WITH_CUDA
  if (ptr && cuda_device_count() > 0) return cuda_backend::free_pinned(ptr);
#endif
  std::free(ptr);
}

void stream_synchronize(const Device& device, void* stream) {
  if (device.is_cpu()) return;
  require_cuda_usable("stream_synchronize", device);
#if MEMKERNELS_WITH_CUDA
  cuda_backend::synchronize(device.index, stream);
#else
  (void)stream;
#endif
}

BuildInfo build_info() {
  BuildInfo b;
  b.version = MEMKERNELS_VERSION;
#if defined(__clang__)
  b.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  b.compiler = "gcc " __VERSION__;
#else
  b.compiler = "unknown";
#endif
  b.build_type = MEMKERNELS_BUILD_TYPE;
  b.cuda_built = cuda_built();
  b.cuda_architectures = MEMKERNELS_CUDA_ARCHS;
  b.cpu_isas_compiled = "generic,avx2,avx512";
  return b;
}

std::string info_string() {
  BuildInfo b = build_info();
  std::ostringstream s;
  s << "memkernels " << b.version << "\n"
    << "  compiler:        " << b.compiler << " (" << b.build_type << ")\n"
    << "  CPU ISA:         " << cpu_isa_name(active_cpu_isa()) << " (best supported: " << cpu_isa_name(best_cpu_isa())
    << "; compiled: " << b.cpu_isas_compiled << ")\n"
    << "  threads:         " << num_threads() << "\n"
    << "  CUDA built:      " << (b.cuda_built ? "yes (sm " + b.cuda_architectures + ")" : std::string("no")) << "\n"
    << "  CUDA devices:    " << cuda_device_count() << "\n";
  if (cuda_device_count() > 0) s << "  GPU:             " << cuda_device_name(0) << "\n";
  return s.str();
}

}  // namespace memkernels
