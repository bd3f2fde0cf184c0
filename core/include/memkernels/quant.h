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
// Rows follow each other (row stride = K_pad * bits / 8 bytes, K_pad below). Then, each section
// 64-byte aligned:
// scales fp32 [N][groups]; zeros uint8 [N][groups] (asymmetric only); mins fp32 [N][groups]
// (int4_min only); for nf4 + double_quant the scales section is replaced by int8 codes [N * groups]
// and fp32 steps [ceil(N * groups / 256)].
// Any in_features K >= 1 is accepted. The codes are stored padded to K_pad columns (padded_cols()):
// K rounded up to whole groups (grouped formats: a multiple of group_size), or to whole 32-weight
// chunks (per-channel int8). The pad columns hold the code of 0 (0 for int8, 2^(b-1) for the
// symmetric formats, the group's zero point for int4/3/2, the NF4 level 0; code 0, i.e. the group
// minimum, for int4_min, which has no exact 0); the last group's scale / zero / min come from its
// K - (groups - 1) * group_size real weights only. cols() stays K: qgemm takes x (tokens, K) and
// hands the kernel a zero-padded copy (tokens, K_pad) when K != K_pad (so the pad weights multiply
// exact zeros whatever they are), dequantize returns (N, K) with the padding dropped, pack_quantized
// takes codes (N, K) and scales (N, ceil(K / group_size)). The kernels only ever see K_pad.
//
// CPU row-interleaved layout (issue 14). On the CPU, int4 / int4_sym / int4_min / int8 / int3 /
// int3_sym / int2 / int2_sym / nf4 (not with double_quant) and the K-quant matrices (on CPUs with
// AVX512-VNNI) keep the same sections and sizes but permute their bytes so that one decode step is a single stream of
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
// K-quants (q4_k / q5_k / q6_k, below), on CPUs with AVX512-VNNI only (quant_cpu_interleaved(); their
// AVX2 and exact kernels read the documented rows), use the same blocks of R rows with the super-block (bits * 32
// bytes per row) in place of the chunk: super-block b of the block takes R * bits * 32 bytes at
// offset b * R * bits * 32, piece j (bytes 4j .. 4j+3 of each row's super-block, j < bits * 8) holding
// row r's 4 bytes at j * R * 4 + r * 4 (so q5_k's bit-4 bytes and q6_k's bits-4-5 bytes are pieces
// 32 .. of the same block). Their sub-scales take b * R * 16 bytes into the block's part of the
// section ([n0 * SB * 16, (n0 + R) * SB * 16), SB = K / 256), byte j of row r at j * R + r, except
// q4_k / q5_k's mins m_0..7: pairs (m_2i, m_2i+1) of row r at 8R + 2R * i + 2r; the super-scales take
// b * R * 2 fp16 values, d of row r at r and dmin at R + r.
// Scales (and mins) may have any sign and may be 0 (GGUF's block scales d can be negative or zero);
// they must be finite. quantize() itself only produces scales >= 0.
//
// Serialised form (little-endian): a 64-byte header {magic "MKQM", version u32 (1 or 2), format u8,
// double_quant u8, 2 reserved, rows i64, cols i64, group_size i32, scale_offset f32, payload
// bytes u64, 16 reserved}, the payload (the buffer above), then an FNV-1a 64-bit checksum of
// header and payload. Any truncation, bad field or checksum mismatch raises Error(CorruptData).
// Version 1 covers every format here: group-wise int8 is int8 with group_size < cols, int4_min is
// format id 8 (a reader that predates it refuses the id; files it wrote still load here).
// Version 2 is written only for a partial last group (K != K_pad): the same header with cols = the
// logical K, and the payload in the padded layout above. A matrix with whole groups is still written
// as version 1, byte for byte as before, so older readers load it; an older reader refuses a version-2
// file by its version number. This build reads both (a version-1 header with a partial group is
// corrupt).
// Format ids: int4_min is 8; q4_k / q5_k / q6_k are 9 / 10 / 11 (a reader that predates an id
// refuses it; files it wrote still load here).
//
// K-quant super-block formats (GGUF Q4_K / Q5_K / Q6_K semantics; group_size is the super-block,
// 256, and K must be a multiple of 256: other K raise Error(Value) naming the sizes):
//   q4_k  per 256 weights: fp16 d and dmin, 8 sub-blocks j of 32 weights with 6-bit sc_j and m_j:
//         w = float32(float32(d * sc_j) * q) - float32(dmin * m_j), q in [0, 16)
//   q5_k  the same with q in [0, 32)
//   q6_k  per 256 weights: fp16 d, 16 sub-blocks j of 16 weights with int8 sc_j:
//         w = float32(d * sc_j) * (q - 32), q in [0, 64)
// Every product above is exact in float32 (11-bit d times integers), so the value is the one GGUF
// readers compute, bit for bit, whatever the order or fusion. quantize(): per sub-block a search
// over (scale, min) candidates (see quant_kquant.cpp) keeps the one of least squared error; the
// candidates include the plain round-to-nearest choice that covers the sub-block's range, so each
// sub-block's RMS error is at most half its plain step: (range_j + dmin) / qmax + d for q4_k/q5_k
// (range_j = max - min(min, 0), qmax = 15 / 31), amax_j / 31 + d for q6_k.
// K-quant layout: codes (row_bytes = K * bits / 8, bits = 4 / 5 / 6), then two sections, each
// 64-byte aligned: sub-scales uint8 [N][K/256][16] (q4_k/q5_k: sc_0..7 then m_0..7; q6_k: int8
// sc_0..15) and super-scales fp16 [N][K/256][2] (d, dmin; q6_k: d, 0). Per super-block the codes are
//   bytes 0-127: the 4-bit chunk layout above for the low 4 bits (weight 32c + i in chunk c, byte
//                16c + i % 16, low nibble for i < 16): a 64-byte load is 4 sub-blocks of 32.
//   q5_k: + 32 bytes of bit 4: for half h (chunks 4h..4h+3, nibble bytes 64h..64h+63) a uint64
//         whose bit j is bit 4 of the low-nibble weight of byte 64h + j, then one for the high nibbles
//         (an AVX-512 mask register each).
//   q6_k: + 64 bytes of bits 4-5: for half h, 32 bytes; byte j holds those bits of the low-nibble
//         weight of byte 64h + j (bits 0-1), of byte 64h + 32 + j (bits 2-3), and of the high-nibble
//         weights of the same two bytes (bits 4-5, 6-7).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "memkernels/tensor.h"

