// The library's CUDA kernels (cuda/attention.cu, spmm.cu, paged_attention.cu, qgemm.cu) run on the emulated device through
// the normal C++ API, with the cases of their CPU tests, against the CPU backend on the same
// inputs (which tests/cpp and tests/python check against float64 references). Outputs are poisoned
// with NaN first: a kernel that writes nothing (e.g. a body compiled out) fails.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "memkernels/memkernels.h"
#include "mkemu/streams.h"

using namespace memkernels;

namespace {

const Device kCuda{DeviceType::CUDA, 0};

// Host values stored in one of the float dtypes.
struct Buffer {
  DType dtype;
  std::vector<unsigned char> bytes;
  Buffer(DType dt, size_t n) : dtype(dt), bytes(n * size_t(dtype_size(dt))) {}
  size_t size() const { return bytes.size() / size_t(dtype_size(dtype)); }
  void set(size_t i, float x) {
    if (dtype == DType::Float32) std::memcpy(&bytes[i * 4], &x, 4);
    else if (dtype == DType::Float16) { __half h = __float2half_rn(x); std::memcpy(&bytes[i * 2], &h, 2); }
    else { __nv_bfloat16 h = __float2bfloat16_rn(x); std::memcpy(&bytes[i * 2], &h, 2); }
  }
  float get(size_t i) const {
    if (dtype == DType::Float32) { float x; std::memcpy(&x, &bytes[i * 4], 4); return x; }
    if (dtype == DType::Float16) { __half h; std::memcpy(&h, &bytes[i * 2], 2); return __half2float(h); }
    __nv_bfloat16 h;
    std::memcpy(&h, &bytes[i * 2], 2);
    return __bfloat162float(h);
  }
  void poison() { for (size_t i = 0; i < size(); ++i) set(i, NAN); }
};

Buffer random_buffer(DType dt, size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d;
  Buffer b(dt, n);
  for (size_t i = 0; i < n; ++i) b.set(i, d(rng));
  return b;
}

// A copy of a host buffer in (emulated) device memory, allocated through the library's runtime.
struct DeviceCopy {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceCopy(const void* host, size_t n) : ptr(device_malloc(kCuda, n)), bytes(n) {
    device_memcpy(ptr, kCuda, host, Device{}, n);
  }
  ~DeviceCopy() { device_free(kCuda, ptr); }
  void copy_to(void* host) const { device_memcpy(host, Device{}, ptr, kCuda, bytes); }
};

float tolerance(DType dt) { return dt == DType::Float32 ? 2e-5f : dt == DType::Float16 ? 4e-3f : 3e-2f; }

void expect_close(const Buffer& got, const Buffer& want, float tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    const float g = got.get(i), w = want.get(i);
    const bool ok = (std::isinf(w) && g == w) || std::fabs(g - w) <= tol * (1.0f + std::fabs(w));
    if (!ok) {
      ADD_FAILURE() << what << ": element " << i << " CUDA " << g << " CPU " << w;
      ++bad;
    }
  }
}

// ---------------------------------------------------------------- flash attention

struct AttnCase {
  int b, sq, sk, h, hkv, d;
  AttentionOptions opts;
  std::string name() const {
    return "(" + std::to_string(b) + "," + std::to_string(sq) + "," + std::to_string(sk) + "," + std::to_string(h) + "," +
           std::to_string(hkv) + "," + std::to_string(d) + ") causal " + std::to_string(opts.causal) + " window " +
           std::to_string(opts.window_left) + "/" + std::to_string(opts.window_right) + " softcap " +
           std::to_string(opts.softcap);
  }
};

// `offset` elements of q/k/v before the data (1 = rows not 16-byte aligned: the generic kernel).
void check_attention(const AttnCase& c, DType dt, int offset = 0) {
  SCOPED_TRACE(c.name() + " dtype " + dtype_name(dt) + " offset " + std::to_string(offset));
  std::mt19937 rng(uint32_t(c.sq * 1000 + c.sk * 10 + c.d + int(dt)));
  const size_t nq = size_t(c.b) * c.sq * c.h * c.d, nk = size_t(c.b) * c.sk * c.hkv * c.d;
  Buffer q = random_buffer(dt, nq + offset, rng), k = random_buffer(dt, nk + offset, rng), v = random_buffer(dt, nk + offset, rng);
  const size_t es = size_t(dtype_size(dt));
  auto view = [&](void* base, int s, int heads, Device dev) {
    return TensorView(static_cast<unsigned char*>(base) + offset * es, dt, {c.b, s, heads, c.d}, dev);
  };
  // CPU backend
  Buffer out_cpu(dt, nq), lse_cpu(DType::Float32, size_t(c.b) * c.h * c.sq);
  out_cpu.poison(), lse_cpu.poison();
  TensorView tl_cpu(lse_cpu.bytes.data(), DType::Float32, {c.b, c.h, c.sq});
  flash_attention(view(q.bytes.data(), c.sq, c.h, {}), view(k.bytes.data(), c.sk, c.hkv, {}),
                  view(v.bytes.data(), c.sk, c.hkv, {}), TensorView(out_cpu.bytes.data(), dt, {c.b, c.sq, c.h, c.d}), &tl_cpu,
                  c.opts);
  // emulated CUDA
  DeviceCopy dq(q.bytes.data(), q.bytes.size()), dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
  Buffer out(dt, nq), lse(DType::Float32, lse_cpu.size());
  out.poison(), lse.poison();
  DeviceCopy dout(out.bytes.data(), out.bytes.size()), dlse(lse.bytes.data(), lse.bytes.size());
  TensorView tl(dlse.ptr, DType::Float32, {c.b, c.h, c.sq}, kCuda);
  flash_attention(view(dq.ptr, c.sq, c.h, kCuda), view(dk.ptr, c.sk, c.hkv, kCuda), view(dv.ptr, c.sk, c.hkv, kCuda),
                  TensorView(dout.ptr, dt, {c.b, c.sq, c.h, c.d}, kCuda), &tl, c.opts);
  dout.copy_to(out.bytes.data());
  dlse.copy_to(lse.bytes.data());
  expect_close(out, out_cpu, tolerance(dt), "out");
  expect_close(lse, lse_cpu, dt == DType::Float32 ? 2e-5f : 2e-3f, "lse");
}

AttentionOptions opts(bool causal, int left = -1, int right = -1, float softcap = 0, float scale = 0) {
  AttentionOptions o;
  o.causal = causal, o.window_left = left, o.window_right = right, o.softcap = softcap, o.scale = scale;
  return o;
}

const DType kDtypes[] = {DType::Float32, DType::Float16, DType::BFloat16};

// The shapes of tests/python/test_attention.py (tiles, tails, GQA, MQA, seq_q > seq_k, odd head dims).
TEST(EmulatedCudaAttention, ShapesDtypesCausal) {
  const int shapes[][6] = {{1, 1, 1, 1, 1, 64},   {2, 37, 53, 4, 2, 64}, {1, 64, 64, 2, 2, 128}, {1, 65, 129, 3, 1, 80},
                           {1, 70, 70, 2, 2, 96}, {1, 33, 90, 2, 1, 256}, {1, 7, 11, 2, 2, 7},    {1, 130, 40, 2, 1, 33}};
  for (const auto& s : shapes)
    for (DType dt : kDtypes)
      for (bool causal : {false, true}) check_attention({s[0], s[1], s[2], s[3], s[4], s[5], opts(causal)}, dt);
}

TEST(EmulatedCudaAttention, SlidingWindows) {
  const int windows[][2] = {{3, 3}, {5, 0}, {0, 4}, {17, 9}, {70, -1}};
  for (const auto& w : windows)
    for (bool causal : {false, true})
      for (DType dt : kDtypes) {
        check_attention({1, 45, 70, 4, 2, 64, opts(causal, w[0], causal ? 0 : w[1])}, dt);
        check_attention({1, 19, 30, 2, 1, 40, opts(causal, w[0], causal ? 0 : w[1])}, dt);
      }
}

TEST(EmulatedCudaAttention, SoftcapAndScale) {
  for (DType dt : kDtypes) {
    check_attention({2, 45, 70, 4, 2, 64, opts(false, 7, 3, 5.0f)}, dt);
    check_attention({2, 45, 70, 4, 2, 40, opts(true, 5, 0, 5.0f, 0.3f)}, dt);
    check_attention({1, 20, 20, 2, 2, 128, opts(true, -1, -1, 30.0f, 0.05f)}, dt);
  }
}

