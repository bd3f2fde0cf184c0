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

#include <algorithm>
#include <type_traits>

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

void* malloc_async(int device, size_t bytes, void* stream) {
  DeviceGuard guard(device);
  void* p = nullptr;
  cudaError_t err = cudaMallocAsync(&p, bytes ? bytes : 4, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw_error(ErrorKind::Memory, "out of GPU memory allocating " + std::to_string(bytes) + " bytes of scratch on cuda:" +
                                       std::to_string(device) + " (" + cudaGetErrorString(err) + ")");
  }
  return p;
}

void free_async(int device, void* ptr, void* stream) noexcept {
  if (!ptr) return;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream));
  cudaSetDevice(previous);
}

void memset_async(int device, void* dst, size_t bytes, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  check_cuda(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(stream)), "cudaMemsetAsync");
}

void copy_2d(int device, void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height,
             void* stream) {
  if (width == 0 || height == 0) return;
  DeviceGuard guard(device);
  check_cuda(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDefault,
                               static_cast<cudaStream_t>(stream)),
             "cudaMemcpy2DAsync");
}

namespace {
template <typename S, typename D>
__global__ void convert_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<D>(to_float<S>(src[i]));
}
}  // namespace

void convert_floats(int device, const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, void* stream) {
  if (n <= 0) return;
  DeviceGuard guard(device);
  const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 1024));
  dispatch_float_dtype(src_dtype, [&](auto* s_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    dispatch_float_dtype(dst_dtype, [&](auto* d_tag) {
      using D = std::remove_pointer_t<decltype(d_tag)>;
      launch_kernel(convert_kernel<S, D>, dim3(blocks), dim3(256), 0, static_cast<cudaStream_t>(stream),
                    static_cast<const S*>(src), static_cast<D*>(dst), n);
      check_launch("convert_floats");
    });
  });
}

void synchronize(int device, void* stream) {
  DeviceGuard guard(device);
  check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace memkernels::cuda_backend