namespace memkernels {

enum class QuantFormat : uint8_t { Int8 = 0, Int4, Int4Sym, Int3, Int3Sym, Int2, Int2Sym, NF4, Int4Min, Q4K, Q5K, Q6K };
constexpr int kNumQuantFormats = 12;

const char* quant_format_name(QuantFormat f);       // "int8", "int4", "int4_sym", ..., "nf4", "int4_min"
QuantFormat parse_quant_format(const std::string& name);  // throws Error(Value) for an unknown name
int quant_bits(QuantFormat f);
bool quant_is_asymmetric(QuantFormat f);               // has zero points
bool quant_has_mins(QuantFormat f);                    // has float minimums (int4_min)
bool quant_is_kquant(QuantFormat f);                   // q4_k / q5_k / q6_k (256-weight super-blocks)
constexpr int kKQuantBlock = 256;                      // weights per K-quant super-block
bool quant_cpu_interleaved(QuantFormat f);             // uses the CPU row-interleaved layout (int8/4/3/2*, nf4;
                                                       // K-quants on CPUs with AVX512-VNNI)
constexpr int kInterleaveRows = 16;                    // rows per block of that layout (a power of two)
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
  int64_t cols() const { return cols_; }  // in_features (logical K)
  int64_t padded_cols() const { return padded_cols_; }  // K_pad: the stored columns (see above)
  int group_size() const { return group_size_; }  // per-channel int8: cols()
  int64_t groups() const { return group_size_ ? (cols_ + group_size_ - 1) / group_size_ : 0; }  // per row
  bool double_quant() const { return double_quant_; }
  float scale_offset() const { return scale_offset_; }
  Device device() const { return device_; }
  bool empty() const { return !buf_; }
  // True for a CPU matrix in the row-interleaved layout (see above); false on CUDA and for the
  // matrices that keep the documented layout on the CPU (nf4 with double_quant, the K-quants).
  bool interleaved() const { return interleaved_; }