TEST(EmulatedCudaAttention, FullyMaskedRowsAndLargeHeadDim) {
  for (DType dt : kDtypes) check_attention({1, 40, 10, 2, 1, 64, opts(true)}, dt);  // rows 0..29 see no key
  check_attention({1, 17, 33, 1, 1, 512, opts(true)}, DType::Float32);                 // 131 KB of shared memory
  check_attention({1, 9, 12, 1, 1, 300, opts(false)}, DType::BFloat16);
}

// On a GPU with 99 KB of shared memory per block (sm_86/89, modelled with MKEMU_SMEM_OPTIN), fp32
// head_dim 512 does not fit: a NotImplemented error naming the limit and the head_dim that fits.
TEST(EmulatedCudaAttention, SharedMemoryLimitOfSmallerGpus) {
  setenv("MKEMU_SMEM_OPTIN", "101376", 1);
  check_attention({1, 9, 12, 1, 1, 384, opts(true)}, DType::Float32);  // 98 KB: fits
  std::vector<float> q(512 * 4, 1.0f), out(q.size());
  void* d = device_malloc(kCuda, q.size() * 4);
  const TensorView t(d, DType::Float32, {1, 4, 1, 512}, kCuda);
  try {
    flash_attention(t, t, t, t, nullptr, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::NotImplemented);
    EXPECT_NE(std::string(e.what()).find("this GPU allows 101376"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("head_dim <= 395 fits"), std::string::npos) << e.what();
  }
  device_free(kCuda, d);
  unsetenv("MKEMU_SMEM_OPTIN");
}

TEST(EmulatedCudaAttention, UnalignedRowsTakeTheGenericKernel) {
  check_attention({1, 37, 53, 2, 1, 64, opts(true)}, DType::Float16, 1);
  check_attention({1, 37, 53, 2, 1, 64, opts(false)}, DType::BFloat16, 3);
}

// Padded batches: seqused_k and a key mask on both backends. Dropped keys hold NaN (the kernels must
// never read them). `cuda_used` may hold out-of-range lengths the CUDA kernel clamps (the CPU, which
// checks them, gets `used`); `offset` as in check_attention (1: the generic kernel).
void check_attention_padded(const AttnCase& c, DType dt, const std::vector<int32_t>& used,
                            const std::vector<uint8_t>& keep, std::vector<int32_t> cuda_used = {}, int offset = 0) {
  SCOPED_TRACE("padded " + c.name() + " dtype " + dtype_name(dt) + " offset " + std::to_string(offset) +
               (used.empty() ? "" : " seqused_k") + (keep.empty() ? "" : " key_mask"));
  if (cuda_used.empty()) cuda_used = used;
  std::mt19937 rng(uint32_t(c.sq * 1000 + c.sk * 10 + c.d + int(dt) + 7));
  const size_t nq = size_t(c.b) * c.sq * c.h * c.d, nk = size_t(c.b) * c.sk * c.hkv * c.d;
  Buffer q = random_buffer(dt, nq + offset, rng), k = random_buffer(dt, nk + offset, rng), v = random_buffer(dt, nk + offset, rng);
  for (int b = 0; b < c.b; ++b)
    for (int j = 0; j < c.sk; ++j)
      if ((!keep.empty() && !keep[size_t(b) * c.sk + j]) || (!used.empty() && j >= used[b]))
        for (int i = 0; i < c.hkv * c.d; ++i) {
          const size_t at = offset + (size_t(b) * c.sk + j) * c.hkv * c.d + i;
          k.set(at, NAN), v.set(at, NAN);
        }
  const size_t es = size_t(dtype_size(dt));
  auto view = [&](void* base, int s, int heads, Device dev) {
    return TensorView(static_cast<unsigned char*>(base) + offset * es, dt, {c.b, s, heads, c.d}, dev);
  };
  std::vector<int32_t> used_cpu = used;
  std::vector<uint8_t> keep_cpu = keep;
  TensorView tu_cpu(used_cpu.data(), DType::Int32, {c.b}), tm_cpu(keep_cpu.data(), DType::Bool, {c.b, c.sk});
  KeyPadding kp_cpu{used.empty() ? nullptr : &tu_cpu, keep.empty() ? nullptr : &tm_cpu};
  Buffer out_cpu(dt, nq), lse_cpu(DType::Float32, size_t(c.b) * c.h * c.sq);
  out_cpu.poison(), lse_cpu.poison();
  TensorView tl_cpu(lse_cpu.bytes.data(), DType::Float32, {c.b, c.h, c.sq});
  flash_attention(view(q.bytes.data(), c.sq, c.h, {}), view(k.bytes.data(), c.sk, c.hkv, {}),
                  view(v.bytes.data(), c.sk, c.hkv, {}), TensorView(out_cpu.bytes.data(), dt, {c.b, c.sq, c.h, c.d}), &tl_cpu,
                  c.opts, kp_cpu);
  DeviceCopy dq(q.bytes.data(), q.bytes.size()), dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
  cuda_used.resize(std::max<size_t>(cuda_used.size(), 1));  // (a device copy of an empty vector reads nullptr)
  std::vector<uint8_t> keep_dev = keep;
  keep_dev.resize(std::max<size_t>(keep.size(), 1));
  DeviceCopy du(cuda_used.data(), cuda_used.size() * 4), dm(keep_dev.data(), keep_dev.size());
  TensorView tu(du.ptr, DType::Int32, {c.b}, kCuda), tm(dm.ptr, DType::Bool, {c.b, c.sk}, kCuda);
  KeyPadding kp{used.empty() ? nullptr : &tu, keep.empty() ? nullptr : &tm};
  Buffer out(dt, nq), lse(DType::Float32, lse_cpu.size());
  out.poison(), lse.poison();
  DeviceCopy dout(out.bytes.data(), out.bytes.size()), dlse(lse.bytes.data(), lse.bytes.size());
  TensorView tl(dlse.ptr, DType::Float32, {c.b, c.h, c.sq}, kCuda);
  flash_attention(view(dq.ptr, c.sq, c.h, kCuda), view(dk.ptr, c.sk, c.hkv, kCuda), view(dv.ptr, c.sk, c.hkv, kCuda),
                  TensorView(dout.ptr, dt, {c.b, c.sq, c.h, c.d}, kCuda), &tl, c.opts, kp);
  dout.copy_to(out.bytes.data());
  dlse.copy_to(lse.bytes.data());
  for (size_t i = 0; i < out_cpu.size(); ++i) ASSERT_FALSE(std::isnan(out_cpu.get(i))) << "CPU out " << i;
  expect_close(out, out_cpu, tolerance(dt), "out");
  expect_close(lse, lse_cpu, dt == DType::Float32 ? 2e-5f : 2e-3f, "lse");
}

// keep flags (b, sk): row 0 left-padded, row 1 right-padded, the others random holes; row 2 (if
// any) fully padded.
std::vector<uint8_t> padding_mask(int b, int sk, std::mt19937& rng) {
  std::vector<uint8_t> keep(size_t(b) * sk, 1);
  for (int r = 0; r < b; ++r)
    for (int j = 0; j < sk; ++j) {
      uint8_t& f = keep[size_t(r) * sk + j];
      if (r == 0) f = j >= sk / 3;
      else if (r == 1) f = j < sk - sk / 4;
      else if (r == 2) f = 0;
      else f = rng() % 10 < 7;
    }
  return keep;
}

TEST(EmulatedCudaAttention, KeyMaskAndSequsedK) {
  std::mt19937 rng(5);
  const int shapes[][6] = {{4, 1, 37, 4, 2, 64}, {4, 37, 53, 4, 2, 64}, {4, 9, 13, 2, 2, 7}, {3, 70, 130, 2, 1, 128},
                           {4, 20, 33, 2, 1, 80}};
  for (const auto& s : shapes)
    for (DType dt : kDtypes)
      for (bool causal : {false, true}) {
        const AttnCase c{s[0], s[1], s[2], s[3], s[4], s[5], opts(causal)};
        std::vector<int32_t> used(size_t(c.b));
        for (int b = 0; b < c.b; ++b) used[b] = b == 0 ? c.sk : b == 1 ? 0 : int(rng() % uint32_t(c.sk + 1));
        const std::vector<uint8_t> keep = padding_mask(c.b, c.sk, rng);
        check_attention_padded(c, dt, {}, keep);
        check_attention_padded(c, dt, used, {});
        check_attention_padded(c, dt, used, keep);
      }
}

TEST(EmulatedCudaAttention, KeyMaskWithWindowsSoftcapAndTheGenericKernel) {
  std::mt19937 rng(6);
  for (DType dt : kDtypes) {
    const AttnCase cases[] = {{4, 45, 70, 4, 2, 64, opts(true, 9, 0, 5.0f)}, {4, 19, 30, 2, 1, 40, opts(false, 5, 3)},
                              {4, 30, 90, 2, 2, 96, opts(false, 17, 9, 0.0f, 0.3f)}};
    for (const AttnCase& c : cases) {
      std::vector<int32_t> used(size_t(c.b));
      for (int b = 0; b < c.b; ++b) used[b] = int(rng() % uint32_t(c.sk + 1));
      check_attention_padded(c, dt, used, padding_mask(c.b, c.sk, rng));
    }
  }
  std::vector<int32_t> used{53, 20, 0, 41};
  check_attention_padded({4, 37, 53, 2, 1, 64, opts(true)}, DType::Float16, used, padding_mask(4, 53, rng), {}, 1);
}

// CUDA never reads seqused_k back to check it: out-of-range values are clamped to [0, seq_k].
TEST(EmulatedCudaAttention, SequsedKOutOfRangeIsClamped) {
  std::mt19937 rng(7);
  for (DType dt : {DType::Float32, DType::BFloat16})
    check_attention_padded({4, 12, 30, 2, 1, 64, opts(true)}, dt, {30, 0, 30, 7}, padding_mask(4, 30, rng),
                           {31, -5, 1 << 30, 7});
}

// max_q_hint: the max_seqlen_q passed on (0: the true maximum).
void check_varlen(DType dt, const std::vector<int>& lq, const std::vector<int>& lk, int h, int hkv, int d,
                  const AttentionOptions& o, int max_q_hint = 0, std::vector<int32_t> used = {},
                  std::vector<uint8_t> keep = {}) {
  SCOPED_TRACE(std::string("varlen ") + dtype_name(dt) + " d " + std::to_string(d) + (used.empty() ? "" : " seqused_k") +
               (keep.empty() ? "" : " key_mask"));
  std::vector<int32_t> cq{0}, ck{0};
  for (size_t i = 0; i < lq.size(); ++i) cq.push_back(cq.back() + lq[i]), ck.push_back(ck.back() + lk[i]);
  const int tq = cq.back(), tk = ck.back();
  std::mt19937 rng(uint32_t(tq + tk + d));
  Buffer q = random_buffer(dt, size_t(tq) * h * d, rng), k = random_buffer(dt, size_t(tk) * hkv * d, rng),
         v = random_buffer(dt, size_t(tk) * hkv * d, rng);
  const int64_t bsz = int64_t(lq.size()) + 1;
  for (size_t b = 0; b < lk.size(); ++b)  // NaN in every key the kernels must skip
    for (int j = 0; j < lk[b]; ++j)
      if ((!keep.empty() && !keep[size_t(ck[b] + j)]) || (!used.empty() && j >= used[b]))
        for (int i = 0; i < hkv * d; ++i) k.set(size_t(ck[b] + j) * hkv * d + i, NAN), v.set(size_t(ck[b] + j) * hkv * d + i, NAN);
  TensorView tu_cpu(used.data(), DType::Int32, {bsz - 1}), tm_cpu(keep.data(), DType::Bool, {tk});
  const KeyPadding kp_cpu{used.empty() ? nullptr : &tu_cpu, keep.empty() ? nullptr : &tm_cpu};
  Buffer out_cpu(dt, q.size()), lse_cpu(DType::Float32, size_t(h) * tq);
  out_cpu.poison(), lse_cpu.poison();
  TensorView tl_cpu(lse_cpu.bytes.data(), DType::Float32, {h, tq});
  flash_attention_varlen(TensorView(q.bytes.data(), dt, {tq, h, d}), TensorView(k.bytes.data(), dt, {tk, hkv, d}),
                         TensorView(v.bytes.data(), dt, {tk, hkv, d}), TensorView(cq.data(), DType::Int32, {bsz}),
                         TensorView(ck.data(), DType::Int32, {bsz}), TensorView(out_cpu.bytes.data(), dt, {tq, h, d}), &tl_cpu, o,
                         kp_cpu);
  DeviceCopy dq(q.bytes.data(), q.bytes.size()), dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
  DeviceCopy dcq(cq.data(), cq.size() * 4), dck(ck.data(), ck.size() * 4);
  const bool has_used = !used.empty(), has_keep = !keep.empty();
  used.resize(std::max<size_t>(used.size(), 1));  // (a device copy of an empty vector reads nullptr)
  keep.resize(std::max<size_t>(keep.size(), 1));
  DeviceCopy du(used.data(), used.size() * 4), dm(keep.data(), keep.size());
  TensorView tu(du.ptr, DType::Int32, {bsz - 1}, kCuda), tm(dm.ptr, DType::Bool, {tk}, kCuda);
  const KeyPadding kp{has_used ? &tu : nullptr, has_keep ? &tm : nullptr};
  Buffer out(dt, q.size()), lse(DType::Float32, lse_cpu.size());
  out.poison(), lse.poison();
  DeviceCopy dout(out.bytes.data(), out.bytes.size()), dlse(lse.bytes.data(), lse.bytes.size());
  TensorView tl(dlse.ptr, DType::Float32, {h, tq}, kCuda);
  int max_q = 0;
  for (int x : lq) max_q = std::max(max_q, x);
  if (max_q_hint > 0) max_q = max_q_hint;
  flash_attention_varlen(TensorView(dq.ptr, dt, {tq, h, d}, kCuda), TensorView(dk.ptr, dt, {tk, hkv, d}, kCuda),
                         TensorView(dv.ptr, dt, {tk, hkv, d}, kCuda), TensorView(dcq.ptr, DType::Int32, {bsz}, kCuda),
                         TensorView(dck.ptr, DType::Int32, {bsz}, kCuda), TensorView(dout.ptr, dt, {tq, h, d}, kCuda), &tl, o,
                         kp, max_q);
  dout.copy_to(out.bytes.data());
  dlse.copy_to(lse.bytes.data());
  expect_close(out, out_cpu, tolerance(dt), "varlen out");
  expect_close(lse, lse_cpu, dt == DType::Float32 ? 2e-5f : 2e-3f, "varlen lse");
}

TEST(EmulatedCudaAttention, Varlen) {
  for (DType dt : kDtypes)
    for (bool causal : {false, true}) {
      check_varlen(dt, {5, 0, 64, 77}, {5, 0, 64, 77}, 4, 2, 64, opts(causal));
      check_varlen(dt, {3, 20, 1}, {9, 20, 30}, 2, 1, 40, opts(causal, 9, causal ? 0 : 4));
    }
  check_varlen(DType::Float16, {5, 0, 64, 77}, {5, 0, 64, 77}, 4, 4, 64, opts(true, 9, 0, 5.0f));
}

// max_seqlen_q only sizes the grid (it is never checked against the offsets on the GPU): a hint
// smaller than the longest sequence must still give every row (issue 15 #3), on both kernels.
TEST(EmulatedCudaAttention, VarlenGridHintTooSmall) {
  for (DType dt : kDtypes)
    for (int hint : {1, 20, 64}) check_varlen(dt, {5, 150, 64, 77}, {5, 150, 64, 90}, 2, 1, 64, opts(true), hint);
  check_varlen(DType::Float32, {3, 40}, {9, 40}, 2, 2, 40, opts(false), 16);
}

TEST(EmulatedCudaAttention, VarlenWithSequsedKAndKeyMask) {
  std::mt19937 rng(8);
  const std::vector<int> lq{5, 0, 64, 1, 3}, lk{9, 3, 80, 100, 3};
  const std::vector<int32_t> used{9, 0, 41, 57, 2};
  std::vector<uint8_t> keep(size_t(9 + 3 + 80 + 100 + 3));
  for (auto& f : keep) f = rng() % 10 < 8;
  for (DType dt : kDtypes)
    for (bool causal : {false, true}) {
      check_varlen(dt, lq, lk, 4, 2, 64, opts(causal, 20, causal ? 0 : -1), 0, used, keep);
      check_varlen(dt, lq, lk, 2, 1, 40, opts(causal), 0, {}, keep);
      check_varlen(dt, lq, lk, 2, 2, 64, opts(causal), 0, used, {});
    }
}

// ---------------------------------------------------------------- paged attention

struct PagedCase {
  std::vector<int> kv_lens;  // tokens per sequence
  std::vector<int> q_lens;   // query rows per sequence; empty: decode (no qo_indptr, one row each)
  int heads, kv_heads, head_dim, page_size;
  PagedAttentionOptions opts;
  std::string name() const {
    std::string s = "kv";
    for (int x : kv_lens) s += " " + std::to_string(x);
    s += " q";
    for (int x : q_lens) s += " " + std::to_string(x);
    return s + " h " + std::to_string(heads) + "/" + std::to_string(kv_heads) + " d " + std::to_string(head_dim) + " ps " +
           std::to_string(page_size) + " causal " + std::to_string(opts.causal) + " window " +
           std::to_string(opts.window_left) + "/" + std::to_string(opts.window_right) + " softcap " +
           std::to_string(opts.softcap) + " splits " + std::to_string(opts.num_splits);
  }
};

PagedAttentionOptions popts(bool causal, int splits = 0, int left = -1, int right = -1, float softcap = 0, float scale = 0) {
  PagedAttentionOptions o;
  o.causal = causal, o.num_splits = splits, o.window_left = left, o.window_right = right, o.softcap = softcap;
  o.scale = scale;
  return o;
}

// paged_attention_raw with FlashInfer-style tables over a pool whose pages are assigned to the
// sequences in a shuffled order (some pages unused), K and V interleaved per page when
// `interleaved` (strided pages, as a PagedKVCache layer), on the CPU and the emulated GPU.
void check_paged(const PagedCase& c, DType dt, bool interleaved = false, int max_q_hint = 0) {
  SCOPED_TRACE(c.name() + " dtype " + dtype_name(dt) + (interleaved ? " interleaved" : "") + " hint " +
               std::to_string(max_q_hint));
  const int B = int(c.kv_lens.size()), ps = c.page_size, kvh = c.kv_heads, D = c.head_dim, H = c.heads;
  std::vector<int32_t> kv_indptr{0}, last, qo{0};
  for (int b = 0; b < B; ++b) {
    const int n = (c.kv_lens[b] + ps - 1) / ps;
    kv_indptr.push_back(kv_indptr.back() + n);
    last.push_back(n ? c.kv_lens[b] - (n - 1) * ps : 1);
    qo.push_back(qo.back() + (c.q_lens.empty() ? 1 : c.q_lens[b]));
  }
  const int nnz = kv_indptr.back(), P = nnz + 3, tq = qo.back();
  std::mt19937 rng(uint32_t(nnz * 131 + tq * 7 + D + int(dt)));
  std::vector<int32_t> perm(P);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> indices(perm.begin(), perm.begin() + nnz);
  const int64_t tok = int64_t(kvh) * D, page = (interleaved ? 2 : 1) * ps * tok;
  Buffer kpool = random_buffer(dt, size_t(P) * page, rng), vpool = random_buffer(dt, interleaved ? 1 : size_t(P) * page, rng);
  Buffer q = random_buffer(dt, size_t(tq) * H * D, rng);
  auto pages = [&](void* kbase, void* vbase, Device dev, bool is_v) {
    const size_t es = size_t(dtype_size(dt));
    void* base = interleaved ? static_cast<unsigned char*>(kbase) + (is_v ? ps * tok * es : 0) : (is_v ? vbase : kbase);
    TensorView t(base, dt, {P, ps, kvh, D}, dev);
    t.strides[0] = page;
    return t;
  };
  const bool decode = c.q_lens.empty();
  const int64_t b1 = B + 1;
  // CPU backend
  Buffer out_cpu(dt, q.size()), lse_cpu(DType::Float32, size_t(H) * tq);
  out_cpu.poison(), lse_cpu.poison();
  TensorView tqo(qo.data(), DType::Int32, {b1}), tl_cpu(lse_cpu.bytes.data(), DType::Float32, {H, tq});
  paged_attention_raw(TensorView(q.bytes.data(), dt, {tq, H, D}), pages(kpool.bytes.data(), vpool.bytes.data(), {}, false),
                      pages(kpool.bytes.data(), vpool.bytes.data(), {}, true), decode ? nullptr : &tqo,
                      TensorView(kv_indptr.data(), DType::Int32, {b1}), TensorView(indices.data(), DType::Int32, {nnz}),
                      TensorView(last.data(), DType::Int32, {B}), TensorView(out_cpu.bytes.data(), dt, {tq, H, D}),
                      &tl_cpu, c.opts);
  // emulated CUDA
  DeviceCopy dq(q.bytes.data(), q.bytes.size()), dk(kpool.bytes.data(), kpool.bytes.size()),
      dv(vpool.bytes.data(), vpool.bytes.size());
  DeviceCopy dqo(qo.data(), qo.size() * 4), dind(kv_indptr.data(), kv_indptr.size() * 4),
      dix(indices.data(), std::max<size_t>(1, indices.size()) * 4), dlast(last.data(), last.size() * 4);
  Buffer out(dt, q.size()), lse(DType::Float32, lse_cpu.size());
  out.poison(), lse.poison();
  DeviceCopy dout(out.bytes.data(), out.bytes.size()), dlse(lse.bytes.data(), lse.bytes.size());
  TensorView tqo_d(dqo.ptr, DType::Int32, {b1}, kCuda), tl(dlse.ptr, DType::Float32, {H, tq}, kCuda);
  paged_attention_raw(TensorView(dq.ptr, dt, {tq, H, D}, kCuda), pages(dk.ptr, dv.ptr, kCuda, false),
                      pages(dk.ptr, dv.ptr, kCuda, true), decode ? nullptr : &tqo_d,
                      TensorView(dind.ptr, DType::Int32, {b1}, kCuda), TensorView(dix.ptr, DType::Int32, {nnz}, kCuda),
                      TensorView(dlast.ptr, DType::Int32, {B}, kCuda), TensorView(dout.ptr, dt, {tq, H, D}, kCuda), &tl,
                      c.opts, max_q_hint);
  dout.copy_to(out.bytes.data());
  dlse.copy_to(lse.bytes.data());
  expect_close(out, out_cpu, tolerance(dt), "paged out");
  expect_close(lse, lse_cpu, dt == DType::Float32 ? 2e-5f : 2e-3f, "paged lse");
}

// Decode (one row per sequence): head dims of every kernel variant (EPL 1/2/4/8, vector loads or
// not), GQA/MQA/MHA, empty and one-token sequences, pages not full, split-KV 1/3/auto.
TEST(EmulatedCudaPaged, Decode) {
  for (DType dt : kDtypes)
    for (int splits : {1, 3, 0}) check_paged({{1, 37, 300, 16}, {}, 8, 2, 64, 16, popts(true, splits)}, dt);
  const int dims[][4] = {{7, 2, 1, 5}, {32, 4, 4, 8}, {40, 6, 2, 7}, {96, 4, 1, 16}, {128, 8, 2, 16}, {256, 2, 1, 4}, {200, 3, 3, 3}};
  for (const auto& d : dims)
    for (DType dt : kDtypes) check_paged({{0, 1, 29, 70}, {}, d[1], d[2], d[0], d[3], popts(true)}, dt);
}

// Chunked prefill (qo_indptr): causal and not, q_len > kv_len (rows before the first key),
// empty chunks, GQA groups larger than a row tile, split-KV, K/V interleaved in one pool.
TEST(EmulatedCudaPaged, ChunkedPrefill) {
  for (DType dt : kDtypes)
    for (bool causal : {true, false})
      for (int splits : {1, 3, 0}) {
        check_paged({{10, 5, 161, 33}, {3, 0, 9, 1}, 4, 2, 64, 16, popts(causal, splits)}, dt);
        check_paged({{61, 4}, {7, 6}, 3, 1, 40, 5, popts(causal, splits)}, dt, true);
      }
  check_paged({{150}, {9}, 16, 1, 128, 16, popts(true, 0)}, DType::Float16);  // 144 rows of one kv head
  check_paged({{90, 17}, {12, 5}, 12, 4, 256, 8, popts(true, 2)}, DType::BFloat16, true);
}

// Sliding windows (decode and prefill), softcap, scale; windows near INT_MAX mean "no window".
TEST(EmulatedCudaPaged, WindowsAndSoftcap) {
  const int windows[][2] = {{0, 0}, {7, 0}, {40, 3}, {3, 9}, {2147483646, -1}, {2147483647, 2147483647}};
  for (const auto& w : windows)
    for (bool causal : {true, false})
      for (int splits : {1, 3}) {
        check_paged({{150, 33}, {9, 4}, 4, 2, 48, 6, popts(causal, splits, w[0], w[1])}, DType::Float32);
        check_paged({{150, 1}, {}, 4, 2, 64, 16, popts(causal, splits, w[0], w[1])}, DType::BFloat16);
      }
  for (DType dt : kDtypes) {
    check_paged({{70, 200}, {5, 3}, 4, 1, 64, 16, popts(true, 0, -1, -1, 5.0f)}, dt);
    check_paged({{70, 200}, {}, 4, 1, 32, 16, popts(true, 3, 20, -1, 30.0f, 0.3f)}, dt);
  }
}

// max_q_len sizes the grid. Under CUDA graph capture (modelled by MKEMU_CAPTURING) qo_indptr is
// not read back, so a hint smaller than the longest chunk must still give every row: each block
// loops over row tiles (issue 15 #3).
TEST(EmulatedCudaPaged, GridHintTooSmallUnderCapture) {
  setenv("MKEMU_CAPTURING", "1", 1);
  for (DType dt : kDtypes)
    for (int hint : {1, 3})
      for (int splits : {1, 3}) check_paged({{10, 5, 81, 33}, {3, 0, 21, 1}, 4, 2, 64, 16, popts(true, splits)}, dt, false, hint);
  check_paged({{60}, {25}, 12, 1, 40, 8, popts(false, 1)}, DType::Float32, true, 2);
  unsetenv("MKEMU_CAPTURING");
  // Outside capture the hint is replaced by the true maximum read back with the offsets.
  check_paged({{10, 5, 81, 33}, {3, 0, 21, 1}, 4, 2, 64, 16, popts(true, 1)}, DType::Float32, false, 1);
}

// qo_indptr lives on the device; rows of q that no sequence covers used to stay unwritten (or be
// filled from the uninitialised split workspace). Now a ValueError naming the mismatch (issue 15 #2).
TEST(EmulatedCudaPaged, QoIndptrMustCoverQ) {
  const int H = 2, D = 32, ps = 4;
  std::vector<float> pool(size_t(4) * ps * D, 0.5f), q(size_t(6) * H * D, 1.0f);
  DeviceCopy dk(pool.data(), pool.size() * 4), dq(q.data(), q.size() * 4), dout(q.data(), q.size() * 4);
  std::vector<int32_t> kv_indptr{0, 2, 4}, indices{0, 1, 2, 3}, last{4, 3};
  DeviceCopy dind(kv_indptr.data(), 12), dix(indices.data(), 16), dlast(last.data(), 8);
  const TensorView pages(dk.ptr, DType::Float32, {4, ps, 1, D}, kCuda);
  auto run = [&](std::vector<int32_t> qo, int splits) {
    DeviceCopy dqo(qo.data(), 12);
    const TensorView tqo(dqo.ptr, DType::Int32, {3}, kCuda);
    paged_attention_raw(TensorView(dq.ptr, DType::Float32, {6, H, D}, kCuda), pages, pages, &tqo,
                        TensorView(dind.ptr, DType::Int32, {3}, kCuda), TensorView(dix.ptr, DType::Int32, {4}, kCuda),
                        TensorView(dlast.ptr, DType::Int32, {2}, kCuda), TensorView(dout.ptr, DType::Float32, {6, H, D}, kCuda),
                        nullptr, popts(true, splits));
  };
  auto expect_value_error = [&](std::vector<int32_t> qo, int splits, const std::string& text) {
    try {
      run(qo, splits);
      ADD_FAILURE() << "no error for " << text;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Value) << e.what();
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  for (int splits : {1, 3}) {
    expect_value_error({0, 2, 4}, splits, "qo_indptr[-1] = 4 must equal the rows of q (6)");
    expect_value_error({0, 2, 7}, splits, "qo_indptr[-1] = 7 must equal the rows of q (6)");
    expect_value_error({1, 2, 6}, splits, "qo_indptr[0] must be 0, got 1");
    expect_value_error({0, 5, 3}, splits, "qo_indptr must be non-decreasing");
    EXPECT_NO_THROW(run({0, 2, 6}, splits));
  }
}

// A PagedKVCache on the emulated device: appends scatter rows into the pages (paged_append),
// attention builds and uploads the tables; compared with the same operations on a CPU cache.
TEST(EmulatedCudaPaged, KvCacheOnDevice) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    const int L = 2, P = 24, ps = 8, kvh = 2, D = 64, H = 4;
    PagedKVCache cpu(L, P, ps, kvh, D, dt), gpu(L, P, ps, kvh, D, dt, kCuda);
    std::mt19937 rng(21 + int(dt));
    const std::vector<int> lens = {13, 1, 40};
    std::vector<int64_t> ids_c, ids_g;
    for (size_t i = 0; i < lens.size(); ++i) ids_c.push_back(cpu.add_sequence()), ids_g.push_back(gpu.add_sequence());
    // prefill all three in one append per layer, then two decode steps (one row each)
    auto append = [&](const std::vector<int64_t>& counts) {
      const int64_t rows = counts.empty() ? int64_t(ids_c.size()) : std::accumulate(counts.begin(), counts.end(), int64_t(0));
      for (int layer = 0; layer < L; ++layer) {
        Buffer k = random_buffer(dt, size_t(rows) * kvh * D, rng), v = random_buffer(dt, size_t(rows) * kvh * D, rng);
        cpu.append(ids_c, layer, TensorView(k.bytes.data(), dt, {rows, kvh, D}), TensorView(v.bytes.data(), dt, {rows, kvh, D}),
                   counts);
        DeviceCopy dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
        gpu.append(ids_g, layer, TensorView(dk.ptr, dt, {rows, kvh, D}, kCuda), TensorView(dv.ptr, dt, {rows, kvh, D}, kCuda),
                   counts);
      }
    };
    append({13, 1, 40});
    append({});
    append({1, 1, 1});
    // The scattered pages hold the same rows.
    for (size_t i = 0; i < lens.size(); ++i) ASSERT_EQ(cpu.page_table(ids_c[i]), gpu.page_table(ids_g[i]));
    const TensorView pool_c = cpu.pool(), pool_g = gpu.pool();
    const size_t page_bytes = size_t(pool_c.strides[0]) * size_t(dtype_size(dt));
    std::vector<unsigned char> host(page_bytes * P);
    device_memcpy(host.data(), Device{}, pool_g.data, kCuda, host.size());
    for (size_t i = 0; i < lens.size(); ++i) {
      const auto table = cpu.page_table(ids_c[i]);
      for (size_t j = 0; j + 1 < table.size(); ++j)  // full pages: every slot written
        EXPECT_EQ(0, std::memcmp(host.data() + table[j] * page_bytes,
                                 static_cast<const unsigned char*>(pool_c.data) + table[j] * page_bytes, page_bytes))
            << "seq " << i << " page " << table[j];
    }
    for (int rows : {1, 5}) {  // decode, then a chunk of 5 rows per sequence
      for (int splits : {1, 3, 0}) {
        const std::vector<int64_t> q_lens = rows == 1 ? std::vector<int64_t>{} : std::vector<int64_t>{5, 2, 5};
        const int64_t tq = rows == 1 ? 3 : 12;
        Buffer q = random_buffer(dt, size_t(tq) * H * D, rng), out_c(dt, q.size()), out_g(dt, q.size());
        out_c.poison(), out_g.poison();
        PagedAttentionOptions o = popts(true, splits, 9);
        cpu.attention(TensorView(q.bytes.data(), dt, {tq, H, D}), 1, ids_c, q_lens, TensorView(out_c.bytes.data(), dt, {tq, H, D}),
                      nullptr, o);
        DeviceCopy dq(q.bytes.data(), q.bytes.size()), dout(out_g.bytes.data(), out_g.bytes.size());
        gpu.attention(TensorView(dq.ptr, dt, {tq, H, D}, kCuda), 1, ids_g, q_lens, TensorView(dout.ptr, dt, {tq, H, D}, kCuda),
                      nullptr, o);
        dout.copy_to(out_g.bytes.data());
        expect_close(out_g, out_c, tolerance(dt), "cache attention rows " + std::to_string(rows));
      }
    }
  }
}

