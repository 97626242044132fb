// The emulator's GPU: runs a kernel over a Metal-style dispatch on the CPU, one fiber per GPU
// thread, one threadgroup at a time.
//
//   * Each fiber runs until it reaches a synchronisation point (a simd collective, a
//     simdgroup_barrier or a threadgroup_barrier) or returns. A collective is released when no
//     lane of its simdgroup can run any more, over the lanes waiting at that call site: lanes that
//     returned or branched away do not take part, as on Metal. A threadgroup barrier is released
//     when every live thread waits at it; a barrier that threads skipped by returning, or barriers
//     at different call sites, are reported.
//   * `order` picks the sequence in which runnable fibers (and threadgroups) are run between two
//     synchronisation points. Running a launch in several orders and comparing the outputs shows
//     missing barriers and races as order dependence.
//   * threadgroup memory is poisoned (0xFF bytes: NaN for every float type) for each threadgroup
//     and fenced by guard zones checked when the threadgroup ends.
// Fibers start with makecontext/setcontext and then switch with _setjmp/_longjmp, which avoids a
// signal-mask system call on every switch.

#include "runtime.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPageBytes = 4096;
constexpr size_t kGuardBytes = 64;          // guard zone on each side of a threadgroup array
constexpr size_t kArenaBytes = 8u << 20;    // far above the 32 KiB a Metal threadgroup may use
constexpr int kWidth = HNET_EMU_SIMD_WIDTH;
constexpr int kSlot = HNET_EMU_SLOT_BYTES;

enum State { RUNNABLE, WAIT_SIMD, WAIT_SIMD_BARRIER, WAIT_TG_BARRIER, DONE };

struct Fiber {
  ucontext_t uc;
  jmp_buf env;
  bool started;
  State state;
  intptr_t site;  // call site of the pending synchronisation
  int line;       // its source line, -1 if unknown
  hnet_emu_collective_fn fn;
  int32_t arg;
  unsigned char in[kSlot];
  unsigned char out[kSlot];
  hnet_emu_attrs attrs;
  char* stack;
};

struct TgBlock {
  const void* site;
  size_t offset;
  size_t bytes;
  std::string name;
};

struct Launch {
  hnet_emu_entry_fn entry;
  void* const* buffers;
  std::vector<Fiber> fibers;
  int nthreads = 0;
  int current = -1;
  jmp_buf sched_env;
  // threadgroup memory
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  size_t tg_bytes = 0;
  std::vector<TgBlock> blocks;
  bool tg_limit_reported = false;
  // problems, deduplicated, with counts
  std::vector<std::string> errors;
  std::vector<int> counts;
  int max_errors = 20;
  std::string where;  // the threadgroup being run, for messages
};

Launch* g_launch = nullptr;  // the launch in progress (launches never nest or overlap)

void report(const std::string& msg) {
  Launch* L = g_launch;
  for (size_t i = 0; i < L->errors.size(); ++i) {
    if (L->errors[i] == msg) {
      L->counts[i]++;
      return;
    }
  }
  if ((int)L->errors.size() < L->max_errors) {
    L->errors.push_back(msg);
    L->counts.push_back(1);
  } else if (!L->counts.empty()) {
    L->counts.back()++;  // attributed to the last kept message; the total is still right
  }
}

Fiber& current_fiber() { return g_launch->fibers[g_launch->current]; }

void fiber_main() {
  Launch* L = g_launch;
  Fiber& f = L->fibers[L->current];
  L->entry(L->buffers, &f.attrs);
  f.state = DONE;
  _longjmp(L->sched_env, 1);
}

// Suspend the calling fiber (state already set) and return to the scheduler.
void yield_to_scheduler() {
  Fiber& f = current_fiber();
  if (!_setjmp(f.env)) _longjmp(g_launch->sched_env, 1);
}

void run_fiber(Launch* L, int i) {
  Fiber& f = L->fibers[i];
  L->current = i;
  if (!_setjmp(L->sched_env)) {
    if (!f.started) {
      f.started = true;
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack;
      f.uc.uc_stack.ss_size = kStackBytes;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, fiber_main, 0);
      setcontext(&f.uc);
    } else {
      _longjmp(f.env, 1);
    }
  }
  L->current = -1;
}

