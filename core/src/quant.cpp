// Quantized matrices: formats, buffer layout, round-to-nearest quantization, (de)serialisation,
// and the argument checks + dispatch of dequantize / qgemm.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "cpu/convert.h"
#include "quant_internal.h"

namespace memkernels {
namespace {

std::string str(int64_t x) { return std::to_string(x); }
std::string num(float x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", double(x));
  return buf;
}

// QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0).
constexpr float kNF4[16] = {-1.0f,
                            -0.6961928009986877f,
                            -0.5250730514526367f,
                            -0.39491748809814453f,
                            -0.28444138169288635f,
                            -0.18477343022823334f,
                            -0.09105003625154495f,
                            0.0f,
                            0.07958029955625534f,
                            0.16093020141124725f,
                            0.24611230194568634f,
                            0.33791524171829224f,
                            0.44070982933044434f,
                            0.5626170039176941f,
                            0.7229568362236023f,
                            1.0f};

constexpr const char* kNames[kNumQuantFormats] = {"int8", "int4", "int4_sym", "int3", "int3_sym",
                                                  "int2", "int2_sym", "nf4", "int4_min",
                                                  "q4_k", "q5_k", "q6_k"};

size_t align64(size_t x) { return (x + 63) / 64 * 64; }

// Serialised header: 64 bytes, little-endian (the library only builds for little-endian x86/ARM).
struct Header {
  char magic[4];
  uint32_t version;
  uint8_t format;
  uint8_t double_quant;
  uint8_t reserved0[2];
  int64_t rows;
  int64_t cols;
  int32_t group_size;
  float scale_offset;
  uint64_t payload_bytes;
  uint8_t reserved1[16];
};
static_assert(sizeof(Header) == 64, "header layout");
// Version 1: whole groups (cols == K_pad). Version 2: the same layout with a partial last group
// (cols < K_pad), written only then, so whole-group files stay readable by version-1 readers.
constexpr uint32_t kVersion = 1, kVersionPartial = 2;
constexpr size_t kDqBlock = 256;  // scales per double-quantisation step

uint64_t fnv1a(const uint8_t* p, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// Checks (format, sizes, group) and resolves group_size; throws `kind` (Value for user calls,
// CorruptData for deserialisation) with a message naming what is wrong.
int resolve_group(QuantFormat f, int64_t rows, int64_t cols, int group_size, bool double_quant, ErrorKind kind,
                  const char* ctx) {
  const std::string c = ctx;
  check(int(f) >= 0 && int(f) < kNumQuantFormats, kind, c + ": unknown quantization format id " + str(int(f)));
  check(rows > 0 && cols > 0, kind,
        c + ": the matrix must have at least one row and column, got (" + str(rows) + ", " + str(cols) + ")");
  // rows * cols < 2^46, written as a division: a corrupt header must not overflow the product
  check(rows < (int64_t(1) << 40) && cols < (int64_t(1) << 31) && rows <= ((int64_t(1) << 46) - 1) / cols, kind,
        c + ": matrix (" + str(rows) + ", " + str(cols) + ") is too large");
  check(!double_quant || f == QuantFormat::NF4, kind,
        c + ": double_quant applies to nf4 only, not " + quant_format_name(f));
  if (quant_is_kquant(f)) {
    // super-blocks of 256, never padded here
    check(group_size == 0 || group_size == kKQuantBlock, kind,
          c + ": " + quant_format_name(f) + " works in super-blocks of 256 weights; group_size must be 0/None or 256, got " +
              str(group_size));
    check(cols % kKQuantBlock == 0, kind,
          c + ": " + quant_format_name(f) + " needs in_features to be a multiple of 256 (its super-block), got " +
              str(cols) + " (" + str(cols % kKQuantBlock) + " past the last whole super-block)");
    return kKQuantBlock;
  }
  if (f == QuantFormat::Int8 && (group_size == 0 || group_size == cols)) {
    return int(cols);  // per output channel (the default): one group spanning the row
  }
  if (f == QuantFormat::Int8)
    check(group_size == 32 || group_size == 64 || group_size == 128, kind,
          c + ": int8 is quantized per output channel (group_size 0/None or in_features, " + str(cols) +
              ") or in groups of 32, 64 or 128; got group_size " + str(group_size));
  const int g = group_size == 0 ? 128 : group_size;
  check(g == 32 || g == 64 || g == 128, kind,
        c + ": group_size must be 32, 64 or 128 for " + quant_format_name(f) + ", got " + str(group_size));
  return g;  // any cols: the last group may be partial (stored padded, see quant.h)
}

// K_pad: cols rounded up to whole groups, or to whole 32-weight chunks for one group per row.
int64_t padded_cols_for(int64_t cols, int group_size) {
  const int64_t unit = group_size == cols ? 32 : group_size;
  return (cols + unit - 1) / unit * unit;
}

// The code that dequantizes to 0 (the pad columns' code); int4_min has none and uses 0 (its minimum).
uint8_t zero_code(QuantFormat f, uint8_t zero_point) {
  switch (f) {
    case QuantFormat::Int4:
    case QuantFormat::Int3:
    case QuantFormat::Int2: return zero_point;
    case QuantFormat::Int4Sym: return 8;
    case QuantFormat::Int3Sym: return 4;
    case QuantFormat::Int2Sym: return 2;
    case QuantFormat::NF4: return 7;  // kNF4[7] == 0
    default: return 0;                // int8 (signed 0), int4_min
  }
}

// Packs 32 codes (each < 2^bits) of one chunk into dst in the documented layout.
void pack_chunk(int bits, const uint8_t* q, uint8_t* dst) {
  if (bits == 8) {
    std::memcpy(dst, q, 32);
  } else if (bits == 4) {
    for (int i = 0; i < 16; ++i) dst[i] = uint8_t(q[i] | (q[i + 16] << 4));
  } else {
    for (int i = 0; i < 8; ++i)
      dst[i] = uint8_t((q[i] & 3) | ((q[i + 8] & 3) << 2) | ((q[i + 16] & 3) << 4) | ((q[i + 24] & 3) << 6));
    if (bits == 3) {
      uint32_t hi = 0;
      for (int i = 0; i < 32; ++i) hi |= uint32_t((q[i] >> 2) & 1) << i;
      for (int b = 0; b < 4; ++b) dst[8 + b] = uint8_t(hi >> (8 * b));
    }
  }
}

uint8_t nearest_nf4(float v) {
  // levels ascending: the first midpoint above v decides
  int q = 0;
  while (q < 15 && v > 0.5f * (kNF4[q] + kNF4[q + 1])) ++q;
  return uint8_t(q);
}

constexpr double kFloatMax = 3.4028234663852886e38;

// Quantizes one group of `n` weights: codes into q[], scale (and zero or min) out. Returns false
// (nothing meaningful written) when the group's range is too wide for the format near the float32
// limit: a dequantized end code ((q - z) * s, z * s, or 15 * s before + min) would overflow.
bool quantize_group(QuantFormat f, const float* w, int n, uint8_t* q, float* scale, uint8_t* zero, float* min) {
  const int bits = quant_bits(f);
  if (f == QuantFormat::Int4Min) {
    // w = s * q + m with m the group minimum: q = round((w - m) / s) in [0, 15]
    float lo = w[0], hi = w[0];
    for (int i = 1; i < n; ++i) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]);
    // in double: hi - lo can overflow float for weights near its range
    const float s = float((double(hi) - double(lo)) / 15.0);
    if (15.0 * double(s) > kFloatMax) return false;  // dequantized as (q * s) + min: q * s must be finite
    const double inv = s > 0.0f ? 1.0 / double(s) : 0.0;  // a constant group: s = 0, every q = 0, w = m exactly
    for (int i = 0; i < n; ++i)
      q[i] = uint8_t(std::min(std::max(std::nearbyint((double(w[i]) - double(lo)) * inv), 0.0), 15.0));
    *scale = s;
    *min = lo;
    return true;
  }
  if (f == QuantFormat::NF4 || f == QuantFormat::Int8 || !quant_is_asymmetric(f)) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(w[i]));
    if (f == QuantFormat::NF4) {
      const float s = amax > 0.0f ? amax : 1.0f;
      for (int i = 0; i < n; ++i) q[i] = nearest_nf4(w[i] / s);
      *scale = s;
      return true;
    }
    const int qmax = (1 << (bits - 1)) - 1;  // symmetric levels -qmax..qmax
    const float s = amax > 0.0f ? amax / float(qmax) : 1.0f;
    const float inv = 1.0f / s;
    for (int i = 0; i < n; ++i) {
      const int v = int(std::lrint(std::min(std::max(w[i] * inv, -float(qmax)), float(qmax))));
      q[i] = f == QuantFormat::Int8 ? uint8_t(int8_t(v)) : uint8_t(v + (1 << (bits - 1)));
    }
    *scale = s;
    return true;
  }
  // Asymmetric: range widened to include 0 so that zero is exact and z fits in [0, 2^b).
  float lo = 0.0f, hi = 0.0f;
  for (int i = 0; i < n; ++i) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]);
  const int qmax = (1 << bits) - 1;
  // In double: hi - lo overflows float for finite weights beyond about 1.7e38 (an infinite scale
  // made every weight NaN); (hi - lo) / qmax is at most 2 * FLT_MAX / 3, a finite float.
  float s = float((double(hi) - double(lo)) / double(qmax));
  if (!(s > 0.0f)) s = 1.0f;
  const float z = std::min(std::max(std::nearbyint(-lo / s), 0.0f), float(qmax));
  // The rounded zero point can put an end code half a step past the float range: (0 - z) * s,
  // (qmax - z) * s and the z * s of the matmul's zero term must stay finite.
  if (double(z) * double(s) > kFloatMax || double(qmax - z) * double(s) > kFloatMax) return false;
  const float inv = 1.0f / s;
  for (int i = 0; i < n; ++i) {
    const float v = std::nearbyint(w[i] * inv) + z;
    q[i] = uint8_t(std::min(std::max(v, 0.0f), float(qmax)));
  }
  *scale = s;
  *zero = uint8_t(z);
  return true;
}