// The page-table and slot uploads go through a persistent pinned ring (64 KB at first): an
// 8200-row append (66 KB of slots) makes it grow, then decode steps with ~6 KB of tables each
// (one-token pages) wrap it; every result must still match the CPU cache (a span reused too
// early, or a wrong offset after a wrap, would upload wrong tables).
TEST(EmulatedCudaPaged, PinnedUploadRingWrapsAndGrows) {
  const int P = 10000, ps = 1, kvh = 1, D = 8, H = 2;
  const DType dt = DType::Float32;
  PagedKVCache cpu(1, P, ps, kvh, D, dt), gpu(1, P, ps, kvh, D, dt, kCuda);
  std::mt19937 rng(77);
  auto append = [&](const std::vector<int64_t>& ic, const std::vector<int64_t>& ig, std::vector<int64_t> counts) {
    int64_t rows = 0;
    for (int64_t c : counts) rows += c;
    Buffer k = random_buffer(dt, size_t(rows) * kvh * D, rng), v = random_buffer(dt, size_t(rows) * kvh * D, rng);
    cpu.append(ic, 0, TensorView(k.bytes.data(), dt, {rows, kvh, D}), TensorView(v.bytes.data(), dt, {rows, kvh, D}), counts);
    DeviceCopy dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
    gpu.append(ig, 0, TensorView(dk.ptr, dt, {rows, kvh, D}, kCuda), TensorView(dv.ptr, dt, {rows, kvh, D}, kCuda), counts);
  };
  const int64_t big_c = cpu.add_sequence(), big_g = gpu.add_sequence();
  append({big_c}, {big_g}, {8200});
  cpu.free(big_c), gpu.free(big_g);
  std::vector<int64_t> ids_c, ids_g;
  for (int i = 0; i < 2; ++i) ids_c.push_back(cpu.add_sequence()), ids_g.push_back(gpu.add_sequence());
  append(ids_c, ids_g, {1400, 3});
  for (int step = 0; step < 16; ++step) {
    append(ids_c, ids_g, {1, 1 + step % 3});
    Buffer q = random_buffer(dt, size_t(2) * H * D, rng), out_c(dt, q.size()), out_g(dt, q.size());
    out_c.poison(), out_g.poison();
    const PagedAttentionOptions o = popts(true, 0);
    cpu.attention(TensorView(q.bytes.data(), dt, {2, H, D}), 0, ids_c, {}, TensorView(out_c.bytes.data(), dt, {2, H, D}), nullptr, o);
    DeviceCopy dq(q.bytes.data(), q.bytes.size()), dout(out_g.bytes.data(), out_g.bytes.size());
    gpu.attention(TensorView(dq.ptr, dt, {2, H, D}, kCuda), 0, ids_g, {}, TensorView(dout.ptr, dt, {2, H, D}, kCuda), nullptr, o);
    dout.copy_to(out_g.bytes.data());
    expect_close(out_g, out_c, tolerance(dt), "step " + std::to_string(step));
  }
}

