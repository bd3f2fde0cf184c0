// Bindings: SparseMatrix and spmm (the Python wrapper in memkernels/sparse.py allocates outputs).
#include <nanobind/stl/shared_ptr.h>

#include "bind_common.h"

namespace memkernels::py {

static DType value_dtype_from_name(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "int8") return DType::Int8;
  throw Error(ErrorKind::Type, "dtype: expected 'float32', 'float16', 'bfloat16' or 'int8', got '" + name + "'");
}

MK_PYTHON_BINDING(sparse) {
  nb::class_<SparseMatrix>(m, "SparseMatrixHandle")
      .def_prop_ro("rows", &SparseMatrix::rows)
      .def_prop_ro("cols", &SparseMatrix::cols)
      .def_prop_ro("format", [](const SparseMatrix& s) { return std::string(sparse_format_name(s.format())); })
      .def_prop_ro("value_dtype", [](const SparseMatrix& s) { return std::string(dtype_name(s.value_dtype())); })
      .def_prop_ro("device", [](const SparseMatrix& s) { return s.device().str(); })
      .def_prop_ro("nnz_stored", &SparseMatrix::nnz_stored)
      .def_prop_ro("nbytes", &SparseMatrix::nbytes)
      .def("csr_nnz",
           [](const SparseMatrix& s) {
             nb::gil_scoped_release release;
             return s.csr_nnz();
           })
      .def("to_bytes",
           [](const SparseMatrix& s) {
             std::string b;
             {
               nb::gil_scoped_release release;
               b = s.to_bytes();
             }
             return nb::bytes(b.data(), b.size());
           })
      .def("to_dense",
           [](const SparseMatrix& s, nb::handle out) {
             ArrayKeeper keep;
             TensorView t = as_tensor(out, "out", keep);
             nb::gil_scoped_release release;
             s.to_dense(t);
           })
      .def("to_csr",
           [](const SparseMatrix& s, nb::handle indptr, nb::handle indices, nb::handle values) {
             ArrayKeeper keep;
             TensorView a = as_tensor(indptr, "indptr", keep), b = as_tensor(indices, "indices", keep),
                        c = as_tensor(values, "values", keep);
             nb::gil_scoped_release release;
             s.to_csr(a, b, c);
           })
      .def("to_device", [](const SparseMatrix& s, bool cuda, int index) {
        nb::gil_scoped_release release;
        return s.to(Device{cuda ? DeviceType::CUDA : DeviceType::CPU, cuda ? index : 0});
      });

  m.def(
      "sparse_from_dense",
      [](nb::handle w, const std::string& format, const std::string& dtype, float threshold) {
        ArrayKeeper keep;
        TensorView t = as_input(w, "w", keep);
        SparseFormat f = parse_sparse_format(format);
        DType vd = value_dtype_from_name(dtype);
        nb::gil_scoped_release release;
        return SparseMatrix::from_dense(t, f, vd, threshold);
      },
      nb::arg("w"), nb::arg("format"), nb::arg("dtype"), nb::arg("threshold"));

  m.def(
      "sparse_from_csr",
      [](int64_t rows, int64_t cols, nb::handle indptr, nb::handle indices, nb::handle data, const std::string& format,
         const std::string& dtype) {
        ArrayKeeper keep;
        TensorView a = as_input(indptr, "indptr", keep), b = as_input(indices, "indices", keep),
                   c = as_input(data, "data", keep);
        SparseFormat f = parse_sparse_format(format);
        DType vd = value_dtype_from_name(dtype);
        nb::gil_scoped_release release;
        return SparseMatrix::from_csr(rows, cols, a, b, c, f, vd);
      },
      nb::arg("rows"), nb::arg("cols"), nb::arg("indptr"), nb::arg("indices"), nb::arg("data"), nb::arg("format"),
      nb::arg("dtype"));

  m.def("sparse_from_bytes", [](nb::bytes data) {
    const void* p = data.c_str();
    const size_t n = data.size();
    nb::gil_scoped_release release;
    return SparseMatrix::from_bytes(p, n);
  });

  m.def(
      "spmm",
      [](const SparseMatrix& s, nb::handle x, nb::handle out, uintptr_t stream) {
        ArrayKeeper keep;
        TensorView tx = as_input(x, "x", keep), to = as_tensor(out, "out", keep);
        nb::gil_scoped_release release;
        spmm(s, tx, to, as_stream(stream));
      },
      nb::arg("sp"), nb::arg("x"), nb::arg("out"), nb::arg("stream"));
}

}  // namespace memkernels::py