// Scratch for one call: host memory, or stream-ordered device memory freed on `stream` when the
// scope ends (also when the kernel throws).
class CallScratch {
 public:
  CallScratch(const Device& device, void* stream) : device_(device), stream_(stream) {}
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;
  ~CallScratch() {
    for (void* p : ptrs_) {
      if (!device_.is_cuda()) {
        std::free(p);
      } else {
#if MEMKERNELS_WITH_CUDA
        cuda_backend::free_async(device_.index, p, stream_);
#endif
      }
    }
  }
  void* alloc(size_t bytes, const char* what) {
    ptrs_.reserve(ptrs_.size() + 1);  // before allocating: a failed push_back must not leak
    void* p = nullptr;
    if (!device_.is_cuda()) {
      p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
      if (!p) throw_error(ErrorKind::Memory, std::string(what) + ": out of memory allocating " + str(int64_t(bytes)) + " bytes");
    } else {
#if MEMKERNELS_WITH_CUDA
      p = cuda_backend::malloc_async(device_.index, bytes, stream_);
#endif
    }
    ptrs_.push_back(p);
    return p;
  }

 private:
  Device device_;
  void* stream_;
  std::vector<void*> ptrs_;
};

// Copies `rows` rows of `width` bytes (source pitch src_pitch bytes) into dst with pitch dst_pitch,
// on the host or (CUDA) on `stream`.
void copy_rows(const Device& device, void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
               int64_t rows, void* stream) {
  if (device.is_cuda()) {
#if MEMKERNELS_WITH_CUDA
    cuda_backend::copy_2d(device.index, dst, dst_pitch, src, src_pitch, width, size_t(rows), stream);
#endif
    return;
  }
  (void)stream;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (int64_t(width) * rows > (int64_t(1) << 18))
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
}

