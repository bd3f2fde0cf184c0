// Weight store: file writer, reader with O_DIRECT reads through an I/O thread pool, and the
// windowing neuron cache kept under a DRAM budget. See memkernels/weight_store.h for the format.
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "weight_store_internal.h"

namespace memkernels {

// ---- CRC-32C (Castagnoli): the SSE4.2 instruction where the CPU has it, else slice-by-8 tables --
namespace {
constexpr uint32_t kCrcPoly = 0x82F63B78u;  // reflected Castagnoli polynomial
struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? kCrcPoly ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = t[0][t[s - 1][i] & 0xFF] ^ (t[s - 1][i] >> 8);
  }
};
const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

uint32_t crc32c_sw(const uint8_t* p, size_t n, uint32_t c) {
  const auto& T = crc_tables().t;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = T[7][lo & 0xFF] ^ T[6][(lo >> 8) & 0xFF] ^ T[5][(lo >> 16) & 0xFF] ^ T[4][lo >> 24] ^ T[3][hi & 0xFF] ^
        T[2][(hi >> 8) & 0xFF] ^ T[1][(hi >> 16) & 0xFF] ^ T[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = T[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MK_HAVE_CRC32C_HW 1
// Three independent streams would hide the instruction's latency; one stream already checks
// ~8 GB/s, far above what the disk delivers.
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(const uint8_t* p, size_t n, uint32_t c) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c64 = __builtin_ia32_crc32di(c64, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = uint32_t(c64);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
bool cpu_has_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
#endif
}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
#ifdef MK_HAVE_CRC32C_HW
  static const bool hw = cpu_has_sse42();
  if (hw) return ~crc32c_hw(p, n, ~crc);
#endif
  return ~crc32c_sw(p, n, ~crc);
}

namespace {

constexpr char kMagic[8] = {'M', 'K', 'W', 'S', 'T', 'O', 'R', 'E'};
constexpr uint64_t kAlign = 4096;
constexpr size_t kHeaderBytes = 64;

std::string str(uint64_t x) { return std::to_string(x); }
uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
uint64_t round_down(uint64_t x, uint64_t a) { return x / a * a; }

std::string errno_text(int e) { return std::string(std::strerror(e)); }

// Linux native AIO through syscall(2) (no libaio dependency). With O_DIRECT, io_submit queues the
// reads without waiting for them: one system call submits a layer's reads, the device works through
// them at a deep queue, and one io_getevents reaps many completions.
int sys_io_setup(unsigned nr, aio_context_t* ctx) { return int(::syscall(SYS_io_setup, nr, ctx)); }
int sys_io_destroy(aio_context_t ctx) { return int(::syscall(SYS_io_destroy, ctx)); }
int sys_io_submit(aio_context_t ctx, long n, struct iocb** cbs) { return int(::syscall(SYS_io_submit, ctx, n, cbs)); }
int sys_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event* ev, struct timespec* ts) {
  return int(::syscall(SYS_io_getevents, ctx, min_nr, nr, ev, ts));
}

// Aligned host memory for O_DIRECT buffers; pinned when the outputs go to a GPU.
struct HostBuffer {
  uint8_t* ptr = nullptr;
  size_t bytes = 0;
  bool pinned = false;
  HostBuffer() = default;
  HostBuffer(size_t n, bool pin) : bytes(n), pinned(pin) {
    if (n == 0) return;
    if (pin) {
      ptr = static_cast<uint8_t*>(host_malloc_pinned(n));  // page aligned (cudaMallocHost) or 64 B aligned
      if (reinterpret_cast<uintptr_t>(ptr) % kAlign != 0) {  // no CUDA device: plain memory, realign
        host_free_pinned(ptr);
        ptr = nullptr;
        pinned = false;
      }
    }
    if (!ptr) {
      ptr = static_cast<uint8_t*>(std::aligned_alloc(kAlign, round_up(n, kAlign)));
      check(ptr != nullptr, ErrorKind::Memory, "weight store: out of host memory allocating " + str(n) + " bytes");
      pinned = false;
    }
  }
  ~HostBuffer() { reset(); }
  void reset() {
    if (ptr) pinned ? host_free_pinned(ptr) : std::free(ptr);
    ptr = nullptr;
  }
  HostBuffer(HostBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes), pinned(o.pinned) { o.ptr = nullptr; }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr = o.ptr, bytes = o.bytes, pinned = o.pinned;
      o.ptr = nullptr;
    }
    return *this;
  }
};

// ---- little-endian serialisation ---------------------------------------------------------------
struct Out {
  std::vector<uint8_t> b;
  template <typename T> void put(T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
  }
  void bytes(const void* p, size_t n) { b.insert(b.end(), (const uint8_t*)p, (const uint8_t*)p + n); }
};

struct In {  // bounds-checked reader: any overrun is a corrupt directory
  const uint8_t* p;
  size_t n, pos = 0;
  In(const uint8_t* p_, size_t n_) : p(p_), n(n_) {}
  void need(size_t k) {
    check(k <= n - pos, ErrorKind::CorruptData, "weight store: directory truncated (needs " + str(k) +
                                                    " more bytes at directory offset " + str(pos) + ")");
  }
  template <typename T> T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  const uint8_t* take(size_t k) {
    need(k);
    const uint8_t* r = p + pos;
    pos += k;
    return r;
  }
};

void write_all(int fd, const void* data, size_t n, uint64_t offset, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, off_t(offset));
    const int e = errno;
    if (w < 0 && e == EINTR) continue;
    check(w > 0, ErrorKind::IO, "weight store: cannot write '" + path + "': " + (w == 0 ? "no progress" : errno_text(e)));
    p += w, n -= size_t(w), offset += uint64_t(w);
  }
}

// Reads up to n bytes at offset; returns the count (short only at end of file).
size_t read_full(int fd, void* buf, size_t n, uint64_t offset, int* err) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  size_t got = 0;
  *err = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, p + got, n - got, off_t(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      *err = errno;
      break;
    }
    if (r == 0) break;
    got += size_t(r);
  }
  return got;
}

bool valid_dtype(uint8_t d) { return d <= uint8_t(DType::UInt32); }

// Byte address of element (i, j) of a 2-D view.
inline const uint8_t* at2(const TensorView& t, int64_t i, int64_t j) {
  return static_cast<const uint8_t*>(t.data) + (i * t.strides[0] + j * t.strides[1]) * dtype_size(t.dtype);
}

}  // namespace

// =================================================================================================
// Writer
// =================================================================================================
struct WeightStoreWriter::Impl {
  std::string path, tmp_path;
  int fd = -1;
  uint64_t pos = kAlign;  // data starts at 4096
  bool finished = false;
  std::vector<StoredTensorInfo> tensors;
  std::vector<std::vector<uint32_t>> tensor_crcs;
  std::vector<StoredLayerInfo> layers;
  std::vector<std::vector<uint32_t>> layer_crcs;

  void align() { pos = round_up(pos, kAlign); }
  void check_open(const char* op) {
    check(!finished && fd >= 0, ErrorKind::Value, std::string("WeightStoreWriter.") + op + ": the writer is finished");
  }
  void check_name(const std::string& name) {
    check(!name.empty() && name.size() < 65536, ErrorKind::Value, "add_tensor: name must be 1..65535 bytes");
    for (auto& t : tensors)
      check(t.name != name, ErrorKind::Value, "add_tensor: a tensor named '" + name + "' was already added");
  }
};

// A NUL inside a path would cut it short at the system call: another file would be written or read.
static void check_path(const std::string& path, const char* op) {
  check(path.find('\0') == std::string::npos, ErrorKind::Value,
        std::string(op) + ": path contains a NUL byte: '" + path.substr(0, path.find('\0')) + "\\0...'");
  check(!path.empty(), ErrorKind::Value, std::string(op) + ": path is empty");
}

WeightStoreWriter::WeightStoreWriter(const std::string& path) : impl_(new Impl) {
  check_path(path, "WeightStoreWriter");
  impl_->path = path;
  impl_->tmp_path = path + ".partial";
  // The rename in finish() replaces whatever `path` names: a device node, a FIFO or a directory
  // must not be replaced by a store. Only a new file or an existing regular file is.
  struct stat st;
  check(::stat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode), ErrorKind::IO,
        "WeightStoreWriter: '" + path + "' exists and is not a regular file; refusing to replace it");
  // A FIFO would block open(2) until a reader comes (O_NONBLOCK: it fails at once instead), and a
  // device or FIFO is no place for a store: only a regular file (new or replaced) is written.
  check(::stat(impl_->tmp_path.c_str(), &st) != 0 || S_ISREG(st.st_mode), ErrorKind::IO,
        "WeightStoreWriter: '" + impl_->tmp_path + "' exists and is not a regular file");
  const int fd = ::open(impl_->tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, 0644);
  const int open_errno = errno;
  check(fd >= 0, ErrorKind::IO, "WeightStoreWriter: cannot create '" + impl_->tmp_path + "': " + errno_text(open_errno));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorKind::IO, "WeightStoreWriter: '" + impl_->tmp_path + "' is not a regular file");
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  impl_->fd = fd;
}

WeightStoreWriter::~WeightStoreWriter() { abort(); }

void WeightStoreWriter::abort() noexcept {
  if (impl_->fd >= 0) ::close(impl_->fd);
  impl_->fd = -1;
  if (!impl_->finished) ::unlink(impl_->tmp_path.c_str());
  impl_->finished = true;
}

void WeightStoreWriter::add_tensor(const std::string& name, const TensorView& t, uint32_t chunk_bytes) {
  Impl& w = *impl_;
  w.check_open("add_tensor");
  w.check_name(name);
  check(t.device.is_cpu(), ErrorKind::Value, "add_tensor: '" + name + "' must be a CPU array, got " + t.device.str());
  check(t.numel() == 0 || t.data != nullptr, ErrorKind::Value, "add_tensor: '" + name + "' has no data");
  check(chunk_bytes >= 4096, ErrorKind::Value, "add_tensor: chunk_bytes must be >= 4096, got " + str(chunk_bytes));
  StoredTensorInfo info;
  info.name = name;
  info.dtype = t.dtype;
  info.shape.assign(t.shape, t.shape + t.ndim);
  info.chunk_bytes = chunk_bytes;
  info.nbytes = uint64_t(t.nbytes());
  w.align();
  info.offset = w.pos;
  // Gather into contiguous order one chunk at a time (a no-op copy for contiguous inputs).
  const int es = dtype_size(t.dtype);
  std::vector<uint8_t> buf(std::min<uint64_t>(chunk_bytes, std::max<uint64_t>(info.nbytes, 1)));
  std::vector<uint32_t> crcs;
  const bool contig = t.is_contiguous();
  int64_t idx[kMaxDims] = {};
  int part = 0;  // bytes of the current element already written (chunks need not hold whole elements)
  for (uint64_t done = 0; done < info.nbytes;) {
    const uint64_t n = std::min<uint64_t>(chunk_bytes, info.nbytes - done);
    if (contig) {
      std::memcpy(buf.data(), static_cast<const uint8_t*>(t.data) + done, n);
    } else {
      for (uint64_t filled = 0; filled < n;) {  // odometer over the multi-index
        int64_t off = 0;
        for (int d = 0; d < t.ndim; ++d) off += idx[d] * t.strides[d];
        const int take = int(std::min<uint64_t>(uint64_t(es - part), n - filled));
        std::memcpy(buf.data() + filled, static_cast<const uint8_t*>(t.data) + off * es + part, size_t(take));
        filled += uint64_t(take);
        part += take;
        if (part < es) break;  // the element continues in the next chunk
        part = 0;
        for (int d = t.ndim - 1; d >= 0; --d) {
          if (++idx[d] < t.shape[d]) break;
          idx[d] = 0;
        }
      }
    }
    crcs.push_back(crc32c(buf.data(), n));
    write_all(w.fd, buf.data(), n, w.pos, w.tmp_path);
    w.pos += n;
    done += n;
  }
  w.tensors.push_back(std::move(info));
  w.tensor_crcs.push_back(std::move(crcs));
}