  // Section pointers into the buffer (on device()); null when the format has no such section. In
  // the order of the layout in use (interleaved() permutes them; canonical() gives the documented one).
  const uint8_t* codes() const { return at(off_codes_); }
  const float* scales() const { return reinterpret_cast<const float*>(at(off_scales_)); }
  const uint8_t* zeros() const { return at(off_zeros_); }
  const float* mins() const { return reinterpret_cast<const float*>(at(off_mins_)); }
  const int8_t* scale_codes() const { return reinterpret_cast<const int8_t*>(at(off_scale_codes_)); }
  const float* scale_steps() const { return reinterpret_cast<const float*>(at(off_scale_steps_)); }
  // K-quants: uint8 [N][K/256][16] sub-scales and fp16 bits [N][K/256][2] super-scales (null otherwise).
  const uint8_t* sub_scales() const { return at(off_sub_scales_); }
  const uint16_t* super_scales() const { return reinterpret_cast<const uint16_t*>(at(off_super_scales_)); }
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
  int64_t rows_ = 0, cols_ = 0, padded_cols_ = 0;
  int group_size_ = 0;
  bool double_quant_ = false;
  bool interleaved_ = false;
  float scale_offset_ = 0.0f;
  Device device_{};
  std::shared_ptr<void> buf_;
  size_t bytes_ = 0;
  size_t off_codes_ = kNone, off_scales_ = kNone, off_zeros_ = kNone, off_scale_codes_ = kNone,
         off_scale_steps_ = kNone, off_mins_ = kNone, off_sub_scales_ = kNone, off_super_scales_ = kNone;
};

// Round-to-nearest quantization of w (N, K) float32/float16/bfloat16 on the CPU, rows contiguous.
QuantizedMatrix quantize(const TensorView& w, QuantFormat format, const QuantOptions& opts = {});

// Packs given codes into a QuantizedMatrix (for external quantizers such as GPTQ, and importers of
// GGUF blocks): codes (N, K) uint8 holding each weight's code q (int8: the signed value, as int8 or
// uint8 bits, any of the 256), scales (N, groups) float32 with groups = ceil(K / group_size) (the
// pad columns get the code of 0, as in quantize()), finite, of any sign and possibly 0,
// zeros (N, groups) uint8 for the asymmetric formats, mins (N, groups) float32 finite for int4_min
// (null otherwise), all contiguous on the CPU. Codes and zeros must lie in [0, 2^bits). Scales and
// mins are stored bit for bit. nf4 with opts.double_quant quantizes the scales as quantize() does.
QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const TensorView* mins, const QuantOptions& opts = {});
// The same without mins (every format but int4_min).
QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const QuantOptions& opts = {});

// Packs GGUF Q4_K / Q5_K / Q6_K blocks losslessly into q4_k / q5_k / q6_k: blocks (N, K / 256 *
// block bytes) uint8, contiguous on the CPU, the tensor's rows of GGUF blocks as stored in the file
// (144, 176, 210 bytes per block). d / dmin must be finite fp16 (Error(Value) naming the row and
// block otherwise); sub-scales and codes are taken bit for bit.
QuantizedMatrix pack_gguf_kquant(QuantFormat format, const TensorView& blocks, int64_t cols);
int gguf_kquant_block_bytes(QuantFormat format);  // 144, 176, 210

// out (N, K) float32/float16/bfloat16, contiguous, on qm's device.
void dequantize(const QuantizedMatrix& qm, const TensorView& out, void* stream = nullptr);

