// CUDA emulation: lazy streams (see src/runtime_api.cpp). Off by default: every stream operation has
// completed when its call returns. On (set_lazy_streams(true) or env MKEMU_LAZY_STREAMS=1), copies,
// memsets and frees enqueued on a created stream run only once something orders them (a launch on
// that stream, an event after them that a stream waits on or the host synchronises on, a stream or
// device synchronisation, a legacy-stream operation for blocking streams): the latest schedule CUDA
// allows, so a missing cudaStreamWaitEvent, or a pinned buffer refilled before its copy completed,
// gives wrong data. cudaStreamQuery reports cudaErrorNotReady while a stream holds such work.
#pragma once

#include <cuda_runtime.h>

#define MKEMU_API __attribute__((visibility("default")))

namespace mkemu {

MKEMU_API void set_lazy_streams(bool on);  // turning it off runs every deferred operation first
MKEMU_API bool lazy_streams();
// Called by launch_kernel before running a kernel on `stream`: its stream's earlier work first.
MKEMU_API void stream_before_launch(cudaStream_t stream);

}  // namespace mkemu
