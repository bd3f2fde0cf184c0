// Internal description of a quantized matrix and of one qgemm / dequantize call, shared by the CPU
// and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "memkernels/quant.h"
#include "runtime_internal.h"

namespace memkernels {

// Plain view of a QuantizedMatrix's buffer (pointers on the device that runs the kernel).
struct QuantView {
  QuantFormat format = QuantFormat::Int4;
  int bits = 4;
  int64_t rows = 0, cols = 0;  // N, K
  int group_size = 0;
  int64_t groups = 0;          // per row
  int64_t row_bytes = 0;
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;       // [N][groups]; null with double_quant
  const uint8_t* zeros = nullptr;      // [N][groups]; asymmetric formats only
  const float* mins = nullptr;         // [N][groups]; int4_min only: w = s * (T[q] - zero) + min
  const int8_t* scale_codes = nullptr; // double_quant: [N * groups]
  const float* scale_steps = nullptr;  // double_quant: one per 256 scale codes
  float scale_offset = 0.0f;
  // Code value -> level before scaling is T[q] - zero: integer formats fold their constant
  // offset into `code_offset` (sym: 2^(b-1), int8: 0 with signed codes), nf4 looks T up.
  float code_offset = 0.0f;
  // CPU row-interleaved layout (quant.h): 0 for the documented layout, else rows per block (16).
  int ilv = 0;

  // Index of (row n, group g) in the scales / zeros / mins sections.
  int64_t sidx(int64_t n, int64_t g) const {
    if (!ilv) return n * groups + g;
    const int64_t r = n % ilv, n0 = n - r;
    const int64_t R = rows - n0 < ilv ? rows - n0 : ilv;
    return n0 * groups + g * R + r;
  }
  // The bits * 4 bytes of chunk c (32 weights) of row n in the documented chunk layout: a pointer
  // into the buffer, or, when interleaved, gathered into tmp (at least 32 bytes).
  const uint8_t* chunk(int64_t n, int64_t c, uint8_t* tmp) const {
    const int cb = bits * 4;
    if (!ilv) return codes + n * row_bytes + c * cb;
    const int64_t r = n % ilv, n0 = n - r;
    const int64_t R = rows - n0 < ilv ? rows - n0 : ilv;
    const uint8_t* p = codes + n0 * row_bytes + c * R * cb + r * 4;
    for (int j = 0; j < bits; ++j) std::memcpy(tmp + 4 * j, p + j * R * 4, 4);
    return tmp;
  }

  // Double-quantised scales in one explicit FMA: left as a * b + c, whether the compiler fuses it
  // depends on the ISA build (and nvcc fuses by default), and CPU and CUDA results differed.
  float scale(int64_t n, int64_t g) const {
    const int64_t j = sidx(n, g);
    return scales ? scales[j] : std::fma(scale_steps[j >> 8], float(scale_codes[j]), scale_offset);
  }
  float zero(int64_t n, int64_t g) const { return (zeros ? float(zeros[sidx(n, g)]) : 0.0f) + code_offset; }
  float min(int64_t n, int64_t g) const { return mins ? mins[sidx(n, g)] : 0.0f; }
};

inline QuantView make_quant_view(const QuantizedMatrix& qm) {
  QuantView v;
  v.format = qm.format();
  v.bits = quant_bits(qm.format());
  v.rows = qm.rows(), v.cols = qm.cols();
  v.group_size = qm.group_size();
  v.groups = qm.groups();
  v.row_bytes = qm.row_bytes();
  v.codes = qm.codes();
  v.scales = qm.scales();
  v.zeros = qm.zeros();
  v.mins = qm.mins();
  v.scale_codes = qm.scale_codes();
  v.scale_steps = qm.scale_steps();
  v.scale_offset = qm.scale_offset();
  v.ilv = qm.interleaved() ? kInterleaveRows : 0;
  switch (qm.format()) {
    case QuantFormat::Int4Sym: v.code_offset = 8.0f; break;
    case QuantFormat::Int3Sym: v.code_offset = 4.0f; break;
    case QuantFormat::Int2Sym: v.code_offset = 2.0f; break;
    default: v.code_offset = 0.0f; break;
  }
  return v;
}

struct QGemmProblem {
  QuantView w;
  DType dtype = DType::Float32;  // of x, out and bias
  int64_t tokens = 0;
  const void* x = nullptr;
  int64_t x_row = 0;   // stride between tokens, elements
  const void* bias = nullptr;  // (N,) or null
  void* out = nullptr;
  int64_t out_row = 0;
  bool int8_activations = false;  // see QGemmOptions
};

struct DequantProblem {
  QuantView w;
  DType dtype = DType::Float32;
  void* out = nullptr;  // (N, K) contiguous
};

namespace cuda_backend {
void qgemm(const QGemmProblem& p, void* stream);
void dequantize(const DequantProblem& p, void* stream);
}  // namespace cuda_backend

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void qgemm(const ::memkernels::QGemmProblem& p))
MK_DECLARE_CPU_KERNEL(void dequantize(const ::memkernels::DequantProblem& p))
// Rows n0 .. n1-1 of w dequantized to fp32 into dst (row n at dst + (n - n0) * ld), any layout and
// format; single-threaded (the caller splits the rows). For kernels that stage blocks of rows.
MK_DECLARE_CPU_KERNEL(void dequantize_rows(const ::memkernels::QuantView& w, int64_t n0, int64_t n1, float* dst,
                                           int64_t ld))
