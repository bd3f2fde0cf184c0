#include "fiber.h"

#include <cstdint>
#include <cstdlib>

namespace mkemu::detail {

#if MKEMU_UCONTEXT

void fiber_prepare(FiberContext& f, void* stack, size_t stack_bytes, void (*entry)()) {
  if (getcontext(&f.uc) != 0) std::abort();
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = stack_bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, entry, 0);
}

void fiber_switch(FiberContext& from, FiberContext& to) {
  if (swapcontext(&from.uc, &to.uc) != 0) std::abort();
}

#else

// mkemu_switch_stack(save_sp, load_sp): push the System V callee-saved registers, store rsp in
// *save_sp, load load_sp, pop the other fiber's registers and return into it. The FPU control words
// are not switched: kernels never change them.
asm(R"(
  .text
  .globl mkemu_switch_stack
  .hidden mkemu_switch_stack
  .type mkemu_switch_stack,@function
mkemu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mkemu_switch_stack, .-mkemu_switch_stack
)");
extern "C" void mkemu_switch_stack(void** save_sp, void* load_sp);

void fiber_prepare(FiberContext& f, void* stack, size_t stack_bytes, void (*entry)()) {
  // A new stack looks like one suspended inside mkemu_switch_stack: six register slots, then the
  // "return address" entry, then a zero return address for entry itself. entry then starts with
  // rsp % 16 == 8, as after a call (the ABI's alignment).
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + stack_bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                              // entry's return address (never used)
  *--sp = reinterpret_cast<void*>(entry);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // r15 r14 r13 r12 rbx rbp
  f.sp = sp;
}

void fiber_switch(FiberContext& from, FiberContext& to) { mkemu_switch_stack(&from.sp, to.sp); }

#endif

}  // namespace mkemu::detail
