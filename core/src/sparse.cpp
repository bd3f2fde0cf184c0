// SparseMatrix: building (from dense / CSR), full validation of imported data, export,
// serialisation, device copies, and the spmm argument checks + dispatch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/convert.h"
#include "sparse_internal.h"

namespace memkernels {
namespace {

using cpu::bf16_to_float;
using cpu::float_to_bf16;
using cpu::float_to_half;
using cpu::half_to_float;

std::string str(int64_t x) { return std::to_string(x); }

constexpr int64_t kMaxCols = int64_t(1) << 31;  // kernels index columns in 32 bits

int64_t popcount64(uint64_t m) { return __builtin_popcountll(m); }

// Element i of a 1-D or flat float array of any float dtype, as float.
float read_float(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::Float32: return static_cast<const float*>(base)[i];
    case DType::Float64: return float(static_cast<const double*>(base)[i]);
    case DType::Float16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::Int8: return float(static_cast<const int8_t*>(base)[i]);  // unscaled
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

void write_float(void* base, DType t, int64_t i, float v) {
  switch (t) {
    case DType::Float32: static_cast<float*>(base)[i] = v; break;
    case DType::Float64: static_cast<double*>(base)[i] = v; break;
    case DType::Float16: static_cast<uint16_t*>(base)[i] = float_to_half(v); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
  }
}

int64_t read_index(const TensorView& t, int64_t i) {
  return t.dtype == DType::Int64 ? t.ptr<const int64_t>()[i] : int64_t(t.ptr<const int32_t>()[i]);
}

void check_value_dtype(DType t) {
  check(t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16 || t == DType::Int8, ErrorKind::Type,
        std::string("value dtype: expected float32, float16, bfloat16 or int8, got ") + dtype_name(t));
}

// Stored value k of row r as float (int8 values are scaled by their row's scale).
float stored_value(const SparseMatrix::Impl& m, int64_t r, int64_t k) {
  const float v = read_float(m.values.ptr, m.value_dtype, k);
  return m.value_dtype == DType::Int8 ? v * m.scales.as<const float>()[r] : v;
}

int8_t quantize(float v, float inv_scale) {
  const float q = std::nearbyint(v * inv_scale);
  return int8_t(std::max(-127.0f, std::min(127.0f, q)));
}

void check_dims(int64_t rows, int64_t cols) {
  check(rows >= 0 && cols >= 0, ErrorKind::Value,
        "sparse matrix shape must be non-negative, got (" + str(rows) + ", " + str(cols) + ")");
  check(rows < kMaxCols && cols < kMaxCols, ErrorKind::Value,
        "sparse matrix shape (" + str(rows) + ", " + str(cols) + ") too large: each dimension must be < 2^31");
}

int64_t cols_padded(SparseFormat f, int64_t cols) { return f == SparseFormat::Semi24 ? (cols + 3) / 4 * 4 : cols; }

std::shared_ptr<SparseMatrix::Impl> new_impl(int64_t rows, int64_t cols, SparseFormat f, DType vdt) {
  auto impl = std::make_shared<SparseMatrix::Impl>();
  impl->rows = rows, impl->cols = cols, impl->format = f, impl->value_dtype = vdt;
  impl->tiles = (cols + kSparseTile - 1) / kSparseTile;
  return impl;
}

void alloc_values(SparseMatrix::Impl& m) {
  const size_t es = size_t(dtype_size(m.value_dtype));
  m.values = SparseBuffer(m.device, size_t(m.nnz + kValuePad) * es);
  std::memset(static_cast<char*>(m.values.ptr) + size_t(m.nnz) * es, 0, size_t(kValuePad) * es);
}

// Builds any format from rows given densely: fill_row(r, row) writes the cols floats of row r;
// zeros are not stored (Semi24 stores explicit zeros to keep 2 per group).
template <typename FillRow>
std::shared_ptr<SparseMatrix::Impl> build(int64_t rows, int64_t cols, SparseFormat f, DType vdt, FillRow fill_row) {
  auto impl = new_impl(rows, cols, f, vdt);
  SparseMatrix::Impl& m = *impl;
  const int64_t T = m.tiles, cpad = cols_padded(f, cols);
  std::vector<int64_t> counts(size_t(rows) + 1, 0);
  m.row_ptr = SparseBuffer(m.device, size_t(rows + 1) * 8);
  if (f != SparseFormat::CSR) m.masks = SparseBuffer(m.device, size_t(rows * T) * 8);
  uint64_t* masks = m.masks.as<uint64_t>();
  const bool q8 = vdt == DType::Int8;
  if (q8) m.scales = SparseBuffer(m.device, size_t(rows) * 4 + 4);
  float* scales = m.scales.as<float>();
  const int threads = num_threads();
  int64_t bad_row = -1, bad_col = 0, bad_count = 0, nonfinite_row = -1;

  // int8: entries that quantize to 0 are not stored. Both passes decide this the same way.
  auto drop_q8_zeros = [&](int64_t r, float* row) {
    const float inv = scales[r] > 0.0f ? 1.0f / scales[r] : 0.0f;
    for (int64_t c = 0; c < cols; ++c)
      if (row[c] != 0.0f && quantize(row[c], inv) == 0) row[c] = 0.0f;
  };

  // Pass 1: masks (or counts for CSR), and the 2:4 check.
  ParallelGuard guard;  // a failed row allocation is rethrown after the region, not std::terminate
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row;
    const bool ok = guard.run([&] { row.assign(size_t(T) * kSparseTile, 0.0f); });
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      if (!ok || guard.failed()) continue;
      fill_row(r, row.data());
      if (q8) {  // symmetric per-row scale: the largest |w| of the row maps to 127
        float amax = 0.0f;
        bool finite = true;
        for (int64_t c = 0; c < cols; ++c) {
          finite = finite && std::isfinite(row[c]);
          amax = std::max(amax, std::fabs(row[c]));
        }
        if (!finite) {
#pragma omp critical
          nonfinite_row = r;
        }
        scales[r] = amax / 127.0f;
        drop_q8_zeros(r, row.data());
      }
      int64_t n = 0;
      if (f == SparseFormat::CSR) {
        for (int64_t c = 0; c < cols; ++c) n += row[c] != 0.0f;
      } else if (f == SparseFormat::Bitmap) {
        for (int64_t t = 0; t < T; ++t) {
          uint64_t mask = 0;
          const int64_t width = std::min<int64_t>(kSparseTile, cols - t * kSparseTile);
          for (int b = 0; b < width; ++b) mask |= uint64_t(row[t * kSparseTile + b] != 0.0f) << b;
          masks[r * T + t] = mask;
          n += popcount64(mask);
        }
      } else {  // Semi24: exactly 2 bits per group of 4 (explicit zeros fill up groups)
        std::fill(masks + r * T, masks + (r + 1) * T, uint64_t(0));
        for (int64_t g = 0; g < cpad; g += 4) {
          unsigned nib = 0;
          int k = 0;
          for (int j = 0; j < 4; ++j)
            if (g + j < cols && row[g + j] != 0.0f) nib |= 1u << j, ++k;
          if (k > 2) {
#pragma omp critical
            if (bad_row < 0 || r < bad_row) bad_row = r, bad_col = g, bad_count = k;
            continue;
          }
          for (int j = 0; j < 4 && k < 2; ++j)
            if (!(nib & (1u << j))) nib |= 1u << j, ++k;
          masks[r * T + g / kSparseTile] |= uint64_t(nib) << (g % kSparseTile);
        }
        n = cpad / 2;
      }
      counts[size_t(r) + 1] = n;
    }
  }
  guard.rethrow();
  check(nonfinite_row < 0, ErrorKind::Value,
        "int8 values need finite weights, but row " + str(nonfinite_row) + " holds inf or NaN");
  check(bad_row < 0, ErrorKind::Value,
        "format '2:4': row " + str(bad_row) + ", columns " + str(bad_col) + ".." + str(bad_col + 3) + " hold " +
            str(bad_count) + " non-zeros, but 2:4 allows at most 2 per group of 4; prune with method='2:4' first");
  int64_t* rp = m.row_ptr.as<int64_t>();
  rp[0] = 0;
  for (int64_t r = 0; r < rows; ++r) rp[r + 1] = rp[r] + counts[size_t(r) + 1];
  m.nnz = rp[rows];
  check(f != SparseFormat::CSR || m.nnz < kMaxCols, ErrorKind::Value,
        "format 'csr': " + str(m.nnz) + " non-zeros do not fit 32-bit indices; use format 'bitmap'");
  alloc_values(m);
  if (f == SparseFormat::CSR) m.indices = SparseBuffer(m.device, size_t(m.nnz) * 4 + 4);

