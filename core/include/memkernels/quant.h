// memkernels/quant.h — weight-only low-bit quantization and quantized matrix multiply.
//
// A weight matrix W (out_features N, in_features K) is stored in 2 to 8 bits per weight plus
// per-group scales; qgemm multiplies activations by it without ever materialising W in float.
//
// Formats and their dequantized value, for weight k of row n in group g = k / group_size:
//   int8      symmetric, per output channel (group_size = K, the default) or group-wise (32, 64,
//             128; GGUF Q8_0 is group 32): w = s[n][g] * int8(q), q any int8 value
//   int4/3/2  group-wise asymmetric: w = s[n][g] * (q - z[n][g]),  q, z in [0, 2^b)
//   int4_sym/int3_sym/int2_sym group-wise symmetric: w = s[n][g] * (q - 2^(b-1))
//   int4_min  group-wise with a float minimum (GGUF Q4_1 and Q4_K import losslessly):
//             w = s[n][g] * q + m[n][g], q in [0, 16), s and m fp32. quantize(): s = (max - min) / 15,
//             m = min of the group (s = 0 for a constant group). Dequantized exactly as
//             float32(float32(s * q) + m) (a product, then a sum: never fused), as GGUF readers do.
//   nf4       group-wise NormalFloat-4 (QLoRA): w = s[n][g] * NF4[q] with s = absmax of the group;
//             double_quant stores the scales as int8: s = scale_offset + step[j / 256] * c[j],
//             j = n * groups + g, one fp32 step per 256 scales.
// Round-to-nearest; int4/3/2 ranges always include 0 (so 0 is exact; int4_min's range is the
// group's own [min, max]), symmetric scales are absmax / (2^(b-1) - 1). Format ids in the header
// are the QuantFormat values. Bound on |w - dequantize(w)|: s / 2 (int formats), s * 0.152 (nf4, half
// the widest NF4 gap), plus the scale error for double_quant.
//
// Packed layout (CPU and CUDA share it; serialise writes it as is). Each row's K codes are cut
// into chunks of 32 consecutive weights, chunks stored one after the other:
//   8-bit: 32 bytes, byte i = weight i (int8).
//   4-bit: 16 bytes, byte i holds weight i in its low nibble and weight i + 16 in its high nibble
//          (so one 16-byte load unpacks into two contiguous runs of 16 with a mask and a shift).
//   2-bit: 8 bytes, byte i holds weights i, i + 8, i + 16, i + 24 at bits 0-1, 2-3, 4-5, 6-7.
//   3-bit: the 2-bit chunk of the low two bits (8 bytes) followed by a little-endian uint32 whose
//          bit i is bit 2 of weight i (12 bytes per 32 weights).
// Rows follow each other (row stride = K * bits / 8 bytes). Then, each section 64-byte aligned:
// scales fp32 [N][groups]; zeros uint8 [N][groups] (asymmetric only); mins fp32 [N][groups]
// (int4_min only); for nf4 + double_quant the scales section is replaced by int8 codes [N * groups]
// and fp32 steps [ceil(N * groups / 256)].
//
// CPU row-interleaved layout (issue 14). On the CPU, int4 / int4_sym / int4_min / int8 matrices keep
// the same sections and sizes but permute their bytes so that one decode step is a single stream of
// whole SIMD loads, each holding several output rows (interleaved() is true). Rows are cut into
// blocks of R = 16 (the last block: the rest, R = N mod 16). Block b (rows n0 = 16b .. n0 + R - 1)
// occupies the same bytes as its rows do in the layout above, [n0 * row_bytes, (n0 + R) * row_bytes),
// and there chunk c of its rows takes R * bits * 4 bytes at offset c * R * bits * 4, cut into
// pieces of 4 bytes: piece j (bytes 4j .. 4j+3 of each row's chunk above, j < bits) holds row r's
// 4 bytes at j * R * 4 + r * 4. So one 64-byte load is 4 bytes of 16 rows: with int8 x, an integer
// dot instruction (vpdpbusd / vpmaddubsw) leaves each row's partial sum in its own 32-bit lane and
// no shuffle or horizontal sum is needed until the end. The scales, zeros and mins of block b take
// [n0 * groups, (n0 + R) * groups) of their sections with (row n0 + r, group g) at n0 * groups +
// g * R + r: a 16-row scale vector is one contiguous load. The CUDA copy, serialize() and
// canonical() use the layout above (to() converts both ways), so files and GPU kernels never see it.
// K must be a multiple of group_size (32, 64 or 128) for the grouped formats and of 32 for
// per-channel int8 (whole chunks). No padding is done: another K raises Error(Value) naming the sizes.
// Scales (and mins) may have any sign and may be 0 (GGUF's block scales d can be negative or zero);
// they must be finite. quantize() itself only produces scales >= 0.
//
// Serialised form (little-endian): a 64-byte header {magic "MKQM", version u32 = 1, format u8,
// double_quant u8, 2 reserved, rows i64, cols i64, group_size i32, scale_offset f32, payload
// bytes u64, 16 reserved}, the payload (the buffer above), then an FNV-1a 64-bit checksum of
// header and payload. Any truncation, bad field or checksum mismatch raises Error(CorruptData).
// Version 1 covers every format here: group-wise int8 is int8 with group_size < cols, int4_min is
// format id 8 (a reader that predates it refuses the id; files it wrote still load here).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "memkernels/tensor.h"

