// flash_attention / flash_attention_varlen: argument checks, then the CPU or CUDA backend.
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_internal.h"

// check() that builds its message only on failure: these checks run on every kernel call, and an
// eager std::string (a malloc for most messages) was a visible part of a decode-sized call.
#define CHECK_LAZY(ok, kind, msg)       \
  do {                                  \
    if (!(ok)) throw_error(kind, msg);  \
  } while (0)

namespace memkernels {
namespace {

std::string str(int64_t x) { return std::to_string(x); }

void fill_options(AttentionProblem& p, const AttentionOptions& o) {
  if (p.head_dim <= 0)
    throw_error(ErrorKind::Value, "flash_attention: head_dim must be > 0, got " + str(p.head_dim));
  CHECK_LAZY(p.kv_heads > 0 && p.heads > 0, ErrorKind::Value, "flash_attention: heads and kv_heads must be > 0");
  if (p.heads % p.kv_heads != 0)
    throw_error(ErrorKind::Value, "flash_attention: q heads (" + str(p.heads) + ") must be a multiple of k/v heads (" +
                                      str(p.kv_heads) + ")");
  CHECK_LAZY(std::isfinite(o.scale) && o.scale >= 0.0f, ErrorKind::Value,
             "flash_attention: scale must be finite and >= 0 (0: 1/sqrt(head_dim)), got " + std::to_string(o.scale));
  CHECK_LAZY(std::isfinite(o.softcap) && o.softcap >= 0.0f, ErrorKind::Value,
             "flash_attention: softcap must be finite and >= 0 (0 disables it), got " + std::to_string(o.softcap));
  p.scale = o.scale > 0.0f ? o.scale : 1.0f / std::sqrt(float(p.head_dim));
  p.causal = o.causal;
  p.window_left = o.window_left < 0 ? -1 : o.window_left;
  p.window_right = o.window_right < 0 ? -1 : o.window_right;
  if (o.causal) p.window_right = 0;  // causal == no key to the right of the diagonal
  p.softcap = o.softcap;
}

// Shared checks of q/k/v/out whose last three dims are (rows, heads, head_dim).
void check_qkv(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, int ndim) {
  const char* names[] = {"q", "k", "v", "out"};
  const TensorView* ts[] = {&q, &k, &v, &out};
  for (int i = 0; i < 4; ++i) {
    expect_ndim(*ts[i], names[i], ndim);
    expect_dtype(*ts[i], names[i], {DType::Float32, DType::Float16, DType::BFloat16});
    expect_last_dim_contiguous(*ts[i], names[i]);
    expect_not_null(*ts[i], names[i]);
    expect_same_device(*ts[i], names[i], q, "q");
  }
  for (int i = 1; i < 4; ++i)
    if (ts[i]->dtype != q.dtype)
      throw_error(ErrorKind::Type, std::string(names[i]) + " has dtype " + dtype_name(ts[i]->dtype) + " but q has " +
                                       dtype_name(q.dtype) + "; q, k, v and out must share one dtype");
  if (!(k.ndim == v.ndim && std::equal(k.shape, k.shape + ndim, v.shape)))
    throw_error(ErrorKind::Value, "k " + k.shape_str() + " and v " + v.shape_str() + " must have the same shape");
  if (k.size(-1) != q.size(-1))
    throw_error(ErrorKind::Value,
                "head_dim of k (" + str(k.size(-1)) + ") differs from q (" + str(q.size(-1)) + ")");
  if (!std::equal(out.shape, out.shape + ndim, q.shape))
    throw_error(ErrorKind::Value, "out: expected the shape of q " + q.shape_str() + ", got " + out.shape_str());
  if (q.size(-1) <= 0) throw_error(ErrorKind::Value, "q: head_dim must be > 0");
  // The problem description holds sizes as int: larger ones (stride-0 views) would wrap.
  const char* dim_names[] = {"batch", "seq", "heads", "head_dim"};
  for (int i = 0; i < 2; ++i)
    for (int d = 0; d < ndim; ++d)
      if (ts[i]->size(d) > INT32_MAX)
        throw_error(ErrorKind::Value, std::string(names[i]) + ": " + dim_names[d + 4 - ndim] + " = " +
                                          str(ts[i]->size(d)) + " is larger than 2^31 - 1");
  // The CPU kernel indexes rows in 32 bits per batch. (Messages are built only on failure: these
  // checks run on every call, and a decode-sized call costs a few microseconds in all.)
  if (!(q.size(-3) < (int64_t(1) << 30) && k.size(-3) < (int64_t(1) << 30)))
    throw_error(ErrorKind::Value, "sequence too long (>= 2^30 rows)");
}

// Checks keys.seqused_k / keys.key_mask and points p at them. `mask_shape`: the key mask's expected
// shape ((batch, seq_k), or (total_k,) for varlen). On the CPU seqused_k is copied to `used_copy`
// (the kernel reads the copy: the caller's array may change while it runs, see cu_seqlens below)
// and range-checked against the rows each batch element owns (p.seq_k(b) before seqused_k applies).
void fill_padding(AttentionProblem& p, const KeyPadding& keys, const TensorView& q, int64_t batch,
                  std::initializer_list<int64_t> mask_shape, std::vector<int32_t>& used_copy) {
  if (const TensorView* u = keys.seqused_k) {
    expect_ndim(*u, "seqused_k", 1);
    expect_dtype(*u, "seqused_k", {DType::Int32});
    expect_shape(*u, "seqused_k", {batch});
    expect_contiguous(*u, "seqused_k");
    expect_same_device(*u, "seqused_k", q, "q");
    expect_not_null(*u, "seqused_k");
    if (q.device.is_cpu()) {
      const int32_t* src = u->ptr<const int32_t>();
      used_copy.assign(src, src + batch);
      for (int b = 0; b < batch; ++b) {
        const int avail = p.seq_k(b);  // seqused_k not set yet: the rows batch b owns
        if (used_copy[b] < 0 || used_copy[b] > avail)
          throw_error(ErrorKind::Value, "seqused_k[" + str(b) + "] = " + str(used_copy[b]) + " is outside [0, " +
                                            str(avail) + "] (the " +
                                            (p.cu_seqlens_k ? "keys of sequence " + str(b) : std::string("seq_k of k")) +
                                            ")");
      }
      p.seqused_k = used_copy.data();
    } else {
      p.seqused_k = u->ptr<const int32_t>();  // CUDA: clamped by the kernel
    }
  }
  if (const TensorView* m = keys.key_mask) {
    const int nd = int(mask_shape.size());
    expect_ndim(*m, "key_mask", nd);
    expect_dtype(*m, "key_mask", {DType::Bool});
    expect_shape(*m, "key_mask", mask_shape);
    expect_same_device(*m, "key_mask", q, "q");
    expect_not_null(*m, "key_mask");
    p.key_mask = m->ptr<const uint8_t>();
    p.mask_batch = nd == 2 ? m->strides[0] : 0;
    p.mask_col = m->strides[nd - 1];
  }
}

void run(AttentionProblem& p, const Device& device, void* stream) {
  if (device.is_cuda()) {
    require_cuda_usable("flash_attention", device);
    p.device = device.index;
#if MEMKERNELS_WITH_CUDA
    cuda_backend::flash_attention(p, stream);
#endif
    return;
  }
  (void)stream;
  MK_CPU_DISPATCH(flash_attention, p);
}

}  // namespace

void flash_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                     const TensorView* lse, const AttentionOptions& opts, void* stream) {
  flash_attention(q, k, v, out, lse, opts, KeyPadding{}, stream);
}

