// The FFN of streamed 4-bit neuron bundles (issue 17): out = sum_i z_i * down_i with
// z_i = a_i * (h . up_i), computed straight from the gathered bundles, without a float copy of the
// weights (NumPy's dequantize-then-matmul spent ~40 ms per layer per token on it).
#include <cstring>
#include <vector>

#include "memkernels/weight_store.h"

namespace memkernels {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) man <<= 1, --exp;
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One part (d values) of a bundle into w (dp floats): code * scale + min per group of 32.
void decode_part(const uint8_t* p, int64_t dp, float* w) {
  const int64_t ng = dp / 32;
  const uint8_t* sc = p + dp / 2;
  const uint8_t* mn = sc + 2 * ng;
  for (int64_t g = 0; g < ng; ++g) {
    uint16_t s16, m16;
    std::memcpy(&s16, sc + 2 * g, 2);
    std::memcpy(&m16, mn + 2 * g, 2);
    const float s = half_to_float(s16), m = half_to_float(m16);
    const uint8_t* c = p + g * 16;
    float* o = w + g * 32;
    for (int j = 0; j < 16; ++j) {
      o[2 * j] = float(c[j] & 15) * s + m;
      o[2 * j + 1] = float(c[j] >> 4) * s + m;
    }
  }
}

// An int8 down column: d int8 codes then a float32 scale.
void decode_part_int8(const uint8_t* p, int64_t d, float* w) {
  float s;
  std::memcpy(&s, p + d, 4);
  const int8_t* c = reinterpret_cast<const int8_t*>(p);
  for (int64_t j = 0; j < d; ++j) w[j] = float(c[j]) * s;
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
  for (const TensorView* t : {&h, &a, &bundles, &out}) {
    check(t->device.is_cpu(), ErrorKind::Value, "stream_ffn_int4: every array must be on the CPU");
    if (t->numel() > 0) {
      expect_contiguous(*t, t == &h ? "h" : t == &a ? "a" : t == &bundles ? "bundles" : "out");
      expect_not_null(*t, t == &h ? "h" : t == &a ? "a" : t == &bundles ? "bundles" : "out");
    }
  }
  const int64_t T = h.shape[0], d = h.shape[1], k = bundles.shape[0];
  const int64_t P = int4_bundle_part_bytes(d), dp = (d + 31) / 32 * 32;
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
  const float* hp = h.ptr<const float>();
  const float* ap = a.ptr<const float>();
  const uint8_t* bp = bundles.ptr<const uint8_t>();
  float* op = out.ptr<float>();
  std::vector<float> y(size_t(T * dp), 0.0f), w(size_t(dp), 0.0f), hpad(size_t(T * dp), 0.0f);
  std::vector<float> z(static_cast<size_t>(T), 0.0f);
  for (int64_t t = 0; t < T; ++t) std::memcpy(hpad.data() + t * dp, hp + t * d, size_t(d) * 4);
  for (int64_t i = 0; i < k; ++i) {
    const uint8_t* b = bp + i * bundle;
    bool any = false;
    for (int64_t t = 0; t < T; ++t) any |= ap[t * k + i] != 0.0f;
    if (!any) continue;  // masked off for every token: its bytes are not even decoded
    decode_part(b, dp, w.data());
    for (int64_t t = 0; t < T; ++t) {
      const float* x = hpad.data() + t * dp;
      float acc = 0.0f;
      for (int64_t j = 0; j < dp; ++j) acc += x[j] * w[size_t(j)];
      z[size_t(t)] = ap[t * k + i] * acc;
    }
    if (down_int8)
      decode_part_int8(b + P, d, w.data());
    else
      decode_part(b + P, dp, w.data());
    for (int64_t t = 0; t < T; ++t) {
      const float zt = z[size_t(t)];
      float* yt = y.data() + t * dp;
      for (int64_t j = 0; j < dp; ++j) yt[j] += zt * w[size_t(j)];
    }
  }
  for (int64_t t = 0; t < T; ++t) std::memcpy(op + t * d, y.data() + t * dp, size_t(d) * 4);
}

}  // namespace memkernels
