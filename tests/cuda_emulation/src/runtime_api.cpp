// CUDA emulation: the runtime API functions the library calls, with device memory as host memory.
// Declarations come from the toolkit's cuda_runtime_api.h, so signatures cannot drift.
//
// Streams and events: by default synchronous (every operation has completed when its call returns),
// so stream-ordering bugs do not show. With lazy streams on (env MKEMU_LAZY_STREAMS=1 or
// mkemu::set_lazy_streams), the copies, memsets and frees enqueued on a created stream are deferred
// until something orders them: a kernel launch on that stream (launches themselves run at once,
// after their stream's earlier work), an event recorded after them that another stream waits on or
// the host synchronises on, a stream / device synchronisation, or (blocking streams only) an
// operation on the legacy default stream. That is one legal schedule of CUDA's rules, the latest
// one for every copy, so a missing cudaStreamWaitEvent or a pinned buffer refilled before the copy
// reading it completed gives wrong data. A copy from pageable host memory reads its source when
// called (as CUDA stages it); one into pageable host memory completes before the call returns.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "mkemu/streams.h"
#include "runtime_state.h"

namespace mkemu::detail {
namespace {
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local int t_device = 0;
thread_local std::string t_detail;
thread_local cudaError_t t_detail_code = cudaSuccess;

std::mutex g_mutex;
std::map<const void*, size_t>& func_smem() {
  static std::map<const void*, size_t> m;
  return m;
}
std::set<void*>& device_allocations() {
  static std::set<void*> s;
  return s;
}
std::map<uintptr_t, size_t>& device_ranges() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
bool is_device(const void* p) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = device_ranges().upper_bound(a);
  if (it == device_ranges().begin()) return false;
  --it;
  return a < it->first + it->second;
}

cudaError_t fail(cudaError_t err, const std::string& detail) {
  set_last_error(err, detail);
  return err;
}
// Stream and event handles are never dereferenced by callers: any distinct non-null pointer works.
struct StreamObject {
  int device;
  bool nonblocking = false;
  std::deque<std::function<void()>> ops;  // lazy mode: enqueued, not yet run
  uint64_t enqueued = 0, done = 0;        // ops ever enqueued / run
};
struct EventObject {
  int device;
  StreamObject* stream = nullptr;  // lazy mode: complete once `stream` has run `seq` ops
  uint64_t seq = 0;
};

// Lazy-stream state. One recursive lock: an op run while flushing may itself call the API (free).
std::recursive_mutex g_streams_mutex;
std::set<StreamObject*>& streams() {
  static std::set<StreamObject*> s;
  return s;
}
std::set<EventObject*>& events() {
  static std::set<EventObject*> s;
  return s;
}
std::map<uintptr_t, size_t>& pinned_ranges() {
  static std::map<uintptr_t, size_t> m;
  return m;
}
int g_lazy = -1;  // -1: not decided yet (env MKEMU_LAZY_STREAMS)

bool lazy() {
  if (g_lazy < 0) {
    const char* env = std::getenv("MKEMU_LAZY_STREAMS");
    g_lazy = env && env[0] == '1' ? 1 : 0;
  }
  return g_lazy == 1;
}

// The legacy default stream (0, cudaStreamLegacy) and the per-thread default stream run eagerly.
StreamObject* lazy_stream(cudaStream_t s) {
  if (!lazy() || s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return nullptr;
  return reinterpret_cast<StreamObject*>(s);
}

void flush(StreamObject* st, uint64_t upto) {
  while (st->done < upto && !st->ops.empty()) {
    std::function<void()> op = std::move(st->ops.front());
    st->ops.pop_front();
    ++st->done;
    op();
  }
}
void flush_all(bool blocking_only) {
  for (StreamObject* st : streams())
    if (!blocking_only || !st->nonblocking) flush(st, st->enqueued);
}

// Runs op on stream s: deferred on a lazy stream, else now (an op on the legacy default stream
// first waits for the blocking streams' work).
void enqueue(cudaStream_t s, std::function<void()> op) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  if (StreamObject* st = lazy_stream(s)) {
    st->ops.push_back(std::move(op));
    ++st->enqueued;
    return;
  }
  if (lazy()) flush_all(true);
  op();
}

bool is_pinned(const void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = pinned_ranges().upper_bound(a);
  if (it == pinned_ranges().begin()) return false;
  --it;
  return a < it->first + it->second;
}
}  // namespace

void set_lazy(bool on) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  if (!on && g_lazy == 1) flush_all(false);
  g_lazy = on ? 1 : 0;
}

