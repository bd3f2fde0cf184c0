// Bindings: weight store writer and reader (the Python wrapper in memkernels/weight_store.py
// allocates outputs and converts safetensors / .npy / .npz files).
#include <nanobind/stl/unique_ptr.h>

#include "bind_common.h"

namespace memkernels::py {

static void ids_of(nb::handle ids, ArrayKeeper& keep, TensorView* view) {
  *view = as_input(ids, "neuron_ids", keep);
  expect_dtype(*view, "neuron_ids", {DType::Int64});
  expect_ndim(*view, "neuron_ids", 1);
  if (view->numel() > 0) expect_contiguous(*view, "neuron_ids");
  check(view->device.is_cpu(), ErrorKind::Value, "neuron_ids must be a CPU (NumPy) array");
}

static nb::dict info_dict(const StoredTensorInfo& t) {
  nb::dict d;
  d["name"] = t.name;
  d["dtype"] = std::string(dtype_name(t.dtype));
  d["shape"] = t.shape;
  d["offset"] = t.offset;
  d["nbytes"] = t.nbytes;
  d["chunk_bytes"] = t.chunk_bytes;
  return d;
}

static nb::dict layer_dict(const StoredLayerInfo& l) {
  nb::dict d;
  d["layer"] = l.layer;
  d["neurons"] = l.neurons;
  d["d_model"] = l.d_model;
  d["dtype"] = std::string(dtype_name(l.dtype));
  d["parts"] = l.parts;
  d["offset"] = l.offset;
  d["bundle_bytes"] = l.bundle_bytes;
  return d;
}

MK_PYTHON_BINDING(weight_store) {
  nb::class_<WeightStoreWriter>(m, "WeightStoreWriter")
      .def(nb::init<const std::string&>(), nb::arg("path"))
      .def(
          "add_tensor",
          [](WeightStoreWriter& w, const std::string& name, nb::handle a, uint32_t chunk_bytes) {
            ArrayKeeper keep;
            TensorView t = as_input(a, "tensor", keep);
            nb::gil_scoped_release release;
            w.add_tensor(name, t, chunk_bytes);
          },
          nb::arg("name"), nb::arg("array"), nb::arg("chunk_bytes"))
      .def(
          "add_ffn_layer",
          [](WeightStoreWriter& w, int64_t layer, nb::handle gate, nb::handle up, nb::handle down) {
            ArrayKeeper keep;
            std::optional<TensorView> g = as_optional_input(gate, "gate", keep);
            TensorView u = as_input(up, "up", keep), d = as_input(down, "down", keep);
            nb::gil_scoped_release release;
            w.add_ffn_layer(layer, g ? &*g : nullptr, u, d);
          },
          nb::arg("layer"), nb::arg("gate").none(), nb::arg("up"), nb::arg("down"))
      .def("finish",
           [](WeightStoreWriter& w) {
             nb::gil_scoped_release release;
             w.finish();
           })
      .def("abort", &WeightStoreWriter::abort);

  nb::class_<WeightStore>(m, "WeightStore")
      .def_static(
          "open",
          [](const std::string& path, int64_t budget, const std::string& device, int device_index, int io_threads,
             int window_tokens, bool direct_io, int64_t merge_gap_bytes, int64_t max_read_bytes, bool async_io) {
            WeightStoreOptions o;
            if (device == "cuda") {
              o.device = Device{DeviceType::CUDA, device_index};
            } else if (device != "cpu") {
              throw Error(ErrorKind::Value, "WeightStore.open: device must be 'cpu' or 'cuda', got '" + device + "'");
            }
            o.io_threads = io_threads;
            o.window_tokens = window_tokens;
            o.direct_io = direct_io;
            o.merge_gap_bytes = merge_gap_bytes;
            o.max_read_bytes = max_read_bytes;
            o.async_io = async_io;
            nb::gil_scoped_release release;
            return WeightStore::open(path, budget, o);
          },
          nb::arg("path"), nb::arg("dram_budget_bytes"), nb::arg("device"), nb::arg("device_index"),
          nb::arg("io_threads"), nb::arg("window_tokens"), nb::arg("direct_io"), nb::arg("merge_gap_bytes"),
          nb::arg("max_read_bytes"), nb::arg("async_io") = true)
      .def("tensors",
           [](const WeightStore& s) {
             nb::list r;
             for (auto& t : s.tensors()) r.append(info_dict(t));
             return r;
           })
      .def("layers",
           [](const WeightStore& s) {
             nb::list r;
             for (auto& l : s.layers()) r.append(layer_dict(l));
             return r;
           })
      .def("tensor_info", [](const WeightStore& s, const std::string& name) { return info_dict(s.tensor_info(name)); })
      .def("layer_info", [](const WeightStore& s, int64_t layer) { return layer_dict(s.layer_info(layer)); })
      .def("io_mode", [](const WeightStore& s) { return std::string(s.io_mode()); })
      .def("io_engine", [](const WeightStore& s) { return std::string(s.io_engine()); })
      .def("largest_read_bytes", &WeightStore::largest_read_bytes)
      .def("dram_budget_bytes", &WeightStore::dram_budget_bytes)
      .def(
          "get",
          [](WeightStore& s, const std::string& name, nb::handle out, uintptr_t stream) {
            ArrayKeeper keep;
            TensorView t = as_tensor(out, "out", keep);
            nb::gil_scoped_release release;
            s.get(name, t, as_stream(stream));
          },
          nb::arg("name"), nb::arg("out"), nb::arg("stream"))
      .def(
          "get_rows",
          [](WeightStore& s, int64_t layer, nb::handle ids, nb::handle out, uintptr_t stream) {
            ArrayKeeper keep;
            TensorView iv;
            ids_of(ids, keep, &iv);
            TensorView t = as_tensor(out, "out", keep);
            nb::gil_scoped_release release;
            s.get_rows(layer, iv.ptr<const int64_t>(), iv.size(0), t, as_stream(stream));
          },
          nb::arg("layer"), nb::arg("neuron_ids"), nb::arg("out"), nb::arg("stream"))
      .def(
          "prefetch",
          [](WeightStore& s, int64_t layer, nb::handle ids) {
            ArrayKeeper keep;
            TensorView iv;
            ids_of(ids, keep, &iv);
            nb::gil_scoped_release release;
            s.prefetch(layer, iv.ptr<const int64_t>(), iv.size(0));
          },
          nb::arg("layer"), nb::arg("neuron_ids"))
      .def(
          "pin",
          [](WeightStore& s, int64_t layer, nb::handle ids) {
            ArrayKeeper keep;
            TensorView iv;
            ids_of(ids, keep, &iv);
            nb::gil_scoped_release release;
            s.pin(layer, iv.ptr<const int64_t>(), iv.size(0));
          },
          nb::arg("layer"), nb::arg("neuron_ids"))
      .def("unpin_all",
           [](WeightStore& s) {
             nb::gil_scoped_release release;
             s.unpin_all();
           })
      .def("wait_prefetch",
           [](WeightStore& s) {
             nb::gil_scoped_release release;
             s.wait_prefetch();
           })
      .def("next_token", &WeightStore::next_token)
      .def("clear_cache",
           [](WeightStore& s) {
             nb::gil_scoped_release release;
             s.clear_cache();
           })
      .def("reset_stats", &WeightStore::reset_stats)
      .def("stats", [](const WeightStore& s) {
        WeightStoreStats st = s.stats();
        nb::dict d;
        d["bytes_read"] = st.bytes_read;
        d["reads_issued"] = st.reads_issued;
        d["neuron_hits"] = st.neuron_hits;
        d["neuron_misses"] = st.neuron_misses;
        d["hit_rate"] = st.hit_rate();
        d["prefetched"] = st.prefetched;
        d["evictions"] = st.evictions;
        d["resident_bytes"] = st.resident_bytes;
        d["peak_resident_bytes"] = st.peak_resident_bytes;
        d["cache_capacity_bytes"] = st.cache_capacity_bytes;
        d["staging_bytes"] = st.staging_bytes;
        d["cache_slots"] = st.cache_slots;
        d["slot_bytes"] = st.slot_bytes;
        d["pinned_neurons"] = st.pinned_neurons;
        d["read_granularity"] = st.read_granularity;
        d["tokens"] = st.tokens;
        d["io_mode"] = std::string(s.io_mode());
        d["io_engine"] = std::string(s.io_engine());
        return d;
      });

  m.def(
      "stream_ffn_int4",
      [](nb::handle h, nb::handle a, nb::handle bundles, nb::handle out, bool down_int8) {
        ArrayKeeper keep;
        TensorView hv = as_input(h, "h", keep), av = as_input(a, "a", keep), bv = as_input(bundles, "bundles", keep);
        TensorView ov = as_tensor(out, "out", keep);
        nb::gil_scoped_release release;
        stream_ffn_int4(hv, av, bv, ov, down_int8);
      },
      nb::arg("h"), nb::arg("a"), nb::arg("bundles"), nb::arg("out"), nb::arg("down_int8") = false);
  m.def(
      "stream_ffn_layer",
      [](WeightStore& s, int64_t layer, nb::handle h, nb::handle act, nb::handle perm, nb::handle score,
         nb::handle col_scale, bool sparse, float threshold, nb::handle out, const std::string& format) {
        StreamFfnFormat f;
        if (format == "int4") {
          f = StreamFfnFormat::Int4;
        } else if (format == "int4_int8") {
          f = StreamFfnFormat::Int4Int8;
        } else if (format == "down_int8") {
          f = StreamFfnFormat::DownInt8;
        } else if (format == "down_int7") {
          f = StreamFfnFormat::DownInt7;
        } else {
          throw Error(ErrorKind::Value, "stream_ffn_layer: format must be 'int4', 'int4_int8', 'down_int8' or "
                                        "'down_int7', got '" + format + "'");
        }
        ArrayKeeper keep;
        TensorView hv = as_input(h, "h", keep), av = as_input(act, "act", keep);
        std::optional<TensorView> pv = as_optional_input(perm, "perm", keep), sv = as_optional_input(score, "score", keep);
        std::optional<TensorView> cv = as_optional_input(col_scale, "col_scale", keep);
        TensorView ov = as_tensor(out, "out", keep);
        StreamFfnCounts c;
        {
          nb::gil_scoped_release release;
          c = stream_ffn_layer(s, layer, hv, av, pv ? &*pv : nullptr, sv ? &*sv : nullptr, cv ? &*cv : nullptr,
                               sparse, threshold, ov, f);
        }
        return nb::make_tuple(c.kept, c.visited);
      },
      nb::arg("store"), nb::arg("layer"), nb::arg("h"), nb::arg("act"), nb::arg("perm").none(), nb::arg("score").none(),
      nb::arg("col_scale").none(), nb::arg("sparse"), nb::arg("threshold"), nb::arg("out"), nb::arg("format"));
  m.def("crc32c", [](nb::bytes b, uint32_t crc) { return crc32c(b.c_str(), b.size(), crc); }, nb::arg("data"),
        nb::arg("crc") = 0);
}

}  // namespace memkernels::py