// ---------------------------------------------------------------- quantized GEMM

struct QCase {
  QuantFormat format;
  int group_size;
  bool double_quant;
  std::string name() const {
    return std::string(quant_format_name(format)) + " g" + std::to_string(group_size) + (double_quant ? " dq" : "");
  }
};

// Every format: int8 per channel and grouped, the 4/3/2-bit formats in two group sizes, nf4 with
// double-quantised scales.
const QCase kQCases[] = {{QuantFormat::Int8, 0, false},     {QuantFormat::Int8, 32, false},   {QuantFormat::Int4, 128, false},
                         {QuantFormat::Int4, 64, false},    {QuantFormat::Int4Sym, 64, false}, {QuantFormat::Int4Min, 32, false},
                         {QuantFormat::Int3, 64, false},    {QuantFormat::Int3Sym, 128, false}, {QuantFormat::Int2, 64, false},
                         {QuantFormat::Int2Sym, 32, false}, {QuantFormat::NF4, 64, false},     {QuantFormat::NF4, 64, true}};

// qgemm on the emulated GPU against the CPU backend on the same quantized matrix, x and bias.
// The CUDA mma path rounds the dequantized weights to x's dtype before multiplying (the CPU keeps
// fp32): the bound is relative to sum_k |w_k x_k| (mag) as well as to the output. x_offset: x
// starts that many elements into its buffer (unaligned loads).
// bias_dt: the bias dtype (default: x's; another one is converted once per call).
void check_qgemm(const QCase& qc, DType dt, int64_t rows, int64_t cols, int64_t tokens, bool with_bias, int x_offset = 0,
                 std::optional<DType> bias_dt = std::nullopt) {
  const DType bdt = bias_dt.value_or(dt);
  SCOPED_TRACE(qc.name() + " " + dtype_name(dt) + " " + std::to_string(rows) + "x" + std::to_string(cols) + " tokens " +
               std::to_string(tokens) + (with_bias ? std::string(" bias ") + dtype_name(bdt) : "") + " x_offset " +
               std::to_string(x_offset));
  std::mt19937 rng(uint32_t(rows * 7 + cols + tokens * 13 + int(qc.format) * 101 + int(dt)));
  std::vector<float> w(size_t(rows * cols));
  std::normal_distribution<float> nd;
  for (auto& v : w) v = nd(rng);
  const QuantizedMatrix qm = quantize(TensorView(w.data(), DType::Float32, {rows, cols}), qc.format,
                                      {qc.group_size, qc.double_quant});
  const QuantizedMatrix dqm = qm.to(kCuda);
  std::vector<float> deq(w.size());
  dequantize(qm, TensorView(deq.data(), DType::Float32, {rows, cols}));
  Buffer x = random_buffer(dt, size_t(tokens * cols) + x_offset, rng), bias = random_buffer(bdt, size_t(rows), rng);
  Buffer out_cpu(dt, size_t(tokens * rows)), out(dt, out_cpu.size());
  out_cpu.poison(), out.poison();
  const size_t es = size_t(dtype_size(dt));
  TensorView tb(bias.bytes.data(), bdt, {rows});
  qgemm(TensorView(x.bytes.data() + x_offset * es, dt, {tokens, cols}), qm, with_bias ? &tb : nullptr,
        TensorView(out_cpu.bytes.data(), dt, {tokens, rows}));
  DeviceCopy dx(x.bytes.data(), x.bytes.size()), db(bias.bytes.data(), bias.bytes.size()), dout(out.bytes.data(), out.bytes.size());
  TensorView tdb(db.ptr, bdt, {rows}, kCuda);
  qgemm(TensorView(static_cast<unsigned char*>(dx.ptr) + x_offset * es, dt, {tokens, cols}, kCuda), dqm, with_bias ? &tdb : nullptr,
        TensorView(dout.ptr, dt, {tokens, rows}, kCuda));
  dout.copy_to(out.bytes.data());
  const float rel = dt == DType::Float32 ? 2e-6f : dt == DType::Float16 ? 2e-3f : 1.6e-2f;
  // fp32: the CPU folds the zero point out of the dot product (s * (sum q x - z sum x)), whose
  // rounding is relative to sum (|q| + z) |x|, up to ~5x mag for the 2-bit formats.
  const float rmag = dt == DType::Float32 ? 1e-5f : dt == DType::Float16 ? 1e-3f : 5e-3f;
  int bad = 0;
  for (int64_t t = 0; t < tokens && bad < 5; ++t)
    for (int64_t n = 0; n < rows && bad < 5; ++n) {
      double mag = with_bias ? std::fabs(bias.get(size_t(n))) : 0.0;
      for (int64_t k = 0; k < cols; ++k) mag += std::fabs(double(deq[size_t(n * cols + k)]) * x.get(size_t(t * cols + k + x_offset)));
      const float g = out.get(size_t(t * rows + n)), c = out_cpu.get(size_t(t * rows + n));
      if (!(std::fabs(g - c) <= rel * std::fabs(c) + rmag * mag + 1e-6f)) {
        ADD_FAILURE() << "token " << t << " row " << n << ": CUDA " << g << " CPU " << c << " (mag " << mag << ")";
        ++bad;
      }
    }
}

