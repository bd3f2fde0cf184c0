// memkernels/weight_store.h — weights streamed from flash storage under a DRAM budget
// ("LLM in a flash", Alizadeh et al. 2023).
//
// A store file holds whole tensors (any dtype: float, quantized codes, sparse index arrays) and
// bundled FFN layers: for each neuron i of a layer, [gate row i | up row i | down row i] (each
// d_model elements; gate optional) lie together, so one read brings one neuron and a run of
// neighbouring neurons is one large read. Every read unit (a neuron, or a chunk of a tensor)
// carries a CRC-32C checked on every read.
//
// File layout (little endian), version 1:
//   [0, 64)      header: magic "MKWSTORE", u32 version, u32 flags, u64 dir_offset, u64 dir_bytes,
//                u64 data_offset, u64 file_bytes, u32 dir_crc, u32 reserved[2], u32 header_crc
//   [4096, ...)  data, each tensor / layer starting on a 4096-byte boundary
//   [dir_offset, +dir_bytes)  binary directory (names, dtypes, shapes, offsets, per-chunk CRC-32Cs)
// The writer writes `path + ".partial"` and renames it over `path` at finish(), so a reader never
// sees a file being written (readers holding the old file keep reading the old inode).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "memkernels/tensor.h"

namespace memkernels {

constexpr uint32_t kWeightStoreVersion = 1;

struct StoredTensorInfo {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  uint64_t offset = 0, nbytes = 0;
  uint32_t chunk_bytes = 0;  // CRC granularity (and read unit) of this tensor
};

struct StoredLayerInfo {
  int64_t layer = 0;         // caller's layer id
  int64_t neurons = 0;       // d_ff
  int64_t d_model = 0;
  DType dtype = DType::Float32;
  int parts = 3;             // 3: gate, up, down; 2: up, down
  uint64_t offset = 0;
  uint64_t bundle_bytes = 0; // parts * d_model * dtype size
};

class WeightStoreWriter {
 public:
  explicit WeightStoreWriter(const std::string& path);
  ~WeightStoreWriter();  // without finish(), the partial file is removed
  WeightStoreWriter(const WeightStoreWriter&) = delete;
  WeightStoreWriter& operator=(const WeightStoreWriter&) = delete;

  // A whole tensor (CPU, any strides, any dtype). chunk_bytes: read/CRC unit (default 1 MiB).
  void add_tensor(const std::string& name, const TensorView& t, uint32_t chunk_bytes = 1u << 20);
  // A bundled FFN layer. gate (optional, may be null), up, down: (neurons, d_model) views, CPU,
  // one dtype, any strides: pass HF down_proj.weight (d_model, d_ff) transposed as a strided view.
  void add_ffn_layer(int64_t layer, const TensorView* gate, const TensorView& up, const TensorView& down);
  void finish();
  void abort() noexcept;  // drops the partial file; the writer is finished

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct WeightStoreOptions {
  Device device{};          // where get()/get_rows() outputs live: CPU or CUDA
  int io_threads = 4;       // I/O thread pool size (the pread engine; with AIO its staging buffers hold the reads in flight)
  int window_tokens = 5;    // keep neurons used in the last k tokens; 0: keep until evicted by budget
  bool direct_io = true;    // try O_DIRECT; falls back to buffered reads (+ fadvise DONTNEED) if refused
  int64_t merge_gap_bytes = 32 << 10;  // coalesce two neuron runs when the gap between them is at most this
  int64_t max_read_bytes = 1 << 20;    // split coalesced runs into reads of at most this (>= one neuron)
  // O_DIRECT CPU stores: issue reads through Linux native AIO (a call's reads in one io_submit, a
  // reaper thread instead of io_threads pread threads). Falls back to the I/O threads when the
  // kernel refuses AIO, for buffered files and CUDA stores, or when the environment variable
  // MEMKERNELS_STORE_IO=threads is set. See io_engine().
  bool async_io = true;
};

struct WeightStoreStats {
  uint64_t bytes_read = 0;       // bytes transferred from the file (alignment padding and gaps included)
  uint64_t reads_issued = 0;     // reads issued (preads or AIO reads; a short one finished synchronously counts once)
  uint64_t neuron_hits = 0;      // requested neurons found resident
  uint64_t neuron_misses = 0;    // requested neurons read from the file
  uint64_t prefetched = 0;       // neurons loaded by prefetch()
  uint64_t evictions = 0;
  uint64_t resident_bytes = 0;   // neuron bytes in the cache now
  uint64_t peak_resident_bytes = 0;
  uint64_t cache_capacity_bytes = 0;  // slots * slot size; + staging_bytes <= dram_budget_bytes
  uint64_t staging_bytes = 0;
  uint64_t cache_slots = 0;      // neurons the cache can hold (each slot = the largest bundle)
  uint64_t slot_bytes = 0;
  uint64_t pinned_neurons = 0;   // slots held by pin()
  uint64_t read_granularity = 0; // alignment of every read: 512 where O_DIRECT takes it, else 4096
  uint64_t tokens = 0;
  double hit_rate() const {
    uint64_t n = neuron_hits + neuron_misses;
    return n ? double(neuron_hits) / double(n) : 0.0;
  }
};

class WeightStore {
 public:
  // Throws Error(CorruptData) for a truncated/corrupt/wrong-version file, Error(IO) when it cannot
  // be opened, Error(Value) when dram_budget_bytes is smaller than the largest single read allows:
  // two read buffers of largest_read_bytes() (one per I/O thread + the caller's; four on CUDA with
  // the gather buffers) plus one neuron. The cache gets what the I/O buffers leave of the budget.
  static std::unique_ptr<WeightStore> open(const std::string& path, int64_t dram_budget_bytes,
                                           const WeightStoreOptions& opts = {});
  ~WeightStore();
  WeightStore(const WeightStore&) = delete;
  WeightStore& operator=(const WeightStore&) = delete;

