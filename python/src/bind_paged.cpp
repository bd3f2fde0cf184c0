// Bindings: PagedKVCache and paged attention (memkernels/paged.py wraps them and allocates outputs).
#include <nanobind/stl/tuple.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <utility>

#include "bind_common.h"

namespace memkernels::py {

static DType dtype_from_name(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "int8") return DType::Int8;
  throw Error(ErrorKind::Type,
              "PagedKVCache: dtype must be float32, float16, bfloat16, int8, kivi4 or kivi2, got '" + name + "'");
}

// seq_ids / q_lens of PagedKVCache.attention: an int or a list / tuple of ints >= lo (and < 2^31 for
// counts) is read here directly (the per-call path of a decode step); anything else goes through
// the Python validator memkernels.paged.<fallback>, which raises the clear error (naming the entry)
// or returns the normalised list of ints (NumPy integers, integral floats).
static bool int_list_fast(nb::handle obj, std::vector<int64_t>& out, int64_t lo) {
  const int64_t hi = lo == 0 ? INT32_MAX : INT64_MAX;
  auto one = [&](PyObject* x) {
    if (!PyLong_CheckExact(x)) return false;  // bools, NumPy integers, floats: the slow path
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
    if (overflow || v < lo || v > hi) return false;
    out.push_back(int64_t(v));
    return true;
  };
  out.clear();
  if (PyLong_CheckExact(obj.ptr())) return one(obj.ptr());
  const bool list = PyList_CheckExact(obj.ptr()), tuple = PyTuple_CheckExact(obj.ptr());
  if (!list && !tuple) return false;
  const Py_ssize_t n = list ? PyList_GET_SIZE(obj.ptr()) : PyTuple_GET_SIZE(obj.ptr());
  out.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!one(list ? PyList_GET_ITEM(obj.ptr(), i) : PyTuple_GET_ITEM(obj.ptr(), i))) return false;
  return true;
}

static void int_list(nb::handle obj, std::vector<int64_t>& out, int64_t lo, const char* fallback) {
  if (int_list_fast(obj, out, lo)) return;
  nb::object checked = nb::module_::import_("memkernels.paged").attr(fallback)(obj);
  if (!int_list_fast(checked, out, lo))
    throw Error(ErrorKind::Value, std::string("memkernels.paged.") + fallback + " returned values out of range");
}

static nb::dlpack::dtype dlpack_of(DType t) {
  using nb::dlpack::dtype_code;
  switch (t) {
    case DType::Float16: return {uint8_t(dtype_code::Float), 16, 1};
    case DType::BFloat16: return {uint8_t(dtype_code::UInt), 16, 1};  // NumPy has no bf16: the bits
    case DType::Int8: return {uint8_t(dtype_code::Int), 8, 1};
    case DType::UInt8: return {uint8_t(dtype_code::UInt), 8, 1};  // KIVI pools (bytes)
    case DType::Float32: return {uint8_t(dtype_code::Float), 32, 1};
    default: throw Error(ErrorKind::Type, std::string("no array view for cache dtype ") + dtype_name(t));
  }
}

// A view of cache memory (no copy) that keeps the Python cache object alive.
static nb::object view_of(const TensorView& t, nb::handle owner) {
  std::vector<size_t> shape(t.shape, t.shape + t.ndim);
  std::vector<int64_t> strides(t.strides, t.strides + t.ndim);
  const int dev = t.device.is_cuda() ? nb::device::cuda::value : nb::device::cpu::value;
  nb::ndarray<> arr(t.data, size_t(t.ndim), shape.data(), owner, strides.data(), dlpack_of(t.dtype), dev,
                    t.device.index);
  if (t.device.is_cuda()) return nb::cast(arr);
  return nb::cast(nb::ndarray<nb::numpy>(arr));
}

static PagedAttentionOptions make_opts(bool causal, float scale, int window_left, int window_right, float softcap,
                                       int num_splits) {
  PagedAttentionOptions o;
  o.causal = causal, o.scale = scale, o.softcap = softcap, o.num_splits = num_splits;
  o.window_left = window_left, o.window_right = window_right;
  return o;
}

