// Scalar conversions between float and the 16-bit float formats (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>

#include "memkernels/tensor.h"

namespace memkernels::cpu {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float half_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}

inline uint16_t float_to_half(float f) {
  _Float16 x = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

// Reads n elements of dtype `t` (float32/float16/bfloat16) at src as floats, scaled by `scale`.
inline void load_floats(const void* src, DType t, int64_t n, float* dst, float scale = 1.0f) {
  if (t == DType::Float32) {
    const float* s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * scale;
  } else if (t == DType::Float16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]) * scale;
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]) * scale;
  }
}

// Writes n floats to dst in dtype `t` (float32/float16/bfloat16).
inline void store_floats(const float* src, DType t, int64_t n, void* dst) {
  if (t == DType::Float32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (t == DType::Float16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

}  // namespace memkernels::cpu