void run_dequant(const DequantProblem& p, const Device& device, void* stream) {
  if (device.is_cuda()) {
    require_cuda_usable("dequantize", device);
#if MEMKERNELS_WITH_CUDA
    cuda_backend::dequantize(p, stream);
#endif
    return;
  }
  (void)stream;
  if (quant_is_kquant(p.w.format)) {
    MK_CPU_DISPATCH(dequantize_kquant, p);
    return;
  }
  MK_CPU_DISPATCH(dequantize, p);
}

}  // namespace

// ---- formats ------------------------------------------------------------------------------------

const char* quant_format_name(QuantFormat f) {
  return int(f) >= 0 && int(f) < kNumQuantFormats ? kNames[int(f)] : "unknown";
}

QuantFormat parse_quant_format(const std::string& name) {
  for (int i = 0; i < kNumQuantFormats; ++i)
    if (name == kNames[i]) return QuantFormat(i);
  throw_error(ErrorKind::Value, "unknown quantization format '" + name +
                                    "' (expected int8, int4, int4_sym, int4_min, int3, int3_sym, int2, int2_sym "
                                    "nf4, q4_k, q5_k or q6_k)");
}

int quant_bits(QuantFormat f) {
  switch (f) {
    case QuantFormat::Int8: return 8;
    case QuantFormat::Int3:
    case QuantFormat::Int3Sym: return 3;
    case QuantFormat::Int2:
    case QuantFormat::Int2Sym: return 2;
    case QuantFormat::Q5K: return 5;
    case QuantFormat::Q6K: return 6;
    default: return 4;
  }
}

bool quant_is_asymmetric(QuantFormat f) {
  return f == QuantFormat::Int4 || f == QuantFormat::Int3 || f == QuantFormat::Int2;
}

bool quant_has_mins(QuantFormat f) { return f == QuantFormat::Int4Min; }

bool quant_is_kquant(QuantFormat f) { return f == QuantFormat::Q4K || f == QuantFormat::Q5K || f == QuantFormat::Q6K; }
// K-quants take the interleaved layout only where a kernel reads it natively (AVX-512 with VNNI):
// elsewhere the AVX2 and exact kernels read the documented rows directly, and de-interleaving each
// block of 16 rows on every call cost them 2-4x (measured on the AVX2 level of an AVX-512 CPU).
static bool kquant_interleaves() {
  static const bool ok = [] {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    return best_cpu_isa() == CpuIsa::AVX512 && __builtin_cpu_supports("avx512vnni") != 0;
#else
    return false;
#endif
  }();
  return ok;
}

bool quant_cpu_interleaved(QuantFormat f) {
  return f == QuantFormat::Int4 || f == QuantFormat::Int4Sym || f == QuantFormat::Int4Min || f == QuantFormat::Int8 ||
         f == QuantFormat::Int3 || f == QuantFormat::Int3Sym || f == QuantFormat::Int2 || f == QuantFormat::Int2Sym ||
         f == QuantFormat::NF4 ||  // not with double_quant (interleave() leaves it)
         (quant_is_kquant(f) && kquant_interleaves());
}

const float* nf4_codebook() { return kNF4; }

// ---- QuantizedMatrix ----------------------------------------------------------------------------

int64_t QuantizedMatrix::row_bytes() const { return padded_cols_ * quant_bits(format_) / 8; }

QuantizedMatrix QuantizedMatrix::allocate(QuantFormat f, int64_t rows, int64_t cols, int group_size,
                                          bool double_quant, const Device& device) {
  QuantizedMatrix m;
  m.group_size_ = resolve_group(f, rows, cols, group_size, double_quant, ErrorKind::Value, "quantized matrix");
  m.format_ = f, m.rows_ = rows, m.cols_ = cols, m.double_quant_ = double_quant, m.device_ = device;
  m.padded_cols_ = padded_cols_for(cols, m.group_size_);
  const size_t nscales = size_t(rows) * size_t(m.groups());
  size_t off = 0;
  m.off_codes_ = off;
  off = align64(off + size_t(rows) * size_t(m.row_bytes()));
  if (quant_is_kquant(f)) {  // sub-scales u8 [N][K/256][16], super-scales fp16 [N][K/256][2]
    m.off_sub_scales_ = off;
    off = align64(off + nscales * 16);
    m.off_super_scales_ = off;
    off = align64(off + nscales * 4);
  } else if (double_quant) {
    m.off_scale_codes_ = off;
    off = align64(off + nscales);
    m.off_scale_steps_ = off;
    off = align64(off + (nscales + kDqBlock - 1) / kDqBlock * 4);
  } else {
    m.off_scales_ = off;
    off = align64(off + nscales * 4);
  }
  if (quant_is_asymmetric(f)) {
    m.off_zeros_ = off;
    off = align64(off + nscales);
  }
  if (quant_has_mins(f)) {
    m.off_mins_ = off;
    off = align64(off + nscales * 4);
  }
  m.bytes_ = off;
  void* p = device_malloc(device, off);
  m.buf_ = std::shared_ptr<void>(p, [device](void* q) { device_free(device, q); });
  // Zero the alignment padding too, so serialised bytes are deterministic.
  device_memset_zero(p, device, off);
  if (device.is_cuda()) stream_synchronize(device, nullptr);
  return m;
}