void WeightStoreWriter::add_ffn_layer(int64_t layer, const TensorView* gate, const TensorView& up,
                                      const TensorView& down) {
  Impl& w = *impl_;
  w.check_open("add_ffn_layer");
  for (auto& l : w.layers)
    check(l.layer != layer, ErrorKind::Value, "add_ffn_layer: layer " + std::to_string(layer) + " was already added");
  const char* names[] = {"gate", "up", "down"};
  const TensorView* parts[] = {gate, &up, &down};
  for (int i = 0; i < 3; ++i) {
    if (!parts[i]) continue;
    expect_ndim(*parts[i], names[i], 2);
    check(parts[i]->device.is_cpu(), ErrorKind::Value, std::string("add_ffn_layer: ") + names[i] + " must be on the CPU");
    expect_not_null(*parts[i], names[i]);
    check(parts[i]->dtype == up.dtype, ErrorKind::Type,
          std::string("add_ffn_layer: ") + names[i] + " has dtype " + dtype_name(parts[i]->dtype) + " but up has " +
              dtype_name(up.dtype));
    check(parts[i]->shape[0] == up.shape[0] && parts[i]->shape[1] == up.shape[1], ErrorKind::Value,
          std::string("add_ffn_layer: ") + names[i] + " " + parts[i]->shape_str() + " must have the shape of up " +
              up.shape_str() + " (neurons, d_model); pass down_proj.weight transposed");
  }
  check(up.shape[0] > 0 && up.shape[1] > 0, ErrorKind::Value, "add_ffn_layer: empty layer " + up.shape_str());
  StoredLayerInfo info;
  info.layer = layer;
  info.neurons = up.shape[0];
  info.d_model = up.shape[1];
  info.dtype = up.dtype;
  info.parts = gate ? 3 : 2;
  const int es = dtype_size(up.dtype);
  const uint64_t row = uint64_t(info.d_model) * es;
  info.bundle_bytes = row * info.parts;
  w.align();
  info.offset = w.pos;
  std::vector<uint32_t> crcs(size_t(info.neurons));
  const int64_t per_batch = std::max<int64_t>(1, int64_t((8u << 20) / info.bundle_bytes));
  std::vector<uint8_t> buf(size_t(std::min(per_batch, info.neurons) * info.bundle_bytes));
  int np = 0;
  const TensorView* present[3];
  for (auto* p : parts)
    if (p) present[np++] = p;
  for (int64_t n0 = 0; n0 < info.neurons; n0 += per_batch) {
    const int64_t n1 = std::min(info.neurons, n0 + per_batch);
    for (int64_t i = n0; i < n1; ++i) {
      uint8_t* dst = buf.data() + (i - n0) * info.bundle_bytes;
      for (int p = 0; p < np; ++p) {
        const TensorView& t = *present[p];
        uint8_t* d = dst + p * row;
        if (t.strides[1] == 1) {
          std::memcpy(d, at2(t, i, 0), row);
        } else {
          for (int64_t j = 0; j < info.d_model; ++j) std::memcpy(d + j * es, at2(t, i, j), es);
        }
      }
      crcs[size_t(i)] = crc32c(dst, info.bundle_bytes);
    }
    const uint64_t n = uint64_t(n1 - n0) * info.bundle_bytes;
    write_all(w.fd, buf.data(), n, w.pos, w.tmp_path);
    w.pos += n;
  }
  w.layers.push_back(info);
  w.layer_crcs.push_back(std::move(crcs));
}

void WeightStoreWriter::finish() {
  Impl& w = *impl_;
  w.check_open("finish");
  Out d;
  d.put<uint32_t>(uint32_t(w.tensors.size()));
  d.put<uint32_t>(uint32_t(w.layers.size()));
  for (size_t i = 0; i < w.tensors.size(); ++i) {
    const auto& t = w.tensors[i];
    d.put<uint32_t>(uint32_t(t.name.size()));
    d.bytes(t.name.data(), t.name.size());
    d.put<uint8_t>(uint8_t(t.dtype));
    d.put<uint8_t>(uint8_t(t.shape.size()));
    d.put<uint16_t>(0);
    for (int64_t s : t.shape) d.put<int64_t>(s);
    d.put<uint64_t>(t.offset);
    d.put<uint64_t>(t.nbytes);
    d.put<uint32_t>(t.chunk_bytes);
    d.put<uint32_t>(uint32_t(w.tensor_crcs[i].size()));
    d.bytes(w.tensor_crcs[i].data(), w.tensor_crcs[i].size() * 4);
  }
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const auto& l = w.layers[i];
    d.put<int64_t>(l.layer);
    d.put<int64_t>(l.neurons);
    d.put<int64_t>(l.d_model);
    d.put<uint8_t>(uint8_t(l.dtype));
    d.put<uint8_t>(uint8_t(l.parts));
    d.put<uint16_t>(0);
    d.put<uint64_t>(l.offset);
    d.put<uint64_t>(l.bundle_bytes);
    d.bytes(w.layer_crcs[i].data(), w.layer_crcs[i].size() * 4);
  }
  const uint64_t dir_offset = w.pos;
  write_all(w.fd, d.b.data(), d.b.size(), dir_offset, w.tmp_path);
  Out h;
  h.bytes(kMagic, 8);
  h.put<uint32_t>(kWeightStoreVersion);
  h.put<uint32_t>(0);  // flags
  h.put<uint64_t>(dir_offset);
  h.put<uint64_t>(d.b.size());
  h.put<uint64_t>(kAlign);  // data offset
  h.put<uint64_t>(dir_offset + d.b.size());
  h.put<uint32_t>(crc32c(d.b.data(), d.b.size()));
  h.put<uint32_t>(0);
  h.put<uint32_t>(0);
  h.put<uint32_t>(crc32c(h.b.data(), h.b.size()));
  std::vector<uint8_t> page(kAlign, 0);
  std::memcpy(page.data(), h.b.data(), h.b.size());
  write_all(w.fd, page.data(), page.size(), 0, w.tmp_path);
  // errno is read right after each call: as an argument next to the call in check(...) the message
  // could be built first, from a stale errno ("Success").
  const int sync_rc = ::fdatasync(w.fd), sync_errno = errno;
  check(sync_rc == 0, ErrorKind::IO, "WeightStoreWriter: fdatasync failed: " + errno_text(sync_errno));
  ::close(w.fd);
  w.fd = -1;
  const int rename_rc = ::rename(w.tmp_path.c_str(), w.path.c_str()), rename_errno = errno;
  check(rename_rc == 0, ErrorKind::IO,
        "WeightStoreWriter: cannot rename '" + w.tmp_path + "' to '" + w.path + "': " + errno_text(rename_errno));
  w.finished = true;
}

// =================================================================================================
// Reader
// =================================================================================================
namespace {

enum class SlotState : uint8_t { Free, Loading, Ready, Failed };

struct Slot {
  int32_t layer = -1;  // index into layers
  int64_t neuron = -1;
  uint64_t last_token = 0;
  int32_t pins = 0;
  bool pinned = false;  // held by pin(): one of `pins`, never evicted (window, LRU, clear_cache)
  SlotState state = SlotState::Free;
  int32_t prev = -1, next = -1;  // LRU list (head = most recent)
};

// Completion of a group of I/O tasks.
struct Group {
  std::mutex m;
  std::condition_variable cv;
  int64_t pending = 0;  // chunks of one tensor: not bounded by 2^31
  std::exception_ptr error;
  void done(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(m);
    if (e && !error) error = e;
    if (--pending == 0) cv.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return pending == 0; });
  }
};

}  // namespace

struct WeightStore::Impl {
  std::string path;
  int fd = -1;
  bool direct = false;
  // Granularity of the reads (offset and length): the device's logical block for O_DIRECT when it
  // accepts 512 B (probed at open), else 4 KiB. Neuron bundles of small models are ~1 KiB: reading
  // one 4 KiB block per active neuron read up to 4x the bytes needed.
  uint64_t read_align = kAlign;
  int64_t budget = 0;
  WeightStoreOptions opts;
  std::vector<StoredTensorInfo> tensors;
  std::vector<std::vector<uint32_t>> tensor_crcs;
  std::vector<StoredLayerInfo> layers;
  std::vector<std::vector<uint32_t>> layer_crcs;
  std::unordered_map<std::string, size_t> tensor_index;
  std::unordered_map<int64_t, size_t> layer_index;
  uint64_t file_bytes = 0;
  int64_t largest_read = 0;  // one aligned read unit (neuron or tensor chunk) with alignment slack
  uint64_t slot_bytes = 0;

  // I/O pool: one staging buffer per thread.
  size_t stage_bytes = 0;
  std::vector<HostBuffer> stages;
  std::vector<std::thread> threads;
  std::deque<std::function<void(uint8_t*, int)>> queue;
  std::mutex qmu;
  std::condition_variable qcv;
  bool stopping = false;
  std::vector<void*> thread_events;  // CUDA: one per staging buffer: its last get() copy
  std::vector<char> stage_pending;   // CUDA: staging buffer i's last copy may still be reading it

  // ---- Reads. A read is (offset, length, completion); the completion gets a pointer to the bytes
  // at offset (nullptr with the error otherwise) and the staging buffer's thread id (-1 for AIO).
  // Two engines: tasks queued to the I/O threads (each a pread), or, for O_DIRECT CPU stores,
  // Linux native AIO: a call's reads go to the kernel in one io_submit (a deep queue, one system
  // call, no thread hand-off per read) and one reaper thread takes their completions in batches.
  // Both engines issue the same reads (same offsets, lengths, stats) and run the same completions.
  using ReadDone = std::function<void(const uint8_t* data, std::exception_ptr err, int tid)>;
  struct ReadReq {
    uint64_t off = 0, len = 0;
    ReadDone done;
  };
  struct AioReq {
    struct iocb cb;
    int region = 0;           // staging buffer the read lands in
    size_t first = 0, units = 0;
    uint64_t a0 = 0, off = 0, need = 0;
    ReadDone done;
  };
  bool aio = false;
  aio_context_t aio_ctx = 0;
  int64_t aio_depth = 0;       // the most reads in flight (io_setup's nr)
  std::thread aio_thread;      // the reaper
  std::mutex amu;              // aio_inflight and the pool
  std::condition_variable acv; // a read completed: room in the queue and the pool
  int64_t aio_inflight = 0;
  std::deque<AioReq*> aio_backlog;  // reads waiting for room in the queue or the pool (amu)
  int caller_reaping = 0;           // callers reaping their own completions (amu)
  std::condition_variable reaper_cv;
  std::atomic<bool> aio_stopping{false};
  // In-flight AIO reads land in the staging buffers (the same bytes of the budget as the threads'
  // buffers), carved in read_align units: used[region][unit]. Next-fit from a cursor: reads complete
  // roughly in the order they were issued, so the space after the cursor is usually free.
  std::vector<std::vector<uint8_t>> pool_used;
  size_t pool_cursor = 0;  // global unit index: region * units_per_region + unit