struct QGemmOptions {
  // Quantize x to int8 on the fly and use integer dot products (AVX512-VNNI or AVX2): one scale per
  // token and block B of K, dx = max_{k in B} |x[t][k]| / 127 (1 for a block of zeros). The block
  // is the weight group (32, 64 or 128 weights; the group's float multiply takes s[n][g] * dx), 256
  // weights for per-channel int8 and the K-quants' super-block (choices measured in
  // bench/qgemm_quality.py --blocks and bench/qgemm_alternate.py --ab; one scale per token, as before,
  // let the outlier channels of LLM activations coarsen every x of the token). The zero-point,
  // symmetric-offset and min terms use the sums of the same int8 x per block. Honoured for int4 /
  // int4_sym / int4_min / int8 / int3 / int3_sym / int2 / int2_sym / nf4 (not double_quant) with 1 to
  // 64 tokens on CPUs with VNNI or AVX2 (MEMKERNELS_INT8_MAX_TOKENS=n in the environment: up to n
  // tokens, a measuring knob); ignored elsewhere (more tokens, nf4 with double_quant, CUDA: the exact
  // path runs, or the bf16 prefill below). q4_k / q5_k / q6_k follow the same rules with the same bound
  // (AVX512-VNNI vpdpbusd on the row-interleaved layout: exact integer sub-block dots, each times
  // d * sc_j in fp32; AVX2 vpmaddubsw: integer sub-block dots times integer sub-scales summed per
  // super-block, one float multiply per super-block; both times dx of the super-block).
  // Error bound against the exact path, for output n of token t (w = the dequantized weights):
  //     |y_int8[t][n] - y_exact[t][n]| <= sum_B (sum_{k in B} |w[n][k]|) * max_{k in B} |x[t][k]| / 254
  // (each x is rounded to the nearest multiple of its block's dx, so moves by at most half of it; the
  // integer sums are exact), plus fp32 rounding of the order of 1e-6 * sum_k |w[n][k] x[t][k]|.
  // nf4 multiplies int8 levels round(127 L) / 127 (at most e = 0.0037 from L for the NF4 levels), so
  // its bound has one more term, s the group scale of weight k, B(k) its x block:
  //     + e * sum_k |s[n][k]| * (|x[t][k]| + max_{B(k)} |x[t]| / 254)
  // (measured, 4096 x 4096 N(0, 1): it adds ~0.3% to nf4's own 9% error against the float weights).
  // tests/python/test_quant.py checks the bound for every format and ISA. The Python qgemm() turns
  // this on by default (exact=True turns it off); the C++ default stays the exact path.
  //
  // Prefill: on CPUs with AVX512-BF16, with this option on and from 32 tokens (the formats with the
  // int8 path above, K-quants excepted: they take the exact path beyond 64 tokens) or 12 tokens (nf4
  // with double_quant), each block of weight rows is dequantized
  // once per call and rounded to bf16, x is rounded to bf16 (round to nearest even), and the
  // products are summed in fp32 (vdpbf16ps; a product of two bf16 is exact in fp32). Bound against
  // the exact path, for output n of token t:
  //     |y_bf16[t][n] - y_exact[t][n]| <= (2^-7 + 2^-16) * sum_k |w[n][k] x[t][k]|
  // (bf16 keeps 8 significant bits: each factor moves by at most 2^-8 of itself), plus the fp32 summation error, at most
  // K * 2^-24 * sum_k |w[n][k] x[t][k]| (about 1e-6 of it in practice); magnitudes below 2^-126
  // count as 0 and x beyond the bf16 range becomes +-inf. tests/python/test_qgemm_prefill.py checks
  // it. Without AVX512-BF16 (and with exact activations) prefill runs the same dequantize-once
  // kernel in fp32, which is the exact path: exact up to fp32 summation order.
  bool int8_activations = false;
};

// out (tokens, N) = x (tokens, K) @ dequantize(qm)^T (+ bias (N,)), accumulated in fp32.
// x and out share one dtype (float32/float16/bfloat16) and qm's device; x and out rows must be
// contiguous in their last dimension. bias may be float32, float16 or bfloat16 whatever x's dtype:
// another dtype is converted to x's once per call (so it is rounded to x's precision, as out is).
// When K is not whole groups (K != qm.padded_cols()) x is copied once per call into a zero-padded
// (tokens, K_pad) scratch (on CUDA: stream-ordered memory, a memset and a 2-D copy on `stream`).
// stream: a cudaStream_t for CUDA (nullptr = default).
void qgemm(const TensorView& x, const QuantizedMatrix& qm, const TensorView* bias, const TensorView& out,
           void* stream = nullptr, const QGemmOptions& opts = {});

}  // namespace memkernels