namespace memkernels {

enum class QuantFormat : uint8_t { Int8 = 0, Int4, Int4Sym, Int3, Int3Sym, Int2, Int2Sym, NF4, Int4Min };
constexpr int kNumQuantFormats = 9;

const char* quant_format_name(QuantFormat f);       // "int8", "int4", "int4_sym", ..., "nf4", "int4_min"
QuantFormat parse_quant_format(const std::string& name);  // throws Error(Value) for an unknown name
int quant_bits(QuantFormat f);
bool quant_is_asymmetric(QuantFormat f);               // has zero points
bool quant_has_mins(QuantFormat f);                    // has float minimums (int4_min)
bool quant_cpu_interleaved(QuantFormat f);             // uses the CPU row-interleaved layout (int4*, int8)
constexpr int kInterleaveRows = 16;                    // rows per block of that layout
const float* nf4_codebook();                          // the 16 NF4 levels, ascending, in [-1, 1]

struct QuantOptions {
  int group_size = 0;         // 0: 128 for grouped formats, K for int8 (int8 accepts 0, K, 32, 64, 128)
  bool double_quant = false;  // nf4 only: int8-quantised scales
};

// An immutable quantized matrix owning one buffer (host or CUDA memory) in the layout above.
// Copies share the buffer.
class QuantizedMatrix {
 public:
  QuantizedMatrix() = default;

  QuantFormat format() const { return format_; }
  int64_t rows() const { return rows_; }  // out_features
  int64_t cols() const { return cols_; }  // in_features
  int group_size() const { return group_size_; }
  int64_t groups() const { return group_size_ ? cols_ / group_size_ : 0; }  // per row
  bool double_quant() const { return double_quant_; }
  float scale_offset() const { return scale_offset_; }
  Device device() const { return device_; }
  bool empty() const { return !buf_; }
  // True for a CPU matrix in the row-interleaved layout (see above); false on CUDA and for the
  // formats that keep the documented layout on the CPU (int3/int2/nf4).
  bool interleaved() const { return interleaved_; }

  // Section pointers into the buffer (on device()); null when the format has no such section. In
  // the order of the layout in use (interleaved() permutes them; canonical() gives the documented one).
  const uint8_t* codes() const { return at(off_codes_); }
  const float* scales() const { return reinterpret_cast<const float*>(at(off_scales_)); }
  const uint8_t* zeros() const { return at(off_zeros_); }
  const float* mins() const { return reinterpret_cast<const float*>(at(off_mins_)); }
  const int8_t* scale_codes() const { return reinterpret_cast<const int8_t*>(at(off_scale_codes_)); }
  const float* scale_steps() const { return reinterpret_cast<const float*>(at(off_scale_steps_)); }
  int64_t row_bytes() const;          // bytes of codes per row
  size_t nbytes() const { return bytes_; }  // whole buffer
  double bits_per_weight() const { return rows_ * cols_ ? 8.0 * double(bytes_) / double(rows_ * cols_) : 0.0; }

  // The effective fp32 scales [rows][groups] (decoded when double-quantised), on the host.
  std::vector<float> effective_scales() const;

  // A copy on another device (CPU <-> CUDA); the same object when already there.
  QuantizedMatrix to(const Device& device) const;

  // A CPU matrix in the documented (not interleaved) layout: this one when it already is, else a copy.
  QuantizedMatrix canonical() const;
  // Permutes a CPU matrix of an interleaving format into the row-interleaved layout in place (used
  // by quantize, pack_quantized, deserialize and to(); a no-op when already done or not applicable).
  void interleave();