  const std::vector<StoredTensorInfo>& tensors() const;
  const std::vector<StoredLayerInfo>& layers() const;
  const StoredTensorInfo& tensor_info(const std::string& name) const;  // Error(Value) if absent
  const StoredLayerInfo& layer_info(int64_t layer) const;
  const char* io_mode() const;  // "direct" (O_DIRECT) or "buffered"
  const char* io_engine() const;  // "aio" (Linux native AIO) or "threads" (pread in the I/O threads)
  int64_t largest_read_bytes() const;
  int64_t dram_budget_bytes() const;
  Device device() const;

  // Whole tensor into out (contiguous, its dtype and shape, on the store's device); not cached.
  void get(const std::string& name, const TensorView& out, void* stream = nullptr);
  // Neurons `ids` (count of them, each in [0, neurons), any order, repeats allowed) of `layer` into
  // out (count, parts, d_model), contiguous, layer dtype, on the store's device. Misses are read in
  // coalesced runs and cached (windowing + LRU under the budget).
  // On CUDA (get and get_rows) the host-to-device copies run on the store's own copy stream, not on
  // `stream` (a cudaStream_t; nullptr = the legacy default stream): they start once the work already
  // enqueued on `stream` is done (out may still be in use by it), and `stream` waits on an event
  // recorded after them (cudaStreamWaitEvent), so work enqueued on `stream` after the call sees the
  // data; the host does not wait for the copies. The copies do not wait for kernels enqueued on
  // `stream` after the call: calling get_rows for the next layer before enqueuing this layer's
  // kernels lets the copy overlap them. A pinned staging buffer is refilled only after the copy that
  // read it has completed (an event; the host waits only when it has not yet).
  void get_rows(int64_t layer, const int64_t* ids, int64_t count, const TensorView& out, void* stream = nullptr);
  // Zero-copy access for a CPU store: makes neurons `ids` of `layer` resident like get_rows (same
  // cache, budget and stats) and calls visit(ks, bundles, n) with pointers to the cached bundles of
  // ids[ks[0]], ..., ids[ks[n-1]] instead of copying them out. Every k in [0, count) is visited once:
  // first the neurons already cached, then the misses as their reads land, each in `ids` order (an
  // order that does not depend on timing), so the caller computes on the cached neurons while the
  // I/O threads read the others. The pointers are valid during the call only; visit must not call
  // back into the store. Error(Value) on a CUDA store; a failed read or an exception thrown by
  // visit is rethrown after the reads in flight are over (the visits made stand).
  using RowVisitor = std::function<void(const int64_t* ks, const uint8_t* const* bundles, int64_t n)>;
  void visit_rows(int64_t layer, const int64_t* ids, int64_t count, const RowVisitor& visit);
  // Starts loading `ids` of `layer` into the cache in the background and returns at once (a
  // predicted active set, or the next layer while this one computes). Prefetch stops at the budget.
  void prefetch(int64_t layer, const int64_t* ids, int64_t count);
  void wait_prefetch();  // blocks until every prefetch issued so far has landed
  // Loads `ids` of `layer` (if not resident) and keeps them in the cache for good: never evicted by
  // the window, the LRU or clear_cache() (the calibrated hot neurons of a model: with layers visited
  // in a cycle, an LRU window alone never hits once a token needs more than the cache). All or
  // nothing; Error(Value) when the pinned neurons would leave no free slot (get_rows needs one).
  void pin(int64_t layer, const int64_t* ids, int64_t count);
  void unpin_all();  // pinned neurons become ordinary cache entries
  // Ends a token: neurons unused in the last window_tokens tokens are evicted.
  void next_token();
  void clear_cache();
  WeightStoreStats stats() const;
  void reset_stats();  // counters to zero (peak := current resident)