  // CUDA: host-to-device copies run on the store's own (non-blocking) copy stream, so they overlap
  // the caller's kernels instead of queueing behind them. Ordering is explicit:
  //   caller stream --entry_event--> copy stream   (out may still be in use by work enqueued before
  //                                                 the call: the copies into it come after)
  //   copy stream   --done_event---> caller stream (kernels enqueued after the call see the data)
  // and a pinned staging / gather buffer is refilled only once the event recorded after the copy
  // that read it has completed (in the steady state it has: no host wait).
  void* copy_stream = nullptr;
  void* entry_event = nullptr;
  void* done_event = nullptr;

  // Cache.
  mutable std::mutex mu;
  std::condition_variable loaded_cv;
  HostBuffer arena;
  std::vector<Slot> slots;
  std::vector<int32_t> free_slots;
  std::vector<std::vector<int32_t>> table;  // per layer: neuron -> slot or -1
  int32_t lru_head = -1, lru_tail = -1;
  uint64_t token = 0;
  int64_t pinned_slots = 0;  // slots held by pin(); get_rows batches fit in the rest
  int64_t prefetch_pending = 0;
  std::condition_variable prefetch_cv;
  std::string prefetch_error;

  // CUDA gather buffers (double-buffered) for get_rows outputs on a GPU.
  HostBuffer gather[2];
  void* gather_event[2] = {nullptr, nullptr};
  int gather_next = 0;

  std::mutex call_mu;  // get()/get_rows() run one at a time

  std::atomic<uint64_t> bytes_read{0}, reads_issued{0};
  uint64_t hits = 0, misses = 0, prefetched = 0, evictions = 0, resident = 0, peak_resident = 0;

  // The process that opened the store. A child made by fork() inherits this object but not the
  // I/O threads (nor the state of their locks): every operation there fails clearly instead of
  // waiting forever for reads no thread will do.
  pid_t owner_pid = ::getpid();
  void check_process(const char* op) const {
    check(::getpid() == owner_pid, ErrorKind::Value,
          std::string("WeightStore.") + op + ": this store was opened in another process (before a fork); " +
              "its I/O threads do not exist here: open the file again in this process");
  }

  ~Impl() { shutdown(); }

  void shutdown() {
    if (::getpid() != owner_pid) {
      // Forked child: the threads are the parent's. Never join them (they do not exist here) and
      // never destroy joinable std::thread objects (std::terminate): leak the handles.
      static_cast<void>(new std::vector<std::thread>(std::move(threads)));
      threads.clear();
      if (aio_thread.joinable()) static_cast<void>(new std::thread(std::move(aio_thread)));
      if (fd >= 0) ::close(fd);
      fd = -1;
      return;
    }
    if (aio) aio_shutdown();
    {
      std::lock_guard<std::mutex> lk(qmu);
      stopping = true;
    }
    qcv.notify_all();
    for (auto& t : threads) t.join();  // workers drain the queue first
    threads.clear();
#if MEMKERNELS_WITH_CUDA
    // The copy stream first: its pending copies read the pinned buffers freed after this.
    cuda_backend::stream_destroy(copy_stream);
    copy_stream = nullptr;
    for (void* e : thread_events) cuda_backend::event_destroy(e);
    for (void* e : gather_event) {
      if (e) {
        try { cuda_backend::event_wait_host(e); } catch (...) {}
        cuda_backend::event_destroy(e);
      }
    }
    cuda_backend::event_destroy(entry_event);
    cuda_backend::event_destroy(done_event);
    entry_event = done_event = nullptr;
#endif
    thread_events.clear();
    if (fd >= 0) ::close(fd);
    fd = -1;
  }

