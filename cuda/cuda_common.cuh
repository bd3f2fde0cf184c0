// Helpers shared by the CUDA kernel files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

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

}  // namespace memkernels::cuda_backend
