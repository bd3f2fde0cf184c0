// Internal description of a quantized matrix and of one qgemm / dequantize call, shared by the CPU
// and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>

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
  // K-quants (q4_k / q5_k / q6_k): per super-block 16 sub-scale bytes and 2 fp16 super-scales.
  const uint8_t* sub_scales = nullptr;
  const uint16_t* super_scales = nullptr;

  // Double-quantised scales in one explicit FMA: left as a * b + c, whether the compiler fuses it
  // depends on the ISA build (and nvcc fuses by default), and CPU and CUDA results differed.
  float scale(int64_t n, int64_t g) const {
    const int64_t j = n * groups + g;
    return scales ? scales[j] : std::fma(scale_steps[j >> 8], float(scale_codes[j]), scale_offset);
  }
  float zero(int64_t n, int64_t g) const { return (zeros ? float(zeros[n * groups + g]) : 0.0f) + code_offset; }
  float min(int64_t n, int64_t g) const { return mins ? mins[n * groups + g] : 0.0f; }
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
  v.sub_scales = qm.sub_scales();
  v.super_scales = qm.super_scales();
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

// K-quants (quant_kquant.cpp): the quantize() search into m (allocated), and the checks of a
// payload's sub-scales (< 64 for q4_k / q5_k) and super-scales (finite), raising `kind`.
void quantize_kquant(const TensorView& w, QuantizedMatrix& m);
void kquant_validate(const QuantizedMatrix& m, ErrorKind kind, const char* what);

namespace cuda_backend {
void qgemm(const QGemmProblem& p, void* stream);
void dequantize(const DequantProblem& p, void* stream);
}  // namespace cuda_backend

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void qgemm(const ::memkernels::QGemmProblem& p))
MK_DECLARE_CPU_KERNEL(void dequantize(const ::memkernels::DequantProblem& p))
// q4_k / q5_k / q6_k (core/src/cpu/qgemm_kquant.cpp)
MK_DECLARE_CPU_KERNEL(void qgemm_kquant(const ::memkernels::QGemmProblem& p))
MK_DECLARE_CPU_KERNEL(void dequantize_kquant(const ::memkernels::DequantProblem& p))
