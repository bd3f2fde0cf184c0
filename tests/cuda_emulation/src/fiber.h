// CUDA emulation: fibers (user-mode threads) for the GPU threads of a block.
//
// On x86-64 a switch is a dozen instructions (save the callee-saved registers and the stack
// pointer, load the other fiber's); ucontext's swapcontext would also make a signal-mask system
// call per switch, which dominated run time in the prototype. Other platforms use ucontext.
// A fiber never moves to another OS thread (thread_local shared memory relies on it).
#pragma once

#include <cstddef>

#if !defined(__x86_64__) || defined(MKEMU_USE_UCONTEXT)
#define MKEMU_UCONTEXT 1
#include <ucontext.h>
#endif

namespace mkemu::detail {

struct FiberContext {
#if MKEMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;  // saved stack pointer; the registers are on that stack
#endif
};

// Makes `f` start running entry() on the given stack at its first switch. entry must never return.
void fiber_prepare(FiberContext& f, void* stack, size_t stack_bytes, void (*entry)());
// Saves the running context in `from` and resumes `to`.
void fiber_switch(FiberContext& from, FiberContext& to);

}  // namespace mkemu::detail
