// The CUDA emulation layer on its own: tensor-core PTX against a plain matmul (fragment layouts as
// the PTX ISA spells them, per element), barriers, shared memory, warp collectives, atomics, launch
// limits, and that the bug classes it exists to catch fail the launch with a clear message.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cuda_common.cuh"

using memkernels::cuda_backend::launch_kernel;
using memkernels::cuda_backend::ldmatrix_x4;
using memkernels::cuda_backend::ldmatrix_x4_trans;
using memkernels::cuda_backend::mma_m16n8k16_bf16;
using memkernels::cuda_backend::mma_m16n8k16_f16;

namespace {

// Runs the launch and returns its error text ("" when it succeeded).
std::string launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename T> uint16_t bits(T x) { uint16_t b; std::memcpy(&b, &x, 2); return b; }
uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; }

// ---------------------------------------------------------------- mma from per-element fragments

// PTX ISA, mma.m16n8k16 with .f16/.bf16 A/B: element i (0..7) of the A fragment is at row
// groupID + 8 * ((i / 2) % 2), column 2 * threadID_in_group + (i % 2) + 8 * (i / 4); element i
// (0..3) of B at row 2 * threadID_in_group + (i % 2) + 8 * (i / 2), column groupID; element i
// (0..3) of C/D at row groupID + 8 * (i / 2), column 2 * threadID_in_group + (i % 2).
template <typename T>
__global__ void mma_elementwise_kernel(const T* A, const T* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint16_t a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = bits(A[(g + 8 * ((i / 2) % 2)) * 16 + 2 * t + (i % 2) + 8 * (i / 4)]);
  for (int i = 0; i < 4; ++i) b[i] = bits(B[(2 * t + (i % 2) + 8 * (i / 2)) * 8 + g]);
  uint32_t ar[4] = {pack(a[0], a[1]), pack(a[2], a[3]), pack(a[4], a[5]), pack(a[6], a[7])};
  float c[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if constexpr (std::is_same_v<T, __half>) mma_m16n8k16_f16(c, ar, pack(b[0], b[1]), pack(b[2], b[3]));
  else mma_m16n8k16_bf16(c, ar, pack(b[0], b[1]), pack(b[2], b[3]));
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = c[i];
}

template <typename T>
void check_mma(uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<T> A(256), B(128);
  std::vector<float> C(128), D(128, NAN);
  for (auto& x : A) x = T(u(rng));
  for (auto& x : B) x = T(u(rng));
  for (auto& x : C) x = u(rng);
  launch_kernel(mma_elementwise_kernel<T>, 1, 32, 0, nullptr, A.data(), B.data(), C.data(), D.data());
  ASSERT_EQ(launch_error(), "");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = C[i * 8 + j];
      for (int k = 0; k < 16; ++k) ref += double(float(A[i * 16 + k])) * double(float(B[k * 8 + j]));
      EXPECT_NEAR(D[i * 8 + j], ref, 1e-5 * (1 + std::fabs(ref))) << "D[" << i << "][" << j << "]";
    }
}

TEST(EmulatedTensorCore, MmaF16MatchesMatmul) {
  for (uint32_t s = 1; s <= 3; ++s) check_mma<__half>(s);
}
TEST(EmulatedTensorCore, MmaBf16MatchesMatmul) {
  for (uint32_t s = 1; s <= 3; ++s) check_mma<__nv_bfloat16>(s);
}

// ---------------------------------------------------------------- ldmatrix

// Four 8x8 matrices stacked (32 rows of 8 halves). Lane l gives the address of row l.
__global__ void ldmatrix_kernel(const __half* M, uint32_t* out, bool trans) {
  __shared__ __half s[32 * 8];
  for (int i = threadIdx.x; i < 256; i += 32) s[i] = M[i];
  __syncwarp();
  uint32_t r[4];
  if (trans) ldmatrix_x4_trans(r, s + threadIdx.x * 8);
  else ldmatrix_x4(r, s + threadIdx.x * 8);
  for (int m = 0; m < 4; ++m) out[threadIdx.x * 4 + m] = r[m];
}

