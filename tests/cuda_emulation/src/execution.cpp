// CUDA emulation: the block scheduler, block barriers, warp collectives and the launcher.
#include "mkemu/execution.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <driver_types.h>  // cudaError_t values

#include "fiber.h"
#include "mkemu/warp.h"
#include "runtime_state.h"

namespace mkemu {

thread_local ThreadVars* t_current = nullptr;

namespace {

using detail::FiberContext;

constexpr size_t kStackBytes = 256 * 1024;  // per GPU thread; a guard page below each

enum class Wait : uint8_t { Running, Block, Warp, Done };

struct Thread {
  ThreadVars vars;
  FiberContext ctx;
  Wait wait = Wait::Running;
  Site site{};
  const char* what = "";
};

struct WarpState {
  uint32_t arrived = 0, mask = 0, exited = 0;
  const char* name = nullptr;
  Completer op = nullptr;
  Site site{};
  Slot in[32], out[32];
};

std::string where(Site s) { return std::string(s.file) + ":" + std::to_string(s.line); }
bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0); }
std::string tid_str(const uint3& t) {
  return "(" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

// One OS thread's state: it runs one block at a time, the block's threads as fibers.
struct Worker {
  std::vector<Thread> threads;
  std::vector<WarpState> warps;
  std::vector<int> ready, batch;
  FiberContext scheduler;
  int running = -1, done = 0, block_arrived = 0;
  Site block_site{};
  bool failed = false;
  std::string error;
  std::mt19937_64 rng;
  uint64_t seed = 0;
  void (*invoke)(const void*) = nullptr;
  const void* body = nullptr;
  unsigned char* stacks = nullptr;
  size_t stacks_bytes = 0;
  std::vector<unsigned char> smem;

  ~Worker() {
    if (stacks) munmap(stacks, stacks_bytes);
  }
  Thread& me() { return threads[size_t(running)]; }
  std::string block_str() const { return "block " + tid_str(threads[0].vars.block_idx); }
};

thread_local Worker* t_worker = nullptr;
std::atomic<uint64_t> g_seed{0};
std::atomic<int> g_workers{0};

void yield_to_scheduler() {
  Worker& w = *t_worker;
  detail::fiber_switch(w.me().ctx, w.scheduler);
}

[[noreturn]] void fail_now(const std::string& msg) {
  Worker& w = *t_worker;
  if (!w.failed) {
    w.failed = true;
    w.error = w.block_str() + ", thread " + tid_str(w.me().vars.thread_idx) + ": " + msg;
  }
  yield_to_scheduler();  // the scheduler abandons the block; this fiber is never resumed
  std::abort();
}

void fiber_main() {
  Worker& w = *t_worker;
  w.invoke(w.body);
  Thread& t = w.me();
  t.wait = Wait::Done;
  ++w.done;
  // A thread that leaves while others use a barrier it will never reach: undefined on the GPU
  // (a hang or a wrong result), reported here.
  if (w.block_arrived > 0)
    fail_now("exited while other threads wait at __syncthreads (" + where(w.block_site) +
             "): a block barrier inside a branch that not every thread takes");
  const int linear = w.running;
  WarpState& ws = w.warps[size_t(linear / 32)];
  ws.exited |= 1u << (linear % 32);
  if (ws.arrived && (ws.mask >> (linear % 32) & 1u))
    fail_now("exited while lanes of its warp wait for it at " + std::string(ws.name) + " (" + where(ws.site) + ")");
  yield_to_scheduler();
  std::abort();
}

std::string describe_deadlock(const Worker& w) {
  std::string s = "deadlock: no thread can run;";
  int shown = 0;
  for (size_t i = 0; i < w.threads.size() && shown < 6; ++i) {
    const Thread& t = w.threads[i];
    if (t.wait == Wait::Done) continue;
    s += " thread " + tid_str(t.vars.thread_idx) + " waits at " + t.what + " (" + where(t.site) + ");";
    ++shown;
  }
  return s;
}

void prepare_stacks(Worker& w, size_t n) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), per = kStackBytes + page;
  if (w.stacks && w.stacks_bytes >= n * per) return;
  if (w.stacks) munmap(w.stacks, w.stacks_bytes);
  w.stacks_bytes = n * per;
  void* p = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) std::abort();
  w.stacks = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) mprotect(w.stacks + i * per, page, PROT_NONE);  // overflow -> SIGSEGV, not corruption
}