  // Pass 2: values (and CSR indices) in column order.
  ParallelGuard guard2;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row;
    const bool ok = guard2.run([&] { row.assign(size_t(T) * kSparseTile, 0.0f); });
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      if (!ok || guard2.failed()) continue;
      fill_row(r, row.data());
      if (q8) drop_q8_zeros(r, row.data());
      int64_t k = rp[r];
      const float inv = q8 && scales[r] > 0.0f ? 1.0f / scales[r] : 0.0f;
      auto put_value = [&](float v) {
        if (q8)
          m.values.as<int8_t>()[k++] = quantize(v, inv);
        else
          write_float(m.values.ptr, vdt, k++, v);
      };
      if (f == SparseFormat::CSR) {
        int32_t* idx = m.indices.as<int32_t>();
        for (int64_t c = 0; c < cols; ++c)
          if (row[c] != 0.0f) idx[k] = int32_t(c), put_value(row[c]);
      } else {
        for (int64_t t = 0; t < T; ++t)
          for (uint64_t mask = masks[r * T + t]; mask; mask &= mask - 1) {
            const int64_t c = t * kSparseTile + __builtin_ctzll(mask);
            put_value(c < cols ? row[c] : 0.0f);
          }
      }
    }
  }
  guard2.rethrow();
  return impl;
}

