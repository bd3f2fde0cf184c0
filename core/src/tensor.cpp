#include "memkernels/tensor.h"

#include <sstream>

namespace memkernels {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int8: return "int8";
    case DType::UInt8: return "uint8";
    case DType::Int16: return "int16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt16: return "uint16";
    case DType::UInt32: return "uint32";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::Float64: case DType::Int64: return 8;
    case DType::Float32: case DType::Int32: case DType::UInt32: return 4;
    case DType::Float16: case DType::BFloat16: case DType::Int16: case DType::UInt16: return 2;
    case DType::Int8: case DType::UInt8: case DType::Bool: return 1;
  }
  return 0;
}

bool is_float(DType t) {
  return t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16 || t == DType::Float64;
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

void throw_error(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

TensorView::TensorView(void* data_, DType dtype_, std::initializer_list<int64_t> shape_, Device device_)
    : data(data_), dtype(dtype_), device(device_) {
  check(shape_.size() <= size_t(kMaxDims), ErrorKind::Value, "TensorView: too many dimensions");
  ndim = int(shape_.size());
  int i = 0;
  for (int64_t s : shape_) shape[i++] = s;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= shape[d];
  }
}

int64_t TensorView::numel() const {
  // Views with zero strides can describe more elements than int64 counts: refuse, do not wrap.
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d)
    if (shape[d] == 0) return 0;
  for (int d = 0; d < ndim; ++d)
    if (shape[d] < 0 || __builtin_mul_overflow(n, shape[d], &n))  // message built only on failure:
      throw_error(ErrorKind::Value,                                  // numel() runs in every op's checks
                  "array of shape " + shape_str() + ": the element count overflows 64 bits");
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // DLPack exporters may give empty arrays any strides
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (int d = 0; d < ndim; ++d) s << (d ? ", " : "") << shape[d];
  if (ndim == 1) s << ",";
  s << ")";
  return s.str();
}

void expect_ndim(const TensorView& t, const char* what, int ndim) {
  if (t.ndim != ndim)
    throw_error(ErrorKind::Value, std::string(what) + ": expected " + std::to_string(ndim) +
                                      " dimensions, got " + std::to_string(t.ndim) + " with shape " + t.shape_str());
}

void expect_dtype(const TensorView& t, const char* what, std::initializer_list<DType> allowed) {
  std::string list;
  for (DType d : allowed) {
    if (d == t.dtype) return;
    list += (list.empty() ? "" : ", ") + std::string(dtype_name(d));
  }
  throw_error(ErrorKind::Type, std::string(what) + ": expected dtype " + list + ", got " + dtype_name(t.dtype));
}

void expect_contiguous(const TensorView& t, const char* what) {
  if (!t.is_contiguous())
    throw_error(ErrorKind::Value, std::string(what) + ": expected a C-contiguous array (shape " + t.shape_str() +
                                      "); make a contiguous copy first");
}

void expect_last_dim_contiguous(const TensorView& t, const char* what) {
  if (t.numel() == 0) return;
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    throw_error(ErrorKind::Value, std::string(what) + ": the last dimension must be contiguous (stride 1), got stride " +
                                      std::to_string(t.strides[t.ndim - 1]));
  for (int d = 0; d < t.ndim; ++d)
    if (t.strides[d] < 0)
      throw_error(ErrorKind::Value, std::string(what) + ": negative strides are not supported");
}

void expect_shape(const TensorView& t, const char* what, std::initializer_list<int64_t> shape) {
  bool ok = int(shape.size()) == t.ndim;
  int d = 0;
  for (int64_t s : shape) {
    if (ok && s >= 0 && t.shape[d] != s) ok = false;
    ++d;
  }
  if (ok) return;  // the message is built only on failure (this runs on every kernel call)
  std::string want = "(";
  d = 0;
  for (int64_t s : shape) want += (d++ ? ", " : "") + (s >= 0 ? std::to_string(s) : std::string("*"));
  want += shape.size() == 1 ? ",)" : ")";
  throw_error(ErrorKind::Value, std::string(what) + ": expected shape " + want + ", got " + t.shape_str());
}

void expect_same_device(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name) {
  if (a.device != b.device)
    throw_error(ErrorKind::Value, std::string(a_name) + " is on " + a.device.str() + " but " + b_name + " is on " +
                                      b.device.str() + "; all arrays must be on the same device");
}

void expect_not_null(const TensorView& t, const char* what) {
  if (t.data == nullptr && t.numel() > 0) throw_error(ErrorKind::Value, std::string(what) + ": null data pointer");
}

}  // namespace memkernels
