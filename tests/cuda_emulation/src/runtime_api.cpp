// CUDA emulation: the runtime API functions the library calls, with device memory as host memory.
// Declarations come from the toolkit's cuda_runtime_api.h, so signatures cannot drift. Streams and
// events are synchronous (every operation has completed when its call returns), so stream-ordering
// bugs do not show here; tests/run_gpu_checks.sh on a real GPU remains the check for those.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

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

cudaError_t fail(cudaError_t err, const std::string& detail) {
  set_last_error(err, detail);
  return err;
}
// Stream and event handles are never dereferenced by callers: any distinct non-null pointer works.
struct StreamObject { int device; };
struct EventObject { int device; };
}  // namespace

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
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

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
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!device_allocations().erase(ptr)) return fail(cudaErrorInvalidValue, "cudaFree of a pointer cudaMalloc did not return");
  }
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }
cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  *ptr = std::malloc(bytes ? bytes : 1);
  return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation, "out of memory");
}
cudaError_t cudaFreeHost(void* ptr) {
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
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }

cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new StreamObject{t_device});
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<StreamObject*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// Emulated streams never capture a graph; MKEMU_CAPTURING=1 makes them say they do, so that a
// test can run the path a library takes under capture (no synchronising read-backs).
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  const char* env = std::getenv("MKEMU_CAPTURING");
  *status = env && env[0] == '1' ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }

cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new EventObject{t_device});
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<EventObject*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }

}  // extern "C"