// Calls fn(col, value_index) for every stored entry of row r in column order (CPU matrices).
template <typename Fn>
void for_each_entry(const SparseMatrix::Impl& m, int64_t r, Fn fn) {
  const int64_t* rp = m.row_ptr.as<const int64_t>();
  int64_t k = rp[r];
  if (m.format == SparseFormat::CSR) {
    const int32_t* idx = m.indices.as<const int32_t>();
    for (; k < rp[r + 1]; ++k) fn(int64_t(idx[k]), k);
    return;
  }
  const uint64_t* masks = m.masks.as<const uint64_t>() + r * m.tiles;
  for (int64_t t = 0; t < m.tiles; ++t)
    for (uint64_t mask = masks[t]; mask; mask &= mask - 1) fn(t * kSparseTile + __builtin_ctzll(mask), k++);
}

void require_cpu(const SparseMatrix::Impl& m, const char* op) {
  check(m.device.is_cpu(), ErrorKind::Value,
        std::string(op) + ": the sparse matrix is on " + m.device.str() + "; copy it to the CPU first (.to('cpu'))");
}

// ---- serialisation ---------------------------------------------------------------------------
constexpr char kMagic[8] = {'M', 'K', 'S', 'P', 'A', 'R', 'S', 'E'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 48;  // magic, version, format, dtype, reserved, rows, cols, nnz, payload

uint8_t dtype_code(DType t) {
  return t == DType::Float32 ? 0 : t == DType::Float16 ? 1 : t == DType::BFloat16 ? 2 : 3;
}

// 64-bit FNV-1a over 8-byte words (then the tail bytes): detects truncation and flipped bits.
uint64_t checksum(const unsigned char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 1099511628211ull;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

template <typename T>
void put(std::string& s, T v) { s.append(reinterpret_cast<const char*>(&v), sizeof v); }

template <typename T>
T get(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void corrupt(const std::string& why) { throw_error(ErrorKind::CorruptData, "SparseMatrix.from_bytes: " + why); }

// Structural checks of Bitmap/Semi24/CSR buffers (used for deserialised data; kind picks the error).
void validate_structure(const SparseMatrix::Impl& m) {
  const int64_t* rp = m.row_ptr.as<const int64_t>();
  if (rp[0] != 0) corrupt("row_ptr[0] = " + str(rp[0]) + ", expected 0");
  for (int64_t r = 0; r < m.rows; ++r)
    if (rp[r + 1] < rp[r]) corrupt("row_ptr decreases at row " + str(r));
  if (rp[m.rows] != m.nnz) corrupt("row_ptr[-1] = " + str(rp[m.rows]) + " but nnz = " + str(m.nnz));
  if (m.format == SparseFormat::CSR) {
    const int32_t* idx = m.indices.as<const int32_t>();
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        if (idx[k] < 0 || idx[k] >= m.cols) corrupt("column index " + str(idx[k]) + " out of range in row " + str(r));
        if (k > rp[r] && idx[k] <= idx[k - 1]) corrupt("column indices not strictly increasing in row " + str(r));
      }
    return;
  }
  const uint64_t* masks = m.masks.as<const uint64_t>();
  const int64_t cpad = cols_padded(m.format, m.cols), T = m.tiles;
  const int64_t tail = cpad - (T - 1) * kSparseTile;  // valid bits in the last tile
  const uint64_t tail_mask = T == 0 ? 0 : tail >= 64 ? ~uint64_t(0) : (uint64_t(1) << tail) - 1;
  for (int64_t r = 0; r < m.rows; ++r) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      const uint64_t mask = masks[r * T + t];
      if (t == T - 1 && (mask & ~tail_mask)) corrupt("mask bits beyond the last column in row " + str(r));
      if (m.format == SparseFormat::Semi24)
        for (int g = 0; g < 64; g += 4)
          if (t * kSparseTile + g < cpad && popcount64((mask >> g) & 0xf) != 2)
            corrupt("2:4 group without exactly 2 entries in row " + str(r));
      n += popcount64(mask);
    }
    if (n != rp[r + 1] - rp[r]) corrupt("mask popcount disagrees with row_ptr in row " + str(r));
  }
}

}  // namespace