std::string fmt_site(const Fiber& f) {
  char buf[64];
  if (f.line >= 0) snprintf(buf, sizeof buf, "line %d", f.line);  // launch.py maps it into the body
  else snprintf(buf, sizeof buf, "%p", (void*)f.site);
  return buf;
}

// Release the simdgroups whose lanes are all blocked: each group of lanes waiting at one call
// site runs its collective (or passes its simdgroup_barrier) together.
bool resolve_simdgroups(Launch* L) {
  bool resolved = false;
  int nsg = (L->nthreads + kWidth - 1) / kWidth;
  for (int sg = 0; sg < nsg; ++sg) {
    int lo = sg * kWidth, hi = std::min(L->nthreads, lo + kWidth);
    bool runnable = false, waiting = false;
    int live = 0;
    for (int i = lo; i < hi; ++i) {
      State s = L->fibers[i].state;
      runnable |= s == RUNNABLE;
      waiting |= s == WAIT_SIMD || s == WAIT_SIMD_BARRIER;
      live += s != DONE;
    }
    if (runnable || !waiting) continue;
    bool handled[kWidth] = {false};
    for (int i = lo; i < hi; ++i) {
      Fiber& lead = L->fibers[i];
      if (handled[i - lo] || (lead.state != WAIT_SIMD && lead.state != WAIT_SIMD_BARRIER)) continue;
      unsigned char active[kWidth] = {0};
      unsigned char in[kWidth * kSlot];
      unsigned char out[kWidth * kSlot];
      int32_t args[kWidth] = {0};
      memset(in, 0xFF, sizeof in);
      memset(out, 0xFF, sizeof out);
      int members = 0;
      for (int j = i; j < hi; ++j) {
        Fiber& f = L->fibers[j];
        if (handled[j - lo] || f.state != lead.state || f.site != lead.site) continue;
        handled[j - lo] = true;
        members++;
        active[j - lo] = 1;
        memcpy(in + (j - lo) * kSlot, f.in, kSlot);
        args[j - lo] = f.arg;
        if (f.state == WAIT_SIMD && f.fn != lead.fn) report("different simd collectives at one call site, " + fmt_site(lead));
      }
      if (lead.state == WAIT_SIMD) {
        lead.fn(active, in, args, out);
      } else if (members != live) {
        report("simdgroup_barrier at " + fmt_site(lead) + " reached by " + std::to_string(members) + " of " +
               std::to_string(live) + " live lanes of a simdgroup (divergent barrier)");
      }
      for (int j = lo; j < hi; ++j) {
        if (!active[j - lo]) continue;
        Fiber& f = L->fibers[j];
        memcpy(f.out, out + (j - lo) * kSlot, kSlot);
        f.state = RUNNABLE;
      }
    }
    resolved = true;
  }
  return resolved;
}

void check_tg_guards(Launch* L) {
  for (const TgBlock& b : L->blocks) {
    const unsigned char* data = L->arena + b.offset;
    size_t before = 0, after = 0;
    for (size_t k = 1; k <= kGuardBytes; ++k) before += data[-(ptrdiff_t)k] != 0xFF;
    for (size_t k = 0; k < kGuardBytes; ++k) after += data[b.bytes + k] != 0xFF;
    if (before) report("out-of-bounds write before threadgroup array '" + b.name + "' (" + std::to_string(before) + " guard bytes changed)");
    if (after) report("out-of-bounds write past the end of threadgroup array '" + b.name + "' (" + std::to_string(after) + " guard bytes changed)");
  }
}

