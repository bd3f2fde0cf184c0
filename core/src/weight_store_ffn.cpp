// The FFN of streamed 4-bit neuron bundles (issue 17): out = sum_i z_i * down_i with
// z_i = a_i * (h . up_i), computed straight from the gathered bundles, without a float copy of the
// weights (NumPy's dequantize-then-matmul spent ~40 ms per layer per token on it).
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "memkernels/weight_store.h"
#include "stream_ffn_internal.h"

namespace memkernels {
namespace {

// The kernel's inputs for h (T, d): h de-interleaved per group of 32, the groups' sums, zeroed
// accumulators.
struct Prepared {
  std::vector<float> hq, hsum, y;
  StreamFfnProblem p;
  Prepared(const float* h, int64_t T, int64_t d, bool down_int8, bool down_only = false, bool down_int7 = false) {
    const int64_t dp = (d + 31) / 32 * 32, ng = dp / 32;
    hq.assign(size_t(T * dp), 0.0f);
    hsum.assign(size_t(T * ng), 0.0f);
    y.assign(size_t(T * dp), 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < d; ++j) {
        const float v = h[t * d + j];
        const int64_t g = j / 32, r = j % 32;
        hq[size_t(t * dp + g * 32 + (r & 1) * 16 + r / 2)] = v;
        hsum[size_t(t * ng + g)] += v;
      }
    p.T = T;
    p.d = d;
    p.dp = dp;
    p.down_int8 = down_int8 || down_only;
    p.down_only = down_only;
    p.down_int7 = down_int7;
    p.hq = hq.data();
    p.hsum = hsum.data();
    p.y = y.data();
  }
  void accumulate(const uint8_t* const* bundles, int64_t n, const float* a, int64_t lda, const int64_t* cols) {
    MK_CPU_DISPATCH(stream_ffn_accumulate, p, bundles, n, a, lda, cols);
  }
  void write(float* out) const {  // y (int4 down: de-interleaved per group) -> out (T, d)
    for (int64_t t = 0; t < p.T; ++t) {
      const float* yt = y.data() + t * p.dp;
      float* o = out + t * p.d;
      if (p.down_int8) {
        std::memcpy(o, yt, size_t(p.d) * 4);
      } else {
        for (int64_t j = 0; j < p.d; ++j) o[j] = yt[(j / 32) * 32 + (j % 2) * 16 + (j % 32) / 2];
      }
    }
  }
};

const char* view_name(const TensorView* t, const TensorView* const* views, const char* const* names, int n) {
  for (int i = 0; i < n; ++i)
    if (t == views[i]) return names[i];
  return "array";
}

}  // namespace

int64_t int8_down_part_bytes(int64_t d) { return (d + 4 + 1) / 2 * 2; }

int64_t int4_bundle_part_bytes(int64_t d) {
  const int64_t dp = (d + 31) / 32 * 32;
  return dp / 2 + 4 * (dp / 32);
}

void stream_ffn_int4(const TensorView& h, const TensorView& a, const TensorView& bundles, const TensorView& out,
                     bool down_int8) {
  expect_dtype(h, "h", {DType::Float32});
  expect_dtype(a, "a", {DType::Float32});
  expect_dtype(bundles, "bundles", {DType::UInt8});
  expect_dtype(out, "out", {DType::Float32});
  expect_ndim(h, "h", 2);
  expect_ndim(a, "a", 2);
  expect_ndim(bundles, "bundles", 3);
  expect_ndim(out, "out", 2);
  const TensorView* views[] = {&h, &a, &bundles, &out};
  const char* names[] = {"h", "a", "bundles", "out"};
  for (const TensorView* t : views) {
    check(t->device.is_cpu(), ErrorKind::Value, "stream_ffn_int4: every array must be on the CPU");
    if (t->numel() > 0) {
      expect_contiguous(*t, view_name(t, views, names, 4));
      expect_not_null(*t, view_name(t, views, names, 4));
    }
  }
  const int64_t T = h.shape[0], d = h.shape[1], k = bundles.shape[0];
  const int64_t P = int4_bundle_part_bytes(d);
  check(d > 0, ErrorKind::Value, "stream_ffn_int4: h must have d_model > 0 columns, got " + h.shape_str());
  const int64_t bundle = P + (down_int8 ? int8_down_part_bytes(d) : P);
  check(bundles.shape[1] == 2 && bundles.shape[2] * 2 == bundle, ErrorKind::Value,
        "stream_ffn_int4: bundles must be (k, 2, " + std::to_string(bundle / 2) + ") for d_model " +
            std::to_string(d) + (down_int8 ? " with int8 down columns" : "") + ", got " + bundles.shape_str());
  check(a.shape[0] == T && a.shape[1] == k, ErrorKind::Value,
        "stream_ffn_int4: a must be (tokens, k) = (" + std::to_string(T) + ", " + std::to_string(k) + "), got " +
            a.shape_str());
  check(out.shape[0] == T && out.shape[1] == d, ErrorKind::Value,
        "stream_ffn_int4: out must be (tokens, d_model) = (" + std::to_string(T) + ", " + std::to_string(d) +
            "), got " + out.shape_str());
  if (T == 0) return;
  Prepared pr(h.ptr<const float>(), T, d, down_int8);
  const uint8_t* bp = bundles.ptr<const uint8_t>();
  std::vector<const uint8_t*> ptrs(static_cast<size_t>(k), nullptr);
  for (int64_t i = 0; i < k; ++i) ptrs[size_t(i)] = bp + i * bundle;
  if (k > 0) pr.accumulate(ptrs.data(), k, a.ptr<const float>(), k, nullptr);
  pr.write(out.ptr<float>());
}

int64_t int7_down_part_bytes(int64_t d) {
  const int64_t raw = 7 * ((d + 7) / 8) + 4;
  const int64_t block = (raw + 511) / 512 * 512;  // whole O_DIRECT blocks when the padding is small
  return (block - raw) * 8 <= raw ? block : (raw + 7) / 8 * 8;
}

int64_t stream_ffn_bundle_bytes(StreamFfnFormat format, int64_t d) {
  switch (format) {
    case StreamFfnFormat::Int4: return 2 * int4_bundle_part_bytes(d);
    case StreamFfnFormat::Int4Int8: return int4_bundle_part_bytes(d) + int8_down_part_bytes(d);
    case StreamFfnFormat::DownInt8: return int8_down_part_bytes(d);
    case StreamFfnFormat::DownInt7: return int7_down_part_bytes(d);
  }
  throw Error(ErrorKind::Value, "stream_ffn_layer: unknown bundle format");
}

StreamFfnCounts stream_ffn_layer(WeightStore& store, int64_t layer, const TensorView& h, const TensorView& act,
                                 const TensorView* perm, const TensorView* score, const TensorView* col_scale,
                                 bool sparse, float threshold, const TensorView& out, StreamFfnFormat format) {
  const char* fn = "stream_ffn_layer";
  const StoredLayerInfo& L = store.layer_info(layer);
  expect_dtype(h, "h", {DType::Float32});
  expect_dtype(act, "act", {DType::Float32});
  expect_dtype(out, "out", {DType::Float32});
  expect_ndim(h, "h", 2);
  expect_ndim(act, "act", 2);
  expect_ndim(out, "out", 2);
  const TensorView* views[] = {&h, &act, &out, perm, score, col_scale};
  const char* names[] = {"h", "act", "out", "perm", "score", "col_scale"};
  for (const TensorView* t : views) {
    if (t == nullptr) continue;
    check(t->device.is_cpu(), ErrorKind::Value,
          std::string(fn) + ": " + view_name(t, views, names, 6) + " must be a CPU array");
    if (t->numel() > 0) {
      expect_contiguous(*t, view_name(t, views, names, 6));
      expect_not_null(*t, view_name(t, views, names, 6));
    }
  }
  const int64_t T = h.shape[0], d = h.shape[1], nn = L.neurons;
  check(d > 0, ErrorKind::Value, std::string(fn) + ": h must have d_model > 0 columns, got " + h.shape_str());
  const int64_t bundle = stream_ffn_bundle_bytes(format, d);
  static const char* const fmt_names[] = {"int4", "int4_int8", "down_int8", "down_int7"};
  check(L.dtype == DType::UInt8 && L.parts == 2 && int64_t(L.bundle_bytes) == bundle, ErrorKind::Value,
        std::string(fn) + ": layer " + std::to_string(layer) + " is not a " + fmt_names[int(format)] +
            " bundle layer for d_model " + std::to_string(d) + " (bundles of " + std::to_string(bundle) +
            " bytes, 2 uint8 parts); it has " + std::to_string(L.parts) + " " + dtype_name(L.dtype) + " parts, " +
            std::to_string(L.bundle_bytes) + " bytes per neuron");
  check(act.shape[0] == T && act.shape[1] == nn, ErrorKind::Value,
        std::string(fn) + ": act must be (tokens, neurons) = (" + std::to_string(T) + ", " + std::to_string(nn) +
            "), got " + act.shape_str());
  check(out.shape[0] == T && out.shape[1] == d, ErrorKind::Value,
        std::string(fn) + ": out must be (tokens, d_model) = (" + std::to_string(T) + ", " + std::to_string(d) +
            "), got " + out.shape_str());
  const int64_t* pm = nullptr;
  if (perm) {
    expect_dtype(*perm, "perm", {DType::Int64});
    check(perm->ndim == 1 && perm->shape[0] == nn, ErrorKind::Value,
          std::string(fn) + ": perm must be (neurons,) = (" + std::to_string(nn) + ",), got " + perm->shape_str());
    pm = perm->ptr<const int64_t>();
    for (int64_t j = 0; j < nn; ++j)
      if (pm[j] < 0 || pm[j] >= nn)  // the message is built only for a bad entry
        throw_error(ErrorKind::Value,
            std::string(fn) + ": perm[" + std::to_string(j) + "] = " + std::to_string(pm[j]) + " is out of range [0, " +
                std::to_string(nn) + ")");
  }
  if (score) {
    expect_dtype(*score, "score", {DType::Float32});
    check(score->ndim == 2 && score->shape[0] == T && score->shape[1] == nn, ErrorKind::Value,
          std::string(fn) + ": score must be (tokens, neurons) = (" + std::to_string(T) + ", " + std::to_string(nn) +
              "), got " + score->shape_str());
  }
  if (col_scale) {
    expect_dtype(*col_scale, "col_scale", {DType::Float32});
    check(col_scale->ndim == 1 && col_scale->shape[0] == nn, ErrorKind::Value,
          std::string(fn) + ": col_scale must be (neurons,) = (" + std::to_string(nn) + ",), got " +
              col_scale->shape_str());
  }
  check(!sparse || !std::isnan(threshold), ErrorKind::Value, std::string(fn) + ": threshold must not be NaN");
  StreamFfnCounts counts;
  float* op = out.ptr<float>();
  if (T == 0) return counts;
  // Coefficients in store order (0 where a token drops the neuron) and the neurons any token keeps.
  const float* ap = act.ptr<const float>();
  const float* sp = score ? score->ptr<const float>() : nullptr;
  const float* cs = col_scale ? col_scale->ptr<const float>() : nullptr;
  std::vector<float> coef(size_t(T * nn));
  std::vector<int64_t> ids;
  ids.reserve(size_t(nn));
  for (int64_t j = 0; j < nn; ++j) {
    const int64_t src = pm ? pm[j] : j;
    bool any = false;
    for (int64_t t = 0; t < T; ++t) {
      const float v = ap[t * nn + src];
      const bool keep = !sparse || std::fabs(sp ? sp[t * nn + j] : v) * (cs ? cs[j] : 1.0f) > threshold;
      coef[size_t(t * nn + j)] = keep ? v : 0.0f;
      counts.kept += keep;
      any |= keep;
    }
    if (any) ids.push_back(j);
  }
  counts.visited = int64_t(ids.size());
  const bool down_only = format == StreamFfnFormat::DownInt8 || format == StreamFfnFormat::DownInt7;
  Prepared pr(h.ptr<const float>(), T, d, format != StreamFfnFormat::Int4, down_only, format == StreamFfnFormat::DownInt7);
  std::vector<int64_t> cols;
  store.visit_rows(layer, ids.data(), int64_t(ids.size()), [&](const int64_t* ks, const uint8_t* const* b, int64_t n) {
    cols.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) cols[size_t(i)] = ids[size_t(ks[i])];
    pr.accumulate(b, n, coef.data(), nn, cols.data());
  });
  pr.write(op);
  return counts;
}

}  // namespace memkernels