// Runs one block to completion on the calling OS thread; false (and w.error) when it failed.
bool run_block(Worker& w, const LaunchConfig& cfg, uint3 bid) {
  const dim3 b = cfg.block;
  const size_t n = size_t(b.x) * b.y * b.z;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  prepare_stacks(w, n);
  w.threads.assign(n, Thread{});
  w.warps.assign((n + 31) / 32, WarpState{});
  // Dynamic shared memory starts as 0xff bytes (NaN in every float format): reads of what no
  // thread wrote show up in results.
  w.smem.assign(cfg.dynamic_smem + 16, 0xff);
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(w.smem.data()) + 15) & ~uintptr_t(15));
  for (size_t i = 0; i < n; ++i) {
    Thread& t = w.threads[i];
    t.vars.thread_idx = uint3{unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (size_t(b.x) * b.y))};
    t.vars.block_idx = bid;
    t.vars.block_dim = b;
    t.vars.grid_dim = cfg.grid;
    t.vars.dynamic_smem = smem;
    detail::fiber_prepare(t.ctx, w.stacks + i * (kStackBytes + page) + page, kStackBytes, fiber_main);
  }
  w.done = 0;
  w.block_arrived = 0;
  w.failed = false;
  w.ready.clear();
  for (size_t i = 0; i < n; ++i) w.ready.push_back(int(i));
  while (!w.failed) {
    if (w.ready.empty()) {
      if (size_t(w.done) == n) break;
      w.failed = true;
      w.error = w.block_str() + ": " + describe_deadlock(w);
      break;
    }
    w.batch.swap(w.ready);
    w.ready.clear();
    if (w.seed) {
      // Random order, and each runnable thread sits out the round with probability 1/2: warps
      // then drift several collectives apart, as on the GPU, so a thread overwriting shared memory
      // another warp still reads (a missing barrier) shows up. (Without this, warps would advance
      // in lockstep, one collective per round, and hide such races.)
      std::shuffle(w.batch.begin(), w.batch.end(), w.rng);
      size_t keep = 0;
      for (size_t j = 0; j < w.batch.size(); ++j) {
        const bool must_run = keep == 0 && j + 1 == w.batch.size();  // at least one thread per round
        if (!must_run && (w.rng() & 1)) w.ready.push_back(w.batch[j]);
        else w.batch[keep++] = w.batch[j];
      }
      w.batch.resize(keep);
    }
    for (int i : w.batch) {
      w.running = i;
      Thread& t = w.threads[size_t(i)];
      t.wait = Wait::Running;
      t_current = &t.vars;
      detail::fiber_switch(w.scheduler, t.ctx);
      if (w.failed) break;
    }
  }
  t_current = nullptr;
  w.running = -1;
  return !w.failed;
}

}  // namespace

void syncthreads(Site site) {
  Worker& w = *t_worker;
  Thread& t = w.me();
  if (w.done > 0)
    fail_now("__syncthreads (" + where(site) +
             ") after another thread of the block exited: a block barrier inside a branch that not every thread takes");
  if (w.block_arrived == 0) w.block_site = site;
  else if (!same_site(site, w.block_site))
    fail_now("divergent __syncthreads: this thread is at " + where(site) + ", others wait at " + where(w.block_site));
  t.wait = Wait::Block;
  t.site = site;
  t.what = "__syncthreads";
  if (size_t(++w.block_arrived) == w.threads.size()) {
    w.block_arrived = 0;
    for (size_t i = 0; i < w.threads.size(); ++i) w.ready.push_back(int(i));
  }
  yield_to_scheduler();
}

void fail(const char* what, Site site) { fail_now(std::string(what) + " at " + where(site)); }

