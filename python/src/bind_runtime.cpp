// Bindings: build/runtime information, threads, ISA, device memory for CUDA outputs.
#include "bind_common.h"

namespace memkernels::py {

static nb::dlpack::dtype dlpack_dtype(const std::string& name) {
  using nb::dlpack::dtype_code;
  auto make = [](dtype_code c, int bits) { return nb::dlpack::dtype{uint8_t(c), uint8_t(bits), 1}; };
  if (name == "float32") return make(dtype_code::Float, 32);
  if (name == "float16") return make(dtype_code::Float, 16);
  if (name == "bfloat16") return make(dtype_code::Bfloat, 16);
  if (name == "float64") return make(dtype_code::Float, 64);
  if (name == "int8") return make(dtype_code::Int, 8);
  if (name == "uint8") return make(dtype_code::UInt, 8);
  if (name == "int32") return make(dtype_code::Int, 32);
  if (name == "int64") return make(dtype_code::Int, 64);
  if (name == "uint16") return make(dtype_code::UInt, 16);
  throw Error(ErrorKind::Type, "unsupported dtype name '" + name + "'");
}

static int dlpack_bytes(nb::dlpack::dtype t) { return t.bits / 8; }

MK_PYTHON_BINDING(runtime) {
  m.def("info_string", &info_string, "Build and machine information as text.");
  m.def("build_info", []() {
    BuildInfo b = build_info();
    nb::dict d;
    d["version"] = b.version;
    d["compiler"] = b.compiler;
    d["build_type"] = b.build_type;
    d["cuda_built"] = b.cuda_built;
    d["cuda_architectures"] = b.cuda_architectures;
    d["cpu_isas_compiled"] = b.cpu_isas_compiled;
    return d;
  });
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, nb::arg("n"));
  m.def("cpu_isa", []() { return std::string(cpu_isa_name(active_cpu_isa())); });
  m.def("best_cpu_isa", []() { return std::string(cpu_isa_name(best_cpu_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) {
    for (CpuIsa isa : {CpuIsa::Generic, CpuIsa::AVX2, CpuIsa::AVX512})
      if (name == cpu_isa_name(isa)) return set_cpu_isa(isa);
    throw Error(ErrorKind::Value, "set_cpu_isa: unknown ISA '" + name + "' (generic, avx2, avx512)");
  });
  m.def("cuda_built", &cuda_built);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_device_name", &cuda_device_name, nb::arg("device") = 0);

  // An uninitialised CUDA array owned by Python (freed when the last reference goes). Returned as
  // a bare DLPack-capable array; the Python layer hands it to the caller's framework.
  m.def("empty_cuda", [](std::vector<size_t> shape, const std::string& dtype, int device) {
    nb::dlpack::dtype t = dlpack_dtype(dtype);
    size_t bytes = size_t(dlpack_bytes(t));
    for (size_t s : shape) bytes *= s;
    Device dev{DeviceType::CUDA, device};
    void* ptr = device_malloc(dev, bytes);
    nb::capsule owner(ptr, [](void* p) noexcept { device_free(Device{DeviceType::CUDA, 0}, p); });
    return nb::ndarray<>(ptr, shape.size(), shape.data(), owner, nullptr, t, nb::device::cuda::value, device);
  }, nb::arg("shape"), nb::arg("dtype"), nb::arg("device") = 0);
  m.def("synchronize", [](int device, uintptr_t stream) {
    nb::gil_scoped_release release;
    stream_synchronize(Device{DeviceType::CUDA, device}, as_stream(stream));
  }, nb::arg("device") = 0, nb::arg("stream") = 0);
}

}  // namespace memkernels::py
