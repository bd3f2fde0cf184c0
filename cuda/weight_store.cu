// Weight store, CUDA side: a copy stream, events and async host->device copies from the pinned
// staging buffers. The store gathers neurons into pinned memory on the host; these copies move them
// to the GPU on the store's own copy stream (so they overlap the caller's kernels), the caller's
// stream waits on an event recorded after them, and events tell the host when a staging buffer may
// be reused.
#include "cuda_common.cuh"
#include "weight_store_internal.h"

namespace memkernels::cuda_backend {

void set_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

void* event_create() {
  cudaEvent_t ev = nullptr;
  check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  return ev;
}

void event_destroy(void* event) noexcept {
  if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

void event_record(void* event, void* stream) {
  check_cuda(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)),
             "cudaEventRecord");
}

void event_wait_host(void* event) {
  check_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

void copy_h2d_async(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return;
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)),
             "cudaMemcpyAsync (weight store H2D)");
}

void* stream_create_nonblocking() {
  cudaStream_t st = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreateWithFlags (weight store copy stream)");
  return st;
}

void stream_destroy(void* stream) noexcept {
  if (!stream) return;
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream));  // its copies read pinned buffers about to be freed
  cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

void stream_wait_event(void* stream, void* event) {
  check_cuda(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0),
             "cudaStreamWaitEvent");
}

}  // namespace memkernels::cuda_backend
