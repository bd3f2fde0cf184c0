// Internal layout of a SparseMatrix and the SpMM problem shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>
#include <utility>

#include "memkernels/sparse.h"
#include "runtime_internal.h"

namespace memkernels {

constexpr int kSparseTile = 64;  // columns per bitmap tile (one uint64 mask)

// One owned allocation on a device (64-byte aligned host memory or cudaMalloc).
struct SparseBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device{};
  SparseBuffer() = default;
  SparseBuffer(const Device& d, size_t n) : bytes(n), device(d) { ptr = device_malloc(d, n ? n : 1); }
  SparseBuffer(const SparseBuffer&) = delete;
  SparseBuffer& operator=(const SparseBuffer&) = delete;
  SparseBuffer(SparseBuffer&& o) noexcept { *this = std::move(o); }
  SparseBuffer& operator=(SparseBuffer&& o) noexcept {
    std::swap(ptr, o.ptr), std::swap(bytes, o.bytes), std::swap(device, o.device);
    return *this;
  }
  ~SparseBuffer() {
    if (ptr) device_free(device, ptr);
  }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
};

struct SparseMatrix::Impl {
  int64_t rows = 0, cols = 0;
  SparseFormat format = SparseFormat::Bitmap;
  DType value_dtype = DType::Float32;
  Device device{};
  int64_t nnz = 0;    // stored values
  int64_t tiles = 0;  // bitmap tiles per row: ceil(cols / 64)
  // Bitmap / Semi24: masks (rows * tiles uint64), row_ptr (rows + 1 int64), values (nnz + pad).
  // CSR: indptr (rows + 1 int64) in row_ptr, indices (nnz int32), values (nnz + pad).
  // values carry kValuePad zero elements at the end so 16-wide vector loads never leave the buffer.
  SparseBuffer masks, row_ptr, indices, values;
  SparseBuffer scales;  // int8 values only: one float per row, w = value * scales[row]
};

constexpr int64_t kValuePad = 32;

struct SpmmProblem {
  SparseFormat format = SparseFormat::Bitmap;
  DType value_dtype = DType::Float32;
  DType x_dtype = DType::Float32;  // of x and out
  int64_t tokens = 0, rows = 0, cols = 0, tiles = 0;
  const uint64_t* masks = nullptr;
  const int64_t* row_ptr = nullptr;  // Bitmap/Semi24 row starts, or CSR indptr
  const int32_t* indices = nullptr;  // CSR only
  const void* values = nullptr;
  const float* row_scale = nullptr;  // int8 values: per-row dequantisation scale
  const void* x = nullptr;
  int64_t x_row = 0;  // stride between tokens, in elements
  void* out = nullptr;
  int64_t out_row = 0;
  int device = 0;  // CUDA device index of x, out and the matrix
};

namespace cuda_backend {
void spmm(const SpmmProblem& p, void* stream);
}

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void spmm(const ::memkernels::SpmmProblem& p))