TEST(EmulatedTensorCore, LdmatrixAndTransFollowThePtxTable) {
  std::vector<__half> M(256);
  for (int i = 0; i < 256; ++i) M[i] = __half(float(i % 97) - 40.0f);
  for (bool trans : {false, true}) {
    std::vector<uint32_t> out(128, 0xdeadbeef);
    launch_kernel(ldmatrix_kernel, 1, 32, 0, nullptr, M.data(), out.data(), trans);
    ASSERT_EQ(launch_error(), "");
    // PTX: lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (.trans: of its transpose).
    for (int l = 0; l < 32; ++l)
      for (int m = 0; m < 4; ++m) {
        const int g = l / 4, t = l % 4;
        auto at = [&](int r, int c) { return bits(M[(8 * m + r) * 8 + c]); };
        const uint32_t want = trans ? pack(at(2 * t, g), at(2 * t + 1, g)) : pack(at(g, 2 * t), at(g, 2 * t + 1));
        EXPECT_EQ(out[l * 4 + m], want) << "lane " << l << " matrix " << m << " trans " << trans;
      }
  }
}

// The way kernels combine them: A (16x16) and B (16x16, row-major K x N) in shared memory, A read
// with ldmatrix.x4, B with ldmatrix.x4.trans (two n-tiles), two mma.sync, D = A B (16x16).
template <typename T>
__global__ void ldmatrix_mma_kernel(const T* A, const T* B, float* D) {
  __shared__ T sA[16 * 16], sB[16 * 16];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) sA[i] = A[i], sB[i] = B[i];
  __syncwarp();
  uint32_t a[4], b[4];
  // matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15 -> a0..a3 order
  ldmatrix_x4(a, sA + (lane % 16) * 16 + (lane / 16) * 8);
  // B^T fragments: k rows 0-15, n columns 0-7 then 8-15
  ldmatrix_x4_trans(b, sB + (lane % 16) * 16 + (lane / 16) * 8);
  for (int nt = 0; nt < 2; ++nt) {
    float c[4] = {0, 0, 0, 0};
    if constexpr (std::is_same_v<T, __half>) mma_m16n8k16_f16(c, a, b[2 * nt], b[2 * nt + 1]);
    else mma_m16n8k16_bf16(c, a, b[2 * nt], b[2 * nt + 1]);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 16 + nt * 8 + 2 * t + i % 2] = c[i];
  }
}

template <typename T>
void check_ldmatrix_mma() {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<T> A(256), B(256);
  std::vector<float> D(256, NAN);
  for (auto& x : A) x = T(u(rng));
  for (auto& x : B) x = T(u(rng));
  launch_kernel(ldmatrix_mma_kernel<T>, 1, 32, 0, nullptr, A.data(), B.data(), D.data());
  ASSERT_EQ(launch_error(), "");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += double(float(A[i * 16 + k])) * double(float(B[k * 16 + j]));
      EXPECT_NEAR(D[i * 16 + j], ref, 1e-5) << i << "," << j;
    }
}

TEST(EmulatedTensorCore, LdmatrixFeedsMmaLikeTheKernels) {
  check_ldmatrix_mma<__half>();
  check_ldmatrix_mma<__nv_bfloat16>();
}

// ---------------------------------------------------------------- barriers and shared memory

// Thread i reads what thread i - 1 wrote. With the barrier: always right. Without it, threads that
// run in index order between barriers hide the race; a shuffled order exposes it.
__global__ void neighbour_kernel(int* out, bool with_barrier) {
  __shared__ int s[128];
  s[threadIdx.x] = int(threadIdx.x) * 3 + int(blockIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 128 + threadIdx.x] = threadIdx.x ? s[threadIdx.x - 1] : -1;
}

int neighbour_errors(bool with_barrier, uint64_t seed, int workers) {
  mkemu::set_schedule_seed(seed);
  mkemu::set_workers(workers);
  std::vector<int> out(8 * 128, 0);
  launch_kernel(neighbour_kernel, 8, 128, 0, nullptr, out.data(), with_barrier);
  mkemu::set_schedule_seed(0);
  mkemu::set_workers(0);
  EXPECT_EQ(launch_error(), "");
  int bad = 0;
  for (int b = 0; b < 8; ++b)
    for (int i = 1; i < 128; ++i) bad += out[b * 128 + i] != (i - 1) * 3 + b;
  return bad;
}

TEST(EmulatedExecution, BarrierAndBlockSharedMemory) {
  for (uint64_t seed : {0, 1, 2, 3})
    for (int workers : {1, 4}) EXPECT_EQ(neighbour_errors(true, seed, workers), 0) << seed << " " << workers;
}

TEST(EmulatedExecution, SeededInterleavingExposesAMissingBarrier) {
  EXPECT_EQ(neighbour_errors(false, 0, 1), 0);  // in-order execution hides this race (documented limit)
  int bad = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) bad += neighbour_errors(false, seed, 2);
  EXPECT_GT(bad, 0);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void exit_then_barrier_kernel(int* out) {
  if (threadIdx.x >= 100) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}
__global__ void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

