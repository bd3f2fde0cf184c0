// Shared helpers for the nanobind bindings: array -> TensorView conversion, streams, registration.
// Bindings only convert arguments and call the C++ API; no kernel logic lives here.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "memkernels/memkernels.h"

namespace memkernels::py {

namespace nb = nanobind;

// Keeps the Python arrays behind TensorViews alive for the duration of one call.
using ArrayKeeper = std::vector<nb::ndarray<>>;

// Converts a NumPy array (including ml_dtypes.bfloat16) or any DLPack-capable array to a view.
// `name` is the argument name used in error messages. as_tensor: an array the call may write
// (read-only arrays are refused by name); as_input: an array only read (read-only arrays welcome).
TensorView as_tensor(nb::handle obj, const char* name, ArrayKeeper& keep);
std::optional<TensorView> as_optional_tensor(nb::handle obj, const char* name, ArrayKeeper& keep);
TensorView as_input(nb::handle obj, const char* name, ArrayKeeper& keep);
std::optional<TensorView> as_optional_input(nb::handle obj, const char* name, ArrayKeeper& keep);
// A read-only mask: bool arrays (DType::Bool) are taken here, and only here, besides every dtype
// as_input takes (the op checks which dtype it wants).
std::optional<TensorView> as_optional_mask(nb::handle obj, const char* name, ArrayKeeper& keep);

// A CUDA stream passed from Python as an int handle (0 = default stream).
inline void* as_stream(uintptr_t handle) { return reinterpret_cast<void*>(handle); }

// Each bind_*.cpp registers itself with MK_PYTHON_BINDING(name) { ... body using `m` ... }.
using BindFn = void (*)(nb::module_&);
struct BindingRegistrar {
  BindingRegistrar(const char* name, BindFn fn);
};
#define MK_PYTHON_BINDING(name)                                                         \
  static void mk_bind_##name(::nanobind::module_& m);                                  \
  static ::memkernels::py::BindingRegistrar mk_registrar_##name(#name, mk_bind_##name); \
  static void mk_bind_##name(::nanobind::module_& m)

}  // namespace memkernels::py
