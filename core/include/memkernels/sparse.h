// memkernels/sparse.h — sparse weight matrices (pruned linear layers) and SpMM y = x W^T.
//
// A SparseMatrix holds a weight W of shape (rows = out_features, cols = in_features) in one of
// three formats. Values are float32, float16 or bfloat16 (independent of the activations' dtype),
// or int8 with one float32 scale per row (symmetric: the row's largest |w| maps to 127; entries
// that quantize to 0 are not stored; the scales follow the values in memory and serialisation).
//
// Bitmap (the compute format; "load as sparse, compute as dense"): every row is cut into tiles of
// 64 columns. Tile t of row r has a uint64 mask at masks[r * tiles + t] (bit b set = column
// 64 t + b is stored) and its non-zeros packed in column order; the tiles of a row follow each
// other, rows follow each other, and row_ptr[r] (int64, rows + 1 entries) is the index of row r's
// first value. A zero costs one bit, a non-zero one value: at 70% sparsity and fp16, 0.725 bytes
// per weight against 2 dense (CSR with int32 indices: 1.8). Mask bits at columns >= cols are 0.
//
// Semi24 (2:4 semi-structured): each group of 4 consecutive columns keeps at most 2 values. Stored
// like Bitmap with exactly 2 bits set per group (a group with fewer non-zeros stores explicit
// zeros), so every row holds cols_padded / 2 values and row_ptr[r] = r * cols_padded / 2, where
// cols_padded = cols rounded up to a multiple of 4 (bits of padding columns carry zero values).
//
// CSR (interchange with SciPy): indptr int64 (rows + 1), indices int32 (nnz), values (nnz).
// Duplicates are summed and column order within a row is free, as in SciPy.
//
// Every import (from CSR arrays, from bytes) is validated in full before anything reads through
// its indices: a corrupt input raises Error(Value) or Error(CorruptData), never reads out of bounds.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "memkernels/tensor.h"

namespace memkernels {

enum class SparseFormat : uint8_t { Bitmap = 0, Semi24 = 1, CSR = 2 };

const char* sparse_format_name(SparseFormat f);
SparseFormat parse_sparse_format(const std::string& name);  // "bitmap" | "2:4" | "csr"; Error(Value) else

class SparseMatrix {
 public:
  // Entries with |w| <= threshold are dropped (threshold 0 drops exact zeros). w: 2-D, float32,
  // float16, bfloat16 or float64, on the CPU; value_dtype float32 / float16 / bfloat16 / int8.
  // Semi24: a group of 4 with more than 2 entries left raises Error(Value) (prune it first).
  static SparseMatrix from_dense(const TensorView& w, SparseFormat format, DType value_dtype, float threshold = 0.0f);
  // From CSR arrays on the CPU: indptr int32/int64 (rows + 1), indices int32/int64 (nnz), values
  // float32/float16/bfloat16/float64 (nnz). Validated in full (Error(Value) on any inconsistency).
  static SparseMatrix from_csr(int64_t rows, int64_t cols, const TensorView& indptr, const TensorView& indices,
                               const TensorView& values, SparseFormat format, DType value_dtype);
  // Versioned header + payload + checksum; from_bytes raises Error(CorruptData) on any damage.
  std::string to_bytes() const;
  static SparseMatrix from_bytes(const void* data, size_t size);

  // Writes W densely into `out` (rows, cols), float32 / float16 / bfloat16 / float64, contiguous, CPU.
  void to_dense(const TensorView& out) const;
  // CSR export (sorted columns, no duplicates): indptr int64 (rows + 1), indices int32 (csr_nnz()),
  // values float32 / float16 / bfloat16 / float64 (csr_nnz()). Explicit zeros of Semi24 are kept
  // (except those in padding columns >= cols).
  void to_csr(const TensorView& indptr, const TensorView& indices, const TensorView& values) const;
  int64_t csr_nnz() const;

  // A copy with its buffers on `device` (CPU or CUDA).
  SparseMatrix to(const Device& device) const;

  int64_t rows() const;
  int64_t cols() const;
  SparseFormat format() const;
  DType value_dtype() const;
  Device device() const;
  int64_t nnz_stored() const;  // stored values (Semi24 includes its explicit zeros)
  int64_t nbytes() const;      // bytes of all buffers (values, masks, indices, row pointers)

  struct Impl;
  const Impl& impl() const { return *impl_; }
  explicit SparseMatrix(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

 private:
  std::shared_ptr<Impl> impl_;  // immutable once built: copies share buffers
};

// out (tokens, rows) = x (tokens, cols) @ W^T, like a linear layer without bias. x and out share
// a dtype (float32 / float16 / bfloat16) and the matrix's device; last dimension contiguous.
// Accumulates in float32. stream: cudaStream_t for CUDA tensors; ignored on CPU.
void spmm(const SparseMatrix& w, const TensorView& x, const TensorView& out, void* stream = nullptr);

}  // namespace memkernels
