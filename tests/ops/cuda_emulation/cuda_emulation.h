// A CPU model of the CUDA features the DiVE kernels use, so that the kernels themselves
// (csrc/dive_cuda_kernels.cuh, compiled by a host compiler with DIVE_EMULATE) run in the
// tests of a machine without a GPU (tests/ops/test_cuda_emulated.py).
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; a fiber runs until it
// reaches a barrier (__syncthreads, or the warp exchange behind a shuffle) and the
// scheduler releases a barrier once every thread it binds has arrived. A thread that can
// never be released (a shuffle or barrier not reached by every thread it binds) aborts
// with a message instead of hanging. cp.async copies are queued per thread and land only
// at the cp.async.wait_group that covers them, so a read of the staging buffer before its
// wait sees stale bytes (shared memory starts filled with NaN patterns). Blocks run one
// after another, in an order the caller chooses (the finalisation's last-block ticket
// must give the same result for every arrival order).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <vector>

namespace emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Block;

struct Thread {
  dim3 thread_idx, block_idx, grid_dim, block_dim;
  Block* block = nullptr;
  ucontext_t context;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
  int waiting = 0;  // 0: runnable, 1: at the block barrier, 2: at its warp's exchange
  bool done = false;
};

struct Block {
  std::vector<Thread> threads;
  std::vector<unsigned char> dynamic_shared;
  std::map<const void*, std::vector<unsigned char>> static_shared;
  std::vector<uint64_t> exchange;  // one 8-byte slot per thread and value, for shuffles
  ucontext_t scheduler;
  Thread* current = nullptr;
  std::function<void()> body;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}
inline Thread& self() { return *current_block()->current; }

constexpr unsigned char kGarbage = 0xff;  // shared memory's initial bytes: NaN floats

inline void yield_to_scheduler() {
  Block* b = current_block();
  swapcontext(&b->current->context, &b->scheduler);
}

// Waits until every thread of the block (kind 1) or of the calling warp (kind 2) arrives.
inline void wait_at(int kind) {
  self().waiting = kind;
  yield_to_scheduler();
}

inline void syncthreads() { wait_at(1); }

// Lane values exchanged through the block's slots: every lane of the warp must call this
// with the same n; returns the partner lane's values.
template <typename T>
inline void shfl_xor(T* values, int n, int offset) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  Thread& t = self();
  const unsigned tid = t.thread_idx.x;
  const unsigned lane = tid & 31u, warp_base = tid - lane;
  std::vector<uint64_t>& slots = t.block->exchange;
  if (slots.size() < t.block->threads.size() * size_t(n)) {
    std::fprintf(stderr, "emu: shuffle of %d values exceeds the exchange\n", n);
    std::abort();
  }
  for (int i = 0; i < n; ++i) {
    uint64_t bits = 0;
    std::memcpy(&bits, &values[i], sizeof(T));
    slots[size_t(tid) * n + i] = bits;
  }
  wait_at(2);
  const unsigned partner = warp_base + (lane ^ unsigned(offset));
  for (int i = 0; i < n; ++i) {
    const uint64_t bits = slots[size_t(partner) * n + i];
    std::memcpy(&values[i], &bits, sizeof(T));
  }
  wait_at(2);  // no lane overwrites its slot before every lane has read
}

inline unsigned char* dynamic_shared() { return current_block()->dynamic_shared.data(); }

template <typename T>
inline T* block_shared(const void* tag, size_t count) {
  Block* b = current_block();
  auto it = b->static_shared.find(tag);
  if (it == b->static_shared.end()) {
    std::vector<unsigned char> bytes(count * sizeof(T) + 16, kGarbage);
    it = b->static_shared.emplace(tag, std::move(bytes)).first;
  }
  return reinterpret_cast<T*>(it->second.data());
}

inline void cp_async(void* dst, const void* src, int bytes) {
  self().open_group.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}
inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (int(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    t.groups.pop_front();
  }
}