void warp_collective(const char* name, Completer op, uint32_t mask, const Slot& in, Slot& out, Site site) {
  Worker& w = *t_worker;
  Thread& t = w.me();
  const int linear = w.running, lane = linear % 32, warp = linear / 32;
  WarpState& ws = w.warps[size_t(warp)];
  const size_t lanes = std::min<size_t>(32, w.threads.size() - size_t(warp) * 32);
  const uint32_t exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  char hex[16];
  std::snprintf(hex, sizeof hex, "0x%08x", mask);
  if (!(mask >> lane & 1u)) fail_now(std::string(name) + " (" + where(site) + ") with mask " + hex + " that leaves out the calling lane");
  if (mask & ~exists)
    fail_now(std::string(name) + " (" + where(site) + ") with mask " + hex + " naming lanes that do not exist (warp " +
             std::to_string(warp) + " has " + std::to_string(lanes) + " threads)");
  if (mask & ws.exited)
    fail_now(std::string(name) + " (" + where(site) + ") with mask " + hex + " naming lanes that have exited");
  if (ws.arrived == 0) {
    ws.mask = mask, ws.name = name, ws.op = op, ws.site = site;
  } else if (ws.mask != mask || ws.op != op || !same_site(ws.site, site)) {
    fail_now("divergent warp collective: this lane is at " + std::string(name) + " (" + where(site) + "), other lanes of warp " +
             std::to_string(warp) + " wait at " + ws.name + " (" + where(ws.site) + ")");
  }
  ws.in[lane] = in;
  ws.arrived |= 1u << lane;
  t.wait = Wait::Warp;
  t.site = site;
  t.what = name;
  if (ws.arrived == mask) {
    if (const char* err = op(ws.in, ws.out, mask)) fail_now(std::string(name) + " (" + where(site) + "): " + err);
    ws.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) w.ready.push_back(warp * 32 + l);
  }
  yield_to_scheduler();
  out = ws.out[lane];
}

namespace detail {
const char* shuffle_complete(const Slot* in, Slot* out, uint32_t mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint32_t src = in[l].w[2];
    if (src >= 32 || !(mask >> src & 1u)) return "a lane reads a lane that is not in the mask (undefined value)";
    out[l] = in[src];
  }
  return nullptr;
}
const char* ballot_complete(const Slot* in, Slot* out, uint32_t mask) {
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && in[l].w[0]) bits |= 1u << l;
  for (int l = 0; l < 32; ++l) out[l].w[0] = bits;
  return nullptr;
}
const char* nothing_complete(const Slot*, Slot*, uint32_t) { return nullptr; }
}  // namespace detail

void set_schedule_seed(uint64_t seed) { g_seed = seed; }
void set_workers(int workers) { g_workers = workers; }

int launch(const LaunchConfig& cfg, void (*invoke)(const void*), const void* body) {
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  auto reject = [](const std::string& why) {
    detail::set_last_error(cudaErrorInvalidConfiguration, "invalid launch configuration: " + why);
    return int(cudaErrorInvalidConfiguration);
  };
  if (threads == 0 || threads > uint64_t(detail::kMaxThreadsPerBlock) || b.z > 64)
    return reject("block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return reject("grid (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," + std::to_string(g.z) + ")");
  const size_t smem_limit = detail::max_dynamic_smem(cfg.kernel);
  if (cfg.dynamic_smem > smem_limit)
    return reject(std::to_string(cfg.dynamic_smem) + " bytes of dynamic shared memory, the kernel may use " +
                  std::to_string(smem_limit) + " (cudaFuncSetAttribute)");

  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  int nworkers = g_workers.load();
  if (nworkers <= 0) {
    const char* env = std::getenv("MKEMU_WORKERS");
    nworkers = env ? std::atoi(env) : int(std::thread::hardware_concurrency());
  }
  nworkers = int(std::max<uint64_t>(1, std::min<uint64_t>(uint64_t(std::max(1, nworkers)), blocks)));
  uint64_t seed = g_seed.load();
  if (!seed)
    if (const char* env = std::getenv("MKEMU_SEED")) seed = std::strtoull(env, nullptr, 10);

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  auto work = [&](int worker_id) {
    Worker w;
    w.invoke = invoke, w.body = body, w.seed = seed;
    w.rng.seed(seed + uint64_t(worker_id) * 0x9e3779b97f4a7c15ull);
    Worker* saved = t_worker;
    t_worker = &w;
    for (uint64_t i; !failed && (i = next++) < blocks;) {
      const uint3 bid{unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / (uint64_t(g.x) * g.y))};
      if (!run_block(w, cfg, bid)) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!failed.exchange(true)) error = w.error;
      }
    }
    t_worker = saved;
  };
  if (nworkers == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < nworkers; ++i) pool.emplace_back(work, i);
    for (auto& th : pool) th.join();
  }
  if (failed) {
    detail::set_last_error(cudaErrorLaunchFailure, "kernel failed in the CUDA emulation: " + error);
    return int(cudaErrorLaunchFailure);
  }
  return int(cudaSuccess);
}

}  // namespace mkemu