  void worker(int id) {
    for (;;) {
      std::function<void(uint8_t*, int)> task;
      {
        std::unique_lock<std::mutex> lk(qmu);
        qcv.wait(lk, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        task = std::move(queue.front());
        queue.pop_front();
      }
      task(stage(id), id);
    }
  }

  // Staging buffer `id`, once the last copy that read it (get() on CUDA) has completed.
  uint8_t* stage(int id) {
#if MEMKERNELS_WITH_CUDA
    if (!stage_pending.empty() && stage_pending[size_t(id)]) {
      // A failure here (a broken device) shows again, reported, in the task's own CUDA calls.
      try { cuda_backend::event_wait_host(thread_events[size_t(id)]); } catch (...) {}
      stage_pending[size_t(id)] = 0;
    }
#endif
    return stages[size_t(id)].ptr;
  }

#if MEMKERNELS_WITH_CUDA
  // Copies into a caller's buffer come after the work already enqueued on its stream.
  void copies_after(void* stream) {
    cuda_backend::set_device(opts.device.index);
    cuda_backend::event_record(entry_event, stream);
    cuda_backend::stream_wait_event(copy_stream, entry_event);
  }
  // Work enqueued on the caller's stream from now on comes after every copy issued so far.
  void consumer_waits(void* stream) {
    cuda_backend::set_device(opts.device.index);
    cuda_backend::event_record(done_event, copy_stream);
    cuda_backend::stream_wait_event(stream, done_event);
  }
#endif

  // The calling thread works through queued reads (with its own staging buffer, the last one)
  // instead of sleeping until `g` is done: fewer thread hand-offs on a busy CPU.
  bool run_one_queued() {
    std::function<void(uint8_t*, int)> task;
    {
      std::lock_guard<std::mutex> lk(qmu);
      if (queue.empty()) return false;
      task = std::move(queue.front());
      queue.pop_front();
    }
    const int tid = int(stages.size()) - 1;
    task(stage(tid), tid);
    return true;
  }
  void help_until(Group& g) {
    if (aio) {  // reap the completions here rather than through a hand-off from the reaper thread
      CallerReaps guard(*this);
      for (;;) {
        {
          std::lock_guard<std::mutex> lk(g.m);
          if (g.pending == 0) return;
        }
        aio_reap(1, 200 * 1000);
      }
    }
    for (;;) {
      {
        std::lock_guard<std::mutex> lk(g.m);
        if (g.pending == 0) return;
      }
      if (!run_one_queued()) return g.wait();
    }
  }

  void submit(std::function<void(uint8_t*, int)> task) {
    {
      std::lock_guard<std::mutex> lk(qmu);
      queue.push_back(std::move(task));
    }
    qcv.notify_one();
  }

  // The outcome of a read at a0 that needed `need` bytes and got `got` (err: its errno): the same
  // errors from both engines.
  void check_read(uint64_t a0, uint64_t need, size_t got, int err) const {
    check(err == 0, ErrorKind::IO, "weight store: read of '" + path + "' at " + str(a0) + " failed: " + errno_text(err));
    check(got >= need, ErrorKind::CorruptData,
          "weight store: '" + path + "' is truncated (read " + str(got) + " of " + str(need) + " bytes at " + str(a0) +
              ")");
  }

  // Reads [off, off + len) of the file into `stage` with an aligned read; returns a pointer to off.
  const uint8_t* read_range(uint8_t* stage, uint64_t off, uint64_t len) {
    const uint64_t a0 = round_down(off, read_align), a1 = round_up(off + len, read_align);
    check(a1 - a0 <= stage_bytes, ErrorKind::Value, "weight store: internal read larger than the staging buffer");
    int err = 0;
    size_t got = read_full(fd, stage, size_t(a1 - a0), a0, &err);
    reads_issued.fetch_add(1, std::memory_order_relaxed);
    bytes_read.fetch_add(got, std::memory_order_relaxed);
    if (!direct) ::posix_fadvise(fd, off_t(a0), off_t(a1 - a0), POSIX_FADV_DONTNEED);
    check_read(a0, off + len - a0, got, err);
    return stage + (off - a0);
  }

  // Issues reads: to the I/O threads one task each, or with AIO in batches. Every request's
  // completion runs exactly once, also when the read cannot even be submitted.
  void issue(std::vector<ReadReq>& reqs) {
    if (aio) return aio_issue(reqs);
    for (auto& r : reqs)
      submit([this, off = r.off, len = r.len, done = std::move(r.done)](uint8_t* stage, int tid) {
        const uint8_t* p = nullptr;
        std::exception_ptr e;
        try {
          p = read_range(stage, off, len);
        } catch (...) {
          e = std::current_exception();
        }
        done(p, e, tid);
      });
  }

  // ---- AIO engine ----
  size_t units_per_region() const { return stage_bytes / read_align; }
  bool pool_alloc(size_t units, int& region, size_t& first) {  // amu held
    const size_t upr = units_per_region(), total = upr * pool_used.size();
    if (units == 0 || units > upr) return false;
    size_t g = pool_cursor % total, run = 0, scanned = 0;
    while (scanned < total + units) {
      const size_t r = g / upr, u = g % upr;
      if (u == 0) run = 0;  // a read never spans two staging buffers
      if (pool_used[r][u]) {
        run = 0;
      } else if (++run == units) {
        region = int(r);
        first = u + 1 - units;
        std::fill(pool_used[r].begin() + long(first), pool_used[r].begin() + long(first + units), 1);
        pool_cursor = (g + 1) % total;
        return true;
      }
      ++scanned;
      if (++g == total) g = 0, run = 0;
    }
    return false;
  }

  // Queues the reads and submits what fits now; the reaper submits the rest as room comes back, so
  // the caller never waits here (a prefetch returns at once, as with the threads).
  void aio_issue(std::vector<ReadReq>& reqs) {
    std::vector<AioReq*> bad;  // larger than a staging buffer: never, by construction
    {
      std::lock_guard<std::mutex> lk(amu);
      for (ReadReq& q : reqs) {
        const uint64_t a0 = round_down(q.off, read_align), a1 = round_up(q.off + q.len, read_align);
        auto* r = new AioReq{};
        r->a0 = a0, r->off = q.off, r->need = q.off + q.len - a0, r->units = size_t((a1 - a0) / read_align);
        r->done = std::move(q.done);
        if (r->units > units_per_region()) bad.push_back(r); else aio_backlog.push_back(r);
      }
    }
    for (AioReq* r : bad) {
      r->done(nullptr,
              std::make_exception_ptr(Error(ErrorKind::Value, "weight store: internal read larger than the staging buffer")),
              -1);
      delete r;
    }
    aio_pump();
  }

  // Submits queued reads while the queue depth and the pool have room. With no read in flight the
  // whole pool is free and any queued read fits, so the queue never stalls: the reaper pumps after
  // every batch of completions.
  void aio_pump() {
    std::vector<struct iocb*> cbs;
    for (;;) {
      cbs.clear();
      {
        std::lock_guard<std::mutex> lk(amu);
        while (!aio_backlog.empty() && aio_inflight < aio_depth) {
          AioReq* r = aio_backlog.front();
          if (!pool_alloc(r->units, r->region, r->first)) break;
          aio_backlog.pop_front();
          std::memset(&r->cb, 0, sizeof(r->cb));
          r->cb.aio_data = uint64_t(reinterpret_cast<uintptr_t>(r));
          r->cb.aio_lio_opcode = IOCB_CMD_PREAD;
          r->cb.aio_fildes = uint32_t(fd);
          r->cb.aio_buf = uint64_t(reinterpret_cast<uintptr_t>(stages[size_t(r->region)].ptr + r->first * read_align));
          r->cb.aio_nbytes = uint64_t(r->units) * read_align;
          r->cb.aio_offset = int64_t(r->a0);
          cbs.push_back(&r->cb);
          ++aio_inflight;
        }
      }
      if (cbs.empty()) return;
      aio_submit(cbs);
      bool wake;
      {
        std::lock_guard<std::mutex> lk(amu);
        wake = caller_reaping == 0;
      }
      if (wake) reaper_cv.notify_one();
    }
  }

  // io_submit of a batch; what the kernel refuses completes at once with the error.
  void aio_submit(std::vector<struct iocb*>& cbs) {
    size_t k = 0;
    int tries = 0;
    while (k < cbs.size()) {
      const int rc = sys_io_submit(aio_ctx, long(cbs.size() - k), cbs.data() + k);
      const int e = errno;
      if (rc > 0) {
        k += size_t(rc);
        tries = 0;
        continue;
      }
      if (rc < 0 && (e == EINTR || (e == EAGAIN && ++tries < 1000))) {
        if (e == EAGAIN) std::this_thread::sleep_for(std::chrono::microseconds(100));
        continue;
      }
      // The first refused read fails with the error; the others are tried again.
      aio_finish(reinterpret_cast<AioReq*>(uintptr_t(cbs[k]->aio_data)), rc < 0 ? -long(e) : -long(EIO), false);
      ++k;
    }
  }

  // One AIO read is over (res: bytes or -errno): check it, run its completion, free its room.
  void aio_finish(AioReq* r, long res, bool reaped) {
    uint8_t* buf = stages[size_t(r->region)].ptr + r->first * read_align;
    const uint64_t want = uint64_t(r->units) * read_align;
    const uint8_t* data = nullptr;
    std::exception_ptr err;
    try {
      int e = 0;
      size_t got = 0;
      if (res < 0) {
        e = int(-res);
      } else {
        got = size_t(res);
        if (got < want && got < r->need) {
          // Short: read the rest synchronously (short again only at the end of the file). O_DIRECT
          // wants aligned offsets: after an unaligned short count, the whole read again.
          if (got % read_align) got = 0;
          got += read_full(fd, buf + got, size_t(want - got), r->a0 + got, &e);
        }
      }
      if (reaped) {
        reads_issued.fetch_add(1, std::memory_order_relaxed);
        bytes_read.fetch_add(got, std::memory_order_relaxed);
      }
      check_read(r->a0, r->need, got, e);
      data = buf + (r->off - r->a0);
    } catch (...) {
      err = std::current_exception();
    }
    try {
      r->done(data, err, -1);
    } catch (...) {
    }
    {
      std::lock_guard<std::mutex> lk(amu);
      std::fill(pool_used[size_t(r->region)].begin() + long(r->first),
                pool_used[size_t(r->region)].begin() + long(r->first + r->units), 0);
      --aio_inflight;
    }
    acv.notify_all();
    delete r;
  }

  // Takes up to 128 completions (waits up to timeout_ns for min_nr of them) and finishes them; then
  // submits queued reads into the room they freed and wakes the callers waiting for slots.
  int aio_reap(long min_nr, long timeout_ns) {
    struct io_event ev[128];
    struct timespec ts{timeout_ns / 1000000000, timeout_ns % 1000000000};
    const int n = sys_io_getevents(aio_ctx, min_nr, 128, ev, &ts);
    const int e = errno;
    for (int k = 0; k < n; ++k) aio_finish(reinterpret_cast<AioReq*>(uintptr_t(ev[k].data)), long(ev[k].res), true);
    // Completions do not notify one by one (tid -1): one wake-up per batch for the callers.
    if (n > 0) {
      aio_pump();
      loaded_cv.notify_all();
    }
    if (n < 0 && e != EINTR) std::this_thread::sleep_for(std::chrono::microseconds(100));
    return n;
  }

  // A caller that waits for its own reads reaps them itself (visit_rows, help_until): every
  // completion handed from the reaper thread to the caller costs two thread wake-ups, and on a busy
  // CPU each can wait for a time slice. Meanwhile the reaper thread stays off the AIO context.
  struct CallerReaps {
    Impl& s;
    explicit CallerReaps(Impl& s_) : s(s_) {
      std::lock_guard<std::mutex> lk(s.amu);
      ++s.caller_reaping;
    }
    ~CallerReaps() {
      {
        std::lock_guard<std::mutex> lk(s.amu);
        --s.caller_reaping;
      }
      s.reaper_cv.notify_one();  // reads still in flight (prefetches) complete in the background
    }
  };

  // The reaper thread: completions nobody waits for in place (prefetches, get_rows' waits for
  // slots, pin). It sleeps while nothing is in flight or while a caller reaps.
  void aio_reap_loop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(amu);
        reaper_cv.wait(lk, [&] { return aio_stopping.load() || (caller_reaping == 0 && aio_inflight > 0); });
        if (aio_stopping.load() && aio_inflight == 0 && aio_backlog.empty()) return;
      }
      // A short timeout: it steps aside soon for a caller that starts reaping its own reads.
      aio_reap(1, 2 * 1000 * 1000);
    }
  }

  void aio_shutdown() {
    {
      std::unique_lock<std::mutex> lk(amu);
      acv.wait(lk, [&] { return aio_inflight == 0 && aio_backlog.empty(); });  // prefetches in flight land first
    }
    {
      std::lock_guard<std::mutex> lk(amu);
      aio_stopping = true;
    }
    reaper_cv.notify_all();
    if (aio_thread.joinable()) aio_thread.join();
    sys_io_destroy(aio_ctx);
    aio = false;
  }

  // ---- LRU list (callers hold mu) ----
  void lru_unlink(int32_t s) {
    Slot& x = slots[size_t(s)];
    if (x.prev >= 0) slots[size_t(x.prev)].next = x.next; else if (lru_head == s) lru_head = x.next;
    if (x.next >= 0) slots[size_t(x.next)].prev = x.prev; else if (lru_tail == s) lru_tail = x.prev;
    x.prev = x.next = -1;
  }
  void lru_push_front(int32_t s) {
    Slot& x = slots[size_t(s)];
    x.prev = -1;
    x.next = lru_head;
    if (lru_head >= 0) slots[size_t(lru_head)].prev = s;
    lru_head = s;
    if (lru_tail < 0) lru_tail = s;
  }
  void touch(int32_t s) {
    slots[size_t(s)].last_token = token;
    // Pinned slots are kept out of the LRU list: alloc_slot() and the window walk it from the
    // tail, and thousands of pinned hot neurons there made every miss scan past all of them.
    if (slots[size_t(s)].pinned) return;
    lru_unlink(s);
    lru_push_front(s);
  }
  void release_slot(int32_t s) {  // back to the free list (caller checked pins == 0)
    Slot& x = slots[size_t(s)];
    if (x.state != SlotState::Free) resident -= layers[size_t(x.layer)].bundle_bytes;
    if (x.layer >= 0 && table[size_t(x.layer)][size_t(x.neuron)] == s) table[size_t(x.layer)][size_t(x.neuron)] = -1;
    lru_unlink(s);
    x = Slot{};
    free_slots.push_back(s);
  }
  // A free slot, evicting the least recently used unpinned ready neuron if needed; -1 when none.
  int32_t alloc_slot() {
    if (free_slots.empty()) {
      for (int32_t s = lru_tail; s >= 0; s = slots[size_t(s)].prev) {
        const Slot& x = slots[size_t(s)];
        if (x.pins == 0 && (x.state == SlotState::Ready || x.state == SlotState::Failed)) {
          if (x.state == SlotState::Ready) ++evictions;
          release_slot(s);
          break;
        }
      }
      if (free_slots.empty()) return -1;
    }
    int32_t s = free_slots.back();
    free_slots.pop_back();
    return s;
  }
  void claim(int32_t s, int32_t layer, int64_t neuron) {
    Slot& x = slots[size_t(s)];
    x.layer = layer;
    x.neuron = neuron;
    x.state = SlotState::Loading;
    x.pins = 1;  // the loader's pin
    table[size_t(layer)][size_t(neuron)] = s;
    resident += layers[size_t(layer)].bundle_bytes;
    peak_resident = std::max(peak_resident, resident);
    touch(s);
  }
  uint8_t* slot_ptr(int32_t s) { return arena.ptr + size_t(s) * slot_bytes; }
  // Drops the caller's pins taken by pin_for_use (a failed slot goes back to the free list when its
  // last pin goes) and wakes callers waiting for a slot. Takes mu.
  void unpin(const std::vector<int32_t>& pinned) {
    {
      std::lock_guard<std::mutex> lk(mu);
      for (int32_t sl : pinned) {
        Slot& x = slots[size_t(sl)];
        if (--x.pins == 0 && x.state == SlotState::Failed) release_slot(sl);
      }
    }
    loaded_cv.notify_all();
  }
  // For a caller about to use (layer li, neuron id), under mu (held by lk): pins its slot into sl.
  // true: a hit; false: a freshly claimed slot whose read the caller must queue. Waits while every
  // slot is pinned (by in-flight prefetches).
  bool pin_for_use(std::unique_lock<std::mutex>& lk, int32_t li, int64_t id, int32_t& sl) {
    sl = table[size_t(li)][size_t(id)];
    if (sl >= 0) {
      ++hits;
      slots[size_t(sl)].pins++;
      touch(sl);
      return true;
    }
    ++misses;
    while ((sl = alloc_slot()) < 0) loaded_cv.wait(lk);
    claim(sl, li, id);
    slots[size_t(sl)].pins++;  // the caller's pin, besides the loader's
    return false;
  }

  // Loads (neuron, slot) pairs of one layer, sorted by neuron, in coalesced reads. Each read task
  // marks its slots Ready (or Failed) and drops the loader pin; `group` counts the tasks.
  void load_runs(int32_t li, const std::vector<std::pair<int64_t, int32_t>>& todo, const std::shared_ptr<Group>& group,
                 bool is_prefetch) {
    const StoredLayerInfo& L = layers[size_t(li)];
    const uint64_t B = L.bundle_bytes;
    const uint64_t gap_neurons = uint64_t(std::max<int64_t>(0, opts.merge_gap_bytes)) / B;
    std::vector<ReadReq> reqs;
    size_t i = 0;
    while (i < todo.size()) {
      size_t j = i + 1;
      while (j < todo.size()) {
        const uint64_t gap = uint64_t(todo[j].first - todo[j - 1].first - 1);
        const uint64_t off0 = L.offset + uint64_t(todo[i].first) * B;
        const uint64_t end = L.offset + uint64_t(todo[j].first + 1) * B;
        // Two runs whose aligned blocks touch or overlap are one read at no extra byte: apart, the
        // shared block was read twice (neurons smaller than a block, as in small models).
        const uint64_t prev_end = L.offset + uint64_t(todo[j - 1].first + 1) * B;
        const uint64_t next_off = L.offset + uint64_t(todo[j].first) * B;
        const uint64_t ra = read_align;
        const bool blocks_touch = round_down(next_off, ra) <= round_up(prev_end, ra);
        if ((gap > gap_neurons && !blocks_touch) || round_up(end, ra) - round_down(off0, ra) > stage_bytes) break;
        ++j;
      }
      auto run = std::make_shared<std::vector<std::pair<int64_t, int32_t>>>(todo.begin() + i, todo.begin() + j);
      {
        std::lock_guard<std::mutex> lk(group->m);
        ++group->pending;
      }
      if (is_prefetch) {
        std::lock_guard<std::mutex> lk(mu);  // counted before it starts: wait_prefetch() cannot miss it
        ++prefetch_pending;
      }
      const uint64_t run_off = L.offset + uint64_t(todo[i].first) * B;
      const uint64_t run_len = uint64_t(todo[j - 1].first - todo[i].first + 1) * B;
      reqs.push_back({run_off, run_len, [this, li, run, group, is_prefetch](const uint8_t* base, std::exception_ptr rerr, int tid) {
        const StoredLayerInfo& Lr = layers[size_t(li)];
        std::exception_ptr err = rerr;
        std::vector<bool> ok(run->size(), false);
        if (!err) try {
          for (size_t k = 0; k < run->size(); ++k) {
            const int64_t n = (*run)[k].first;
            const uint8_t* src = base + uint64_t(n - run->front().first) * Lr.bundle_bytes;
            if (crc32c(src, Lr.bundle_bytes) != layer_crcs[size_t(li)][size_t(n)]) {
              if (!err)
                err = std::make_exception_ptr(Error(ErrorKind::CorruptData,
                                                    "weight store: checksum mismatch in layer " + std::to_string(Lr.layer) +
                                                        ", neuron " + std::to_string(n) + " of '" + path + "'"));
              continue;
            }
            std::memcpy(slot_ptr((*run)[k].second), src, Lr.bundle_bytes);
            ok[k] = true;
          }
        } catch (...) {
          err = std::current_exception();
        }
        {
          std::lock_guard<std::mutex> lk(mu);
          for (size_t k = 0; k < run->size(); ++k) {
            const int32_t s = (*run)[k].second;
            Slot& x = slots[size_t(s)];
            x.state = ok[k] ? SlotState::Ready : SlotState::Failed;
            if (!ok[k] && table[size_t(x.layer)][size_t(x.neuron)] == s)
              table[size_t(x.layer)][size_t(x.neuron)] = -1;  // forget it: a later request reads it again
            if (--x.pins == 0 && x.state == SlotState::Failed) release_slot(s);
          }
          if (is_prefetch) {
            prefetched += uint64_t(std::count(ok.begin(), ok.end(), true));
            if (err && prefetch_error.empty()) {
              try { std::rethrow_exception(err); } catch (const std::exception& e) { prefetch_error = e.what(); }
            }
            if (--prefetch_pending == 0) prefetch_cv.notify_all();
          }
        }
        if (tid >= 0) loaded_cv.notify_all();  // the AIO reaper notifies once per batch
        group->done(is_prefetch ? nullptr : err);
      }});
      i = j;
    }
    issue(reqs);
  }
};