namespace {

// Moves every row block of the codes and of the per-group sections between the documented layout
// and the CPU row-interleaved one (quant.h), on a host buffer; to_ilv picks the direction.
void permute_rows(const QuantizedMatrix& m, const uint8_t* src, uint8_t* dst, bool to_ilv) {
  const int64_t N = m.rows(), G = m.groups(), rb = m.row_bytes(), chunks = m.padded_cols() / 32;
  const int bits = quant_bits(m.format()), cb = bits * 4;
  const size_t codes_off = 0;  // the codes section starts the buffer
  const auto section = [&](const void* p) { return p ? size_t(static_cast<const uint8_t*>(p) - m.data()) : ~size_t(0); };
  const size_t off_s = section(m.scales()), off_z = section(m.zeros()), off_m = section(m.mins());
  const int64_t blocks = (N + kInterleaveRows - 1) / kInterleaveRows;
  if (quant_is_kquant(m.format())) {  // super-blocks for chunks, and their own scale sections
    const size_t off_sub = section(m.sub_scales()), off_sup = section(m.super_scales());
    const auto at = [&](const uint8_t* base, int64_t n0) {
      uint8_t* p = const_cast<uint8_t*>(base);
      return KQuantSections{p + n0 * rb, p + off_sub + n0 * G * 16, reinterpret_cast<uint16_t*>(p + off_sup) + n0 * G * 2};
    };
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * kInterleaveRows, R = std::min<int64_t>(kInterleaveRows, N - n0);
      kquant_permute_block(m.format(), G, R, at(src, n0), at(dst, n0), to_ilv);
    }
    return;
  }
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * kInterleaveRows, R = std::min<int64_t>(kInterleaveRows, N - n0);
    const uint8_t* cs = src + codes_off + n0 * rb;
    uint8_t* cd = dst + codes_off + n0 * rb;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < chunks; ++c)
        for (int j = 0; j < bits; ++j) {
          const int64_t plain = r * rb + c * cb + 4 * j, ilv = c * R * cb + j * R * 4 + r * 4;
          std::memcpy(cd + (to_ilv ? ilv : plain), cs + (to_ilv ? plain : ilv), 4);
        }
    // (row r, group g): plain n0 * G + r * G + g, interleaved n0 * G + g * R + r; elem bytes each
    const auto perm = [&](size_t off, int elem) {
      if (off == ~size_t(0)) return;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t plain = (n0 + r) * G + g, ilv = n0 * G + g * R + r;
          std::memcpy(dst + off + (to_ilv ? ilv : plain) * elem, src + off + (to_ilv ? plain : ilv) * elem, size_t(elem));
        }
    };
    perm(off_s, 4), perm(off_z, 1), perm(off_m, 4);
  }
}

}  // namespace

void QuantizedMatrix::interleave() {
  if (interleaved_ || empty() || !device_.is_cpu() || double_quant_ || !quant_cpu_interleaved(format_)) return;
  std::vector<uint8_t> plain(data(), data() + bytes_);
  permute_rows(*this, plain.data(), mutable_data(), true);
  interleaved_ = true;
}

QuantizedMatrix QuantizedMatrix::canonical() const {
  check(!empty(), ErrorKind::Value, "QuantizedMatrix.canonical: the matrix is empty");
  if (!interleaved_) return device_.is_cpu() ? *this : to_host_plain();  // CUDA: documented layout already
  QuantizedMatrix m = allocate(format_, rows_, cols_, group_size_, double_quant_, Device{});
  m.scale_offset_ = scale_offset_;
  permute_rows(*this, data(), m.mutable_data(), false);
  return m;
}

QuantizedMatrix QuantizedMatrix::to(const Device& device) const {
  check(!empty(), ErrorKind::Value, "QuantizedMatrix.to: the matrix is empty");
  if (device == device_) return *this;
  // CUDA keeps the documented layout: leave the CPU's interleaved one first, enter it on arrival.
  const QuantizedMatrix& src = interleaved_ ? canonical() : *this;
  QuantizedMatrix m = allocate(format_, rows_, cols_, group_size_, double_quant_, device);
  m.scale_offset_ = scale_offset_;
  device_memcpy(m.mutable_data(), device, src.data(), src.device_, bytes_);
  if (device.is_cpu()) m.interleave();
  return m;
}

QuantizedMatrix QuantizedMatrix::to_host_plain() const {
  QuantizedMatrix m = allocate(format_, rows_, cols_, group_size_, double_quant_, Device{});
  m.scale_offset_ = scale_offset_;
  device_memcpy(m.mutable_data(), Device{}, data(), device_, bytes_);
  return m;
}

std::vector<float> QuantizedMatrix::effective_scales() const {
  check(!empty(), ErrorKind::Value, "scales: the matrix is empty");
  const QuantizedMatrix h = to(Device{});
  const QuantView v = make_quant_view(h);
  std::vector<float> s(static_cast<size_t>(rows_ * groups()));
  if (quant_is_kquant(format_)) {  // the super-block scale d, in the documented order
    const QuantizedMatrix c = h.canonical();
    for (size_t j = 0; j < s.size(); ++j) s[j] = cpu::half_to_float(c.super_scales()[2 * j]);
    return s;
  }
  for (int64_t n = 0; n < rows_; ++n)
    for (int64_t g = 0; g < groups(); ++g) s[size_t(n * groups() + g)] = v.scale(n, g);
  return s;
}

std::vector<uint8_t> QuantizedMatrix::serialize() const {
  check(!empty(), ErrorKind::Value, "serialize: the matrix is empty");
  Header h{};
  std::memcpy(h.magic, "MKQM", 4);
  h.version = cols_ == padded_cols_ ? kVersion : kVersionPartial;
  h.format = uint8_t(format_);
  h.double_quant = double_quant_ ? 1 : 0;
  h.rows = rows_, h.cols = cols_, h.group_size = group_size_;
  h.scale_offset = scale_offset_;
  h.payload_bytes = bytes_;
  std::vector<uint8_t> out(sizeof(Header) + bytes_ + 8);
  std::memcpy(out.data(), &h, sizeof h);
  if (interleaved_) {  // files hold the documented layout (version 1), whatever the CPU uses
    const QuantizedMatrix c = canonical();
    std::memcpy(out.data() + sizeof h, c.data(), bytes_);
  } else {
    device_memcpy(out.data() + sizeof h, Device{}, data(), device_, bytes_);
  }
  const uint64_t sum = fnv1a(out.data(), sizeof h + bytes_);
  std::memcpy(out.data() + sizeof h + bytes_, &sum, 8);
  return out;
}