void run_threadgroup(Launch* L, const hnet_emu_launch_config* cfg, const uint32_t tg[3], std::mt19937_64& rng) {
  uint32_t size[3];
  uint32_t groups[3];
  for (int d = 0; d < 3; ++d) {
    uint32_t t = std::min(cfg->threadgroup[d], cfg->grid[d]);  // MLX: group dims = min(threadgroup, grid)
    groups[d] = (cfg->grid[d] + t - 1) / t;
    size[d] = std::min(t, cfg->grid[d] - tg[d] * t);  // non-uniform dispatch: edge groups are smaller
  }
  uint32_t dispatch[3];
  for (int d = 0; d < 3; ++d) dispatch[d] = std::min(cfg->threadgroup[d], cfg->grid[d]);
  int n = (int)(size[0] * size[1] * size[2]);
  int dispatch_n = (int)(dispatch[0] * dispatch[1] * dispatch[2]);
  L->nthreads = n;
  for (int i = 0; i < n; ++i) {
    Fiber& f = L->fibers[i];
    f.started = false;
    f.state = RUNNABLE;
    f.site = 0;
    f.line = -1;
    hnet_emu_attrs& a = f.attrs;
    uint32_t local[3] = {i % size[0], (i / size[0]) % size[1], i / (size[0] * size[1])};
    for (int d = 0; d < 3; ++d) {
      a.threads_per_grid[d] = cfg->grid[d];
      a.thread_position_in_threadgroup[d] = local[d];
      a.threadgroup_position_in_grid[d] = tg[d];
      a.thread_position_in_grid[d] = tg[d] * dispatch[d] + local[d];
      a.threadgroups_per_grid[d] = groups[d];
      a.threads_per_threadgroup[d] = size[d];
      a.dispatch_threads_per_threadgroup[d] = dispatch[d];
    }
    a.thread_index_in_threadgroup = i;
    a.thread_index_in_simdgroup = i % kWidth;
    a.simdgroup_index_in_threadgroup = i / kWidth;
    a.simdgroups_per_threadgroup = (n + kWidth - 1) / kWidth;
    a.dispatch_simdgroups_per_threadgroup = (dispatch_n + kWidth - 1) / kWidth;
    a.thread_index_in_quadgroup = i % 4;
    a.quadgroup_index_in_threadgroup = i / 4;
    a.quadgroups_per_threadgroup = (n + 3) / 4;
    a.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = cfg->order == 1 ? n - 1 - i : i;
  if (cfg->order == 2) std::shuffle(order.begin(), order.end(), rng);

  L->blocks.clear();
  L->arena_used = kGuardBytes;
  L->tg_bytes = 0;
  memset(L->arena, 0xFF, kGuardBytes);
  char where[96];
  snprintf(where, sizeof where, "threadgroup (%u, %u, %u)", tg[0], tg[1], tg[2]);
  L->where = where;

  for (;;) {
    bool ran = false;
    for (int i : order) {
      if (L->fibers[i].state == RUNNABLE) {
        run_fiber(L, i);
        ran = true;
      }
    }
    bool resolved = resolve_simdgroups(L);
    if (ran || resolved) continue;
    int live = 0, at_barrier = 0;
    const Fiber* first = nullptr;
    bool same_site = true;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = L->fibers[i];
      if (f.state == DONE) continue;
      live++;
      if (f.state == WAIT_TG_BARRIER) {
        if (at_barrier == 0) first = &f;
        same_site &= f.site == first->site;
        at_barrier++;
      }
    }
    if (live == 0) break;
    if (at_barrier == live) {
      if (live < n)
        report("threadgroup_barrier at " + fmt_site(*first) + " reached by " + std::to_string(live) + " of " +
               std::to_string(n) + " threads of a threadgroup; the others returned before it (barrier divergence)");
      if (!same_site) report("threads of one threadgroup wait at different threadgroup_barrier calls (barrier divergence)");
      for (int i = 0; i < n; ++i)
        if (L->fibers[i].state == WAIT_TG_BARRIER) L->fibers[i].state = RUNNABLE;
      continue;
    }
    report("deadlock in " + L->where + ": threads blocked at synchronisation points that can never be released");
    break;  // abandon the stuck fibers; their stacks are reused
  }
  check_tg_guards(L);
}

}  // namespace