TEST(EmulatedExecution, BarrierAndCollectiveMisuseFailTheLaunch) {
  std::vector<int> iout(128);
  std::vector<float> fout(128);
  launch_kernel(divergent_barrier_kernel, 2, 128, 0, nullptr, iout.data());
  EXPECT_NE(launch_error().find("divergent __syncthreads"), std::string::npos);
  launch_kernel(exit_then_barrier_kernel, 1, 128, 0, nullptr, iout.data());
  EXPECT_NE(launch_error().find("exited"), std::string::npos);
  launch_kernel(partial_warp_shuffle_kernel, 1, 40, 0, nullptr, fout.data());  // warp 1 has 8 threads
  EXPECT_NE(launch_error().find("do not exist"), std::string::npos);
  launch_kernel(exited_lane_shuffle_kernel, 1, 64, 0, nullptr, fout.data());
  EXPECT_NE(launch_error().find("exited"), std::string::npos);
  launch_kernel(partial_warp_shuffle_kernel, 1, 64, 0, nullptr, fout.data());  // and the valid case runs
  EXPECT_EQ(launch_error(), "");
  for (int i = 0; i < 64; ++i) EXPECT_EQ(fout[i], float(i ^ 1));
}

// ---------------------------------------------------------------- collectives

__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32, v = int(threadIdx.x) * 10;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 6);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3);
  o[4] = __shfl_sync(0xffffffffu, v, 1, 8);  // lane 1 of each 8-lane segment
  o[5] = int(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[6] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 31);
  __syncwarp();
  o[7] = __shfl_down_sync(0xffffffffu, v, 2, 16);
}

TEST(EmulatedExecution, ShufflesAndVotesFollowCuda) {
  std::vector<int> out(64 * 8, -7);
  launch_kernel(collectives_kernel, 1, 64, 0, nullptr, out.data());
  ASSERT_EQ(launch_error(), "");
  uint32_t ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, base = t - lane;
    const int* o = out.data() + t * 8;
    EXPECT_EQ(o[0], (base + 5) * 10);
    EXPECT_EQ(o[1], (base + (lane ^ 6)) * 10);
    EXPECT_EQ(o[2], (lane >= 3 ? t - 3 : t) * 10);
    EXPECT_EQ(o[3], (lane + 3 < 32 ? t + 3 : t) * 10);
    EXPECT_EQ(o[4], (base + (lane & ~7) + 1) * 10);
    EXPECT_EQ(uint32_t(o[5]), ballot);
    EXPECT_EQ(o[6], 1);
    EXPECT_EQ(o[7], ((lane % 16) + 2 < 16 ? t + 2 : t) * 10);
  }
}

// ---------------------------------------------------------------- atomics, dynamic smem, limits

__global__ void atomic_kernel(float* sum, unsigned* count) {
  atomicAdd(sum, 1.0f);
  atomicAdd(count, 1u);
}

TEST(EmulatedExecution, AtomicsAcrossConcurrentBlocks) {
  mkemu::set_workers(4);
  float sum = 0;
  unsigned count = 0;
  launch_kernel(atomic_kernel, 64, 256, 0, nullptr, &sum, &count);
  mkemu::set_workers(0);
  ASSERT_EQ(launch_error(), "");
  EXPECT_EQ(count, 64u * 256u);
  EXPECT_EQ(sum, float(64 * 256));  // exact: integers below 2^24
}

__global__ void dynamic_smem_kernel(float* out, int n) {
  MK_DYNAMIC_SHARED(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = float((i + int(blockIdx.x)) % 7);  // small integers: the float sum is exact
  __syncthreads();
  float acc = 0;
  for (int i = 0; i < n; ++i) acc += s[i];
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

TEST(EmulatedExecution, DynamicSharedMemoryAndItsLimit) {
  const int n = 20000;  // 80 000 bytes: needs cudaFuncSetAttribute, as on the GPU
  std::vector<float> out(6, NAN);
  launch_kernel(dynamic_smem_kernel, 6, 96, n * 4, nullptr, out.data(), n);
  EXPECT_NE(launch_error().find("dynamic shared memory"), std::string::npos);
  ASSERT_EQ(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n * 4), cudaSuccess);
  launch_kernel(dynamic_smem_kernel, 6, 96, n * 4, nullptr, out.data(), n);
  ASSERT_EQ(launch_error(), "");
  for (int b = 0; b < 6; ++b) {
    int want = 0;
    for (int i = 0; i < n; ++i) want += (i + b) % 7;
    EXPECT_EQ(out[b], float(want)) << b;
  }
  EXPECT_NE(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024), cudaSuccess);
  cudaGetLastError();
  launch_kernel(dynamic_smem_kernel, 1, 1025, 0, nullptr, out.data(), 1);
  EXPECT_NE(launch_error().find("invalid launch configuration"), std::string::npos);
  launch_kernel(dynamic_smem_kernel, dim3(1, 70000), 32, 0, nullptr, out.data(), 1);
  EXPECT_NE(launch_error().find("grid"), std::string::npos);
}

