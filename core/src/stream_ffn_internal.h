// The streamed FFN's CPU kernel on 4-bit neuron bundles (issue 17), shared by stream_ffn_int4 and
// stream_ffn_layer (weight_store_ffn.cpp); compiled once per ISA level (core/src/cpu/stream_ffn.cpp).
#pragma once

#include <cstdint>

#include "runtime_internal.h"

namespace memkernels {

// Bundle i = [up part | down part] (see weight_store.h): the up part is d values in groups of 32
// (16 code bytes, value 2j in the low nibble of byte j, 2j+1 in the high one), then the groups'
// float16 scales, then their float16 mins; the down part is the same (int4) or d int8 codes and a
// float32 scale (down_int8).
struct StreamFfnProblem {
  int64_t T = 0, d = 0, dp = 0;  // tokens, d_model, d_model padded to a multiple of 32
  bool down_int8 = false;
  // the bundle is one int8 down column ([d codes][float32 scale]) and a[t, i] is the neuron's whole
  // coefficient z (the up projection is computed outside, from resident weights): y += a * down
  bool down_only = false;
  // down_only columns of 7-bit codes ([ceil(d/8) groups of 8 codes in 7 bytes, little-endian, code
  // + 64 in 7 bits][float32 scale]) instead of int8 ones
  bool down_int7 = false;
  // (T, dp): h with each group of 32 de-interleaved (its 16 even positions, then its 16 odd ones,
  // the order of a group's low and high nibbles), zero padded
  const float* hq = nullptr;
  const float* hsum = nullptr;  // (T, dp / 32): each group's sum of h (the mins' term)
  // (T, dp) accumulators: out[t] = sum_i a[t, i] * (h[t] . up_i) * down_i; natural order for int8
  // down columns, de-interleaved per group like hq for int4 ones
  float* y = nullptr;
};

}  // namespace memkernels

// Accumulates n neurons into p.y: bundle pointers bundles[0, n); the coefficient of neuron i for
// token t is a[t * lda + (cols ? cols[i] : i)] (a neuron whose coefficients are all 0 is skipped).
MK_DECLARE_CPU_KERNEL(void stream_ffn_accumulate(const ::memkernels::StreamFfnProblem& p,
                                                 const uint8_t* const* bundles, int64_t n, const float* a,
                                                 int64_t lda, const int64_t* cols))