const char* sparse_format_name(SparseFormat f) {
  switch (f) {
    case SparseFormat::Bitmap: return "bitmap";
    case SparseFormat::Semi24: return "2:4";
    case SparseFormat::CSR: return "csr";
  }
  return "unknown";
}

SparseFormat parse_sparse_format(const std::string& name) {
  if (name == "bitmap") return SparseFormat::Bitmap;
  if (name == "2:4" || name == "semi24") return SparseFormat::Semi24;
  if (name == "csr") return SparseFormat::CSR;
  throw_error(ErrorKind::Value, "format: expected 'bitmap', '2:4' or 'csr', got '" + name + "'");
}

SparseMatrix SparseMatrix::from_dense(const TensorView& w, SparseFormat format, DType value_dtype, float threshold) {
  expect_ndim(w, "w", 2);
  expect_dtype(w, "w", {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  expect_last_dim_contiguous(w, "w");
  expect_not_null(w, "w");
  check(w.device.is_cpu(), ErrorKind::Value, "w: from_dense needs a CPU array, got one on " + w.device.str());
  check_value_dtype(value_dtype);
  check(std::isfinite(threshold) && threshold >= 0.0f, ErrorKind::Value,
        "threshold must be finite and >= 0, got " + std::to_string(threshold));
  const int64_t rows = w.size(0), cols = w.size(1), ld = w.strides[0];
  check_dims(rows, cols);
  const int es = dtype_size(w.dtype);
  const char* base = static_cast<const char*>(w.data);
  auto fill = [&](int64_t r, float* row) {
    const char* src = base + r * ld * es;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = read_float(src, w.dtype, c);
      row[c] = std::fabs(v) <= threshold ? 0.0f : v;  // NaN is kept, so it shows in the result
    }
  };
  return SparseMatrix(build(rows, cols, format, value_dtype, fill));
}

SparseMatrix SparseMatrix::from_csr(int64_t rows, int64_t cols, const TensorView& indptr, const TensorView& indices,
                                    const TensorView& values, SparseFormat format, DType value_dtype) {
  check_dims(rows, cols);
  check_value_dtype(value_dtype);
  const char* names[] = {"indptr", "indices", "data"};
  const TensorView* ts[] = {&indptr, &indices, &values};
  for (int i = 0; i < 3; ++i) {
    expect_ndim(*ts[i], names[i], 1);
    expect_contiguous(*ts[i], names[i]);
    expect_not_null(*ts[i], names[i]);
    check(ts[i]->device.is_cpu(), ErrorKind::Value, std::string(names[i]) + ": CSR arrays must be on the CPU");
  }
  expect_dtype(indptr, "indptr", {DType::Int32, DType::Int64});
  expect_dtype(indices, "indices", {DType::Int32, DType::Int64});
  expect_dtype(values, "data", {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  check(indptr.size(0) == rows + 1, ErrorKind::Value,
        "indptr: expected rows + 1 = " + str(rows + 1) + " entries, got " + str(indptr.size(0)));
  const int64_t nnz = indices.size(0);
  check(values.size(0) == nnz, ErrorKind::Value,
        "data has " + str(values.size(0)) + " entries but indices has " + str(nnz) + "; they must match");
  check(read_index(indptr, 0) == 0, ErrorKind::Value, "indptr[0] must be 0, got " + str(read_index(indptr, 0)));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = read_index(indptr, r), b = read_index(indptr, r + 1);
    check(b >= a, ErrorKind::Value,
          "indptr must be non-decreasing, but indptr[" + str(r + 1) + "] = " + str(b) + " < indptr[" + str(r) +
              "] = " + str(a));
  }
  check(read_index(indptr, rows) == nnz, ErrorKind::Value,
        "indptr[-1] = " + str(read_index(indptr, rows)) + " must equal the number of indices (" + str(nnz) + ")");
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t c = read_index(indices, k);
    check(c >= 0 && c < cols, ErrorKind::Value,
          "indices[" + str(k) + "] = " + str(c) + " is out of range for " + str(cols) + " columns");
  }
  // Everything the builder reads is now known to be in bounds. Duplicates are summed (as SciPy does).
  auto fill = [&](int64_t r, float* row) {
    std::fill(row, row + cols, 0.0f);
    for (int64_t k = read_index(indptr, r), e = read_index(indptr, r + 1); k < e; ++k)
      row[read_index(indices, k)] += read_float(values.data, values.dtype, k);
  };
  return SparseMatrix(build(rows, cols, format, value_dtype, fill));
}

void SparseMatrix::to_dense(const TensorView& out) const {
  const Impl& m = *impl_;
  require_cpu(m, "to_dense");
  expect_ndim(out, "out", 2);
  expect_dtype(out, "out", {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  expect_shape(out, "out", {m.rows, m.cols});
  expect_contiguous(out, "out");
  expect_not_null(out, "out");
  check(out.device.is_cpu(), ErrorKind::Value, "out: to_dense writes a CPU array");
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic, 16)
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t c = 0; c < m.cols; ++c) write_float(out.data, out.dtype, r * m.cols + c, 0.0f);
    for_each_entry(m, r, [&](int64_t c, int64_t k) {
      if (c < m.cols) write_float(out.data, out.dtype, r * m.cols + c, stored_value(m, r, k));
    });
  }
}