WeightStore::WeightStore() : impl_(new Impl) {}
WeightStore::~WeightStore() {
  Impl* s = impl_.get();
  if (s == nullptr || ::getpid() == s->owner_pid) return;  // the normal case: ~Impl joins the I/O threads
  // A child made by fork(): the store's condition variables still count the parent's waiting I/O
  // threads, and destroying them (pthread_cond_destroy) would wait for those threads forever. Close
  // the file, free the large host buffers, and leak the rest of the state.
  impl_.release();
  if (s->fd >= 0) ::close(s->fd);
  s->fd = -1;
  if (!s->opts.device.is_cuda()) {  // pinned CUDA memory is not freed in a forked child
    s->arena.reset();
    for (auto& b : s->stages) b.reset();
  }
}

std::unique_ptr<WeightStore> WeightStore::open(const std::string& path, int64_t dram_budget_bytes,
                                               const WeightStoreOptions& opts) {
  check(opts.io_threads >= 1 && opts.io_threads <= 256, ErrorKind::Value,
        "WeightStore.open: io_threads must be in [1, 256], got " + std::to_string(opts.io_threads));
  check(opts.window_tokens >= 0, ErrorKind::Value, "WeightStore.open: window_tokens must be >= 0");
  check(opts.merge_gap_bytes >= 0, ErrorKind::Value, "WeightStore.open: merge_gap_bytes must be >= 0");
  check(dram_budget_bytes > 0, ErrorKind::Value,
        "WeightStore.open: dram_budget_bytes must be > 0, got " + std::to_string(dram_budget_bytes));
  require_cuda_usable("WeightStore.open", opts.device);
  check_path(path, "WeightStore.open");
  std::unique_ptr<WeightStore> store(new WeightStore());
  Impl& s = *store->impl_;
  s.path = path;
  s.opts = opts;
  s.budget = dram_budget_bytes;

  // Open with O_DIRECT; filesystems such as tmpfs refuse it (EINVAL) -> buffered + fadvise.
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below); it changes
  // nothing for regular files and is cleared once the file is known to be one.
  if (opts.direct_io) {
    s.fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC | O_NONBLOCK);
    s.direct = s.fd >= 0;
  }
  if (s.fd < 0) {
    s.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    const int e = errno;
    check(s.fd >= 0, ErrorKind::IO, "WeightStore.open: cannot open '" + path + "': " + errno_text(e));
  }
  struct stat st;
  check(::fstat(s.fd, &st) == 0, ErrorKind::IO, "WeightStore.open: cannot stat '" + path + "'");
  check(S_ISREG(st.st_mode), ErrorKind::IO, "WeightStore.open: '" + path + "' is not a regular file");
  ::fcntl(s.fd, F_SETFL, ::fcntl(s.fd, F_GETFL) & ~O_NONBLOCK);
  const uint64_t actual = uint64_t(st.st_size);
  HostBuffer head(kAlign, false);
  int err = 0;
  size_t got = read_full(s.fd, head.ptr, kAlign, 0, &err);
  if (err == EINVAL && s.direct) {  // O_DIRECT accepted at open but refused at read
    ::close(s.fd);
    s.direct = false;
    s.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    check(s.fd >= 0, ErrorKind::IO, "WeightStore.open: cannot open '" + path + "': " + errno_text(errno));
    got = read_full(s.fd, head.ptr, kAlign, 0, &err);
  }
  check(err == 0, ErrorKind::IO, "WeightStore.open: cannot read '" + path + "': " + errno_text(err));
  if (s.direct && got >= 1024) {
    // Does O_DIRECT take 512 B reads here (the logical block of most disks)? Probe one at offset 512.
    HostBuffer probe(kAlign, false);
    int e512 = 0;
    if (read_full(s.fd, probe.ptr, 512, 512, &e512) == 512 && e512 == 0) s.read_align = 512;
  }
  check(got >= kHeaderBytes, ErrorKind::CorruptData,
        "WeightStore.open: '" + path + "' is truncated (" + str(got) + " bytes, a header needs 64)");
  check(std::memcmp(head.ptr, kMagic, 8) == 0, ErrorKind::CorruptData,
        "WeightStore.open: '" + path + "' is not a memkernels weight store (bad magic)");
  In h(head.ptr + 8, kHeaderBytes - 8);
  const uint32_t version = h.get<uint32_t>();
  check(version == kWeightStoreVersion, ErrorKind::CorruptData,
        "WeightStore.open: '" + path + "' has format version " + str(version) + "; this build reads version " +
            str(kWeightStoreVersion));
  h.get<uint32_t>();  // flags
  const uint64_t dir_offset = h.get<uint64_t>(), dir_bytes = h.get<uint64_t>();
  const uint64_t data_offset = h.get<uint64_t>(), file_bytes = h.get<uint64_t>();
  const uint32_t dir_crc = h.get<uint32_t>();
  h.get<uint32_t>();
  h.get<uint32_t>();
  const uint32_t header_crc = h.get<uint32_t>();
  check(crc32c(head.ptr, kHeaderBytes - 4) == header_crc, ErrorKind::CorruptData,
        "WeightStore.open: header checksum mismatch in '" + path + "'");
  check(actual >= file_bytes, ErrorKind::CorruptData,
        "WeightStore.open: '" + path + "' is truncated (" + str(actual) + " bytes, header says " + str(file_bytes) + ")");
  check(actual == file_bytes && data_offset == kAlign && dir_offset >= data_offset && dir_bytes <= file_bytes &&
            dir_offset == file_bytes - dir_bytes,
        ErrorKind::CorruptData, "WeightStore.open: inconsistent header in '" + path + "'");
  s.file_bytes = file_bytes;

  // Directory.
  {
    const uint64_t a0 = round_down(dir_offset, kAlign), a1 = round_up(dir_offset + dir_bytes, kAlign);
    HostBuffer dir(size_t(a1 - a0), false);
    got = read_full(s.fd, dir.ptr, size_t(a1 - a0), a0, &err);
    check(err == 0, ErrorKind::IO, "WeightStore.open: cannot read the directory of '" + path + "': " + errno_text(err));
    check(got >= dir_offset + dir_bytes - a0, ErrorKind::CorruptData, "WeightStore.open: '" + path + "' is truncated");
    const uint8_t* dp = dir.ptr + (dir_offset - a0);
    check(crc32c(dp, dir_bytes) == dir_crc, ErrorKind::CorruptData,
          "WeightStore.open: directory checksum mismatch in '" + path + "'");
    In d(dp, dir_bytes);
    const uint32_t nt = d.get<uint32_t>(), nl = d.get<uint32_t>();
    auto bad = [&](const std::string& what) { throw_error(ErrorKind::CorruptData, "WeightStore.open: '" + path + "': " + what); };
    auto in_data = [&](uint64_t off, uint64_t n) { return off >= data_offset && off <= dir_offset && n <= dir_offset - off; };
    for (uint32_t i = 0; i < nt; ++i) {
      StoredTensorInfo t;
      const uint32_t name_len = d.get<uint32_t>();
      const uint8_t* nm = d.take(name_len);
      t.name.assign(reinterpret_cast<const char*>(nm), name_len);
      const uint8_t dt = d.get<uint8_t>(), ndim = d.get<uint8_t>();
      d.get<uint16_t>();
      if (!valid_dtype(dt) || ndim > kMaxDims) bad("bad dtype or rank of tensor '" + t.name + "'");
      t.dtype = DType(dt);
      __int128 numel = 1;
      for (int k = 0; k < ndim; ++k) {
        int64_t v = d.get<int64_t>();
        if (v < 0 || v > (int64_t(1) << 48)) bad("bad shape of tensor '" + t.name + "'");
        t.shape.push_back(v);
        numel *= v;
        if (numel > (__int128(1) << 60)) bad("bad shape of tensor '" + t.name + "'");
      }
      t.offset = d.get<uint64_t>();
      t.nbytes = d.get<uint64_t>();
      t.chunk_bytes = d.get<uint32_t>();
      const uint32_t nchunks = d.get<uint32_t>();
      if (__int128(t.nbytes) != numel * dtype_size(t.dtype) || !in_data(t.offset, t.nbytes) || t.chunk_bytes < 4096 ||
          t.chunk_bytes > (1u << 30) || uint64_t(nchunks) != (t.nbytes + t.chunk_bytes - 1) / t.chunk_bytes)
        bad("inconsistent entry for tensor '" + t.name + "'");
      const uint8_t* crc_bytes = d.take(size_t(nchunks) * 4);  // bounds first, then allocate
      std::vector<uint32_t> crcs(nchunks);
      // An empty tensor has no chunks: crcs.data() may be null, and memcpy(null, p, 0) is UB (UBSan).
      if (nchunks) std::memcpy(crcs.data(), crc_bytes, size_t(nchunks) * 4);
      if (!s.tensor_index.emplace(t.name, s.tensors.size()).second) bad("duplicate tensor '" + t.name + "'");
      s.tensors.push_back(std::move(t));
      s.tensor_crcs.push_back(std::move(crcs));
    }
    for (uint32_t i = 0; i < nl; ++i) {
      StoredLayerInfo l;
      l.layer = d.get<int64_t>();
      l.neurons = d.get<int64_t>();
      l.d_model = d.get<int64_t>();
      const uint8_t dt = d.get<uint8_t>(), parts = d.get<uint8_t>();
      d.get<uint16_t>();
      l.offset = d.get<uint64_t>();
      l.bundle_bytes = d.get<uint64_t>();
      const std::string ln = "layer " + std::to_string(l.layer);
      if (!valid_dtype(dt) || (parts != 2 && parts != 3) || l.neurons <= 0 || l.d_model <= 0 ||
          l.neurons > (int64_t(1) << 32) || l.d_model > (int64_t(1) << 32))
        bad("bad entry for " + ln);
      l.dtype = DType(dt);
      l.parts = parts;
      if (__int128(l.bundle_bytes) != __int128(l.d_model) * parts * dtype_size(l.dtype) ||
          __int128(l.bundle_bytes) * l.neurons > __int128(dir_offset) || !in_data(l.offset, l.bundle_bytes * uint64_t(l.neurons)))
        bad("inconsistent entry for " + ln);
      const uint8_t* crc_bytes = d.take(size_t(l.neurons) * 4);
      std::vector<uint32_t> crcs(size_t(l.neurons));
      std::memcpy(crcs.data(), crc_bytes, size_t(l.neurons) * 4);
      if (!s.layer_index.emplace(l.layer, s.layers.size()).second) bad("duplicate " + ln);
      s.layers.push_back(l);
      s.layer_crcs.push_back(std::move(crcs));
    }
    if (d.pos != d.n) bad("trailing bytes in the directory");
  }

  // Budget: one read buffer of the largest read unit plus (with FFN layers) one neuron slot, and on
  // CUDA two gather buffers. Everything the store allocates for data comes out of the budget.
  uint64_t unit = 0;
  for (auto& l : s.layers) {
    s.slot_bytes = std::max(s.slot_bytes, l.bundle_bytes);
    unit = std::max(unit, l.bundle_bytes);
  }
  for (auto& t : s.tensors) unit = std::max<uint64_t>(unit, std::min<uint64_t>(t.chunk_bytes, t.nbytes));
  s.largest_read = int64_t(round_up(std::max<uint64_t>(unit, 1), kAlign) + kAlign);
  const bool cuda = opts.device.is_cuda();
  const uint64_t min_budget = uint64_t(s.largest_read) * (cuda ? 4 : 2) + s.slot_bytes;
  check(uint64_t(dram_budget_bytes) >= min_budget, ErrorKind::Value,
        "WeightStore.open: dram_budget_bytes (" + std::to_string(dram_budget_bytes) +
            ") is smaller than the largest single read: needs at least " + str(min_budget) + " bytes (" +
            (cuda ? "4" : "2") + " read buffers of " + str(uint64_t(s.largest_read)) + " bytes" +
            (s.slot_bytes ? " + one " + str(s.slot_bytes) + "-byte neuron" : "") + ")");
  const uint64_t B = uint64_t(dram_budget_bytes);
  // max_read_bytes is clamped to [1, min(B, file size, 1 GiB)]: no read is larger (or fits the budget),
  // and an extreme value (e.g. 2^62) made fixed() below overflow, so that the store allocated staging
  // buffers far beyond the budget. (Found while fuzzing WeightStore.open's options; see
  // tests/python/test_regressions.py.)
  const uint64_t max_read = uint64_t(std::clamp<int64_t>(opts.max_read_bytes, 1, int64_t(1) << 30));
  const uint64_t want = std::max<uint64_t>(uint64_t(s.largest_read), round_up(std::min({max_read, B, s.file_bytes}), kAlign) + kAlign);
  uint64_t stage = want;
  uint64_t nbuf = uint64_t(opts.io_threads);
  // n worker buffers + the calling thread's + (CUDA) two gather buffers.
  auto fixed = [&](uint64_t st, uint64_t n) { return st * (n + 1) + (cuda ? 2 * st : 0); };
  while (nbuf > 1 && fixed(stage, nbuf) + s.slot_bytes > B / 2) --nbuf;
  if (fixed(stage, nbuf) + s.slot_bytes > B / 2)
    stage = std::max<uint64_t>(uint64_t(s.largest_read), round_down(B / (2 * (nbuf + 1 + (cuda ? 2 : 0))), kAlign));
  if (fixed(stage, nbuf) + s.slot_bytes > B) stage = uint64_t(s.largest_read);
  s.stage_bytes = size_t(stage);
  const uint64_t left = B - fixed(stage, nbuf);
  // Never more slots than neurons in the file (a budget larger than all FFN data holds it all), and
  // never more than int32 slot ids can name: a 1 TB budget of small neurons overflowed them.
  uint64_t total_neurons = 0;
  for (auto& l : s.layers) total_neurons += uint64_t(l.neurons);
  const size_t nslots = s.slot_bytes ? size_t(std::min<uint64_t>({left / s.slot_bytes, total_neurons,
                                                                   uint64_t(INT32_MAX)})) : 0;
  s.arena = HostBuffer(nslots * s.slot_bytes, false);  // CUDA copies go through the pinned gather buffers
  s.slots.resize(nslots);
  for (size_t i = nslots; i-- > 0;) s.free_slots.push_back(int32_t(i));
  s.table.resize(s.layers.size());
  for (size_t i = 0; i < s.layers.size(); ++i) s.table[i].assign(size_t(s.layers[i].neurons), -1);
  for (uint64_t i = 0; i <= nbuf; ++i) s.stages.emplace_back(size_t(stage), cuda);  // + the caller's
  if (cuda) {
#if MEMKERNELS_WITH_CUDA
    cuda_backend::set_device(opts.device.index);  // events belong to the store's device
    for (int g = 0; g < 2; ++g) {
      s.gather[g] = HostBuffer(size_t(stage), true);
      s.gather_event[g] = cuda_backend::event_create();
    }
    for (uint64_t i = 0; i <= nbuf; ++i) s.thread_events.push_back(cuda_backend::event_create());
    s.stage_pending.assign(size_t(nbuf + 1), 0);
    s.entry_event = cuda_backend::event_create();
    s.done_event = cuda_backend::event_create();
    s.copy_stream = cuda_backend::stream_create_nonblocking();
#endif
  }
  // The read engine: AIO for O_DIRECT CPU stores unless refused (options, MEMKERNELS_STORE_IO=threads,
  // or the kernel: io_setup fails with ENOSYS/EPERM under seccomp, EAGAIN past fs.aio-max-nr; a
  // probe read must also come back right), else the I/O threads. CUDA stores keep the threads: their
  // staging buffers are tied to the threads' copy events.
  const char* env_io = std::getenv("MEMKERNELS_STORE_IO");
  const bool env_threads = env_io && std::string(env_io) == "threads";
  if (opts.async_io && !env_threads && s.direct && !cuda && s.read_align <= s.stage_bytes) {
    aio_context_t ctx = 0;
    const int64_t depth = 256;
    if (sys_io_setup(unsigned(depth), &ctx) == 0) {
      struct iocb cb;
      std::memset(&cb, 0, sizeof(cb));
      cb.aio_lio_opcode = IOCB_CMD_PREAD;
      cb.aio_fildes = uint32_t(s.fd);
      cb.aio_buf = uint64_t(reinterpret_cast<uintptr_t>(s.stages[0].ptr));
      cb.aio_nbytes = s.read_align;
      cb.aio_offset = 0;
      struct iocb* p = &cb;
      struct io_event ev;
      std::memset(&ev, 0, sizeof(ev));
      struct timespec ts{5, 0};
      const bool ok = sys_io_submit(ctx, 1, &p) == 1 && sys_io_getevents(ctx, 1, 1, &ev, &ts) == 1 &&
                      ev.res == long(s.read_align) && std::memcmp(s.stages[0].ptr, kMagic, 8) == 0;
      if (ok) {
        s.aio = true;
        s.aio_ctx = ctx;
        s.aio_depth = depth;
        s.pool_used.assign(s.stages.size(), std::vector<uint8_t>(s.units_per_region(), 0));
        s.aio_thread = std::thread([&s] { s.aio_reap_loop(); });
      } else {
        sys_io_destroy(ctx);
      }
    }
  }
  if (!s.aio)
    for (uint64_t i = 0; i < nbuf; ++i) s.threads.emplace_back([&s, i] { s.worker(int(i)); });
  return store;
}

