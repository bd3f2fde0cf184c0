// Internal description of a quantized matrix and of one qgemm / dequantize call, shared by the CPU
// and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "memkernels/quant.h"
#include "cpu/convert.h"
#include "runtime_internal.h"

namespace memkernels {

// Plain view of a QuantizedMatrix's buffer (pointers on the device that runs the kernel).
struct QuantView {
  QuantFormat format = QuantFormat::Int4;
  int bits = 4;
  int64_t rows = 0, cols = 0;  // N, K_pad (QuantizedMatrix::padded_cols(): whole groups / chunks)
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
  // CPU row-interleaved layout (quant.h): 0 for the documented layout, else rows per block (16).
  int ilv = 0;

  // Index of (row n, group g) in the scales / zeros / mins sections.
  int64_t sidx(int64_t n, int64_t g) const {
    if (!ilv) return n * groups + g;
    const int64_t r = n & (ilv - 1), n0 = n - r;  // ilv: a power of two (no division per call)
    const int64_t R = rows - n0 < ilv ? rows - n0 : ilv;
    return n0 * groups + g * R + r;
  }
  // The bits * 4 bytes of chunk c (32 weights) of row n in the documented chunk layout: a pointer
  // into the buffer, or, when interleaved, gathered into tmp (at least 32 bytes).
  const uint8_t* chunk(int64_t n, int64_t c, uint8_t* tmp) const {
    const int cb = bits * 4;
    if (!ilv) return codes + n * row_bytes + c * cb;
    const int64_t r = n & (ilv - 1), n0 = n - r;
    const int64_t R = rows - n0 < ilv ? rows - n0 : ilv;
    const uint8_t* p = codes + n0 * row_bytes + c * R * cb + r * 4;
    for (int j = 0; j < bits; ++j) std::memcpy(tmp + 4 * j, p + j * R * 4, 4);
    return tmp;
  }

  // Double-quantised scales in one explicit FMA: left as a * b + c, whether the compiler fuses it
  // depends on the ISA build (and nvcc fuses by default), and CPU and CUDA results differed.
  // By (row, group), or by index j = sidx(n, g) for loops that step it themselves.
  float scale_at(int64_t j) const {
    return scales ? scales[j] : std::fma(scale_steps[j >> 8], float(scale_codes[j]), scale_offset);
  }
  float zero_at(int64_t j) const { return (zeros ? float(zeros[j]) : 0.0f) + code_offset; }
  float min_at(int64_t j) const { return mins ? mins[j] : 0.0f; }
  float scale(int64_t n, int64_t g) const { return scale_at(sidx(n, g)); }
  float zero(int64_t n, int64_t g) const { return zero_at(sidx(n, g)); }
  float min(int64_t n, int64_t g) const { return min_at(sidx(n, g)); }
};

inline QuantView make_quant_view(const QuantizedMatrix& qm) {
  QuantView v;
  v.format = qm.format();
  v.bits = quant_bits(qm.format());
  // The kernels see the stored (padded) matrix: K_pad columns of whole groups; per-channel int8
  // (group_size == cols) is one group spanning the padded row.
  v.rows = qm.rows(), v.cols = qm.padded_cols();
  v.group_size = qm.group_size() == qm.cols() ? int(qm.padded_cols()) : qm.group_size();
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
  const void* x = nullptr;  // (tokens, K_pad): the dispatch zero-pads x when K != K_pad
  int64_t x_row = 0;   // stride between tokens, elements
  const void* bias = nullptr;  // (N,) of `dtype` (the dispatch converts another one) or null
  void* out = nullptr;
  int64_t out_row = 0;
  bool int8_activations = false;  // see QGemmOptions
};

// A CPU problem's x and bias as fp32: pointers into the caller's arrays when they are fp32
// already, else into converted copies owned by this object (the kernels read fp32 only).
struct Fp32Operands {
  std::vector<float> xbuf, bbuf;
  const float* x = nullptr;
  const float* bias = nullptr;
  int64_t ldx = 0;
  explicit Fp32Operands(const QGemmProblem& p) {
    const int64_t K = p.w.cols, T = p.tokens;
    x = static_cast<const float*>(p.x), ldx = p.x_row;
    if (p.dtype != DType::Float32) {
      xbuf.resize(size_t(T * K));
      for (int64_t t = 0; t < T; ++t)
        cpu::load_floats(static_cast<const char*>(p.x) + t * p.x_row * dtype_size(p.dtype), p.dtype, K,
                         xbuf.data() + t * K);
      x = xbuf.data(), ldx = K;
    }
    if (p.bias) {
      bbuf.resize(size_t(p.w.rows));
      cpu::load_floats(p.bias, p.dtype, p.w.rows, bbuf.data());
      bias = bbuf.data();
    }
  }
};

struct DequantProblem {
  QuantView w;
  DType dtype = DType::Float32;
  void* out = nullptr;  // (N, K_pad) contiguous (the dispatch drops the padding for K != K_pad)
};

// K-quants (quant_kquant.cpp): the quantize() search into m (allocated), and the checks of a
// payload's sub-scales (< 64 for q4_k / q5_k) and super-scales (finite), raising `kind`.
void quantize_kquant(const TensorView& w, QuantizedMatrix& m);
// One block of R rows of a K-quant matrix moved between the documented layout and the CPU
// row-interleaved one (quant.h); to_ilv picks the direction. Each pointer is the block's start in
// its section (codes + n0 * row_bytes, sub-scales + n0 * SB * 16, super-scales + n0 * SB * 2).
struct KQuantSections {
  uint8_t* codes;
  uint8_t* sub;
  uint16_t* sup;
};
void kquant_permute_block(QuantFormat f, int64_t SB, int64_t R, const KQuantSections& src, const KQuantSections& dst,
                          bool to_ilv);
void kquant_validate(const QuantizedMatrix& m, ErrorKind kind, const char* what);

// The int8-activation path's token limit (QGemmOptions::int8_activations, CPU). Default (0 returned):
// the int8 kernels serve 1-64 tokens and, on CPUs with AVX512-BF16, the bf16 prefill kernel takes
// over from 32. MEMKERNELS_INT8_MAX_TOKENS=n (n >= 1, read once) makes the int8 kernels serve every
// call of up to n tokens and the prefill kernels only longer ones (a measuring knob:
// bench/qgemm_quality.py uses it to run a whole prompt on the int8 path).
int64_t int8_max_tokens_override();

namespace cuda_backend {
void qgemm(const QGemmProblem& p, void* stream);
void dequantize(const DequantProblem& p, void* stream);
}  // namespace cuda_backend

}  // namespace memkernels