void set_last_error(int err, const std::string& detail) {
  t_last_error = cudaError_t(err);
  t_detail_code = cudaError_t(err);
  t_detail = detail;
}

size_t max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = func_smem().find(kernel);
  return it == func_smem().end() ? kDefaultDynamicSmem : it->second;
}

size_t device_smem_optin() {
  if (const char* env = std::getenv("MKEMU_SMEM_OPTIN")) return size_t(std::strtoull(env, nullptr, 10));
  return kMaxDynamicSmem;
}

}  // namespace mkemu::detail

using namespace mkemu::detail;

// Exported from the emulated libmemkernels too, so that a test linking only the library can create
// streams and query them (this build only).
#pragma GCC visibility push(default)

extern "C" {

cudaError_t cudaGetLastError(void) {
  cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  if (err == t_detail_code && !t_detail.empty()) return t_detail.c_str();
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "CUDA emulation error";
  }
}
const char* cudaGetErrorName(cudaError_t err) { return cudaGetErrorString(err); }

// One emulated device (an sm_90 part).
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "invalid device ordinal " + std::to_string(device) + " (the emulation has one device)");
  t_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "invalid device ordinal");
  std::memset(prop, 0, sizeof *prop);
  std::strncpy(prop->name, "memkernels CUDA emulation (sm_90 limits)", sizeof prop->name - 1);
  prop->major = 9, prop->minor = 0;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = kMaxThreadsPerBlock;
  prop->sharedMemPerBlock = kDefaultDynamicSmem;
  prop->sharedMemPerBlockOptin = device_smem_optin();
  prop->multiProcessorCount = 2;
  prop->totalGlobalMem = size_t(1) << 34;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "invalid device ordinal");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 2; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(device_smem_optin()); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " + std::to_string(int(attr)) + " is not emulated");
  }
}
cudaError_t cudaDeviceSynchronize(void) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  flush_all(false);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
  if (value < 0 || size_t(value) > device_smem_optin())
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                           " bytes of dynamic shared memory exceed the device's " + std::to_string(device_smem_optin()));
  std::lock_guard<std::mutex> lock(g_mutex);
  func_smem()[func] = size_t(value);
  return cudaSuccess;
}

// Device memory is host memory, 256-byte aligned like cudaMalloc's.
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (!*ptr) return fail(cudaErrorMemoryAllocation, "out of memory");
  std::lock_guard<std::mutex> lock(g_mutex);
  device_allocations().insert(*ptr);
  device_ranges()[reinterpret_cast<uintptr_t>(*ptr)] = bytes ? bytes : 1;
  return cudaSuccess;
}
namespace {
cudaError_t free_device_now(void* ptr) {
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!device_allocations().erase(ptr)) return fail(cudaErrorInvalidValue, "cudaFree of a pointer cudaMalloc did not return");
    device_ranges().erase(reinterpret_cast<uintptr_t>(ptr));
  }
  std::free(ptr);
  return cudaSuccess;
}
}  // namespace