const std::vector<StoredTensorInfo>& WeightStore::tensors() const { return impl_->tensors; }
const std::vector<StoredLayerInfo>& WeightStore::layers() const { return impl_->layers; }
const char* WeightStore::io_mode() const { return impl_->direct ? "direct" : "buffered"; }
const char* WeightStore::io_engine() const { return impl_->aio ? "aio" : "threads"; }
int64_t WeightStore::largest_read_bytes() const { return impl_->largest_read; }
int64_t WeightStore::dram_budget_bytes() const { return impl_->budget; }
Device WeightStore::device() const { return impl_->opts.device; }

const StoredTensorInfo& WeightStore::tensor_info(const std::string& name) const {
  auto it = impl_->tensor_index.find(name);
  check(it != impl_->tensor_index.end(), ErrorKind::Value, "WeightStore: no tensor named '" + name + "'");
  return impl_->tensors[it->second];
}

const StoredLayerInfo& WeightStore::layer_info(int64_t layer) const {
  auto it = impl_->layer_index.find(layer);
  check(it != impl_->layer_index.end(), ErrorKind::Value,
        "WeightStore: no FFN layer " + std::to_string(layer) + " (the store has " +
            std::to_string(impl_->layers.size()) + " layers)");
  return impl_->layers[it->second];
}