// GEMV (<= 4 tokens; fp32 x at any count) and the mma path (fp16/bf16, > 4 tokens: 8- and
// 16-token tiles, token tails), rows not a multiple of a warp's 16 or a block's 64.
TEST(EmulatedCudaQgemm, EveryFormatDtypeAndTokenCount) {
  for (const QCase& qc : kQCases)
    for (DType dt : kDtypes)
      for (int64_t tokens : {1, 3, 5, 9, 17}) check_qgemm(qc, dt, 37, 256, tokens, tokens % 3 != 0);
}

// Split-K (the emulated GPU has 2 SMs: few row blocks and long rows split K into 2 to 8 pieces).
TEST(EmulatedCudaQgemm, SplitK) {
  for (const QCase& qc : {kQCases[0], kQCases[2], kQCases[5], kQCases[6], kQCases[11]})
    for (DType dt : {DType::Float16, DType::BFloat16}) {
      check_qgemm(qc, dt, 20, 2048, 6, true);   // 8 splits
      check_qgemm(qc, dt, 70, 1024, 12, false); // 2 splits, 16-token tile with a tail
    }
  check_qgemm(kQCases[2], DType::Float32, 20, 2048, 6, true);  // fp32: GEMV at any token count
}

TEST(EmulatedCudaQgemm, UnalignedX) {
  for (const QCase& qc : {kQCases[1], kQCases[3], kQCases[8]}) {
    check_qgemm(qc, DType::Float32, 21, 128, 1, true, 1);  // GEMV scalar loads
    check_qgemm(qc, DType::Float16, 21, 128, 3, false, 1);
    check_qgemm(qc, DType::BFloat16, 21, 128, 7, true, 2);  // mma: 4-byte aligned is enough
  }
  // mma needs 4-byte aligned x rows: a clear error otherwise.
  try {
    check_qgemm(kQCases[2], DType::Float16, 21, 128, 7, false, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Value);
    EXPECT_NE(std::string(e.what()).find("4-byte aligned"), std::string::npos) << e.what();
  }
}