void SparseMatrix::to_csr(const TensorView& indptr, const TensorView& indices, const TensorView& values) const {
  const Impl& m = *impl_;
  require_cpu(m, "to_csr");
  const char* names[] = {"indptr", "indices", "values"};
  const TensorView* ts[] = {&indptr, &indices, &values};
  for (int i = 0; i < 3; ++i) {
    expect_ndim(*ts[i], names[i], 1);
    expect_contiguous(*ts[i], names[i]);
    expect_not_null(*ts[i], names[i]);
    check(ts[i]->device.is_cpu(), ErrorKind::Value, std::string(names[i]) + ": must be a CPU array");
  }
  expect_dtype(indptr, "indptr", {DType::Int64});
  expect_dtype(indices, "indices", {DType::Int32});
  expect_dtype(values, "values", {DType::Float32, DType::Float16, DType::BFloat16, DType::Float64});
  const int64_t n = csr_nnz();
  expect_shape(indptr, "indptr", {m.rows + 1});
  expect_shape(indices, "indices", {n});
  expect_shape(values, "values", {n});
  int64_t* ip = indptr.ptr<int64_t>();
  int32_t* idx = indices.ptr<int32_t>();
  int64_t j = 0;
  ip[0] = 0;
  for (int64_t r = 0; r < m.rows; ++r) {
    for_each_entry(m, r, [&](int64_t c, int64_t k) {
      if (c >= m.cols) return;  // 2:4 padding columns hold only explicit zeros
      idx[j] = int32_t(c);
      write_float(values.data, values.dtype, j++, stored_value(m, r, k));
    });
    ip[r + 1] = j;
  }
}

int64_t SparseMatrix::csr_nnz() const {
  const Impl& m = *impl_;
  if (m.format != SparseFormat::Semi24 || m.cols % 4 == 0) return m.nnz;
  require_cpu(m, "csr_nnz");
  int64_t n = 0;
  for (int64_t r = 0; r < m.rows; ++r)
    for_each_entry(m, r, [&](int64_t c, int64_t) { n += c < m.cols; });
  return n;
}

