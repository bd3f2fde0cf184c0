// Helpers shared by the CUDA kernel files.
//
// Inline PTX and kernel launches go only through the wrappers below (mma_m16n8k16_*, ldmatrix_*,
// launch_kernel, MK_DYNAMIC_SHARED): each has its device body and its emulated body side by side,
// so the CUDA emulation build (-DMEMKERNELS_CUDA_EMULATION=ON, tests/cuda_emulation) compiles every
// kernel with the host compiler and runs it on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#ifdef MEMKERNELS_CUDA_EMULATION
#include "mkemu/cuda_emulation.h"
#endif

#include "memkernels/tensor.h"

namespace memkernels::cuda_backend {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw_error(ErrorKind::Device, std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

// Checks the launch just made (configuration errors); does not synchronise.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// Selects `device` for the scope and restores the previous one after.
struct DeviceGuard {
  int previous = 0;
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous);
    if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous); }
};

// Stream-ordered scratch memory freed (cudaFreeAsync on the same stream) when the scope ends,
// also when a launch or check in between throws.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    for (int i = 0; i < n_; ++i) cudaFreeAsync(ptrs_[i], stream_);
  }
  void* alloc(size_t bytes, const char* what) {
    if (n_ == kMax) throw_error(ErrorKind::Value, std::string(what) + ": too many scratch buffers");
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, bytes ? bytes : 4, stream_), what);
    ptrs_[n_++] = p;
    return p;
  }

 private:
  static constexpr int kMax = 4;
  cudaStream_t stream_;
  void* ptrs_[kMax] = {};
  int n_ = 0;
};

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls fn with a null pointer of the CUDA element type matching dtype (float, __half, __nv_bfloat16).
template <typename Fn>
void dispatch_float_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(static_cast<float*>(nullptr)); break;
    case DType::Float16: fn(static_cast<__half*>(nullptr)); break;
    case DType::BFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw_error(ErrorKind::Type, std::string("unsupported dtype on CUDA: ") + dtype_name(dtype));
  }
}

// ------------------------------------------------------------------ launch and PTX wrappers

// kernel<<<grid, block, smem, stream>>>(args...), spelled so that a host compiler can run it.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#ifdef MEMKERNELS_CUDA_EMULATION
  ::mkemu::stream_before_launch(stream);  // the kernel runs now, after its stream's earlier work
  ::mkemu::launch({grid, block, smem, reinterpret_cast<const void*>(kernel)}, [&] { kernel(Params(args)...); });
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

// The kernel's dynamic shared memory (the launch's smem bytes) as a T*, 16-byte aligned.
#ifdef MEMKERNELS_CUDA_EMULATION
#define MK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::mkemu::dynamic_shared())
#else
#define MK_DYNAMIC_SHARED(T, name)                               \
  extern __shared__ __align__(16) unsigned char mk_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(mk_dynamic_smem)
#endif

// c (4 fp32 accumulators) += A * B with mma.sync.aligned.m16n8k16.row.col, fp16 or bf16 inputs:
// a[4] and b0/b1 are the lane's A and B fragments (PTX ISA fragment layout; see
// tests/cuda_emulation/src/tensor_core.cpp for the table). Warp-wide: all 32 lanes must call it.
__device__ __forceinline__ void mma_m16n8k16_f16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef MEMKERNELS_CUDA_EMULATION
  ::mkemu::mma_m16n8k16(::mkemu::MmaInput::F16, c, a, b0, b1, MKEMU_SITE);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef MEMKERNELS_CUDA_EMULATION
  ::mkemu::mma_m16n8k16(::mkemu::MmaInput::BF16, c, a, b0, b1, MKEMU_SITE);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 pass the shared-memory row
// addresses of 8x8 matrix i (16 bytes each); r[i] receives this lane's pair of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_row) {
#ifdef MEMKERNELS_CUDA_EMULATION
  ::mkemu::ldmatrix(4, false, r, smem_row, MKEMU_SITE);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem_row) {
#ifdef MEMKERNELS_CUDA_EMULATION
  ::mkemu::ldmatrix(4, true, r, smem_row, MKEMU_SITE);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

}  // namespace memkernels::cuda_backend
