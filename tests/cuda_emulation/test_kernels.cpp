// The library's CUDA kernels (cuda/attention.cu, cuda/spmm.cu) run on the emulated device through
// the normal C++ API, with the cases of their CPU tests, against the CPU backend on the same
// inputs (which tests/cpp and tests/python check against float64 references). Outputs are poisoned
// with NaN first: a kernel that writes nothing (e.g. a body compiled out) fails.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "memkernels/memkernels.h"

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

// max_q_hint: the max_seqlen_q passed on (0: the true maximum).
void check_varlen(DType dt, const std::vector<int>& lq, const std::vector<int>& lk, int h, int hkv, int d,
                  const AttentionOptions& o, int max_q_hint = 0) {
  SCOPED_TRACE(std::string("varlen ") + dtype_name(dt) + " d " + std::to_string(d));
  std::vector<int32_t> cq{0}, ck{0};
  for (size_t i = 0; i < lq.size(); ++i) cq.push_back(cq.back() + lq[i]), ck.push_back(ck.back() + lk[i]);
  const int tq = cq.back(), tk = ck.back();
  std::mt19937 rng(uint32_t(tq + tk + d));
  Buffer q = random_buffer(dt, size_t(tq) * h * d, rng), k = random_buffer(dt, size_t(tk) * hkv * d, rng),
         v = random_buffer(dt, size_t(tk) * hkv * d, rng);
  const int64_t bsz = int64_t(lq.size()) + 1;
  Buffer out_cpu(dt, q.size()), lse_cpu(DType::Float32, size_t(h) * tq);
  out_cpu.poison(), lse_cpu.poison();
  TensorView tl_cpu(lse_cpu.bytes.data(), DType::Float32, {h, tq});
  flash_attention_varlen(TensorView(q.bytes.data(), dt, {tq, h, d}), TensorView(k.bytes.data(), dt, {tk, hkv, d}),
                         TensorView(v.bytes.data(), dt, {tk, hkv, d}), TensorView(cq.data(), DType::Int32, {bsz}),
                         TensorView(ck.data(), DType::Int32, {bsz}), TensorView(out_cpu.bytes.data(), dt, {tq, h, d}), &tl_cpu, o);
  DeviceCopy dq(q.bytes.data(), q.bytes.size()), dk(k.bytes.data(), k.bytes.size()), dv(v.bytes.data(), v.bytes.size());
  DeviceCopy dcq(cq.data(), cq.size() * 4), dck(ck.data(), ck.size() * 4);
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
                         max_q);
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

}  // namespace