// ---------------------------------------------------------------- lazy streams

__global__ void copy_kernel(const float* src, float* dst, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) dst[i] = src[i];
}

struct LazyOn {
  LazyOn() { mkemu::set_lazy_streams(true); }
  ~LazyOn() { mkemu::set_lazy_streams(false); }
};

// The orderings CUDA requires and lazy streams enforce: without them the copy is not done yet.
TEST(EmulatedStreams, LazyCopiesNeedTheirOrdering) {
  LazyOn lazy;
  const int n = 256;
  float* pinned = nullptr;
  float *dev = nullptr, *dev2 = nullptr;
  ASSERT_EQ(cudaMallocHost(reinterpret_cast<void**>(&pinned), n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dev), n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dev2), n * 4), cudaSuccess);
  cudaStream_t copy = nullptr, compute = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&compute), cudaSuccess);
  cudaEvent_t ev = nullptr;
  ASSERT_EQ(cudaEventCreate(&ev), cudaSuccess);
  std::vector<float> host(n);
  for (int i = 0; i < n; ++i) pinned[i] = float(i);
  cudaMemset(dev, 0, n * 4);
  cudaMemset(dev2, 0, n * 4);

  // 1. A kernel on another stream without a wait reads the old data.
  cudaMemcpyAsync(dev, pinned, n * 4, cudaMemcpyHostToDevice, copy);
  EXPECT_EQ(cudaStreamQuery(copy), cudaErrorNotReady);
  launch_kernel(copy_kernel, 1, n, 0, compute, dev, dev2, n);
  cudaMemcpy(host.data(), dev2, n * 4, cudaMemcpyDeviceToHost);  // legacy: not ordered with a non-blocking stream
  EXPECT_EQ(host[5], 0.0f);
  // 2. With the event wait, the kernel sees the copy.
  cudaEventRecord(ev, copy);
  cudaStreamWaitEvent(compute, ev, 0);
  EXPECT_EQ(cudaStreamQuery(copy), cudaSuccess);
  launch_kernel(copy_kernel, 1, n, 0, compute, dev, dev2, n);
  cudaMemcpy(host.data(), dev2, n * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(host[5], 5.0f);
  // 3. A pinned source refilled before the copy ran: the copy reads the new values...
  cudaMemcpyAsync(dev, pinned, n * 4, cudaMemcpyHostToDevice, copy);
  for (int i = 0; i < n; ++i) pinned[i] = -1.0f;
  cudaStreamSynchronize(copy);
  cudaMemcpy(host.data(), dev, n * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(host[5], -1.0f);
  // ... unless the host waited for the copy's event first.
  for (int i = 0; i < n; ++i) pinned[i] = float(2 * i);
  cudaMemcpyAsync(dev, pinned, n * 4, cudaMemcpyHostToDevice, copy);
  cudaEventRecord(ev, copy);
  cudaEventSynchronize(ev);
  for (int i = 0; i < n; ++i) pinned[i] = -1.0f;
  cudaMemcpy(host.data(), dev, n * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(host[5], 10.0f);
  // 4. A pageable source is read when the call is made (CUDA stages it), whatever comes after.
  std::vector<float> pageable(n, 7.0f);
  cudaMemcpyAsync(dev, pageable.data(), n * 4, cudaMemcpyHostToDevice, copy);
  pageable.assign(n, 8.0f);
  cudaStreamSynchronize(copy);
  cudaMemcpy(host.data(), dev, n * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(host[5], 7.0f);
  // 5. A blocking stream's work is ordered before a legacy-stream operation; in-stream order holds.
  cudaMemsetAsync(dev2, 0, n * 4, compute);
  cudaMemcpyAsync(dev2, dev, n * 4, cudaMemcpyDeviceToDevice, compute);
  EXPECT_EQ(cudaStreamQuery(compute), cudaErrorNotReady);
  cudaMemcpy(host.data(), dev2, n * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(host[5], 7.0f);
  EXPECT_EQ(cudaStreamQuery(compute), cudaSuccess);

  cudaEventDestroy(ev);
  cudaStreamDestroy(copy);
  cudaStreamDestroy(compute);
  cudaFree(dev);
  cudaFree(dev2);
  cudaFreeHost(pinned);
}

}  // namespace
