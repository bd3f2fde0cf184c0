// Internal helpers of the weight store shared with the CUDA backend (not installed).
#pragma once

#include <cstddef>

#include "memkernels/weight_store.h"
#include "runtime_internal.h"

namespace memkernels::cuda_backend {
// Implemented in cuda/weight_store.cu; only called when MEMKERNELS_WITH_CUDA is set.
void set_device(int device);  // cudaSetDevice for the calling thread
void* event_create();
void event_destroy(void* event) noexcept;
void event_record(void* event, void* stream);
void event_wait_host(void* event);  // blocks the calling host thread until the event completed
// Async host->device copy on `stream` (src must be pinned to overlap).
void copy_h2d_async(void* dst, const void* src, size_t bytes, void* stream);
// The store's copy stream: non-blocking (no implicit ordering with the legacy default stream), so
// its copies overlap the caller's kernels; ordering is explicit, through events.
void* stream_create_nonblocking();
void stream_destroy(void* stream) noexcept;  // waits for the stream's work first
void stream_wait_event(void* stream, void* event);  // later work on `stream` waits for `event`
}  // namespace memkernels::cuda_backend