cudaError_t cudaFree(void* ptr) {
  {
    std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
    if (lazy()) flush_all(false);  // cudaFree synchronises the device
  }
  return free_device_now(ptr);
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t s) {
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!device_allocations().count(ptr)) return fail(cudaErrorInvalidValue, "cudaFreeAsync of a pointer cudaMallocAsync did not return");
  }
  enqueue(s, [ptr] { free_device_now(ptr); });
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  *ptr = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096 + 4096);  // page aligned, as CUDA's
  if (!*ptr) return fail(cudaErrorMemoryAllocation, "out of memory");
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  pinned_ranges()[reinterpret_cast<uintptr_t>(*ptr)] = bytes ? bytes : 1;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* ptr) {
  {
    std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
    if (lazy()) flush_all(false);  // cudaFreeHost synchronises the device
    pinned_ranges().erase(reinterpret_cast<uintptr_t>(ptr));
  }
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  std::memset(attr, 0, sizeof *attr);
  std::lock_guard<std::mutex> lock(g_mutex);
  // Only the start of an allocation is recognised as device memory (enough for the library's checks).
  const bool dev = device_allocations().count(const_cast<void*>(ptr)) != 0;
  attr->type = dev ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
  attr->device = 0;
  attr->devicePointer = dev ? const_cast<void*>(ptr) : nullptr;
  attr->hostPointer = dev ? nullptr : const_cast<void*>(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  enqueue(nullptr, [=] { if (bytes) std::memmove(dst, src, bytes); });
  return cudaSuccess;
}
namespace {
// A 2-D copy (rows of `width` bytes) on stream s, with CUDA's treatment of pageable host memory:
// a pageable source is read now (staged), a copy into pageable memory completes before returning.
void copy_on_stream(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height, cudaStream_t s) {
  if (!width || !height) return;
  auto pageable = [](const void* p) { return !is_device(p) && !is_pinned(p); };
  if (lazy_stream(s) && pageable(dst)) {
    std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
    StreamObject* st = lazy_stream(s);
    flush(st, st->enqueued);
    s = nullptr;  // now, after the stream's earlier work
  }
  if (lazy_stream(s) && pageable(src)) {
    auto staged = std::make_shared<std::vector<unsigned char>>(width * height);
    for (size_t r = 0; r < height; ++r) std::memcpy(staged->data() + r * width, static_cast<const char*>(src) + r * spitch, width);
    enqueue(s, [=] {
      for (size_t r = 0; r < height; ++r) std::memcpy(static_cast<char*>(dst) + r * dpitch, staged->data() + r * width, width);
    });
    return;
  }
  enqueue(s, [=] {
    for (size_t r = 0; r < height; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  });
}
}  // namespace
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t s) {
  copy_on_stream(dst, bytes, src, bytes, bytes, 1, s);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t s) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue, "cudaMemcpy2DAsync: width exceeds a pitch");
  copy_on_stream(dst, dpitch, src, spitch, width, height, s);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                         cudaMemcpyKind kind) {
  return cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, nullptr);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  enqueue(nullptr, [=] { if (bytes) std::memset(dst, value, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s) {
  enqueue(s, [=] { if (bytes) std::memset(dst, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  auto* st = new StreamObject{t_device};
  st->nonblocking = (flags & cudaStreamNonBlocking) != 0;
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  streams().insert(st);
  *s = reinterpret_cast<cudaStream_t>(st);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  auto* st = reinterpret_cast<StreamObject*>(s);
  flush(st, st->enqueued);  // CUDA completes a destroyed stream's work
  for (EventObject* e : events())
    if (e->stream == st) e->stream = nullptr;
  streams().erase(st);
  delete st;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  if (StreamObject* st = lazy_stream(s)) flush(st, st->enqueued);
  else if (lazy()) flush_all(true);
  return cudaSuccess;
}
// cudaErrorNotReady while a lazy stream holds work nothing has ordered yet (and runs none of it).
cudaError_t cudaStreamQuery(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  StreamObject* st = lazy_stream(s);
  return st && st->done < st->enqueued ? cudaErrorNotReady : cudaSuccess;
}
// Emulated streams never capture a graph; MKEMU_CAPTURING=1 makes them say they do, so that a
// test can run the path a library takes under capture (no synchronising read-backs).
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  const char* env = std::getenv("MKEMU_CAPTURING");
  *status = env && env[0] == '1' ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
namespace {
// Runs the work an event was recorded after (lazy mode): a wait on it, or the host, needs it done.
void complete(cudaEvent_t e) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  auto* ev = reinterpret_cast<EventObject*>(e);
  if (ev->stream) flush(ev->stream, ev->seq);
}
}  // namespace
// Later work on the stream comes after the event: in lazy mode that work runs later anyway, so
// completing the event's work now is the ordering.
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned int) {
  complete(e);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) {
  auto* ev = new EventObject{t_device};
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  events().insert(ev);
  *e = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  events().erase(reinterpret_cast<EventObject*>(e));
  delete reinterpret_cast<EventObject*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mutex);
  auto* ev = reinterpret_cast<EventObject*>(e);
  StreamObject* st = lazy_stream(s);
  if (!st && lazy()) flush_all(true);  // on the legacy stream: after the blocking streams' work
  ev->stream = st;
  ev->seq = st ? st->enqueued : 0;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  complete(e);
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  complete(e);  // "completes when asked": a poll loop never spins forever
  return cudaSuccess;
}

}  // extern "C"

namespace mkemu {
void set_lazy_streams(bool on) { detail::set_lazy(on); }
bool lazy_streams() {
  std::lock_guard<std::recursive_mutex> lock(detail::g_streams_mutex);
  return detail::lazy();
}
void stream_before_launch(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(detail::g_streams_mutex);
  if (detail::StreamObject* st = detail::lazy_stream(s)) detail::flush(st, st->enqueued);
  else if (detail::lazy()) detail::flush_all(true);
}
}  // namespace mkemu

#pragma GCC visibility pop