MK_PYTHON_BINDING(paged) {
  nb::class_<PagedKVCache>(m, "PagedKVCache")
      .def("__init__",
           [](PagedKVCache* self, int num_layers, int num_pages, int page_size, int kv_heads, int head_dim,
              const std::string& dtype, int device_type, int device_index) {
             Device dev{device_type == 1 ? DeviceType::CUDA : DeviceType::CPU, device_index};
             const int bits = dtype == "kivi4" ? 4 : dtype == "kivi2" ? 2 : 0;
             new (self) PagedKVCache(num_layers, num_pages, page_size, kv_heads, head_dim,
                                     bits ? DType::UInt8 : dtype_from_name(dtype), dev, bits);
           },
           nb::arg("num_layers"), nb::arg("num_pages"), nb::arg("page_size"), nb::arg("kv_heads"),
           nb::arg("head_dim"), nb::arg("dtype"), nb::arg("device_type"), nb::arg("device_index"))
      .def_prop_ro("num_layers", &PagedKVCache::num_layers)
      .def_prop_ro("num_pages", &PagedKVCache::num_pages)
      .def_prop_ro("page_size", &PagedKVCache::page_size)
      .def_prop_ro("kv_heads", &PagedKVCache::kv_heads)
      .def_prop_ro("head_dim", &PagedKVCache::head_dim)
      .def_prop_ro("dtype", [](const PagedKVCache& c) { return std::string(dtype_name(c.dtype())); })
      .def_prop_ro("device_type", [](const PagedKVCache& c) { return c.device().is_cuda() ? 1 : 0; })
      .def_prop_ro("device_index", [](const PagedKVCache& c) { return c.device().index; })
      .def("pool", [](nb::handle self) { return view_of(nb::cast<PagedKVCache&>(self).pool(), self); })
      .def("k_pages", [](nb::handle self, int layer) { return view_of(nb::cast<PagedKVCache&>(self).k_pages(layer), self); })
      .def("v_pages", [](nb::handle self, int layer) { return view_of(nb::cast<PagedKVCache&>(self).v_pages(layer), self); })
      .def("k_scales", [](nb::handle self, int layer) { return view_of(nb::cast<PagedKVCache&>(self).k_scales(layer), self); })
      .def("v_scales", [](nb::handle self, int layer) { return view_of(nb::cast<PagedKVCache&>(self).v_scales(layer), self); })
      .def("add_sequence",
           [](PagedKVCache& c, nb::handle tokens) {
             ArrayKeeper keep;
             int64_t cached = 0;
             if (tokens.is_none()) return c.add_sequence(nullptr, 0, &cached);
             TensorView t = as_input(tokens, "prefix_tokens", keep);
             expect_ndim(t, "prefix_tokens", 1);
             expect_dtype(t, "prefix_tokens", {DType::Int32});
             expect_contiguous(t, "prefix_tokens");
             check(t.device.is_cpu(), ErrorKind::Value, "prefix_tokens must be a host (NumPy) array");
             nb::gil_scoped_release release;
             return c.add_sequence(t.ptr<const int32_t>(), t.size(0), &cached);
           },
           nb::arg("prefix_tokens").none())
      .def("append",
           [](PagedKVCache& c, std::vector<int64_t> ids, int layer, nb::handle k, nb::handle v,
              std::vector<int64_t> counts, uintptr_t stream) {
             ArrayKeeper keep;
             TensorView tk = as_input(k, "k", keep), tv = as_input(v, "v", keep);
             nb::gil_scoped_release release;
             c.append(ids, layer, tk, tv, counts, as_stream(stream));
           },
           nb::arg("seq_ids"), nb::arg("layer"), nb::arg("k"), nb::arg("v"), nb::arg("counts"), nb::arg("stream"))
      .def("fork", [](PagedKVCache& c, int64_t id) { nb::gil_scoped_release r; return c.fork(id); })
      .def("free", [](PagedKVCache& c, int64_t id) { nb::gil_scoped_release r; c.free(id); })
      .def("truncate", [](PagedKVCache& c, int64_t id, int64_t n) { nb::gil_scoped_release r; c.truncate(id, n); })
      .def("length", [](PagedKVCache& c, int64_t id, int layer) { return c.length(id, layer); })
      .def("page_table", &PagedKVCache::page_table)
      .def("read_kv",
           [](PagedKVCache& c, int64_t id, int layer) {
             // Sized and filled under the cache's lock (an append from another thread in between
             // would overflow buffers sized beforehand).
             std::unique_ptr<float[]> k, v;
             int64_t n = 0;
             {
               nb::gil_scoped_release r;
               n = c.read_kv(id, layer, [&](int64_t len) {
                 const size_t count = std::max<size_t>(1, size_t(len) * size_t(c.kv_heads()) * size_t(c.head_dim()));
                 k.reset(new float[count]), v.reset(new float[count]);
                 return std::make_pair(k.get(), v.get());
               });
             }
             const size_t shape[3] = {size_t(n), size_t(c.kv_heads()), size_t(c.head_dim())};
             float* kp = k.get();
             nb::capsule ok(kp, [](void* p) noexcept { delete[] static_cast<float*>(p); });
             k.release();  // owned by the capsule now
             float* vp = v.get();
             nb::capsule ov(vp, [](void* p) noexcept { delete[] static_cast<float*>(p); });
             v.release();
             return nb::make_tuple(nb::ndarray<nb::numpy, float>(kp, 3, shape, ok),
                                   nb::ndarray<nb::numpy, float>(vp, 3, shape, ov));
           })
      .def("sequences", &PagedKVCache::sequences)
      .def("refcount", &PagedKVCache::refcount)
      .def("swap_out", [](PagedKVCache& c, int64_t id, uintptr_t s) { nb::gil_scoped_release r; c.swap_out(id, as_stream(s)); })
      .def("swap_in", [](PagedKVCache& c, int64_t id, uintptr_t s) { nb::gil_scoped_release r; c.swap_in(id, as_stream(s)); })
      .def("is_swapped", &PagedKVCache::is_swapped)
      .def("check_invariants", &PagedKVCache::check_invariants)
      .def("build_indices",
           [](PagedKVCache& c, std::vector<int64_t> ids, int layer) {
             std::vector<int32_t> a, b, l;
             c.build_indices(ids, layer, a, b, l);
             return nb::make_tuple(a, b, l);
           })
      .def("stats",
           [](PagedKVCache& c) {
             PagedCacheStats s = c.stats();
             nb::dict d;
             d["num_pages"] = s.num_pages;
             d["page_size"] = s.page_size;
             d["pages_used"] = s.pages_used;
             d["pages_cached"] = s.pages_cached;
             d["pages_free"] = s.pages_free;
             d["pages_shared"] = s.pages_shared;
             d["num_sequences"] = s.num_sequences;
             d["num_swapped"] = s.num_swapped;
             d["tokens"] = s.tokens;
             d["bytes_per_token"] = s.bytes_per_token;
             d["pool_bytes"] = s.pool_bytes;
             d["wasted_slots"] = s.wasted_slots;
             d["fragmentation"] = s.fragmentation;
             d["prefix_hits"] = s.prefix_hits;
             d["prefix_queries"] = s.prefix_queries;
             d["evictions"] = s.evictions;
             return d;
           })
      .def("attention",
           [](PagedKVCache& c, nb::handle q, int layer, nb::handle seq_ids, nb::handle q_lens_obj,
              nb::handle out, nb::handle lse, bool causal, float scale, int window_left, int window_right,
              float softcap, int num_splits, uintptr_t stream) {
             std::vector<int64_t> ids, q_lens;
             int_list(seq_ids, ids, INT64_MIN, "_ids");
             if (!q_lens_obj.is_none()) int_list(q_lens_obj, q_lens, 0, "_q_lens");
             ArrayKeeper keep;
             TensorView tq = as_input(q, "q", keep), to = as_tensor(out, "out", keep);
             std::optional<TensorView> tl = as_optional_tensor(lse, "lse", keep);
             PagedAttentionOptions o = make_opts(causal, scale, window_left, window_right, softcap, num_splits);
             nb::gil_scoped_release release;
             c.attention(tq, layer, ids, q_lens, to, tl ? &*tl : nullptr, o, as_stream(stream));
           },
           nb::arg("q"), nb::arg("layer"), nb::arg("seq_ids"), nb::arg("q_lens").none(), nb::arg("out"),
           nb::arg("lse").none(), nb::arg("causal"), nb::arg("scale"), nb::arg("window_left"),
           nb::arg("window_right"), nb::arg("softcap"), nb::arg("num_splits"), nb::arg("stream"));

  m.def(
      "paged_attention_raw",
      [](nb::handle q, nb::handle kp, nb::handle vp, nb::handle qo, nb::handle indptr, nb::handle indices,
         nb::handle last, nb::handle out, nb::handle lse, bool causal, float scale, int window_left,
         int window_right, float softcap, int num_splits, int max_q_len, uintptr_t stream, nb::handle k_scales,
         nb::handle v_scales) {
        ArrayKeeper keep;
        // Inputs are only read (read-only arrays welcome); out and lse are written.
        TensorView tq = as_input(q, "q", keep), tk = as_input(kp, "k_pages", keep),
                   tv = as_input(vp, "v_pages", keep);
        std::optional<TensorView> tqo = as_optional_input(qo, "qo_indptr", keep);
        TensorView ti = as_input(indptr, "kv_indptr", keep), tx = as_input(indices, "kv_indices", keep),
                   tl = as_input(last, "kv_last_page_len", keep), to = as_tensor(out, "out", keep);
        std::optional<TensorView> tlse = as_optional_tensor(lse, "lse", keep);
        std::optional<TensorView> tks = as_optional_input(k_scales, "k_scales", keep);
        std::optional<TensorView> tvs = as_optional_input(v_scales, "v_scales", keep);
        PagedAttentionOptions o = make_opts(causal, scale, window_left, window_right, softcap, num_splits);
        nb::gil_scoped_release release;
        paged_attention_raw(tq, tk, tv, tqo ? &*tqo : nullptr, ti, tx, tl, to, tlse ? &*tlse : nullptr, o, max_q_len,
                            as_stream(stream), tks ? &*tks : nullptr, tvs ? &*tvs : nullptr);
      },
      nb::arg("q"), nb::arg("k_pages"), nb::arg("v_pages"), nb::arg("qo_indptr").none(), nb::arg("kv_indptr"),
      nb::arg("kv_indices"), nb::arg("kv_last_page_len"), nb::arg("out"), nb::arg("lse").none(), nb::arg("causal"),
      nb::arg("scale"), nb::arg("window_left"), nb::arg("window_right"), nb::arg("softcap"), nb::arg("num_splits"),
      nb::arg("max_q_len"), nb::arg("stream"),
      nb::arg("k_scales").none(), nb::arg("v_scales").none());
}

}  // namespace memkernels::py