// Fiber stacks, reused by every block (uninitialised: a fresh zeroed stack per fiber and
// block would cost more than the emulated kernel).
inline char* fiber_stack(unsigned index, size_t bytes) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= index) stacks.emplace_back(new char[bytes]);
  return stacks[index].get();
}

inline void fiber_entry() {
  Block* b = current_block();
  b->body();
  b->current->done = true;
  swapcontext(&b->current->context, &b->scheduler);
}

// Runs one block: every thread's fiber, barriers released when complete.
inline void run_block(const dim3& grid, unsigned block_index, unsigned threads, size_t shared_bytes,
                      const std::function<void()>& body) {
  constexpr size_t kStack = 128 << 10;
  if (threads % 32 != 0) {
    std::fprintf(stderr, "emu: blocks must be whole warps, got %u threads\n", threads);
    std::abort();
  }
  auto block = std::make_unique<Block>();
  block->threads.resize(threads);
  block->dynamic_shared.assign(shared_bytes + 16, kGarbage);
  block->exchange.assign(size_t(threads) * 32, 0);
  block->body = body;
  Block* previous = current_block();
  current_block() = block.get();
  for (unsigned i = 0; i < threads; ++i) {
    Thread& t = block->threads[i];
    t.thread_idx = {i, 0, 0};
    t.block_idx = {block_index, 0, 0};
    t.grid_dim = grid;
    t.block_dim = {threads, 1, 1};
    t.block = block.get();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = fiber_stack(i, kStack);
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_entry, 0);
  }
  for (;;) {
    bool ran = false;
    for (auto& t : block->threads) {
      if (t.done || t.waiting != 0) continue;
      block->current = &t;
      swapcontext(&block->scheduler, &t.context);
      ran = true;
    }
    // Release complete barriers: the block's (every live thread waits there) and each warp's.
    size_t live = 0, at_block = 0;
    for (auto& t : block->threads) {
      live += !t.done;
      at_block += !t.done && t.waiting == 1;
    }
    if (live == 0) break;
    bool released = false;
    if (at_block == live) {
      for (auto& t : block->threads) t.waiting = 0;
      released = true;
    }
    for (unsigned w = 0; w < threads / 32; ++w) {
      unsigned at_warp = 0;
      for (unsigned l = 0; l < 32; ++l) at_warp += block->threads[w * 32 + l].waiting == 2;
      if (at_warp == 32) {
        for (unsigned l = 0; l < 32; ++l) block->threads[w * 32 + l].waiting = 0;
        released = true;
      }
    }
    if (!ran && !released) {
      std::fprintf(stderr, "emu: block %u deadlocked (a barrier or shuffle not reached by every "
                   "thread it binds)\n", block_index);
      std::abort();
    }
  }
  for (auto& t : block->threads) {
    if (!t.groups.empty() || !t.open_group.empty()) {
      // Copies never waited for are lost on a GPU too (undefined); here they simply land.
      cp_async_wait(0);
    }
  }
  current_block() = previous;
}

// A kernel launch: blocks in `order` (default 0..grid-1), each to completion.
inline void launch(unsigned grid, unsigned threads, size_t shared_bytes,
                   const std::vector<unsigned>& order, const std::function<void()>& body) {
  std::vector<unsigned> blocks = order;
  if (blocks.empty()) {
    blocks.resize(grid);
    for (unsigned i = 0; i < grid; ++i) blocks[i] = i;
  }
  if (blocks.size() != grid) {
    std::fprintf(stderr, "emu: block order names %zu of %u blocks\n", blocks.size(), grid);
    std::abort();
  }
  for (unsigned b : blocks) run_block({grid, 1, 1}, b, threads, shared_bytes, body);
}

inline float uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace emu

// The CUDA names the kernels use, mapped onto the model.
#define threadIdx (::emu::self().thread_idx)
#define blockIdx (::emu::self().block_idx)
#define gridDim (::emu::self().grid_dim)
#define blockDim (::emu::self().block_dim)
#define __syncthreads() ::emu::syncthreads()
