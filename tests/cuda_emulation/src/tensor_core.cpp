// CUDA emulation: mma.sync m16n8k16 and ldmatrix from the PTX ISA fragment tables.
//
// Fragment layout of mma.m16n8k16 (.f16/.bf16 inputs, .f32 accumulators), lane = 4 g + t:
//   A (16x16, row): a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16x8, col):  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C, D (16x8):    c0, c1 = D[g][2t, 2t+1]   c2, c3 = D[g+8][2t, 2t+1]
// The lower-indexed element of a pair sits in the low 16 bits of the register.
// ldmatrix .m8n8 .b16: lane 4 g + t receives row g, columns 2t and 2t+1 of each matrix (.trans:
// row 2t and 2t+1 of column g, i.e. the transposed matrix).
#include "mkemu/tensor_core.h"

#include <cmath>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mkemu/warp.h"

namespace mkemu {
namespace {

float f16_bits_to_float(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element `half` (0 = low 16 bits) of register `reg` of lane `lane`.
template <MmaInput T>
float element(const Slot* in, int lane, int reg, int half) {
  const uint16_t bits = uint16_t(in[lane].w[reg] >> (16 * half));
  return T == MmaInput::F16 ? f16_bits_to_float(bits) : bf16_bits_to_float(bits);
}

// Slot words: a0..a3 = w[0..3], b0, b1 = w[4..5], c0..c3 = w[6..9] (float bits).
template <MmaInput T>
const char* mma_complete(const Slot* in, Slot* out, uint32_t) {
  float A[16][16], B[16][8];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) A[i][k] = element<T>(in, (i % 8) * 4 + (k % 8) / 2, (i >= 8) + 2 * (k >= 8), k % 2);
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 8; ++j) B[k][j] = element<T>(in, j * 4 + (k % 8) / 2, 4 + (k >= 8), k % 2);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {
      const int i = g + 8 * (r / 2), j = 2 * t + r % 2;
      float acc;
      std::memcpy(&acc, &in[lane].w[6 + r], 4);
      for (int k = 0; k < 16; ++k) acc = std::fma(A[i][k], B[k][j], acc);  // products of 16-bit inputs are exact in fp32
      std::memcpy(&out[lane].w[r], &acc, 4);
    }
  }
  return nullptr;
}

// Slot: ptr = this lane's row address, w[0] = number of matrices, w[1] = .trans.
const char* ldmatrix_complete(const Slot* in, Slot* out, uint32_t) {
  const int count = int(in[0].w[0]);
  const bool trans = in[0].w[1] != 0;
  for (int l = 0; l < 32; ++l)
    if (int(in[l].w[0]) != count || (in[l].w[1] != 0) != trans) return "lanes disagree on the ldmatrix shape";
  for (int m = 0; m < count; ++m) {
    auto at = [&](int row, int col) {
      uint16_t v;
      std::memcpy(&v, static_cast<const unsigned char*>(in[8 * m + row].ptr) + 2 * col, 2);
      return uint32_t(v);
    };
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      out[lane].w[m] = trans ? at(2 * t, g) | at(2 * t + 1, g) << 16 : at(g, 2 * t) | at(g, 2 * t + 1) << 16;
    }
  }
  return nullptr;
}

}  // namespace

void mma_m16n8k16(MmaInput type, float* c, const uint32_t* a, uint32_t b0, uint32_t b1, Site site) {
  Slot in{}, out{};
  std::memcpy(in.w, a, 16);
  in.w[4] = b0, in.w[5] = b1;
  std::memcpy(&in.w[6], c, 16);
  if (type == MmaInput::F16)
    warp_collective("mma.sync.m16n8k16.f16", mma_complete<MmaInput::F16>, 0xffffffffu, in, out, site);
  else
    warp_collective("mma.sync.m16n8k16.bf16", mma_complete<MmaInput::BF16>, 0xffffffffu, in, out, site);
  std::memcpy(c, out.w, 16);
}

void ldmatrix(int count, bool trans, uint32_t* r, const void* row_address, Site site) {
  Slot in{}, out{};
  in.w[0] = uint32_t(count), in.w[1] = trans;
  in.ptr = row_address;
  warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", ldmatrix_complete, 0xffffffffu, in, out, site);
  std::memcpy(r, out.w, size_t(count) * 4);
}

}  // namespace mkemu
