// memkernels/tensor.h — the one tensor view type, dtypes, devices and the library's error type.
//
// A TensorView never owns memory: it describes memory somebody else (NumPy, CuPy, PyTorch, a C++
// caller) owns. Shapes and strides are in elements, like DLPack.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace memkernels {

// Bool: one byte per element, nonzero = true (NumPy / PyTorch bool); only masks take it.
enum class DType : uint8_t { Float32, Float16, BFloat16, Float64, Int8, UInt8, Int16, Int32, Int64, UInt16, UInt32, Bool };

const char* dtype_name(DType t);
int dtype_size(DType t);
bool is_float(DType t);

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;
};

// What kind of mistake an Error reports; the Python binding maps each kind to an exception class.
enum class ErrorKind : uint8_t {
  Value,        // ValueError: wrong shape, out-of-range value, bad option
  Type,         // TypeError: wrong dtype
  Memory,       // MemoryError: an allocation failed
  CacheFull,    // memkernels.CacheFullError (a MemoryError): no free KV-cache page
  CorruptData,  // memkernels.CorruptDataError (a ValueError): bad bytes in a file or buffer
  IO,           // OSError: the operating system refused a read or write
  Device,       // RuntimeError: CUDA not built / no GPU / a CUDA call failed
  NotImplemented,  // NotImplementedError: a valid request this build cannot serve
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] void throw_error(ErrorKind kind, const std::string& msg);
inline void check(bool ok, ErrorKind kind, const std::string& msg) {
  if (!ok) throw_error(kind, msg);
}

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements

  TensorView() = default;
  // A C-contiguous view of `data` with the given shape.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});

  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t stride(int dim) const { return strides[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  std::string shape_str() const;  // "(2, 3, 4)"
};

// Argument checks shared by every op. `what` names the argument in the message, e.g. "q".
void expect_ndim(const TensorView& t, const char* what, int ndim);
void expect_dtype(const TensorView& t, const char* what, std::initializer_list<DType> allowed);
void expect_contiguous(const TensorView& t, const char* what);
void expect_last_dim_contiguous(const TensorView& t, const char* what);
void expect_shape(const TensorView& t, const char* what, std::initializer_list<int64_t> shape);
void expect_same_device(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name);
void expect_not_null(const TensorView& t, const char* what);

}  // namespace memkernels