static void check_out(const TensorView& out, const Device& dev, DType dtype, const std::vector<int64_t>& shape,
                      const char* op) {
  expect_dtype(out, "out", {dtype});
  check(out.ndim == int(shape.size()) && std::equal(shape.begin(), shape.end(), out.shape), ErrorKind::Value,
        std::string(op) + ": out has shape " + out.shape_str() + ", expected the stored shape");
  if (out.numel() > 0) expect_contiguous(out, "out");
  check(out.device == dev, ErrorKind::Value,
        std::string(op) + ": out is on " + out.device.str() + " but the store was opened for " + dev.str());
  check(out.numel() == 0 || out.data != nullptr, ErrorKind::Value, std::string(op) + ": out has no data");
}

void WeightStore::get(const std::string& name, const TensorView& out, void* stream) {
  Impl& s = *impl_;
  s.check_process("get");
  const StoredTensorInfo& t = tensor_info(name);
  const size_t ti = s.tensor_index[name];
  check_out(out, s.opts.device, t.dtype, t.shape, "WeightStore.get");
  std::lock_guard<std::mutex> call(s.call_mu);
  const uint64_t nchunks = (t.nbytes + t.chunk_bytes - 1) / t.chunk_bytes;
  auto group = std::make_shared<Group>();
  group->pending = int64_t(nchunks);
  uint8_t* dst = static_cast<uint8_t*>(out.data);
  const bool cuda = s.opts.device.is_cuda();
#if MEMKERNELS_WITH_CUDA
  if (cuda && nchunks) s.copies_after(stream);
#endif
  std::vector<Impl::ReadReq> reqs;
  reqs.reserve(size_t(nchunks));
  for (uint64_t c = 0; c < nchunks; ++c) {
    const uint64_t off = uint64_t(c) * t.chunk_bytes, n = std::min<uint64_t>(t.chunk_bytes, t.nbytes - off);
    reqs.push_back({t.offset + off, n, [&s, &t, ti, c, off, n, dst, cuda, stream, group](const uint8_t* src,
                                                                                         std::exception_ptr rerr, int tid) {
      std::exception_ptr err = rerr;
      if (!err) try {
        check(crc32c(src, n) == s.tensor_crcs[ti][size_t(c)], ErrorKind::CorruptData,
              "weight store: checksum mismatch in tensor '" + t.name + "', chunk " + str(c) + " of '" + s.path + "'");
        if (!cuda) {
          std::memcpy(dst + off, src, n);
        } else {
#if MEMKERNELS_WITH_CUDA
          cuda_backend::set_device(s.opts.device.index);  // I/O threads start on device 0
          cuda_backend::copy_h2d_async(dst + off, src, n, s.copy_stream);
          // the stage is refilled only after this copy completed (waited for when it is next taken)
          cuda_backend::event_record(s.thread_events[size_t(tid)], s.copy_stream);
          s.stage_pending[size_t(tid)] = 1;
#else
          (void)stream, (void)tid;
#endif
        }
      } catch (...) {
        err = std::current_exception();
      }
      group->done(err);
    }});
  }
  s.issue(reqs);
  s.help_until(*group);
#if MEMKERNELS_WITH_CUDA
  // Also after a failed chunk: the caller may reuse out once its stream reaches this point.
  if (cuda && nchunks) s.consumer_waits(stream);
#endif
  if (group->error) std::rethrow_exception(group->error);
}

void WeightStore::get_rows(int64_t layer, const int64_t* ids, int64_t count, const TensorView& out, void* stream) {
  Impl& s = *impl_;
  s.check_process("get_rows");
  const StoredLayerInfo& L = layer_info(layer);
  const int32_t li = int32_t(s.layer_index[layer]);
  check(count >= 0, ErrorKind::Value, "get_rows: count must be >= 0");
  check_out(out, s.opts.device, L.dtype, {count, int64_t(L.parts), L.d_model}, "WeightStore.get_rows");
  for (int64_t k = 0; k < count; ++k)
    if (ids[k] < 0 || ids[k] >= L.neurons)  // the message only for a bad id: built for every id, it cost more than the look-ups
      throw_error(ErrorKind::Value,
          "get_rows: neuron_ids[" + std::to_string(k) + "] = " + std::to_string(ids[k]) + " is out of range [0, " +
              std::to_string(L.neurons) + ") of layer " + std::to_string(layer));
  std::lock_guard<std::mutex> call(s.call_mu);
  const bool cuda = s.opts.device.is_cuda();
  const uint64_t B = L.bundle_bytes;
  const int64_t nslots = int64_t(s.slots.size());
  check(nslots > 0, ErrorKind::Value, "get_rows: no neuron fits in the cache");
  uint8_t* dst = static_cast<uint8_t*>(out.data);
  // Batches of at most the unpinned slots (pinned neurons are hits and take no new slot): each
  // batch is loaded, pinned for the copy, copied out, unpinned. pin() always leaves one slot.
  int64_t batch;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    batch = std::max<int64_t>(1, nslots - s.pinned_slots);
  }
  for (int64_t b0 = 0; b0 < count; b0 += batch) {
    const int64_t b1 = std::min(count, b0 + batch);
    std::vector<int32_t> slot_of(size_t(b1 - b0), -1);
    std::vector<std::pair<int64_t, int32_t>> todo;
    {
      std::unique_lock<std::mutex> lk(s.mu);
      for (int64_t k = b0; k < b1; ++k) {
        int32_t sl;
        if (!s.pin_for_use(lk, li, ids[k], sl)) todo.emplace_back(ids[k], sl);
        slot_of[size_t(k - b0)] = sl;
      }
    }
    std::sort(todo.begin(), todo.end());
    auto group = std::make_shared<Group>();
    if (!todo.empty()) {
      s.load_runs(li, todo, group, false);
      s.help_until(*group);
    }
    std::exception_ptr err = group->error;
    auto landed = [&] {
      for (int32_t sl : slot_of)
        if (s.slots[size_t(sl)].state == SlotState::Loading) return false;
      return true;
    };
    for (;;) {  // neurons a prefetch is still loading: help with the queued reads, then wait
      {
        std::lock_guard<std::mutex> lk(s.mu);
        if (landed()) break;
      }
      if (!s.run_one_queued()) break;
    }
    {
      std::unique_lock<std::mutex> lk(s.mu);
      s.loaded_cv.wait(lk, landed);
      for (int32_t sl : slot_of)
        if (s.slots[size_t(sl)].state != SlotState::Ready && !err)
          err = std::make_exception_ptr(Error(ErrorKind::CorruptData,
                                              "get_rows: a prefetched read of layer " + std::to_string(layer) +
                                                  " failed: " + s.prefetch_error));
    }
    if (!err) {
      try {
        if (!cuda) {
          for (int64_t k = b0; k < b1; ++k) std::memcpy(dst + k * B, s.slot_ptr(slot_of[size_t(k - b0)]), B);
        } else {
#if MEMKERNELS_WITH_CUDA
          // Gather into a pinned buffer, copy it to the GPU asynchronously on the copy stream;
          // double-buffered: a gather buffer is refilled once the copy that read it completed.
          if (b0 == 0) s.copies_after(stream);
          const int64_t per = std::max<int64_t>(1, int64_t(s.stage_bytes / B));
          try {
            for (int64_t k0 = b0; k0 < b1; k0 += per) {
              const int64_t k1 = std::min(b1, k0 + per);
              const int g = s.gather_next;
              s.gather_next ^= 1;
              cuda_backend::event_wait_host(s.gather_event[g]);
              for (int64_t k = k0; k < k1; ++k)
                std::memcpy(s.gather[g].ptr + (k - k0) * B, s.slot_ptr(slot_of[size_t(k - b0)]), B);
              cuda_backend::copy_h2d_async(dst + k0 * B, s.gather[g].ptr, size_t((k1 - k0) * B), s.copy_stream);
              cuda_backend::event_record(s.gather_event[g], s.copy_stream);
            }
          } catch (...) {
            try { s.consumer_waits(stream); } catch (...) {}
            throw;
          }
          s.consumer_waits(stream);
#else
          (void)stream;
#endif
        }
      } catch (...) {
        err = std::current_exception();
      }
    }
    s.unpin(slot_of);
    if (err) std::rethrow_exception(err);
  }
}

void WeightStore::visit_rows(int64_t layer, const int64_t* ids, int64_t count, const RowVisitor& visit) {
  Impl& s = *impl_;
  s.check_process("visit_rows");
  const StoredLayerInfo& L = layer_info(layer);
  const int32_t li = int32_t(s.layer_index[layer]);
  check(!s.opts.device.is_cuda(), ErrorKind::Value,
        "visit_rows: the store's outputs are on CUDA; visit_rows hands out host pointers to a CPU store's cache");
  check(count >= 0, ErrorKind::Value, "visit_rows: count must be >= 0");
  for (int64_t k = 0; k < count; ++k)
    if (ids[k] < 0 || ids[k] >= L.neurons)  // the message only for a bad id: built for every id, it cost more than the look-ups
      throw_error(ErrorKind::Value,
          "visit_rows: neuron_ids[" + std::to_string(k) + "] = " + std::to_string(ids[k]) + " is out of range [0, " +
              std::to_string(L.neurons) + ") of layer " + std::to_string(layer));
  std::lock_guard<std::mutex> call(s.call_mu);
  const int64_t nslots = int64_t(s.slots.size());
  check(nslots > 0, ErrorKind::Value, "visit_rows: no neuron fits in the cache");
  int64_t batch;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    batch = std::max<int64_t>(1, nslots - s.pinned_slots);
  }
  std::vector<int64_t> order;            // positions k in visiting order: cached ones, then the misses
  std::vector<const uint8_t*> ptrs;
  std::vector<int32_t> slot_of;
  for (int64_t b0 = 0; b0 < count; b0 += batch) {
    const int64_t b1 = std::min(count, b0 + batch);
    order.clear();
    slot_of.assign(size_t(b1 - b0), -1);
    std::vector<std::pair<int64_t, int32_t>> todo;
    std::vector<int64_t> missed;
    {
      std::unique_lock<std::mutex> lk(s.mu);
      for (int64_t k = b0; k < b1; ++k) {
        int32_t sl;
        if (s.pin_for_use(lk, li, ids[k], sl)) {
          order.push_back(k);
        } else {
          todo.emplace_back(ids[k], sl);
          missed.push_back(k);
        }
        slot_of[size_t(k - b0)] = sl;
      }
    }
    // The reads start now on the I/O threads; the caller visits the cached neurons meanwhile, then
    // the misses as their reads land. The order (cached ones, then misses, each in `ids` order)
    // does not depend on timing, so neither does a floating-point sum over the visits.
    order.insert(order.end(), missed.begin(), missed.end());
    std::sort(todo.begin(), todo.end());
    auto group = std::make_shared<Group>();
    std::unique_ptr<Impl::CallerReaps> reaps;
    if (s.aio) reaps.reset(new Impl::CallerReaps(s));  // before the reads start: the reaper thread keeps off
    if (!todo.empty()) s.load_runs(li, todo, group, false);
    std::exception_ptr err;
    bool failed = false;
    size_t at = 0;
    while (at < order.size() && !err && !failed) {
      size_t end = at;
      {
        std::unique_lock<std::mutex> lk(s.mu);
        while (end < order.size() && s.slots[size_t(slot_of[size_t(order[end] - b0)])].state != SlotState::Loading) ++end;
        if (end == at) {
          lk.unlock();
          if (s.aio) {
            s.aio_reap(1, 200 * 1000);  // 200 us: the completion may have gone to the reaper thread
          } else if (!s.run_one_queued()) {  // nothing queued: the next neuron is being read by a thread
            lk.lock();
            s.loaded_cv.wait(lk, [&] {
              return s.slots[size_t(slot_of[size_t(order[at] - b0)])].state != SlotState::Loading;
            });
          }
          continue;
        }
        for (size_t i = at; i < end; ++i)
          if (s.slots[size_t(slot_of[size_t(order[i] - b0)])].state != SlotState::Ready) {
            end = i;  // visit up to the failed one, then report it (below, once its read has said why)
            failed = true;
            break;
          }
      }
      ptrs.resize(end - at);
      for (size_t i = at; i < end; ++i) ptrs[i - at] = s.slot_ptr(slot_of[size_t(order[i] - b0)]);
      if (end > at) {
        try {
          visit(order.data() + at, ptrs.data(), int64_t(end - at));
        } catch (...) {
          if (!err) err = std::current_exception();
        }
      }
      at = end;
    }
    if (!todo.empty()) s.help_until(*group);  // every read of this batch is over before its slots are unpinned
    reaps.reset();
    if (!err && group->error) err = group->error;
    if (!err && failed)  // a neuron a prefetch was loading
      err = std::make_exception_ptr(Error(ErrorKind::CorruptData,
                                          "visit_rows: a prefetched read of layer " + std::to_string(layer) + " failed" +
                                              (s.prefetch_error.empty() ? "" : ": " + s.prefetch_error)));
    s.unpin(slot_of);
    if (err) std::rethrow_exception(err);
  }
}