QuantizedMatrix QuantizedMatrix::deserialize(const void* data, size_t size) {
  const uint8_t* b = static_cast<const uint8_t*>(data);
  const ErrorKind bad = ErrorKind::CorruptData;
  check(b != nullptr || size == 0, ErrorKind::Value, "deserialize: null data");
  check(size >= sizeof(Header) + 8, bad,
        "QuantizedMatrix bytes truncated: " + str(int64_t(size)) + " bytes, less than a header");
  Header h;
  std::memcpy(&h, b, sizeof h);
  check(std::memcmp(h.magic, "MKQM", 4) == 0, bad, "not a memkernels QuantizedMatrix (bad magic)");
  check(h.version == kVersion || h.version == kVersionPartial, bad,
        "QuantizedMatrix format version " + str(h.version) + " is not supported (this build reads " + str(kVersion) +
            " and " + str(kVersionPartial) + ")");
  check(h.double_quant <= 1, bad, "QuantizedMatrix header: bad double_quant flag");
  const QuantFormat f = QuantFormat(h.format);
  const int g = resolve_group(f, h.rows, h.cols, h.group_size, h.double_quant != 0, bad, "QuantizedMatrix header");
  check(g == h.group_size, bad, "QuantizedMatrix header: group_size " + str(h.group_size) + " is invalid");
  const bool whole = padded_cols_for(h.cols, g) == h.cols;
  check(whole || h.version == kVersionPartial, bad,
        "QuantizedMatrix header: version 1 with cols " + str(h.cols) + " not a whole number of groups of " + str(g) +
            " (a partial last group needs version 2)");
  check(h.payload_bytes == size - sizeof(Header) - 8, bad,
        "QuantizedMatrix bytes truncated or padded: header announces " + str(int64_t(h.payload_bytes)) +
            " payload bytes, " + str(int64_t(size - sizeof(Header) - 8)) + " present");
  uint64_t sum;
  std::memcpy(&sum, b + size - 8, 8);
  check(sum == fnv1a(b, size - 8), bad, "QuantizedMatrix checksum mismatch: the bytes are corrupted");
  check(std::isfinite(h.scale_offset), bad, "QuantizedMatrix header: non-finite scale offset");
  // The packed codes alone take rows * cols * bits / 8 bytes: reject a header whose shape needs more
  // than the bytes given *before* allocating (and zeroing) a buffer for that shape; otherwise a few
  // hundred bytes with a re-sealed checksum could make this allocate gigabytes. (Found by
  // tests/fuzz/fuzz_quant.py; the exact size is checked below once the layout is known.)
  check(uint64_t(h.rows) * uint64_t(h.cols) * uint64_t(quant_bits(f)) / 8 <= h.payload_bytes, bad,
        "QuantizedMatrix payload size " + str(int64_t(h.payload_bytes)) + " is too small for its shape (" +
            str(h.rows) + ", " + str(h.cols) + ")");
  QuantizedMatrix m = allocate(f, h.rows, h.cols, h.group_size, h.double_quant != 0);
  check(m.bytes_ == h.payload_bytes, bad,
        "QuantizedMatrix payload size " + str(int64_t(h.payload_bytes)) + " does not match its shape (" +
            str(int64_t(m.bytes_)) + " expected)");
  std::memcpy(m.mutable_data(), b + sizeof(Header), m.bytes_);
  m.scale_offset_ = h.scale_offset;
  if (quant_is_kquant(f)) kquant_validate(m, bad, "QuantizedMatrix payload");
  m.interleave();
  return m;
}

void QuantizedMatrix::save(const std::string& path) const {
  std::vector<uint8_t> bytes = serialize();
  std::FILE* fp = std::fopen(path.c_str(), "wb");
  check(fp != nullptr, ErrorKind::IO, "cannot open '" + path + "' for writing: " + std::strerror(errno));
  const size_t n = std::fwrite(bytes.data(), 1, bytes.size(), fp);
  const bool ok = n == bytes.size() && std::fflush(fp) == 0;
  std::fclose(fp);
  check(ok, ErrorKind::IO, "writing '" + path + "' failed: " + std::strerror(errno));
}

QuantizedMatrix QuantizedMatrix::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  check(in.good(), ErrorKind::IO, "cannot open '" + path + "' for reading");
  const std::streamoff n = in.tellg();
  check(n >= 0, ErrorKind::IO, "cannot read the size of '" + path + "'");
  std::vector<uint8_t> bytes(static_cast<size_t>(n));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(bytes.data()), n);
  check(in.good() || n == 0, ErrorKind::IO, "reading '" + path + "' failed");
  return deserialize(bytes.data(), bytes.size());
}

// ---- quantize -----------------------------------------------------------------------------------

