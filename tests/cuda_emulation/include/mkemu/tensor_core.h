// CUDA emulation: the warp-wide tensor-core PTX the kernels use, written from the PTX ISA's
// fragment tables (mma.sync.aligned.m16n8k16, ldmatrix.sync.aligned.m8n8). cuda/cuda_common.cuh
// calls these from its named PTX wrappers.
#pragma once

#include <cstdint>

#include "mkemu/execution.h"

namespace mkemu {

enum class MmaInput { F16, BF16 };

// d = a (16x16, row-major fragments) * b (16x8, column-major fragments) + c, fp32 accumulators, for
// the calling lane's fragments: a[4], b0/b1, c[4] (c is updated in place).
void mma_m16n8k16(MmaInput type, float* c, const uint32_t* a, uint32_t b0, uint32_t b1, Site site);

// ldmatrix .m8n8 .x1/.x2/.x4 (count) [.trans] .b16: lanes 8i..8i+7 give the row addresses of
// matrix i; each lane receives one 32-bit register per matrix.
void ldmatrix(int count, bool trans, uint32_t* r, const void* row_address, Site site);

}  // namespace mkemu
