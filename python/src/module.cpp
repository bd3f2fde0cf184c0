// The nanobind extension module `memkernels._memkernels`: exception mapping, array conversion,
// and the registry that every bind_*.cpp adds its functions to.
#include <Python.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include "bind_common.h"

namespace memkernels::py {

static std::map<std::string, BindFn>& registry() {
  static std::map<std::string, BindFn> r;  // sorted by name: a deterministic registration order
  return r;
}

BindingRegistrar::BindingRegistrar(const char* name, BindFn fn) { registry()[name] = fn; }

static PyObject* g_cache_full_error = nullptr;
static PyObject* g_corrupt_data_error = nullptr;

static void translate_error(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const Error& e) {
    PyObject* type = PyExc_RuntimeError;
    switch (e.kind()) {
      case ErrorKind::Value: type = PyExc_ValueError; break;
      case ErrorKind::Type: type = PyExc_TypeError; break;
      case ErrorKind::Memory: type = PyExc_MemoryError; break;
      case ErrorKind::CacheFull: type = g_cache_full_error; break;
      case ErrorKind::CorruptData: type = g_corrupt_data_error; break;
      case ErrorKind::IO: type = PyExc_OSError; break;
      case ErrorKind::Device: type = PyExc_RuntimeError; break;
      case ErrorKind::NotImplemented: type = PyExc_NotImplementedError; break;
    }
    PyErr_SetString(type, e.what());
  }
}

static DType dtype_from_dlpack(nb::dlpack::dtype t, const char* name, bool allow_bool = false) {
  using nb::dlpack::dtype_code;
  const uint8_t code = t.code, bits = t.bits;
  if (allow_bool && t.lanes == 1 && code == uint8_t(dtype_code::Bool) && bits == 8) return DType::Bool;
  if (t.lanes == 1) {
    if (code == uint8_t(dtype_code::Float)) {
      if (bits == 32) return DType::Float32;
      if (bits == 16) return DType::Float16;
      if (bits == 64) return DType::Float64;
    } else if (code == uint8_t(dtype_code::Bfloat) && bits == 16) {
      return DType::BFloat16;
    } else if (code == uint8_t(dtype_code::Int)) {
      if (bits == 8) return DType::Int8;
      if (bits == 16) return DType::Int16;
      if (bits == 32) return DType::Int32;
      if (bits == 64) return DType::Int64;
    } else if (code == uint8_t(dtype_code::UInt)) {
      if (bits == 8) return DType::UInt8;
      if (bits == 16) return DType::UInt16;
      if (bits == 32) return DType::UInt32;
    }
  }
  throw Error(ErrorKind::Type, std::string(name) + ": unsupported dtype (DLPack code " + std::to_string(code) +
                                   ", " + std::to_string(bits) + " bits)");
}

static bool dtype_supported(nb::dlpack::dtype t) {
  using nb::dlpack::dtype_code;
  if (t.lanes != 1) return false;
  switch (t.code) {
    case uint8_t(dtype_code::Float): return t.bits == 16 || t.bits == 32 || t.bits == 64;
    case uint8_t(dtype_code::Bfloat): return t.bits == 16;
    case uint8_t(dtype_code::Int): return t.bits == 8 || t.bits == 16 || t.bits == 32 || t.bits == 64;
    case uint8_t(dtype_code::UInt): return t.bits == 8 || t.bits == 16 || t.bits == 32;
    default: return false;
  }
}

static bool is_numpy_bfloat16(nb::handle obj) {
  if (!nb::hasattr(obj, "dtype") || !nb::hasattr(obj, "view")) return false;
  nb::object tp = nb::borrow(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())));
  nb::object mod = nb::getattr(tp, "__module__", nb::none());
  if (!nb::isinstance<nb::str>(mod) || std::strcmp(nb::cast<const char*>(mod), "numpy") != 0) return false;
  nb::object dname = nb::getattr(obj.attr("dtype"), "name", nb::none());
  return nb::isinstance<nb::str>(dname) && std::strcmp(nb::cast<const char*>(dname), "bfloat16") == 0;
}

// Why `obj` could not be taken as an array, for the error message: NumPy byte order and dtype first.
static Error not_an_array(nb::handle obj, const char* name) {
  std::string tname = nb::cast<std::string>(nb::str(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()))).attr("__name__")));
  if (nb::hasattr(obj, "dtype") && nb::hasattr(obj, "shape")) {
    nb::object dt = obj.attr("dtype");
    nb::object order = nb::getattr(dt, "byteorder", nb::none());
    std::string dstr = nb::cast<std::string>(nb::str(dt));
    if (nb::isinstance<nb::str>(order)) {
      const std::string o = nb::cast<std::string>(order);
      const bool little = nb::cast<std::string>(nb::module_::import_("sys").attr("byteorder")) == "little";
      if ((o == ">" && little) || (o == "<" && !little))
        return Error(ErrorKind::Type, std::string(name) + ": " + (little ? "big" : "little") +
                                          "-endian (byte-swapped) arrays are not supported (dtype " +
                                          nb::cast<std::string>(nb::str(dt.attr("str"))) +
                                          "); convert with a.astype(a.dtype.newbyteorder('='))");
    }
    return Error(ErrorKind::Type, std::string(name) + ": cannot take a " + tname + " of dtype " + dstr +
                                      " as an array (unsupported dtype or memory layout)");
  }
  return Error(ErrorKind::Type, std::string(name) + ": expected a NumPy or DLPack-capable array, got " + tname);
}