 private:
  WeightStore();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The FFN of gathered 4-bit neuron bundles (the streaming store's int4 format, see
// memkernels/models/stream.py): each bundle i is [up row | down column], each part d_model values
// padded to a multiple of 32 as [dp/2 code bytes: value 2j in the low nibble of byte j, 2j+1 in the
// high one][dp/32 float16 scales][dp/32 float16 mins], value = code * scale + min.
// h (T, d) float32, a (T, k) float32 (activated gate, 0 where a neuron is masked off),
// bundles (k, 2, int4_bundle_part_bytes(d)) uint8, out (T, d) float32:
//   out[t] = sum_i a[t, i] * (h[t] . up_i) * down_i, float32 accumulation. CPU, contiguous.
// down_int8: the down part is [d int8 codes][float32 scale] padded to int8_down_part_bytes(d), and
// bundles is (k, 2, (int4_bundle_part_bytes(d) + int8_down_part_bytes(d)) / 2).
int64_t int4_bundle_part_bytes(int64_t d_model);
int64_t int8_down_part_bytes(int64_t d_model);
void stream_ffn_int4(const TensorView& h, const TensorView& a, const TensorView& bundles, const TensorView& out,
                     bool down_int8 = false);

// One streamed FFN layer in one call (the decode step of issue 17's streaming model). Formats of the
// layer's neuron bundles (2 uint8 parts; bundle_bytes checked against d_model):
//   Int4:      [4-bit up row | 4-bit down column]          (see stream_ffn_int4)
//   Int4Int8:  [4-bit up row | int8 down column]
//   DownInt8:  [int8 down column] only: the up projection is resident and computed by the caller
//   DownInt7:  [7-bit down column] only (int7_down_part_bytes: 8 codes in 7 bytes, + 64, then a
//              float32 scale, padded to 512 B where that costs <= 1/8: one O_DIRECT block at d 576)
// With act (T, neurons) float32 in the model's neuron order (Int4*: the activated gate; DownInt8:
// the coefficient z = act(gate) * up) and perm (neurons,) int64 (store position j -> model neuron;
// nullptr: the same order):
//   a_s[t, j]  = act[t, perm[j]]
//   keep[t, j] = !sparse || |s[t, j]| * col_scale[j] > threshold
//                (s = score, (T, neurons) float32 in store order, or a_s itself when score is null;
//                 col_scale (neurons,) float32 in store order, or 1 when null)
// the neurons kept by any token are visited in the store (WeightStore::visit_rows: the cached ones
// are computed while the misses are read), and
//   out[t] = sum_j keep[t, j] a_s[t, j] (h[t] . up_j) down_j     (Int4, Int4Int8)
//   out[t] = sum_j keep[t, j] a_s[t, j] down_j                   (DownInt8/7; h only gives d_model)
// with h (T, d) float32, out (T, d) float32, float32 accumulation.
enum class StreamFfnFormat { Int4 = 0, Int4Int8 = 1, DownInt8 = 2, DownInt7 = 3 };
int64_t int7_down_part_bytes(int64_t d_model);
int64_t stream_ffn_bundle_bytes(StreamFfnFormat format, int64_t d_model);
struct StreamFfnCounts {
  int64_t kept = 0;     // (token, neuron) pairs kept
  int64_t visited = 0;  // neurons requested from the store (kept by any token)
};
StreamFfnCounts stream_ffn_layer(WeightStore& store, int64_t layer, const TensorView& h, const TensorView& act,
                                 const TensorView* perm, const TensorView* score, const TensorView* col_scale,
                                 bool sparse, float threshold, const TensorView& out, StreamFfnFormat format);

// CRC-32C (Castagnoli, as in iSCSI/ext4/RocksDB), the checksum of every read unit, header and
// directory: the SSE4.2 crc32 instruction where the CPU has it (~8 GB/s), else table code.
uint32_t crc32c(const void* data, size_t bytes, uint32_t crc = 0);

}  // namespace memkernels