MK_DECLARE_CPU_KERNEL(void qgemm(const ::memkernels::QGemmProblem& p))
MK_DECLARE_CPU_KERNEL(void dequantize(const ::memkernels::DequantProblem& p))

// Weights of rows [n0, n1), columns [k0, k1) of w dequantized to fp32, the same values dequantize()
// gives: dst[(n - n0) * ld + (k - k0)]. k0 is a multiple of 256 and k1 a multiple of 256 or K (the
// callers cut K into 256-aligned slices, so any format whose blocks divide 256 can serve them).
// Implemented with the packed layout (cpu/qgemm.cpp, cpu/qgemm_kquant.cpp); the prefill GEMM reads
// weights only through it, so it does not depend on the layout.
MK_DECLARE_CPU_KERNEL(void dequantize_rows(const ::memkernels::QuantView& w, int64_t n0, int64_t n1, int64_t k0,
                                           int64_t k1, float* dst, int64_t ld))
// The same weights rounded to bf16 (round to nearest even: the bits of converting dequantize_rows'
// floats), for the bf16 prefill kernel. Optional: a layout without a fast way to do it returns false
// (writing nothing) and the caller converts dequantize_rows' output itself.
MK_DECLARE_CPU_KERNEL(bool dequantize_rows_bf16(const ::memkernels::QuantView& w, int64_t n0, int64_t n1, int64_t k0,
                                                int64_t k1, uint16_t* dst, int64_t ld))
// Prefill GEMM (cpu/qgemm_prefill.cpp): blocks of weight rows dequantized once per call into a tile
// (bf16 on CPUs with AVX512-BF16 when p.int8_activations allows approximate activations, fp32
// otherwise) and multiplied with every token. x: fp32 rows (ldx apart), bias: fp32 or null. Returns
// false, computing nothing, when the problem is one the other qgemm paths serve better (few tokens).
MK_DECLARE_CPU_KERNEL(bool qgemm_prefill(const ::memkernels::QGemmProblem& p, const float* x, int64_t ldx,
                                         const float* bias))
// q4_k / q5_k / q6_k (core/src/cpu/qgemm_kquant.cpp)
MK_DECLARE_CPU_KERNEL(void qgemm_kquant(const ::memkernels::QGemmProblem& p))
MK_DECLARE_CPU_KERNEL(void dequantize_kquant(const ::memkernels::DequantProblem& p))