static TensorView to_view(nb::handle obj, const char* name, ArrayKeeper& keep, bool written, bool mask = false) {
  if (obj.is_none()) throw Error(ErrorKind::Type, std::string(name) + ": expected an array, got None");
  // The plain cast first: the ml_dtypes.bfloat16 probe costs several attribute lookups, paid on
  // every call, so it only runs when the cast fails or gives a dtype we do not take.
  // Read-only arrays (np.load(mmap_mode="r"), np.frombuffer, broadcast_to) are fine as inputs;
  // an array the kernel writes must be writable.
  auto try_view = [&](nb::handle src, nb::ndarray<>& out) {
    if (nb::try_cast(src, out, /*convert=*/false)) return true;
    nb::ndarray<nb::ro> ro;
    if (!nb::try_cast(src, ro, /*convert=*/false)) return false;
    if (written)
      throw Error(ErrorKind::Value, std::string(name) + ": a read-only array is not accepted here (the call writes it or "
                                        "takes only writable arrays); pass a writable array");
    out = nb::ndarray<>(ro);
    return true;
  };
  nb::ndarray<> arr;
  bool ok = try_view(obj, arr);
  bool bf16_view = false;
  const bool bool_mask = ok && mask && arr.dtype().code == uint8_t(nb::dlpack::dtype_code::Bool);
  if ((!ok || !(dtype_supported(arr.dtype()) || bool_mask)) && is_numpy_bfloat16(obj)) {
    // NumPy cannot export ml_dtypes.bfloat16 itself: pass its bits
    nb::object bits = obj.attr("view")(nb::module_::import_("numpy").attr("uint16"));
    arr = nb::ndarray<>();
    ok = try_view(bits, arr);
    bf16_view = ok;
  }
  if (!ok) throw not_an_array(obj, name);
  TensorView t;
  t.data = arr.data();
  t.dtype = bf16_view ? DType::BFloat16 : dtype_from_dlpack(arr.dtype(), name, mask);
  const int dev = arr.device_type();
  if (dev == nb::device::cpu::value || dev == nb::device::cuda_host::value) {
    t.device = Device{DeviceType::CPU, 0};
  } else if (dev == nb::device::cuda::value || dev == nb::device::cuda_managed::value) {
    t.device = Device{DeviceType::CUDA, arr.device_id()};
  } else {
    throw Error(ErrorKind::Value, std::string(name) + ": arrays on DLPack device type " + std::to_string(dev) +
                                      " are not supported (only CPU and CUDA)");
  }
  if (arr.ndim() > size_t(kMaxDims))
    throw Error(ErrorKind::Value, std::string(name) + ": at most " + std::to_string(kMaxDims) + " dimensions");
  t.ndim = int(arr.ndim());
  for (int d = 0; d < t.ndim; ++d) {
    t.shape[d] = int64_t(arr.shape(d));
    t.strides[d] = int64_t(arr.stride(d));
  }
  keep.push_back(std::move(arr));
  return t;
}

TensorView as_tensor(nb::handle obj, const char* name, ArrayKeeper& keep) { return to_view(obj, name, keep, true); }
TensorView as_input(nb::handle obj, const char* name, ArrayKeeper& keep) { return to_view(obj, name, keep, false); }

std::optional<TensorView> as_optional_tensor(nb::handle obj, const char* name, ArrayKeeper& keep) {
  if (obj.is_none()) return std::nullopt;
  return as_tensor(obj, name, keep);
}

std::optional<TensorView> as_optional_input(nb::handle obj, const char* name, ArrayKeeper& keep) {
  if (obj.is_none()) return std::nullopt;
  return as_input(obj, name, keep);
}

std::optional<TensorView> as_optional_mask(nb::handle obj, const char* name, ArrayKeeper& keep) {
  if (obj.is_none()) return std::nullopt;
  return to_view(obj, name, keep, false, /*mask=*/true);
}

}  // namespace memkernels::py

NB_MODULE(_memkernels, m) {
  using namespace memkernels::py;
  m.doc() = "memkernels C++ extension (use the `memkernels` package, not this module directly)";
  g_cache_full_error = PyErr_NewExceptionWithDoc(
      "memkernels.CacheFullError", "No free page is left in the KV cache; nothing was changed.", PyExc_MemoryError,
      nullptr);
  g_corrupt_data_error = PyErr_NewExceptionWithDoc(
      "memkernels.CorruptDataError", "Bytes read from a file or buffer are truncated, corrupt or of a wrong version.",
      PyExc_ValueError, nullptr);
  m.attr("CacheFullError") = nb::handle(g_cache_full_error);
  m.attr("CorruptDataError") = nb::handle(g_corrupt_data_error);
  nb::register_exception_translator(translate_error);
  for (auto& [name, fn] : registry()) fn(m);
}
