// memkernels/runtime.h — build information, CPU ISA dispatch, thread count, CUDA presence.
#pragma once

#include <cstddef>
#include <string>

#include "memkernels/tensor.h"

namespace memkernels {

// Instruction-set levels the CPU kernels are compiled for. Each kernel file under core/src/cpu is
// compiled once per level; the level in use is picked at run time (best the CPU supports), and can
// be lowered with set_cpu_isa() or the MEMKERNELS_ISA environment variable (generic|avx2|avx512).
enum class CpuIsa : int { Generic = 0, AVX2 = 1, AVX512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
CpuIsa best_cpu_isa();        // what this CPU (and this build) supports
CpuIsa active_cpu_isa();      // what the kernels use now
void set_cpu_isa(CpuIsa isa); // throws Error(Value) if the CPU does not support it

// Threads used by CPU kernels; default = number of cores. n <= 0 restores the default;
// n > kMaxThreads throws Error(Value) (each thread gets its own stack and scratch buffers).
// In a child made by fork() after a kernel ran, the kernels use one thread (the OpenMP runtime's
// threads stay in the parent); num_threads() then returns 1.
constexpr int kMaxThreads = 1024;
int num_threads();
void set_num_threads(int n);

bool cuda_built();            // compiled with the CUDA backend
int cuda_device_count();      // 0 when not built, no driver or no GPU
std::string cuda_device_name(int device = 0);  // "" when none

// Memory on a device. CPU: 64-byte aligned host memory; CUDA: cudaMalloc. Both throw
// Error(Memory) when the allocation fails. Copies on CUDA are asynchronous on `stream` when given
// (host memory must then be pinned to overlap), synchronous when stream is nullptr.
void* device_malloc(const Device& device, size_t bytes);
void device_free(const Device& device, void* ptr) noexcept;
void device_memcpy(void* dst, const Device& dst_device, const void* src, const Device& src_device, size_t bytes,
                   void* stream = nullptr);
void device_memset_zero(void* dst, const Device& device, size_t bytes, void* stream = nullptr);
void* host_malloc_pinned(size_t bytes);  // page-locked when CUDA is usable, else plain aligned memory
void host_free_pinned(void* ptr) noexcept;
void stream_synchronize(const Device& device, void* stream);

struct BuildInfo {
  std::string version;
  std::string compiler;
  std::string build_type;
  bool cuda_built;
  std::string cuda_architectures;  // e.g. "80;90"
  std::string cpu_isas_compiled;   // e.g. "generic,avx2,avx512"
};
BuildInfo build_info();

// A human-readable multi-line report: version, build options, ISA in use, threads, CUDA, GPU name.
std::string info_string();

}  // namespace memkernels