// Any in_features (issue 16): a partial last group is stored padded to whole groups (whole 32-weight
// chunks for per-channel int8) and x is copied zero-padded on the stream (memset + 2-D copy into
// stream-ordered scratch) before the kernel; every format, GEMV and mma paths, split-K.
TEST(EmulatedCudaQgemm, PartialLastGroup) {
  for (const QCase& qc : kQCases)
    for (int64_t cols : {1, 31, 33, 100, 688, 1000})
      for (DType dt : kDtypes)
        for (int64_t tokens : {1, 5, 17}) {
          if ((cols == 1 || cols == 688) && tokens == 5) continue;  // keeps the run short
          check_qgemm(qc, dt, 13, cols, tokens, tokens != 5);
        }
  // unaligned x rows of a partial K: the padded copy is aligned, so the mma path takes it
  check_qgemm(kQCases[2], DType::Float16, 21, 100, 7, true, 1);
  check_qgemm(kQCases[5], DType::BFloat16, 70, 1000, 12, false, 3);  // split-K over the padded K
}

// A bias of any float dtype with x of any float dtype: converted on the device once per call.
TEST(EmulatedCudaQgemm, BiasOfAnyFloatDtype) {
  for (DType dt : kDtypes)
    for (DType bdt : kDtypes)
      for (int64_t tokens : {1, 9}) check_qgemm(kQCases[3], dt, 37, 100, tokens, true, 0, bdt);
}