namespace {

// Replaces the fp32 scales of an nf4 matrix by offset + step[block] * int8 code (one step per 256).
void double_quantize_scales(QuantizedMatrix& m, const std::vector<float>& raw) {
  const size_t ns = raw.size();
  double mean = 0.0;
  for (float s : raw) mean += s;
  const float off = float(mean / double(ns));
  int8_t* sc = const_cast<int8_t*>(m.scale_codes());
  float* steps = const_cast<float*>(m.scale_steps());
  for (size_t b0 = 0; b0 < ns; b0 += kDqBlock) {
    const size_t b1 = std::min(ns, b0 + kDqBlock);
    float amax = 0.0f;
    for (size_t j = b0; j < b1; ++j) amax = std::max(amax, std::fabs(raw[j] - off));
    const float step = amax > 0.0f ? amax / 127.0f : 1.0f;
    steps[b0 / kDqBlock] = step;
    for (size_t j = b0; j < b1; ++j)
      sc[j] = int8_t(std::lrint(std::min(std::max((raw[j] - off) / step, -127.0f), 127.0f)));
  }
  m.set_scale_offset(off);
}

// Packs codes q (rows x cols, row stride ldq) into m; a partial last chunk is completed with the
// code of 0 (the zero point of the row's last group for the asymmetric formats; zeros set before).
void pack_rows(QuantizedMatrix& m, const uint8_t* q, int64_t ldq) {
  const int bits = quant_bits(m.format());
  const int64_t rb = m.row_bytes(), K = m.cols(), whole = K / 32, G = m.groups();
  uint8_t* codes = m.mutable_data();
  const uint8_t* zp = m.zeros();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (int64_t n = 0; n < m.rows(); ++n) {
    for (int64_t c = 0; c < whole; ++c) pack_chunk(bits, q + n * ldq + c * 32, codes + n * rb + c * (bits * 4));
    if (whole * 32 < K) {
      uint8_t tail[32];
      std::memset(tail, zero_code(m.format(), zp ? zp[n * G + G - 1] : 0), 32);
      std::memcpy(tail, q + n * ldq + whole * 32, size_t(K - whole * 32));
      pack_chunk(bits, tail, codes + n * rb + whole * (bits * 4));
    }
    // chunks wholly in the padding (a group of 64/128 with more than 32 pad columns)
    for (int64_t c = (K + 31) / 32; c < m.padded_cols() / 32; ++c) {
      uint8_t pad[32];
      std::memset(pad, zero_code(m.format(), zp ? zp[n * G + G - 1] : 0), 32);
      pack_chunk(bits, pad, codes + n * rb + c * (bits * 4));
    }
  }
}

}  // namespace

QuantizedMatrix quantize(const TensorView& w, QuantFormat format, const QuantOptions& opts) {
  expect_ndim(w, "w", 2);
  expect_dtype(w, "w", {DType::Float32, DType::Float16, DType::BFloat16});
  expect_last_dim_contiguous(w, "w");
  expect_not_null(w, "w");
  check(w.device.is_cpu(), ErrorKind::Value,
        "quantize: w must be a CPU array (got " + w.device.str() + "); quantize on the CPU, then move with .to()");
  const int64_t N = w.size(0), K = w.size(1);
  QuantizedMatrix m = QuantizedMatrix::allocate(format, N, K, opts.group_size, opts.double_quant);
  if (quant_is_kquant(format)) {
    quantize_kquant(w, m);
    m.interleave();
    return m;
  }
  const int g = m.group_size(), bits = quant_bits(format);
  const int64_t Kp = m.padded_cols();
  const int64_t G = m.groups(), rb = m.row_bytes();
  const bool dq = opts.double_quant;
  std::vector<float> raw_scales(dq ? size_t(N * G) : 0);
  float* scales = dq ? raw_scales.data() : const_cast<float*>(m.scales());
  uint8_t* zeros = const_cast<uint8_t*>(m.zeros());
  float* mins = const_cast<float*>(m.mins());
  uint8_t* codes = m.mutable_data();
  const int esize = dtype_size(w.dtype);
  bool finite = true;

  // The row buffers are allocated inside the region: a failure there must not leave it (terminate).
  // Rows are quantized through the guard too: a group too wide for the format throws.
  ParallelGuard guard;
#pragma omp parallel num_threads(num_threads()) reduction(&& : finite)
  {
    std::vector<float> row;
    std::vector<uint8_t> q;
    const bool ok = guard.run([&] { row.resize(static_cast<size_t>(K)), q.resize(static_cast<size_t>(Kp)); });
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < N; ++n) {
      if (!ok || guard.failed()) continue;
      guard.run([&] {
        cpu::load_floats(static_cast<const char*>(w.data) + n * w.strides[0] * esize, w.dtype, K, row.data());
        bool row_finite = true;
        for (int64_t k = 0; k < K; ++k) row_finite = row_finite && std::isfinite(row[k]);
        if (!row_finite) {  // reported after the region (NaN / inf weights), before the range check
          finite = false;
          return;
        }
        for (int64_t gi = 0; gi < G; ++gi) {
          uint8_t z = 0;
          float mn = 0.0f;
          const int len = int(std::min<int64_t>(g, K - gi * g));  // the last group may be partial
          if (!quantize_group(format, row.data() + gi * g, len, q.data() + gi * g, &scales[n * G + gi], &z, &mn)) {
            const float* x = row.data() + gi * g;
            const auto [lo, hi] = std::minmax_element(x, x + len);
            throw Error(ErrorKind::Value, "quantize: w[" + str(n) + "] group " + str(gi) + " spans [" +
                                              num(*lo) + ", " + num(*hi) + "], too wide for " + quant_format_name(format) +
                                              ": its dequantized values would overflow float32; scale the weights down");
          }
          if (zeros) zeros[n * G + gi] = z;
          if (mins) mins[n * G + gi] = mn;
          if (gi == G - 1) std::fill(q.begin() + K, q.end(), zero_code(format, z));  // pad columns: the code of 0
        }
        for (int64_t c = 0; c < Kp / 32; ++c) pack_chunk(bits, q.data() + c * 32, codes + n * rb + c * (bits * 4));
      });
    }
  }
  check(finite, ErrorKind::Value, "quantize: w contains NaN or infinity");
  guard.rethrow();
  if (dq) double_quantize_scales(m, raw_scales);
  m.interleave();
  return m;
}

QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const QuantOptions& opts) {
  return pack_quantized(format, codes, scales, zeros, nullptr, opts);
}

