// CUDA SpMM out (tokens, rows) = x (tokens, cols) @ W^T for the Bitmap, Semi24 and CSR formats.
//
// One warp per output row and per block of NT tokens; 8 warps (rows) per thread block.
// Bitmap / Semi24: the warp walks the row's 64-column tiles; lane l owns columns l and l + 32 of
// each tile. Every lane reads the tile mask (one broadcast load); a lane whose bit is set finds its
// value at (row start + values of earlier tiles + popc(mask bits below it)), so consecutive lanes
// read consecutive values and consecutive x columns: both loads coalesce, and the decode is two
// popc per lane per tile ("load as sparse, compute as dense" on CUDA cores).
// CSR: lanes stride over the row's non-zeros.
// fp32 accumulation, a warp shuffle reduction at the end, no shared memory, no synchronisation.
// Columns >= cols (2:4 padding, explicit zeros) are never read from x.
//
// Not yet here (see NOTES-sparse.md): a tensor-core (mma.sync) path for N >= 8 decompressing tiles
// into shared memory; this kernel's FMA work is that of a dense GEMV per token.
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "sparse_internal.h"

namespace memkernels::cuda_backend {
namespace {

constexpr int kWarps = 8;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ float ld(const T* p) { return to_float<T>(*p); }
template <>
__device__ __forceinline__ float ld<int8_t>(const int8_t* p) { return float(*p); }  // row scale applied at the end

template <int NT>
__device__ __forceinline__ void warp_sum(float (&acc)[NT]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], o);
}

template <typename VT, typename XT, int NT>
__global__ void __launch_bounds__(kWarps * 32) spmm_bitmap_kernel(SpmmProblem p, int64_t token0) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t n0 = token0 + int64_t(blockIdx.y) * NT;
  if (r >= p.rows || n0 >= p.tokens) return;  // whole warps exit together
  const int nt = int(min(int64_t(NT), p.tokens - n0));
  const VT* vals = static_cast<const VT*>(p.values);
  const XT* x = static_cast<const XT*>(p.x) + n0 * p.x_row;
  const uint64_t* masks = p.masks + r * p.tiles;
  const uint32_t below = (1u << lane) - 1u;
  int64_t k = p.row_ptr[r];
  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.0f;

  for (int64_t t = 0; t < p.tiles; ++t) {
    const uint64_t m = __ldg(masks + t);
    const uint32_t half[2] = {uint32_t(m), uint32_t(m >> 32)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = t * 64 + h * 32 + lane;
      if (((half[h] >> lane) & 1u) && c < p.cols) {
        const float v = ld(vals + k + __popc(half[h] & below));
#pragma unroll
        for (int n = 0; n < NT; ++n)
          if (n < nt) acc[n] = fmaf(v, ld(x + n * p.x_row + c), acc[n]);
      }
      k += __popc(half[h]);
    }
  }
  warp_sum<NT>(acc);
  if (lane == 0) {
    XT* out = static_cast<XT*>(p.out);
    const float scale = p.row_scale ? p.row_scale[r] : 1.0f;
    for (int n = 0; n < nt; ++n) out[(n0 + n) * p.out_row + r] = from_float<XT>(acc[n] * scale);
  }
}

template <typename VT, typename XT, int NT>
__global__ void __launch_bounds__(kWarps * 32) spmm_csr_kernel(SpmmProblem p, int64_t token0) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t n0 = token0 + int64_t(blockIdx.y) * NT;
  if (r >= p.rows || n0 >= p.tokens) return;
  const int nt = int(min(int64_t(NT), p.tokens - n0));
  const VT* vals = static_cast<const VT*>(p.values);
  const XT* x = static_cast<const XT*>(p.x) + n0 * p.x_row;
  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.0f;
  for (int64_t k = p.row_ptr[r] + lane, e = p.row_ptr[r + 1]; k < e; k += 32) {
    const float v = ld(vals + k);
    const int64_t c = p.indices[k];
#pragma unroll
    for (int n = 0; n < NT; ++n)
      if (n < nt) acc[n] = fmaf(v, ld(x + n * p.x_row + c), acc[n]);
  }
  warp_sum<NT>(acc);
  if (lane == 0) {
    XT* out = static_cast<XT*>(p.out);
    const float scale = p.row_scale ? p.row_scale[r] : 1.0f;
    for (int n = 0; n < nt; ++n) out[(n0 + n) * p.out_row + r] = from_float<XT>(acc[n] * scale);
  }
}

template <typename VT, typename XT, int NT>
void launch(const SpmmProblem& p, cudaStream_t stream) {
  const dim3 block(kWarps * 32);
  const int64_t per_launch = kMaxGridY * NT;  // grid.y limit: long prefills take several launches
  for (int64_t t0 = 0; t0 < p.tokens; t0 += per_launch) {
    const int64_t n = std::min(per_launch, p.tokens - t0);
    const dim3 grid(unsigned((p.rows + kWarps - 1) / kWarps), unsigned((n + NT - 1) / NT));
    if (p.format == SparseFormat::CSR)
      launch_kernel(spmm_csr_kernel<VT, XT, NT>, grid, block, 0, stream, p, t0);
    else
      launch_kernel(spmm_bitmap_kernel<VT, XT, NT>, grid, block, 0, stream, p, t0);
    check_launch("spmm");
  }
}

template <typename VT, typename XT>
void launch_nt(const SpmmProblem& p, cudaStream_t stream) {
  if (p.tokens >= 8) launch<VT, XT, 8>(p, stream);
  else if (p.tokens >= 4) launch<VT, XT, 4>(p, stream);  // 4..7 tokens: one or two blocks
  else if (p.tokens >= 2) launch<VT, XT, 2>(p, stream);
  else launch<VT, XT, 1>(p, stream);
}

}  // namespace

void spmm(const SpmmProblem& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int previous = 0;  // launch on the arrays' device, then restore the caller's
  check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != p.device) check_cuda(cudaSetDevice(p.device), "cudaSetDevice");
  struct Restore {
    int d, prev;
    ~Restore() {
      if (d != prev) cudaSetDevice(prev);
    }
  } restore{p.device, previous};
  dispatch_float_dtype(p.x_dtype, [&](auto* xtag) {
    using XT = std::remove_pointer_t<decltype(xtag)>;
    if (p.value_dtype == DType::Int8) {
      launch_nt<int8_t, XT>(p, s);
      return;
    }
    dispatch_float_dtype(p.value_dtype, [&](auto* vtag) {
      using VT = std::remove_pointer_t<decltype(vtag)>;
      launch_nt<VT, XT>(p, s);
    });
  });
}

}  // namespace memkernels::cuda_backend