std::string SparseMatrix::to_bytes() const {
  const Impl& m = *impl_;
  require_cpu(m, "to_bytes");
  const size_t rp_bytes = size_t(m.rows + 1) * 8;
  const size_t idx_bytes = m.format == SparseFormat::CSR ? size_t(m.nnz) * 4 : size_t(m.rows * m.tiles) * 8;
  const size_t val_bytes = size_t(m.nnz) * dtype_size(m.value_dtype);
  const size_t scale_bytes = m.value_dtype == DType::Int8 ? size_t(m.rows) * 4 : 0;
  const uint64_t payload = rp_bytes + idx_bytes + val_bytes + scale_bytes;
  std::string s;
  s.reserve(kHeaderBytes + payload + 8);
  s.append(kMagic, 8);
  put<uint32_t>(s, kVersion);
  put<uint8_t>(s, uint8_t(m.format));
  put<uint8_t>(s, dtype_code(m.value_dtype));
  put<uint16_t>(s, 0);
  put<int64_t>(s, m.rows);
  put<int64_t>(s, m.cols);
  put<int64_t>(s, m.nnz);
  put<uint64_t>(s, payload);
  s.append(static_cast<const char*>(m.row_ptr.ptr), rp_bytes);
  s.append(static_cast<const char*>(m.format == SparseFormat::CSR ? m.indices.ptr : m.masks.ptr), idx_bytes);
  s.append(static_cast<const char*>(m.values.ptr), val_bytes);
  if (scale_bytes) s.append(static_cast<const char*>(m.scales.ptr), scale_bytes);
  put<uint64_t>(s, checksum(reinterpret_cast<const unsigned char*>(s.data()), s.size()));
  return s;
}

SparseMatrix SparseMatrix::from_bytes(const void* data, size_t size) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  if (size < kHeaderBytes + 8) corrupt("only " + str(int64_t(size)) + " bytes, shorter than the header");
  if (std::memcmp(p, kMagic, 8) != 0) corrupt("bad magic: not a memkernels sparse matrix");
  const uint32_t version = get<uint32_t>(p + 8);
  if (version != kVersion)
    corrupt("unsupported version " + str(version) + " (this build reads version " + str(kVersion) + ")");
  const uint8_t fcode = p[12], dcode = p[13];
  if (fcode > 2) corrupt("unknown format code " + str(fcode));
  if (dcode > 3) corrupt("unknown value dtype code " + str(dcode));
  const int64_t rows = get<int64_t>(p + 16), cols = get<int64_t>(p + 24), nnz = get<int64_t>(p + 32);
  const uint64_t payload = get<uint64_t>(p + 40);
  if (payload != size - kHeaderBytes - 8)
    corrupt("payload size " + std::to_string(payload) + " does not match the " + str(int64_t(size)) +
            " bytes given (truncated?)");
  if (get<uint64_t>(p + size - 8) != checksum(p, size - 8)) corrupt("checksum mismatch: the data is damaged");
  if (rows < 0 || cols < 0 || rows >= kMaxCols || cols >= kMaxCols) corrupt("bad shape");
  const SparseFormat f = SparseFormat(fcode);
  const DType vdt = dcode == 0 ? DType::Float32 : dcode == 1 ? DType::Float16 : dcode == 2 ? DType::BFloat16 : DType::Int8;
  auto impl = new_impl(rows, cols, f, vdt);
  const int es = dtype_size(vdt);
  // Sizes are checked against the byte count before any multiplication can overflow.
  if (nnz < 0 || uint64_t(nnz) > payload / uint64_t(es)) corrupt("bad nnz " + str(nnz));
  const uint64_t rp_bytes = uint64_t(rows + 1) * 8;
  const uint64_t idx_bytes = f == SparseFormat::CSR ? uint64_t(nnz) * 4 : uint64_t(rows) * uint64_t(impl->tiles) * 8;
  const uint64_t scale_bytes = vdt == DType::Int8 ? uint64_t(rows) * 4 : 0;
  if (rp_bytes + idx_bytes + uint64_t(nnz) * es + scale_bytes != payload)
    corrupt("payload size disagrees with the header");
  Impl& m = *impl;
  m.nnz = nnz;
  const unsigned char* q = p + kHeaderBytes;
  m.row_ptr = SparseBuffer(m.device, rp_bytes);
  std::memcpy(m.row_ptr.ptr, q, rp_bytes);
  q += rp_bytes;
  SparseBuffer& idx = f == SparseFormat::CSR ? m.indices : m.masks;
  idx = SparseBuffer(m.device, idx_bytes + 4);
  std::memcpy(idx.ptr, q, idx_bytes);
  q += idx_bytes;
  alloc_values(m);
  std::memcpy(m.values.ptr, q, size_t(nnz) * es);
  q += size_t(nnz) * es;
  if (scale_bytes) {
    m.scales = SparseBuffer(m.device, scale_bytes);
    std::memcpy(m.scales.ptr, q, scale_bytes);
  }
  if (f == SparseFormat::Semi24 && nnz != rows * (cols_padded(f, cols) / 2)) corrupt("2:4 value count mismatch");
  validate_structure(m);
  return SparseMatrix(impl);
}

