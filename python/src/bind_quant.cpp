// Bindings: quantized matrices, quantize / dequantize / qgemm (memkernels/quant.py wraps them).
#include <nanobind/stl/tuple.h>

#include "bind_common.h"

namespace memkernels::py {

static Device parse_device(const std::string& s) {
  if (s == "cpu") return Device{DeviceType::CPU, 0};
  if (s == "cuda") return Device{DeviceType::CUDA, 0};
  if (s.rfind("cuda:", 0) == 0) {
    try {
      return Device{DeviceType::CUDA, std::stoi(s.substr(5))};
    } catch (const std::exception&) {
    }
  }
  throw Error(ErrorKind::Value, "device: expected 'cpu', 'cuda' or 'cuda:<index>', got '" + s + "'");
}

MK_PYTHON_BINDING(quant) {
  nb::class_<QuantizedMatrix>(m, "QuantizedMatrix",
                              "A weight matrix (out_features, in_features) stored in 2-8 bits per weight; see "
                              "memkernels.quantize.")
      .def_prop_ro("format", [](const QuantizedMatrix& q) { return std::string(quant_format_name(q.format())); })
      .def_prop_ro("shape", [](const QuantizedMatrix& q) { return std::make_tuple(q.rows(), q.cols()); })
      .def_prop_ro("out_features", &QuantizedMatrix::rows)
      .def_prop_ro("in_features", &QuantizedMatrix::cols)
      .def_prop_ro("padded_in_features", &QuantizedMatrix::padded_cols,
                   "in_features rounded up to whole groups (32-weight chunks for per-channel int8): the "
                   "stored columns; the pad columns hold the code of 0")
      .def_prop_ro("group_size", &QuantizedMatrix::group_size)
      .def_prop_ro("double_quant", &QuantizedMatrix::double_quant)
      .def_prop_ro("bits", [](const QuantizedMatrix& q) { return quant_bits(q.format()); })
      .def_prop_ro("nbytes", &QuantizedMatrix::nbytes)
      .def_prop_ro("bits_per_weight", &QuantizedMatrix::bits_per_weight)
      .def_prop_ro("device", [](const QuantizedMatrix& q) { return q.device().str(); })
      .def("to", [](const QuantizedMatrix& q, const std::string& dev) {
        Device d = parse_device(dev);
        nb::gil_scoped_release release;
        return q.to(d);
      }, nb::arg("device"))
      .def("to_bytes", [](const QuantizedMatrix& q) {
        std::vector<uint8_t> b;
        {
          nb::gil_scoped_release release;
          b = q.serialize();
        }
        return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size());
      })
      .def("save", [](const QuantizedMatrix& q, const std::string& path) {
        nb::gil_scoped_release release;
        q.save(path);
      }, nb::arg("path"))
      .def("scales", [](const QuantizedMatrix& q) {
        // The effective fp32 scales (N, groups), decoded when double-quantised; a host copy.
        std::vector<float> s = q.effective_scales();
        const int64_t N = q.rows(), G = q.groups();
        float* data = new float[s.size()];
        std::copy(s.begin(), s.end(), data);
        nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<float*>(p); });
        size_t shape[2] = {size_t(N), size_t(G)};
        return nb::ndarray<nb::numpy, float, nb::ndim<2>>(data, 2, shape, owner);
      })
      .def("mins", [](const QuantizedMatrix& q) -> nb::object {
        // The fp32 group minimums (N, groups) of int4_min (a host copy); None for other formats.
        if (!quant_has_mins(q.format())) return nb::none();
        const QuantizedMatrix h = q.canonical();  // the documented [N][groups] order on the host
        const size_t count = size_t(q.rows() * q.groups());
        float* data = new float[count];
        std::copy(h.mins(), h.mins() + count, data);
        nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<float*>(p); });
        size_t shape[2] = {size_t(q.rows()), size_t(q.groups())};
        return nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(data, 2, shape, owner));
      })
      .def("__repr__", [](const QuantizedMatrix& q) {
        return "QuantizedMatrix(format='" + std::string(quant_format_name(q.format())) + "', shape=(" +
               std::to_string(q.rows()) + ", " + std::to_string(q.cols()) + "), group_size=" +
               std::to_string(q.group_size()) + (q.double_quant() ? ", double_quant=True" : "") + ", device='" +
               q.device().str() + "')";
      });

  m.def("quant_from_bytes", [](nb::bytes b) {
    const void* p = b.c_str();
    size_t n = b.size();
    nb::gil_scoped_release release;
    return QuantizedMatrix::deserialize(p, n);
  }, nb::arg("data"));
  m.def("quant_load", [](const std::string& path) {
    nb::gil_scoped_release release;
    return QuantizedMatrix::load(path);
  }, nb::arg("path"));
  m.def("quantize", [](nb::handle w, const std::string& format, int group_size, bool double_quant) {
    ArrayKeeper keep;
    TensorView tw = as_tensor(w, "w", keep);
    QuantFormat f = parse_quant_format(format);
    QuantOptions o;
    o.group_size = group_size;
    o.double_quant = double_quant;
    nb::gil_scoped_release release;
    return quantize(tw, f, o);
  }, nb::arg("w"), nb::arg("format"), nb::arg("group_size"), nb::arg("double_quant"));
  m.def("pack_quantized", [](const std::string& format, nb::handle codes, nb::handle scales, nb::handle zeros,
                             int group_size, bool double_quant, nb::handle mins) {
    ArrayKeeper keep;
    TensorView tc = as_tensor(codes, "codes", keep), ts = as_tensor(scales, "scales", keep);
    std::optional<TensorView> tz = as_optional_tensor(zeros, "zeros", keep);
    std::optional<TensorView> tm = as_optional_tensor(mins, "mins", keep);
    QuantFormat f = parse_quant_format(format);
    QuantOptions o;
    o.group_size = group_size;
    o.double_quant = double_quant;
    nb::gil_scoped_release release;
    return pack_quantized(f, tc, ts, tz ? &*tz : nullptr, tm ? &*tm : nullptr, o);
  }, nb::arg("format"), nb::arg("codes"), nb::arg("scales"), nb::arg("zeros").none(), nb::arg("group_size"),
     nb::arg("double_quant"), nb::arg("mins").none() = nb::none());
  m.def("pack_gguf_kquant", [](const std::string& format, nb::handle blocks, int64_t cols) {
    ArrayKeeper keep;
    TensorView tb = as_input(blocks, "blocks", keep);
    QuantFormat f = parse_quant_format(format);
    nb::gil_scoped_release release;
    return pack_gguf_kquant(f, tb, cols);
  }, nb::arg("format"), nb::arg("blocks"), nb::arg("cols"));
  m.def("nf4_codebook", []() { return std::vector<float>(nf4_codebook(), nf4_codebook() + 16); });
  m.def("dequantize", [](const QuantizedMatrix& q, nb::handle out, uintptr_t stream) {
    ArrayKeeper keep;
    TensorView to = as_tensor(out, "out", keep);
    nb::gil_scoped_release release;
    dequantize(q, to, as_stream(stream));
  }, nb::arg("qm"), nb::arg("out"), nb::arg("stream"));
  m.def("qgemm", [](nb::handle x, const QuantizedMatrix& q, nb::handle bias, nb::handle out, uintptr_t stream,
                    bool int8_activations) {
    ArrayKeeper keep;
    TensorView tx = as_tensor(x, "x", keep), to = as_tensor(out, "out", keep);
    std::optional<TensorView> tb = as_optional_tensor(bias, "bias", keep);
    QGemmOptions o;
    o.int8_activations = int8_activations;
    nb::gil_scoped_release release;
    qgemm(tx, q, tb ? &*tb : nullptr, to, as_stream(stream), o);
  }, nb::arg("x"), nb::arg("qm"), nb::arg("bias").none(), nb::arg("out"), nb::arg("stream"),
     nb::arg("int8_activations") = false);
}

}  // namespace memkernels::py
