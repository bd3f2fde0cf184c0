// CUDA device queries for memkernels::info() and the "is CUDA usable" checks.
#include <cuda_runtime.h>

#include "runtime_internal.h"

namespace memkernels::cuda_backend {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls are not confused
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  return prop.name;
}

}  // namespace memkernels::cuda_backend

#include "cuda_common.cuh"

namespace memkernels::cuda_backend {

void* malloc_device(int device, size_t bytes) {
  DeviceGuard guard(device);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw_error(ErrorKind::Memory, "out of GPU memory allocating " + std::to_string(bytes) + " bytes on cuda:" +
                                       std::to_string(device) + " (" + cudaGetErrorString(err) + ")");
  }
  return p;
}

void free_device(int device, void* ptr) noexcept {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFree(ptr);
  cudaSetDevice(previous);
}

void memcpy_any(void* dst, const void* src, size_t bytes, void* stream) {
  if (stream)
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)), "cudaMemcpyAsync");
  else
    check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
}

void memset_zero(int device, void* dst, size_t bytes, void* stream) {
  DeviceGuard guard(device);
  check_cuda(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(stream)), "cudaMemsetAsync");
  if (!stream) check_cuda(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
}

void* malloc_pinned(size_t bytes) {
  void* p = nullptr;
  cudaError_t err = cudaMallocHost(&p, bytes ? bytes : 1);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw_error(ErrorKind::Memory, "cannot allocate " + std::to_string(bytes) + " bytes of pinned host memory (" +
                                       cudaGetErrorString(err) + ")");
  }
  return p;
}

void free_pinned(void* ptr) noexcept { cudaFreeHost(ptr); }

void synchronize(int device, void* stream) {
  DeviceGuard guard(device);
  check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace memkernels::cuda_backend