void WeightStore::prefetch(int64_t layer, const int64_t* ids, int64_t count) {
  Impl& s = *impl_;
  s.check_process("prefetch");
  const StoredLayerInfo& L = layer_info(layer);
  const int32_t li = int32_t(s.layer_index[layer]);
  for (int64_t k = 0; k < count; ++k)
    if (ids[k] < 0 || ids[k] >= L.neurons)  // the message only for a bad id: built for every id, it cost more than the look-ups
      throw_error(ErrorKind::Value,
          "prefetch: neuron_ids[" + std::to_string(k) + "] = " + std::to_string(ids[k]) + " is out of range [0, " +
              std::to_string(L.neurons) + ") of layer " + std::to_string(layer));
  std::vector<std::pair<int64_t, int32_t>> todo;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    // Never evict what this prefetch itself just loaded: at most nslots/2 new neurons, so the
    // windowed working set is not thrashed by a too-large prediction.
    const size_t cap = std::max<size_t>(1, (s.slots.size() - size_t(s.pinned_slots)) / 2);
    for (int64_t k = 0; k < count && todo.size() < cap; ++k) {
      int32_t sl = s.table[size_t(li)][size_t(ids[k])];
      if (sl >= 0) {
        s.touch(sl);
        continue;
      }
      sl = s.alloc_slot();
      if (sl < 0) break;  // budget reached: the rest is read on demand
      s.claim(sl, li, ids[k]);
      todo.emplace_back(ids[k], sl);
    }
    if (todo.empty()) return;
  }
  std::sort(todo.begin(), todo.end());
  auto group = std::make_shared<Group>();
  s.load_runs(li, todo, group, true);
}

void WeightStore::wait_prefetch() {
  Impl& s = *impl_;
  s.check_process("wait_prefetch");
  std::unique_lock<std::mutex> lk(s.mu);
  s.prefetch_cv.wait(lk, [&] { return s.prefetch_pending == 0; });
}

void WeightStore::pin(int64_t layer, const int64_t* ids, int64_t count) {
  Impl& s = *impl_;
  s.check_process("pin");
  const StoredLayerInfo& L = layer_info(layer);
  const int32_t li = int32_t(s.layer_index[layer]);
  check(count >= 0, ErrorKind::Value, "pin: count must be >= 0");
  for (int64_t k = 0; k < count; ++k)
    if (ids[k] < 0 || ids[k] >= L.neurons)  // the message only for a bad id: built for every id, it cost more than the look-ups
      throw_error(ErrorKind::Value,
          "pin: neuron_ids[" + std::to_string(k) + "] = " + std::to_string(ids[k]) + " is out of range [0, " +
              std::to_string(L.neurons) + ") of layer " + std::to_string(layer));
  wait_prefetch();
  std::lock_guard<std::mutex> call(s.call_mu);
  std::vector<std::pair<int64_t, int32_t>> todo;
  std::vector<int32_t> newly;  // slots this call pinned (undone if a read fails)
  {
    std::unique_lock<std::mutex> lk(s.mu);
    // Count what is new first: one slot always stays unpinned so that get_rows can work.
    std::vector<int64_t> uniq(ids, ids + count);
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    int64_t add = 0;
    for (int64_t n : uniq) {
      const int32_t sl = s.table[size_t(li)][size_t(n)];
      if (sl < 0 || !s.slots[size_t(sl)].pinned) ++add;
    }
    const int64_t nslots = int64_t(s.slots.size());
    check(s.pinned_slots + add <= nslots - 1, ErrorKind::Value,
          "pin: " + std::to_string(add) + " more neurons do not fit: the cache has " + std::to_string(nslots) +
              " slots, " + std::to_string(s.pinned_slots) + " are pinned and one must stay free");
    for (int64_t n : uniq) {
      int32_t sl = s.table[size_t(li)][size_t(n)];
      if (sl >= 0) {
        Slot& x = s.slots[size_t(sl)];
        if (!x.pinned) {
          x.pinned = true;
          ++x.pins;
          ++s.pinned_slots;
          s.lru_unlink(sl);
          newly.push_back(sl);
        }
        continue;
      }
      while ((sl = s.alloc_slot()) < 0) s.loaded_cv.wait(lk);  // in-flight reads hold the others
      s.claim(sl, li, n);
      Slot& x = s.slots[size_t(sl)];
      x.pinned = true;
      ++x.pins;  // the permanent pin, besides the loader's
      ++s.pinned_slots;
      s.lru_unlink(sl);
      newly.push_back(sl);
      todo.emplace_back(n, sl);
    }
  }
  auto group = std::make_shared<Group>();
  if (!todo.empty()) {
    s.load_runs(li, todo, group, false);
    s.help_until(*group);
  }
  std::unique_lock<std::mutex> lk(s.mu);
  s.loaded_cv.wait(lk, [&] {
    for (int32_t sl : newly)
      if (s.slots[size_t(sl)].state == SlotState::Loading) return false;
    return true;
  });
  bool failed = false;
  for (int32_t sl : newly) failed |= s.slots[size_t(sl)].state != SlotState::Ready;
  if (failed || group->error) {  // all or nothing: undo this call's pins
    for (int32_t sl : newly) {
      Slot& x = s.slots[size_t(sl)];
      x.pinned = false;
      --s.pinned_slots;
      s.lru_push_front(sl);
      if (--x.pins == 0 && x.state == SlotState::Failed) s.release_slot(sl);
    }
    lk.unlock();
    s.loaded_cv.notify_all();
    if (group->error) std::rethrow_exception(group->error);
    throw Error(ErrorKind::CorruptData, "pin: a read of layer " + std::to_string(layer) + " failed");
  }
}

void WeightStore::unpin_all() {
  Impl& s = *impl_;
  s.check_process("unpin_all");
  std::lock_guard<std::mutex> call(s.call_mu);
  std::lock_guard<std::mutex> lk(s.mu);
  for (int32_t sl = 0; sl < int32_t(s.slots.size()); ++sl) {
    Slot& x = s.slots[size_t(sl)];
    if (x.pinned) {
      x.pinned = false;
      --x.pins;
      s.lru_push_front(sl);  // back in the LRU list, as just used
    }
  }
  s.pinned_slots = 0;
}

void WeightStore::next_token() {
  Impl& s = *impl_;
  s.check_process("next_token");
  std::lock_guard<std::mutex> lk(s.mu);
  ++s.token;
  if (s.opts.window_tokens <= 0) return;
  // Neurons not used in the last window_tokens tokens leave (from the LRU end).
  for (int32_t sl = s.lru_tail; sl >= 0;) {
    const int32_t prev = s.slots[size_t(sl)].prev;
    const Slot& x = s.slots[size_t(sl)];
    if (x.last_token + uint64_t(s.opts.window_tokens) > s.token) break;
    if (x.pins == 0 && x.state == SlotState::Ready) {
      ++s.evictions;
      s.release_slot(sl);
    }
    sl = prev;
  }
}

void WeightStore::clear_cache() {
  Impl& s = *impl_;
  s.check_process("clear_cache");
  wait_prefetch();
  std::lock_guard<std::mutex> call(s.call_mu);
  std::lock_guard<std::mutex> lk(s.mu);
  for (int32_t sl = 0; sl < int32_t(s.slots.size()); ++sl)
    if (s.slots[size_t(sl)].state != SlotState::Free && s.slots[size_t(sl)].pins == 0) s.release_slot(sl);
}

WeightStoreStats WeightStore::stats() const {
  const Impl& s = *impl_;
  s.check_process("stats");
  std::lock_guard<std::mutex> lk(s.mu);
  WeightStoreStats r;
  r.bytes_read = s.bytes_read.load();
  r.reads_issued = s.reads_issued.load();
  r.neuron_hits = s.hits;
  r.neuron_misses = s.misses;
  r.prefetched = s.prefetched;
  r.evictions = s.evictions;
  r.resident_bytes = s.resident;
  r.peak_resident_bytes = s.peak_resident;
  r.cache_capacity_bytes = uint64_t(s.slots.size()) * s.slot_bytes;
  r.staging_bytes = uint64_t(s.stages.size()) * s.stage_bytes + (s.gather[0].ptr ? 2 * s.stage_bytes : 0);
  r.cache_slots = uint64_t(s.slots.size());
  r.slot_bytes = s.slot_bytes;
  r.pinned_neurons = uint64_t(s.pinned_slots);
  r.read_granularity = s.read_align;
  r.tokens = s.token;
  return r;
}

void WeightStore::reset_stats() {
  Impl& s = *impl_;
  s.check_process("reset_stats");
  std::lock_guard<std::mutex> lk(s.mu);
  s.bytes_read = 0;
  s.reads_issued = 0;
  s.hits = s.misses = s.prefetched = s.evictions = 0;
  s.peak_resident = s.resident;
}

}  // namespace memkernels