void flash_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                     const TensorView* lse, const AttentionOptions& opts, const KeyPadding& keys, void* stream) {
  check_qkv(q, k, v, out, 4);
  if (k.size(0) != q.size(0))
    throw_error(ErrorKind::Value, "batch of k (" + str(k.size(0)) + ") differs from q (" + str(q.size(0)) + ")");
  AttentionProblem p;
  p.dtype = q.dtype;
  p.batch = int(q.size(0));
  p.seqlen_q = int(q.size(1));
  p.heads = int(q.size(2));
  p.head_dim = int(q.size(3));
  p.seqlen_k = int(k.size(1));
  p.kv_heads = int(k.size(2));
  fill_options(p, opts);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out = out.data;
  p.q_batch = q.strides[0], p.q_row = q.strides[1], p.q_head = q.strides[2];
  p.k_batch = k.strides[0], p.k_row = k.strides[1], p.k_head = k.strides[2];
  p.v_batch = v.strides[0], p.v_row = v.strides[1], p.v_head = v.strides[2];
  p.o_batch = out.strides[0], p.o_row = out.strides[1], p.o_head = out.strides[2];
  if (lse) {
    expect_dtype(*lse, "lse", {DType::Float32});
    expect_shape(*lse, "lse", {p.batch, p.heads, p.seqlen_q});
    expect_contiguous(*lse, "lse");
    expect_same_device(*lse, "lse", q, "q");
    p.lse = lse->ptr<float>();
    p.lse_batch = int64_t(p.heads) * p.seqlen_q;
    p.lse_head = p.seqlen_q;
  }
  std::vector<int32_t> used_copy;
  if (keys.seqused_k || keys.key_mask) fill_padding(p, keys, q, p.batch, {p.batch, p.seqlen_k}, used_copy);
  if (p.batch == 0 || p.seqlen_q == 0) return;
  run(p, q.device, stream);
}

void flash_attention_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k, const TensorView& out,
                            const TensorView* lse, const AttentionOptions& opts, int max_seqlen_q, void* stream) {
  flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, opts, KeyPadding{}, max_seqlen_q, stream);
}