QuantizedMatrix pack_quantized(QuantFormat format, const TensorView& codes, const TensorView& scales,
                               const TensorView* zeros, const TensorView* mins, const QuantOptions& opts) {
  expect_ndim(codes, "codes", 2);
  expect_dtype(codes, "codes", {DType::UInt8, DType::Int8});
  expect_contiguous(codes, "codes");
  expect_not_null(codes, "codes");
  check(codes.device.is_cpu(), ErrorKind::Value, "pack_quantized: codes must be a CPU array");
  check(!quant_is_kquant(format), ErrorKind::Value,
        std::string("pack_quantized: ") + quant_format_name(format) +
            " is packed from GGUF blocks with pack_gguf_kquant (memkernels.quant.pack_gguf_blocks), not from codes");
  const int64_t N = codes.size(0), K = codes.size(1);
  QuantizedMatrix m = QuantizedMatrix::allocate(format, N, K, opts.group_size, opts.double_quant);
  const int64_t G = m.groups();
  expect_ndim(scales, "scales", 2);
  expect_dtype(scales, "scales", {DType::Float32});
  expect_contiguous(scales, "scales");
  expect_shape(scales, "scales", {N, G});
  check(scales.device.is_cpu(), ErrorKind::Value, "pack_quantized: scales must be a CPU array");
  const float* s = scales.ptr<const float>();
  // Any sign and 0 are fine (GGUF block scales can be negative or 0); NaN and infinity are not.
  for (int64_t j = 0; j < N * G; ++j)
    if (!std::isfinite(s[j]))
      throw Error(ErrorKind::Value, "pack_quantized: scales must be finite; scales[" + str(j / G) + ", " +
                                        str(j % G) + "] = " + std::to_string(s[j]));
  const int bits = quant_bits(format);
  const uint8_t* q = codes.ptr<const uint8_t>();
  if (format != QuantFormat::Int8) {
    // The message is built only for a bad code: building it per element made packing a 1B model take minutes.
    for (int64_t i = 0; i < N * K; ++i)
      if (q[i] >= (1u << bits))
        throw Error(ErrorKind::Value, "pack_quantized: codes must be < 2^" + str(bits) + " for " +
                                          quant_format_name(format) + "; codes[" + str(i / K) + ", " + str(i % K) +
                                          "] = " + str(q[i]));
  }
  if (quant_is_asymmetric(format)) {
    check(zeros != nullptr, ErrorKind::Value,
          std::string("pack_quantized: ") + quant_format_name(format) + " needs zeros (N, groups)");
    expect_ndim(*zeros, "zeros", 2);
    expect_dtype(*zeros, "zeros", {DType::UInt8});
    expect_contiguous(*zeros, "zeros");
    expect_shape(*zeros, "zeros", {N, G});
    check(zeros->device.is_cpu(), ErrorKind::Value, "pack_quantized: zeros must be a CPU array");
    const uint8_t* z = zeros->ptr<const uint8_t>();
    for (int64_t j = 0; j < N * G; ++j)
      check(z[j] < (1u << bits), ErrorKind::Value, "pack_quantized: zeros must be < 2^" + str(bits));
    std::memcpy(const_cast<uint8_t*>(m.zeros()), z, size_t(N * G));
  } else {
    check(zeros == nullptr, ErrorKind::Value,
          std::string("pack_quantized: ") + quant_format_name(format) + " has no zero points; pass no zeros" +
              (quant_has_mins(format) ? " (its offsets are the float mins)" : " (it is symmetric)"));
  }
  if (quant_has_mins(format)) {
    check(mins != nullptr, ErrorKind::Value,
          std::string("pack_quantized: ") + quant_format_name(format) + " needs mins (N, groups) float32");
    expect_ndim(*mins, "mins", 2);
    expect_dtype(*mins, "mins", {DType::Float32});
    expect_contiguous(*mins, "mins");
    expect_shape(*mins, "mins", {N, G});
    expect_not_null(*mins, "mins");
    check(mins->device.is_cpu(), ErrorKind::Value, "pack_quantized: mins must be a CPU array");
    const float* mn = mins->ptr<const float>();
    for (int64_t j = 0; j < N * G; ++j)
      if (!std::isfinite(mn[j]))
        throw Error(ErrorKind::Value, "pack_quantized: mins must be finite; mins[" + str(j / G) + ", " +
                                          str(j % G) + "] = " + std::to_string(mn[j]));
    std::memcpy(const_cast<float*>(m.mins()), mn, size_t(N * G) * 4);
  } else {
    check(mins == nullptr, ErrorKind::Value,
          std::string("pack_quantized: mins apply to int4_min only, not ") + quant_format_name(format));
  }
  if (opts.double_quant) {
    double_quantize_scales(m, std::vector<float>(s, s + N * G));
  } else {
    std::memcpy(const_cast<float*>(m.scales()), s, size_t(N * G) * 4);
  }
  pack_rows(m, q, K);
  m.interleave();
  return m;
}

// ---- dequantize / qgemm -------------------------------------------------------------------------

void dequantize(const QuantizedMatrix& qm, const TensorView& out, void* stream) {
  check(!qm.empty(), ErrorKind::Value, "dequantize: the quantized matrix is empty");
  expect_ndim(out, "out", 2);
  expect_dtype(out, "out", {DType::Float32, DType::Float16, DType::BFloat16});
  expect_contiguous(out, "out");
  expect_not_null(out, "out");
  expect_shape(out, "out", {qm.rows(), qm.cols()});
  check(out.device == qm.device(), ErrorKind::Value,
        "dequantize: out is on " + out.device.str() + " but the quantized matrix is on " + qm.device().str());
  DequantProblem p;
  p.w = make_quant_view(qm);
  p.dtype = out.dtype;
  p.out = out.data;
  if (qm.padded_cols() == qm.cols()) {
    run_dequant(p, out.device, stream);
    return;
  }
  // A partial last group: the kernels write whole padded rows; dequantize into (N, K_pad) scratch
  // and copy the K real columns of each row out.
  CallScratch scratch(out.device, stream);
  const size_t es = size_t(dtype_size(out.dtype));
  if (out.device.is_cuda()) require_cuda_usable("dequantize", out.device);
  p.out = scratch.alloc(size_t(qm.rows()) * size_t(qm.padded_cols()) * es, "dequantize");
  run_dequant(p, out.device, stream);
  copy_rows(out.device, out.data, size_t(qm.cols()) * es, p.out, size_t(qm.padded_cols()) * es, size_t(qm.cols()) * es,
            qm.rows(), stream);
}