SparseMatrix SparseMatrix::to(const Device& device) const {
  const Impl& m = *impl_;
  if (device == m.device) return *this;
  auto impl = new_impl(m.rows, m.cols, m.format, m.value_dtype);
  impl->device = device;
  impl->nnz = m.nnz;
  auto copy = [&](const SparseBuffer& src, SparseBuffer& dst) {
    if (!src.ptr) return;
    dst = SparseBuffer(device, src.bytes);
    device_memcpy(dst.ptr, device, src.ptr, m.device, src.bytes);
  };
  copy(m.masks, impl->masks);
  copy(m.row_ptr, impl->row_ptr);
  copy(m.indices, impl->indices);
  copy(m.values, impl->values);
  copy(m.scales, impl->scales);
  return SparseMatrix(impl);
}

int64_t SparseMatrix::rows() const { return impl_->rows; }
int64_t SparseMatrix::cols() const { return impl_->cols; }
SparseFormat SparseMatrix::format() const { return impl_->format; }
DType SparseMatrix::value_dtype() const { return impl_->value_dtype; }
Device SparseMatrix::device() const { return impl_->device; }
int64_t SparseMatrix::nnz_stored() const { return impl_->nnz; }
int64_t SparseMatrix::nbytes() const {
  const Impl& m = *impl_;
  return int64_t(m.row_ptr.bytes) + (m.masks.ptr ? int64_t(m.masks.bytes) : 0) +
         (m.format == SparseFormat::CSR ? m.nnz * 4 : 0) + m.nnz * dtype_size(m.value_dtype) +
         (m.scales.ptr ? m.rows * 4 : 0);
}

void spmm(const SparseMatrix& w, const TensorView& x, const TensorView& out, void* stream) {
  const SparseMatrix::Impl& m = w.impl();
  expect_ndim(x, "x", 2);
  expect_ndim(out, "out", 2);
  expect_dtype(x, "x", {DType::Float32, DType::Float16, DType::BFloat16});
  check(out.dtype == x.dtype, ErrorKind::Type,
        std::string("out has dtype ") + dtype_name(out.dtype) + " but x has " + dtype_name(x.dtype) +
            "; they must match");
  // Empty arrays may come with stride 0 (DLPack); they are never read.
  if (x.numel() > 0) expect_last_dim_contiguous(x, "x");
  if (out.numel() > 0) expect_last_dim_contiguous(out, "out");
  expect_not_null(x, "x");
  expect_not_null(out, "out");
  expect_same_device(out, "out", x, "x");
  check(m.device == x.device, ErrorKind::Value,
        "the sparse matrix is on " + m.device.str() + " but x is on " + x.device.str() +
            "; move one of them (SparseMatrix.to(device))");
  check(x.size(1) == m.cols, ErrorKind::Value,
        "x: expected (tokens, in_features = " + str(m.cols) + "), got shape " + x.shape_str());
  expect_shape(out, "out", {x.size(0), m.rows});
  SpmmProblem p;
  p.format = m.format;
  p.value_dtype = m.value_dtype;
  p.x_dtype = x.dtype;
  p.tokens = x.size(0), p.rows = m.rows, p.cols = m.cols, p.tiles = m.tiles;
  p.masks = m.masks.as<const uint64_t>();
  p.row_ptr = m.row_ptr.as<const int64_t>();
  p.indices = m.indices.as<const int32_t>();
  p.values = m.values.ptr;
  p.row_scale = m.scales.as<const float>();
  p.x = x.data, p.x_row = x.strides[0];
  p.out = out.data, p.out_row = out.strides[0];
  p.device = x.device.index;
  if (p.tokens == 0 || p.rows == 0) return;
  if (x.device.is_cuda()) {
    require_cuda_usable("spmm", x.device);
#if MEMKERNELS_WITH_CUDA
    cuda_backend::spmm(p, stream);
#endif
    return;
  }
  (void)stream;
  MK_CPU_DISPATCH(spmm, p);
}

}  // namespace memkernels