void flash_attention_varlen(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k, const TensorView& out,
                            const TensorView* lse, const AttentionOptions& opts, const KeyPadding& keys,
                            int max_seqlen_q, void* stream) {
  check_qkv(q, k, v, out, 3);
  const char* cu_names[] = {"cu_seqlens_q", "cu_seqlens_k"};
  const TensorView* cus[] = {&cu_seqlens_q, &cu_seqlens_k};
  for (int i = 0; i < 2; ++i) {
    expect_ndim(*cus[i], cu_names[i], 1);
    expect_dtype(*cus[i], cu_names[i], {DType::Int32});
    expect_contiguous(*cus[i], cu_names[i]);
    expect_same_device(*cus[i], cu_names[i], q, "q");
  }
  CHECK_LAZY(cu_seqlens_q.size(0) <= INT32_MAX, ErrorKind::Value, "cu_seqlens_q: more than 2^31 - 1 entries");
  CHECK_LAZY(cu_seqlens_q.size(0) >= 1 && cu_seqlens_q.size(0) == cu_seqlens_k.size(0), ErrorKind::Value,
        "cu_seqlens_q " + cu_seqlens_q.shape_str() + " and cu_seqlens_k " + cu_seqlens_k.shape_str() +
            " must both have batch + 1 >= 1 entries");
  AttentionProblem p;
  p.dtype = q.dtype;
  p.batch = int(cu_seqlens_q.size(0)) - 1;
  p.heads = int(q.size(1));
  p.head_dim = int(q.size(2));
  p.kv_heads = int(k.size(1));
  fill_options(p, opts);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out = out.data;
  p.q_row = q.strides[0], p.q_head = q.strides[1];
  p.k_row = k.strides[0], p.k_head = k.strides[1];
  p.v_row = v.strides[0], p.v_head = v.strides[1];
  p.o_row = out.strides[0], p.o_head = out.strides[1];
  const int64_t total_q = q.size(0), total_k = k.size(0);
  if (lse) {
    expect_dtype(*lse, "lse", {DType::Float32});
    expect_shape(*lse, "lse", {p.heads, total_q});
    expect_contiguous(*lse, "lse");
    expect_same_device(*lse, "lse", q, "q");
    p.lse = lse->ptr<float>();
    p.lse_head = total_q;
  }
  p.total_q = total_q, p.total_k = total_k;
  p.cu_seqlens_q = cu_seqlens_q.ptr<const int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.ptr<const int32_t>();
  // CPU: the kernel reads a private copy of the offsets, validated below. The caller's arrays may
  // change while the kernel runs (another thread, the GIL released): reading them again after the
  // checks would let such a change move writes outside `out`.
  std::vector<int32_t> cu_copy[2], used_copy;
  if (q.device.is_cpu()) {
    for (int i = 0; i < 2; ++i) {
      const int32_t* src = cus[i]->ptr<const int32_t>();
      cu_copy[i].assign(src, src + cus[i]->size(0));
    }
    p.cu_seqlens_q = cu_copy[0].data();
    p.cu_seqlens_k = cu_copy[1].data();
    // Validate the offsets fully: they decide every address the kernel touches.
    const TensorView* totals_for[] = {&q, &k};
    for (int i = 0; i < 2; ++i) {
      const int32_t* cu = cu_copy[i].data();
      const int64_t total = totals_for[i]->size(0);
      CHECK_LAZY(cu[0] == 0, ErrorKind::Value, std::string(cu_names[i]) + "[0] must be 0, got " + str(cu[0]));
      for (int b = 0; b < p.batch; ++b)
        CHECK_LAZY(cu[b + 1] >= cu[b], ErrorKind::Value,
              std::string(cu_names[i]) + " must be non-decreasing, but entry " + str(b + 1) + " (" + str(cu[b + 1]) +
                  ") < entry " + str(b) + " (" + str(cu[b]) + ")");
      CHECK_LAZY(cu[p.batch] <= total, ErrorKind::Value,
            std::string(cu_names[i]) + "[-1] = " + str(cu[p.batch]) + " exceeds the " + str(total) +
                " rows of " + (i ? "k/v" : "q"));
    }
    if (keys.seqused_k || keys.key_mask) fill_padding(p, keys, q, p.batch, {total_k}, used_copy);
    int mq = 0, mk = 0;
    for (int b = 0; b < p.batch; ++b) {
      mq = std::max(mq, p.seq_q(b));
      mk = std::max(mk, p.seq_k(b));
    }
    p.seqlen_q = mq, p.seqlen_k = mk;
  } else {
    // CUDA: reading the offsets here would synchronise; the kernel clamps them to [0, total] itself,
    // and without max_seqlen_q the grid covers total_q rows per batch (idle blocks exit at once).
    p.seqlen_q = max_seqlen_q > 0 ? max_seqlen_q : int(total_q);
    p.seqlen_k = int(total_k);
    if (keys.seqused_k || keys.key_mask) fill_padding(p, keys, q, p.batch, {total_k}, used_copy);
  }
  if (p.batch == 0 || total_q == 0) return;
  run(p, q.device, stream);
}

}  // namespace memkernels
