// CUDA emulation: the execution model (grid, blocks, threads, block barriers, shared memory, launch).
//
// A launch runs its blocks on a few OS worker threads, one block at a time per worker; the threads
// of a block are fibers on that worker, switched only at barriers and warp collectives. Because a
// block never leaves its worker, `static thread_local` storage is exactly "the shared memory of the
// running block" (this is what `__shared__` becomes), and plain loads/stores between two barriers
// behave as on the GPU for race-free code.
#pragma once

#include <cstddef>
#include <cstdint>

#include <vector_types.h>  // uint3, dim3 from the CUDA toolkit

namespace mkemu {

// Where a barrier or collective was called from: all threads meeting at one barrier must have
// called it from the same place, otherwise the code has a divergent barrier (undefined on a GPU).
struct Site {
  const char* file;
  int line;
};

// What the running fiber sees as its built-in variables; the scheduler points t_current at the
// running thread's record before switching to it.
struct ThreadVars {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_smem;
};
extern thread_local ThreadVars* t_current;

// Block-wide barrier. Fails the launch (never hangs) when threads of the block wait at different
// call sites, or when a thread of the block has exited while others use a block barrier.
void syncthreads(Site site);

// Ends the launch with an error naming `what` (the launch then reports cudaErrorLaunchFailure with
// this text). Only valid inside a kernel.
[[noreturn]] void fail(const char* what, Site site);

inline unsigned char* dynamic_shared() { return t_current->dynamic_smem; }

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel;  // identifies the kernel for cudaFuncSetAttribute's dynamic shared memory limit
};

// Runs body() once per GPU thread of the grid, synchronously. Returns a cudaError_t value and also
// records it as the runtime's last error (what cudaGetLastError returns next).
int launch(const LaunchConfig& cfg, void (*invoke)(const void*), const void* body);

template <typename Body>
int launch(const LaunchConfig& cfg, const Body& body) {
  return launch(cfg, [](const void* b) { (*static_cast<const Body*>(b))(); }, &body);
}

// Test hooks. Seed 0 (the default, or env MKEMU_SEED): threads run in index order between barriers;
// any other seed runs them in a random order and lets threads fall behind by whole segments, so a
// missing __syncthreads shows up as a wrong result. Workers: OS threads a launch uses (default: env MKEMU_WORKERS or the core count).
void set_schedule_seed(uint64_t seed);
void set_workers(int workers);

}  // namespace mkemu