extern "C" {

void hnet_emu_collective(hnet_emu_collective_fn fn, const void* in, int size, int32_t arg, void* out, intptr_t site,
                         int line) {
  Fiber& f = current_fiber();
  f.site = site ? site : (intptr_t)__builtin_return_address(0);
  f.line = line;
  f.fn = fn;
  f.arg = arg;
  memset(f.in, 0, kSlot);
  memcpy(f.in, in, size);
  f.state = WAIT_SIMD;
  yield_to_scheduler();
  memcpy(out, current_fiber().out, size);
}

void hnet_emu_barrier(int scope, intptr_t site, int line) {
  Fiber& f = current_fiber();
  f.site = site ? site : (intptr_t)__builtin_return_address(0);
  f.line = line;
  f.state = scope == 0 ? WAIT_TG_BARRIER : WAIT_SIMD_BARRIER;
  yield_to_scheduler();
}

void* hnet_emu_tg_alloc(const void* site, size_t bytes, size_t align, const char* name) {
  Launch* L = g_launch;
  for (const TgBlock& b : L->blocks)
    if (b.site == site) return L->arena + b.offset;
  if (align < 16) align = 16;
  size_t offset = (L->arena_used + align - 1) / align * align;
  if (offset + bytes + kGuardBytes > kArenaBytes) {
    fprintf(stderr, "hnet metal emulator: threadgroup memory arena exhausted (%zu bytes requested)\n", bytes);
    abort();
  }
  memset(L->arena + L->arena_used, 0xFF, offset + bytes + kGuardBytes - L->arena_used);
  L->blocks.push_back({site, offset, bytes, name});
  L->arena_used = offset + bytes + kGuardBytes;
  L->tg_bytes += (bytes + 15) / 16 * 16;
  if (L->tg_bytes > HNET_EMU_TG_MEMORY_LIMIT && !L->tg_limit_reported) {
    L->tg_limit_reported = true;
    report("threadgroup memory " + std::to_string(L->tg_bytes) + " bytes exceeds the 32768-byte limit of Apple GPUs");
  }
  return L->arena + offset;
}

void hnet_emu_report(const char* message) { report(message); }

int hnet_emu_launch(hnet_emu_entry_fn entry, void* const* buffers, const hnet_emu_launch_config* cfg, char* errors,
                    int errors_len) {
  Launch L;
  L.entry = entry;
  L.buffers = buffers;
  L.max_errors = cfg->max_errors > 0 ? cfg->max_errors : 20;
  g_launch = &L;
  int problems = 0;
  std::string text;
  uint32_t dispatch[3], groups[3];
  for (int d = 0; d < 3; ++d) {
    if (cfg->grid[d] == 0 || cfg->threadgroup[d] == 0) {
      snprintf(errors, errors_len, "empty grid or threadgroup dimension");
      g_launch = nullptr;
      return 1;
    }
    dispatch[d] = std::min(cfg->threadgroup[d], cfg->grid[d]);
    groups[d] = (cfg->grid[d] + dispatch[d] - 1) / dispatch[d];
  }
  size_t max_threads = (size_t)dispatch[0] * dispatch[1] * dispatch[2];
  if (max_threads > 1024) {
    snprintf(errors, errors_len, "threadgroup of %zu threads exceeds the 1024-thread maximum of Metal", max_threads);
    g_launch = nullptr;
    return 1;
  }
  // One stack per thread of a threadgroup, each above a PROT_NONE page so an overflow faults.
  size_t per = kStackBytes + kPageBytes;
  char* stacks = (char*)mmap(nullptr, per * max_threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  L.arena = (unsigned char*)mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED || L.arena == MAP_FAILED) {
    snprintf(errors, errors_len, "could not map fiber stacks");
    g_launch = nullptr;
    return 1;
  }
  L.fibers.resize(max_threads);
  for (size_t i = 0; i < max_threads; ++i) {
    mprotect(stacks + i * per, kPageBytes, PROT_NONE);
    L.fibers[i].stack = stacks + i * per + kPageBytes;
  }
  std::vector<uint32_t> tgs;
  for (uint32_t z = 0; z < groups[2]; ++z)
    for (uint32_t y = 0; y < groups[1]; ++y)
      for (uint32_t x = 0; x < groups[0]; ++x) {
        tgs.push_back(x);
        tgs.push_back(y);
        tgs.push_back(z);
      }
  size_t ntg = tgs.size() / 3;
  std::vector<size_t> tg_order(ntg);
  for (size_t i = 0; i < ntg; ++i) tg_order[i] = cfg->order == 1 ? ntg - 1 - i : i;
  std::mt19937_64 rng(cfg->seed);
  if (cfg->order == 2) std::shuffle(tg_order.begin(), tg_order.end(), rng);
  for (size_t k : tg_order) run_threadgroup(&L, cfg, &tgs[3 * k], rng);

  munmap(stacks, per * max_threads);
  munmap(L.arena, kArenaBytes);
  for (size_t i = 0; i < L.errors.size(); ++i) {
    problems += L.counts[i];
    text += L.errors[i];
    if (L.counts[i] > 1) text += " [x" + std::to_string(L.counts[i]) + "]";
    text += "\n";
  }
  snprintf(errors, errors_len, "%s", text.c_str());
  g_launch = nullptr;
  return problems;
}

}  // extern "C"