  std::vector<uint8_t> serialize() const;  // works from any device (copies to host)
  static QuantizedMatrix deserialize(const void* data, size_t size);  // on the CPU
  void save(const std::string& path) const;
  static QuantizedMatrix load(const std::string& path);

  // Builds an empty matrix with its buffer allocated on `device` (used by quantize/deserialize).
  static QuantizedMatrix allocate(QuantFormat f, int64_t rows, int64_t cols, int group_size, bool double_quant,
                                  const Device& device = {});
  uint8_t* mutable_data() { return static_cast<uint8_t*>(buf_.get()); }
  const uint8_t* data() const { return static_cast<const uint8_t*>(buf_.get()); }
  void set_scale_offset(float v) { scale_offset_ = v; }

 private:
  QuantizedMatrix to_host_plain() const;  // a host copy, bytes as they are
  const uint8_t* at(size_t off) const { return off == kNone ? nullptr : data() + off; }
  static constexpr size_t kNone = ~size_t(0);
  QuantFormat format_ = QuantFormat::Int4;
  int64_t rows_ = 0, cols_ = 0;
  int group_size_ = 0;
  bool double_quant_ = false;
  bool interleaved_ = false;
  float scale_offset_ = 0.0f;
  Device device_{};
  std::shared_ptr<void> buf_;
  size_t bytes_ = 0;
  size_t off_codes_ = kNone, off_scales_ = kNone, off_zeros_ = kNone, off_scale_codes_ = kNone,
         off_scale_steps_ = kNone, off_mins_ = kNone;
};

// Round-to-nearest quantization of w (N, K) float32/float16/bfloat16 on the CPU, rows contiguous.
QuantizedMatrix quantize(const TensorView& w, QuantFormat format, const QuantOptions& opts = {});

// Packs given codes into a QuantizedMatrix (for external quantizers such as GPTQ, and importers of
// GGUF blocks): codes (N, K) uint8 holding each weight's code q (int8: the signed value, as int8 or
// uint8 bits, any of the 256), scales (N, groups) float32, finite, of any sign and possibly 0,
// zeros (N, groups) uint8 for the asymmetric formats, mins (N, groups) float32 finite for int4_min
// (null otherwise), all contiguous on the CPU. Codes and zeros must lie in [0, 2^bits). Scales and
// mins are stored bit for bit. nf4 with opts.double_quant quantizes the scales as quantize() does.
QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const TensorView* mins, const QuantOptions& opts = {});
// The same without mins (every format but int4_min).
QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const QuantOptions& opts = {});

// out (N, K) float32/float16/bfloat16, contiguous, on qm's device.
void dequantize(const QuantizedMatrix& qm, const TensorView& out, void* stream = nullptr);

struct QGemmOptions {
  // Quantize each token of x to int8 on the fly (one scale per token, max|x| / 127) and use integer
  // dot products (AVX512-VNNI or AVX2). Honoured for int4 / int4_sym / int4_min / int8 with 1 to 64
  // tokens on CPUs with VNNI or AVX2; ignored elsewhere (more tokens, other formats, CUDA: the exact
  // path runs).
  // Error bound against the exact path, for output n of token t (w = the dequantized weights):
  //     |y_int8[t][n] - y_exact[t][n]| <= sum_k |w[n][k]| * max_k |x[t][k]| / 254
  // (each x is rounded to the nearest multiple of max|x_t| / 127, so moves by at most half of it;
  // the integer sums are exact), plus fp32 rounding of the order of 1e-6 * sum_k |w[n][k] x[t][k]|.
  // tests/python/test_quant.py checks the bound for every format and ISA. The Python qgemm() turns
  // this on by default (exact=True turns it off); the C++ default stays the exact path.
  bool int8_activations = false;
};

// out (tokens, N) = x (tokens, K) @ dequantize(qm)^T (+ bias (N,)), accumulated in fp32.
// x, out and bias share one dtype (float32/float16/bfloat16) and qm's device; x and out rows must
// be contiguous in their last dimension. stream: a cudaStream_t for CUDA (nullptr = default).
void qgemm(const TensorView& x, const QuantizedMatrix& qm, const TensorView* bias, const TensorView& out,
           void* stream = nullptr, const QGemmOptions& opts = {});

}  // namespace memkernels
