// CUDA emulation: warp collectives (shuffles, votes, __syncwarp).
//
// A collective is a barrier over the lanes named in its mask: each lane deposits its input, and the
// lane that arrives last computes every lane's output at once (so the operation is atomic, as on
// the GPU), then all of them continue. This catches the bugs that matter on sm_70+: a full-mask
// shuffle reached by only part of a warp (a lane exited or waits elsewhere), lanes of one warp at
// different collectives, and a mask naming lanes the block does not have.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mkemu/execution.h"

namespace mkemu {

// One lane's input or output of a collective; big enough for an mma fragment (4 + 2 + 4 words).
struct Slot {
  uint32_t w[10];
  const void* ptr;
};

// in[l] / out[l] for every lane l of the warp; mask = the participating lanes. Returns nullptr, or
// a message when the inputs are invalid (e.g. a shuffle reads a lane outside the mask).
using Completer = const char* (*)(const Slot* in, Slot* out, uint32_t mask);

// Runs one collective for the calling lane; `name` is reported in error messages.
void warp_collective(const char* name, Completer op, uint32_t mask, const Slot& in, Slot& out, Site site);

namespace detail {
const char* shuffle_complete(const Slot* in, Slot* out, uint32_t mask);
const char* ballot_complete(const Slot* in, Slot* out, uint32_t mask);
const char* nothing_complete(const Slot* in, Slot* out, uint32_t mask);

inline unsigned lane_id() {
  const ThreadVars& t = *t_current;
  return (t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z)) % 32u;
}

// Every shuffle variant: the lane computes which lane it reads (src) and the completer copies.
template <typename T>
T shuffle(const char* name, uint32_t mask, T value, int src, Site site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a value wider than 8 bytes");
  Slot in{}, out{};
  std::memcpy(in.w, &value, sizeof(T));
  in.w[2] = uint32_t(src);
  warp_collective(name, shuffle_complete, mask, in, out, site);
  T r;
  std::memcpy(&r, out.w, sizeof(T));
  return r;
}

// The lane read by each shuffle kind within segments of `width` lanes; out-of-segment reads return
// the lane's own value, as CUDA specifies.
inline int shfl_src(int lane, int src, int width) { return (lane & ~(width - 1)) + (src & (width - 1)); }
inline int shfl_xor_src(int lane, int m, int width) {
  const int s = lane ^ m;
  return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
}
inline int shfl_up_src(int lane, unsigned d, int width) {
  return int(lane & (width - 1)) - int(d) >= 0 ? lane - int(d) : lane;
}
inline int shfl_down_src(int lane, unsigned d, int width) {
  return int(lane & (width - 1)) + int(d) < width ? lane + int(d) : lane;
}
}  // namespace detail

inline uint32_t ballot(uint32_t mask, bool pred, Site site) {
  Slot in{}, out{};
  in.w[0] = pred;
  warp_collective("__ballot_sync", detail::ballot_complete, mask, in, out, site);
  return out.w[0];
}

inline void syncwarp(uint32_t mask, Site site) {
  Slot in{}, out{};
  warp_collective("__syncwarp", detail::nothing_complete, mask, in, out, site);
}

}  // namespace mkemu

#define MKEMU_SITE ::mkemu::Site{__FILE__, __LINE__}
// CUDA's spellings. Macros (not functions) so that errors name the kernel's line.
#define __shfl_sync(mask, v, src, ...) \
  ::mkemu::detail::shuffle("__shfl_sync", mask, v, \
                           ::mkemu::detail::shfl_src(int(::mkemu::detail::lane_id()), src, MKEMU_WIDTH(__VA_ARGS__)), MKEMU_SITE)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::mkemu::detail::shuffle("__shfl_xor_sync", mask, v, \
                           ::mkemu::detail::shfl_xor_src(int(::mkemu::detail::lane_id()), m, MKEMU_WIDTH(__VA_ARGS__)), MKEMU_SITE)
#define __shfl_up_sync(mask, v, d, ...) \
  ::mkemu::detail::shuffle("__shfl_up_sync", mask, v, \
                           ::mkemu::detail::shfl_up_src(int(::mkemu::detail::lane_id()), d, MKEMU_WIDTH(__VA_ARGS__)), MKEMU_SITE)
#define __shfl_down_sync(mask, v, d, ...) \
  ::mkemu::detail::shuffle("__shfl_down_sync", mask, v, \
                           ::mkemu::detail::shfl_down_src(int(::mkemu::detail::lane_id()), d, MKEMU_WIDTH(__VA_ARGS__)), MKEMU_SITE)
// The optional width argument (default 32).
#define MKEMU_WIDTH(...) (32 __VA_OPT__(*0 + (__VA_ARGS__)))
#define __ballot_sync(mask, pred) ::mkemu::ballot(mask, bool(pred), MKEMU_SITE)
#define __any_sync(mask, pred) (::mkemu::ballot(mask, bool(pred), MKEMU_SITE) != 0u)
#define __all_sync(mask, pred) (::mkemu::ballot(mask, bool(pred), MKEMU_SITE) == uint32_t(mask))
#define __syncwarp(...) ::mkemu::syncwarp(MKEMU_MASK(__VA_ARGS__), MKEMU_SITE)
#define MKEMU_MASK(...) (0xffffffffu __VA_OPT__(*0u + (__VA_ARGS__)))