// dequantize of a partial last group: (N, K) with the padding dropped, bit for bit the CPU's.
TEST(EmulatedCudaQgemm, DequantizePartialBitExact) {
  const int64_t rows = 7;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  for (int64_t cols : {1, 33, 100, 1000}) {
    std::vector<float> w(size_t(rows * cols));
    for (auto& v : w) v = nd(rng);
    for (const QCase& qc : kQCases)
      for (DType dt : kDtypes) {
        SCOPED_TRACE(qc.name() + " " + dtype_name(dt) + " cols " + std::to_string(cols));
        const QuantizedMatrix qm = quantize(TensorView(w.data(), DType::Float32, {rows, cols}), qc.format,
                                            {qc.group_size, qc.double_quant});
        Buffer want(dt, w.size()), got(dt, w.size());
        want.poison(), got.poison();
        dequantize(qm, TensorView(want.bytes.data(), dt, {rows, cols}));
        DeviceCopy dout(got.bytes.data(), got.bytes.size());
        dequantize(qm.to(kCuda), TensorView(dout.ptr, dt, {rows, cols}, kCuda));
        dout.copy_to(got.bytes.data());
        EXPECT_EQ(got.bytes, want.bytes);
      }
  }
}

// Split-K partials are added in a fixed order (issue 15 #8): the same bits on every run, whatever
// order the blocks run in (several workers, shuffled thread orders).
TEST(EmulatedCudaQgemm, SplitKIsDeterministic) {
  const int64_t rows = 20, cols = 2048, tokens = 6;
  std::mt19937 rng(5);
  std::vector<float> w(size_t(rows * cols));
  std::normal_distribution<float> nd;
  for (auto& v : w) v = nd(rng) * 3.0f;
  const QuantizedMatrix dqm = quantize(TensorView(w.data(), DType::Float32, {rows, cols}), QuantFormat::Int4, {32, false}).to(kCuda);
  Buffer x = random_buffer(DType::Float16, size_t(tokens * cols), rng);
  DeviceCopy dx(x.bytes.data(), x.bytes.size());
  std::vector<std::vector<unsigned char>> results;
  for (int run = 0; run < 6; ++run) {
    Buffer out(DType::Float16, size_t(tokens * rows));
    out.poison();
    DeviceCopy dout(out.bytes.data(), out.bytes.size());
    if (run % 2) setenv("MKEMU_SEED", std::to_string(run).c_str(), 1);
    qgemm(TensorView(dx.ptr, DType::Float16, {tokens, cols}, kCuda), dqm, nullptr,
          TensorView(dout.ptr, DType::Float16, {tokens, rows}, kCuda));
    unsetenv("MKEMU_SEED");
    dout.copy_to(out.bytes.data());
    results.push_back(out.bytes);
  }
  for (size_t i = 1; i < results.size(); ++i) EXPECT_EQ(results[i], results[0]) << "run " << i;
}

// dequantize on the GPU is bit for bit the CPU's, every format and dtype.
TEST(EmulatedCudaQgemm, DequantizeBitExact) {
  const int64_t rows = 19, cols = 256;
  std::mt19937 rng(3);
  std::vector<float> w(size_t(rows * cols));
  std::normal_distribution<float> nd;
  for (auto& v : w) v = nd(rng);
  for (const QCase& qc : kQCases)
    for (DType dt : kDtypes) {
      SCOPED_TRACE(qc.name() + " " + dtype_name(dt));
      const QuantizedMatrix qm = quantize(TensorView(w.data(), DType::Float32, {rows, cols}), qc.format,
                                          {qc.group_size, qc.double_quant});
      Buffer want(dt, w.size()), got(dt, w.size());
      want.poison(), got.poison();
      dequantize(qm, TensorView(want.bytes.data(), dt, {rows, cols}));
      DeviceCopy dout(got.bytes.data(), got.bytes.size());
      dequantize(qm.to(kCuda), TensorView(dout.ptr, dt, {rows, cols}, kCuda));
      dout.copy_to(got.bytes.data());
      EXPECT_EQ(got.bytes, want.bytes);
    }
}

// K-quant super-block formats (q4_k / q5_k / q6_k): qgemm against the CPU backend (its exact path)
// at several token counts and dtypes, and dequantize bit for bit.
TEST(EmulatedCudaQgemm, KQuants) {
  for (QuantFormat f : {QuantFormat::Q4K, QuantFormat::Q5K, QuantFormat::Q6K}) {
    const QCase qc{f, 0, false};
    for (DType dt : kDtypes)
      for (int64_t tokens : {1, 3, 6}) check_qgemm(qc, dt, 19, 512, tokens, tokens != 3);
    check_qgemm(qc, DType::Float32, 37, 768, 9, true);
    const int64_t rows = 11, cols = 512;
    std::mt19937 rng{uint32_t(int(f))};
    std::vector<float> w(size_t(rows * cols));
    std::normal_distribution<float> nd;
    for (auto& v : w) v = nd(rng);
    const QuantizedMatrix qm = quantize(TensorView(w.data(), DType::Float32, {rows, cols}), f);
    for (DType dt : kDtypes) {
      SCOPED_TRACE(qc.name() + " dequantize " + dtype_name(dt));
      Buffer want(dt, w.size()), got(dt, w.size());
      want.poison(), got.poison();
      dequantize(qm, TensorView(want.bytes.data(), dt, {rows, cols}));
      DeviceCopy dout(got.bytes.data(), got.bytes.size());
      dequantize(qm.to(kCuda), TensorView(dout.ptr, dt, {rows, cols}, kCuda));
      dout.copy_to(got.bytes.data());
      EXPECT_EQ(got.bytes, want.bytes);
    }
  }
}

// ---------------------------------------------------------------- SpMM

void check_spmm(SparseFormat f, DType vdt, DType xdt, int64_t rows, int64_t cols, int64_t tokens, double sparsity) {
  SCOPED_TRACE(std::string(sparse_format_name(f)) + " values " + dtype_name(vdt) + " x " + dtype_name(xdt) + " " +
               std::to_string(rows) + "x" + std::to_string(cols) + " tokens " + std::to_string(tokens));
  std::mt19937 rng(uint32_t(rows * 31 + cols + tokens));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), p(0.0f, 1.0f);
  std::vector<float> w(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      w[size_t(r * cols + c)] = (p(rng) < sparsity || (f == SparseFormat::Semi24 && c % 4 >= 2)) ? 0.0f : u(rng);
  SparseMatrix sp = SparseMatrix::from_dense(TensorView(w.data(), DType::Float32, {rows, cols}), f, vdt);
  SparseMatrix dsp = sp.to(kCuda);
  Buffer x = random_buffer(xdt, size_t(tokens * cols), rng), out_cpu(xdt, size_t(tokens * rows)), out(xdt, out_cpu.size());
  out_cpu.poison(), out.poison();
  spmm(sp, TensorView(x.bytes.data(), xdt, {tokens, cols}), TensorView(out_cpu.bytes.data(), xdt, {tokens, rows}));
  DeviceCopy dx(x.bytes.data(), x.bytes.size()), dout(out.bytes.data(), out.bytes.size());
  spmm(dsp, TensorView(dx.ptr, xdt, {tokens, cols}, kCuda), TensorView(dout.ptr, xdt, {tokens, rows}, kCuda));
  dout.copy_to(out.bytes.data());
  // Same values, fp32 accumulation in another order: the output dtype's rounding and a little more.
  const float tol = xdt == DType::Float32 ? 1e-4f : xdt == DType::Float16 ? 3e-3f : 2e-2f;
  expect_close(out, out_cpu, tol, "spmm out");
}