int64_t int8_max_tokens_override() {
  static const int64_t n = [] {
    const char* env = std::getenv("MEMKERNELS_INT8_MAX_TOKENS");
    if (!env) return int64_t(0);
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return end != env && *end == '\0' && v >= 1 ? int64_t(v) : int64_t(0);
  }();
  return n;
}

// The backend call of a checked problem: CUDA, the K-quant CPU kernels or the other CPU kernels.
static void run_qgemm(const QGemmProblem& p, bool cuda, void* stream) {
  if (cuda) {
#if MEMKERNELS_WITH_CUDA
    cuda_backend::qgemm(p, stream);
#endif
    return;
  }
  (void)stream;
  if (quant_is_kquant(p.w.format)) {
    MK_CPU_DISPATCH(qgemm_kquant, p);
    return;
  }
  MK_CPU_DISPATCH(qgemm, p);
}

void qgemm(const TensorView& x, const QuantizedMatrix& qm, const TensorView* bias, const TensorView& out,
           void* stream, const QGemmOptions& opts) {
  // Every check builds its message only on failure: this runs once per call, and a 1-token call on
  // a small layer costs a few microseconds in all.
  if (qm.empty()) throw_error(ErrorKind::Value, "qgemm: the quantized matrix is empty");
  expect_ndim(x, "x", 2);
  expect_dtype(x, "x", {DType::Float32, DType::Float16, DType::BFloat16});
  expect_last_dim_contiguous(x, "x");
  expect_not_null(x, "x");
  expect_ndim(out, "out", 2);
  expect_last_dim_contiguous(out, "out");
  expect_not_null(out, "out");
  if (x.size(1) != qm.cols())
    throw_error(ErrorKind::Value, "qgemm: x has " + str(x.size(1)) + " features (shape " + x.shape_str() +
                                      ") but the quantized matrix has in_features " + str(qm.cols()));
  expect_shape(out, "out", {x.size(0), qm.rows()});
  if (out.dtype != x.dtype)
    throw_error(ErrorKind::Type,
                std::string("qgemm: out has dtype ") + dtype_name(out.dtype) + " but x has " + dtype_name(x.dtype));
  if (x.device != qm.device())
    throw_error(ErrorKind::Value, "qgemm: x is on " + x.device.str() + " but the quantized matrix is on " +
                                      qm.device().str() + " (move it with .to())");
  expect_same_device(out, "out", x, "x");
  QGemmProblem p;
  if (bias) {
    expect_ndim(*bias, "bias", 1);
    expect_shape(*bias, "bias", {qm.rows()});
    expect_contiguous(*bias, "bias");
    expect_not_null(*bias, "bias");
    expect_same_device(*bias, "bias", x, "x");
    expect_dtype(*bias, "bias", {DType::Float32, DType::Float16, DType::BFloat16});
    p.bias = bias->data;
  }
  p.w = make_quant_view(qm);
  p.dtype = x.dtype;
  p.tokens = x.size(0);
  p.x = x.data;
  p.x_row = x.strides[0];
  p.out = out.data;
  p.out_row = out.strides[0];
  p.int8_activations = opts.int8_activations;
  if (p.tokens == 0) return;
  const bool cuda = x.device.is_cuda();
  if (cuda) require_cuda_usable("qgemm", x.device);
  const bool pad_x = qm.padded_cols() != qm.cols();
  const bool cast_bias = bias && bias->dtype != x.dtype;
  if (!pad_x && !cast_bias) {
    run_qgemm(p, cuda, stream);
    return;
  }
  CallScratch scratch(x.device, stream);
  const size_t es = size_t(dtype_size(x.dtype));
  if (pad_x) {
    // The kernels read whole groups: x (tokens, K) -> zero-padded (tokens, K_pad), once per call
    // (tokens * K_pad elements: small next to the weights the call reads).
    const int64_t T = p.tokens, K = qm.cols(), Kp = qm.padded_cols();
    void* xp = scratch.alloc(size_t(T) * size_t(Kp) * es, "qgemm");
    if (cuda) {
#if MEMKERNELS_WITH_CUDA
      cuda_backend::memset_async(x.device.index, xp, size_t(T) * size_t(Kp) * es, stream);
#endif
      copy_rows(x.device, xp, size_t(Kp) * es, x.data, size_t(x.strides[0]) * es, size_t(K) * es, T, stream);
    } else {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (T * Kp > (int64_t(1) << 16))
      for (int64_t t = 0; t < T; ++t) {
        char* dst = static_cast<char*>(xp) + size_t(t) * size_t(Kp) * es;
        std::memcpy(dst, static_cast<const char*>(x.data) + size_t(t) * size_t(x.strides[0]) * es, size_t(K) * es);
        std::memset(dst + size_t(K) * es, 0, size_t(Kp - K) * es);
      }
    }
    p.x = xp;
    p.x_row = Kp;
  }
  if (cast_bias) {
    // A bias of another float dtype: converted to x's once per call (the kernels read x's dtype).
    const int64_t N = qm.rows();
    void* b = scratch.alloc(size_t(N) * es, "qgemm");
    if (cuda) {
#if MEMKERNELS_WITH_CUDA
      cuda_backend::convert_floats(x.device.index, bias->data, bias->dtype, b, x.dtype, N, stream);
#endif
    } else {
      std::vector<float> tmp(static_cast<size_t>(N));
      cpu::load_floats(bias->data, bias->dtype, N, tmp.data());
      cpu::store_floats(tmp.data(), x.dtype, N, b);
    }
    p.bias = b;
  }
  run_qgemm(p, cuda, stream);
}

}  // namespace memkernels