TEST(EmulatedCudaSpmm, AllFormatsValueAndActivationDtypes) {
  const DType vdts[] = {DType::Float32, DType::Float16, DType::BFloat16, DType::Int8};
  for (SparseFormat f : {SparseFormat::Bitmap, SparseFormat::Semi24, SparseFormat::CSR})
    for (DType vdt : vdts)
      for (DType xdt : kDtypes) check_spmm(f, vdt, xdt, 37, 131, 5, 0.7);
}

TEST(EmulatedCudaSpmm, TokenCountsAndTails) {
  // 1, 2, 4, 8 tokens per warp pass, with tails; rows not a multiple of 8; cols past a 64-column tile.
  for (int64_t tokens : {1, 2, 3, 4, 7, 8, 9, 17})
    for (SparseFormat f : {SparseFormat::Bitmap, SparseFormat::CSR}) check_spmm(f, DType::Float32, DType::Float32, 21, 70, tokens, 0.6);
  check_spmm(SparseFormat::Bitmap, DType::Float16, DType::Float32, 8, 64, 1, 0.0);   // dense, exactly one tile
  check_spmm(SparseFormat::Bitmap, DType::Float32, DType::Float32, 9, 200, 3, 0.99);  // almost empty rows
  check_spmm(SparseFormat::Semi24, DType::Float16, DType::BFloat16, 19, 66, 4, 0.3); // padding columns
}

// ---------------------------------------------------------------- weight store (issue 15 #6)

// The store's host-to-device copies run on its own copy stream. Under lazy streams (copies run only
// once something orders them: see mkemu/streams.h) each of these fails when its ordering is missing:
//  - the caller's stream not waiting on the copies' event: the read-back sees the memset, not the rows;
//  - the copy stream not waiting on work enqueued on the caller's stream before the call (a memset of
//    out here): that memset runs after the copies and wipes them;
//  - a pinned gather / staging buffer refilled before the copy reading it ran: rows of a later chunk;
//  - the copies enqueued on the caller's stream itself: cudaStreamQuery(stream) reports pending work.
struct LazyStreams {
  LazyStreams() { mkemu::set_lazy_streams(true); }
  ~LazyStreams() { mkemu::set_lazy_streams(false); }
};

struct StoreFile {
  std::string path;
  int64_t neurons = 300, d_model = 64;
  std::vector<float> gate, up, down, emb;
  StoreFile() {
    path = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") + "/mkemu_ws_" +
           std::to_string(::getpid()) + ".mkws";
    std::mt19937 rng(17);
    std::normal_distribution<float> nd;
    for (auto* v : {&gate, &up, &down}) {
      v->resize(size_t(neurons * d_model));
      for (auto& x : *v) x = nd(rng);
    }
    emb.resize(50000);
    for (auto& x : emb) x = nd(rng);
    WeightStoreWriter w(path);
    w.add_tensor("emb", TensorView(emb.data(), DType::Float32, {int64_t(emb.size())}), 8192);  // 25 chunks
    TensorView g(gate.data(), DType::Float32, {neurons, d_model}), u(up.data(), DType::Float32, {neurons, d_model}),
        dn(down.data(), DType::Float32, {neurons, d_model});
    w.add_ffn_layer(0, &g, u, dn);
    w.finish();
  }
  ~StoreFile() { std::remove(path.c_str()); }
  // neuron i's bundle [gate | up | down] as stored
  void expect_rows(const std::vector<float>& got, const std::vector<int64_t>& ids) const {
    int bad = 0;
    for (size_t k = 0; k < ids.size() && bad < 5; ++k)
      for (int part = 0; part < 3; ++part) {
        const std::vector<float>& src = part == 0 ? gate : part == 1 ? up : down;
        for (int64_t j = 0; j < d_model; ++j) {
          const float want = src[size_t(ids[k] * d_model + j)], g = got[(k * 3 + size_t(part)) * size_t(d_model) + size_t(j)];
          if (!(g == want)) {
            ADD_FAILURE() << "row " << k << " (neuron " << ids[k] << ") part " << part << " [" << j << "]: " << g
                          << " instead of " << want;
            ++bad;
            break;
          }
        }
      }
  }
};

std::unique_ptr<WeightStore> open_cuda_store(const StoreFile& f) {
  WeightStoreOptions o;
  o.device = kCuda;
  o.io_threads = 1;
  // 256 KB: 32 KB staging and gather buffers (42 neurons each), so one get_rows of 150 neurons
  // refills each gather buffer twice, and get() of 25 chunks cycles both staging buffers.
  return WeightStore::open(f.path, 256 << 10, o);
}

TEST(EmulatedCudaWeightStore, GetRowsOrderedByEventsOnTheCopyStream) {
  StoreFile f;
  LazyStreams lazy;
  auto st = open_cuda_store(f);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  std::mt19937 rng(3);
  for (int round = 0; round < 3; ++round) {  // cold, then partly cached
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<int64_t> ids(150);
    for (auto& i : ids) i = int64_t(rng() % uint32_t(f.neurons));
    const size_t bytes = ids.size() * 3 * size_t(f.d_model) * 4;
    void* out = device_malloc(kCuda, bytes);
    ASSERT_EQ(cudaMemsetAsync(out, 0xff, bytes, nullptr), cudaSuccess);  // NaN, done now (legacy stream)
    // work on the caller's stream before the call that writes out: the copies must come after it
    ASSERT_EQ(cudaMemsetAsync(out, 0, bytes, s), cudaSuccess);
    st->get_rows(0, ids.data(), int64_t(ids.size()), TensorView(out, DType::Float32, {int64_t(ids.size()), 3, f.d_model}, kCuda), s);
    // the copies went to the store's stream: the caller's holds no work of the store
    EXPECT_EQ(cudaStreamQuery(s), cudaSuccess);
    // a read on the caller's stream (into pageable memory: complete on return) sees the rows
    std::vector<float> got(bytes / 4, -1.0f);
    ASSERT_EQ(cudaMemcpyAsync(got.data(), out, bytes, cudaMemcpyDeviceToHost, s), cudaSuccess);
    f.expect_rows(got, ids);
    device_free(kCuda, out);
    st->next_token();
  }
  cudaStreamDestroy(s);
}

TEST(EmulatedCudaWeightStore, GetRowsOnTheLegacyStream) {
  StoreFile f;
  LazyStreams lazy;
  auto st = open_cuda_store(f);
  std::vector<int64_t> ids(120);
  for (size_t k = 0; k < ids.size(); ++k) ids[k] = int64_t((k * 37) % size_t(f.neurons));
  const size_t bytes = ids.size() * 3 * size_t(f.d_model) * 4;
  void* out = device_malloc(kCuda, bytes);
  st->get_rows(0, ids.data(), int64_t(ids.size()), TensorView(out, DType::Float32, {int64_t(ids.size()), 3, f.d_model}, kCuda),
               nullptr);
  // a synchronous copy waits for the legacy stream only (the copy stream is non-blocking): the
  // legacy stream's wait on the copies' event is what makes the rows visible
  std::vector<float> got(bytes / 4, -1.0f);
  device_memcpy(got.data(), Device{}, out, kCuda, bytes);
  f.expect_rows(got, ids);
  device_free(kCuda, out);
}

TEST(EmulatedCudaWeightStore, GetTensorOrderedByEventsOnTheCopyStream) {
  StoreFile f;
  LazyStreams lazy;
  auto st = open_cuda_store(f);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  const size_t bytes = f.emb.size() * 4;
  for (int round = 0; round < 2; ++round) {
    void* out = device_malloc(kCuda, bytes);
    ASSERT_EQ(cudaMemsetAsync(out, 0, bytes, s), cudaSuccess);
    st->get("emb", TensorView(out, DType::Float32, {int64_t(f.emb.size())}, kCuda), s);
    EXPECT_EQ(cudaStreamQuery(s), cudaSuccess);
    std::vector<float> got(f.emb.size(), -1.0f);
    ASSERT_EQ(cudaMemcpyAsync(got.data(), out, bytes, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(got, f.emb) << "round " << round;
    device_free(kCuda, out);
  }
  cudaStreamDestroy(s);
}

}  // namespace
