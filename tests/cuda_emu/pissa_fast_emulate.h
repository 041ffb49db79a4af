// Host emulation of the device primitives of csrc/cuda/device.cuh, so that the CUDA kernels' own
// source runs on the CPU: every CUDA thread is a std::thread, a block's threads share a barrier and
// a shared-memory buffer, a warp's threads exchange shuffle values through a buffer and a barrier,
// and the blocks of a cluster run together and see each other's shared memory.
//
// It checks what the hardware would not forgive: alignment of vector and cp.async accesses and of
// 16-byte atomics, shared-memory accesses through cluster_map outside the buffer; shared memory
// starts filled with NaN bytes, so a read before a write shows up in the results. Built with
// -fsanitize=address it also finds out-of-bounds global and shared-memory accesses. It cannot find
// missing barriers reliably (threads really run concurrently, so a race may or may not show).
#pragma once

#include <math.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define PF_DEVICE inline
#define PF_HOST_DEVICE inline
#define PF_GLOBAL
#define PF_LAUNCH_BOUNDS(threads, blocks)

namespace pissa_fast {
namespace dev {
namespace emu {

inline std::mutex error_mutex;
inline std::string first_error;

inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = what;
}

inline void check_aligned(const void* p, uintptr_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fail(std::string(what) + ": address not " + std::to_string(align) + "-byte aligned");
}

struct Warp {
  std::barrier<> bar{32};
  double buf[32][64];  // up to 64 values per lane per exchange
};

struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), warps(new Warp[threads / 32]), size(smem_bytes) {
    // Exactly the requested size (so AddressSanitizer sees overruns), aligned like CUDA's.
    smem = static_cast<unsigned char*>(::operator new[](std::max<size_t>(size, 1), std::align_val_t(128)));
    std::memset(smem, 0xFF, size);  // NaN in every floating type: unwritten reads poison results
  }
  ~Block() { ::operator delete[](smem, std::align_val_t(128)); }
  std::barrier<> bar;
  std::unique_ptr<Warp[]> warps;
  unsigned char* smem;
  size_t size;
};

struct Cluster {
  explicit Cluster(int threads) : bar(threads) {}
  std::barrier<> bar;
  std::vector<Block*> blocks;
};

struct Self {
  int tid = 0;
  int64_t bid = 0;
  Block* block = nullptr;
  Cluster* cluster = nullptr;
};
inline thread_local Self self;

// Runs `body` as a grid of `grid` blocks of `threads` threads, `cluster` blocks at a time (the
// blocks of a cluster concurrently, clusters one after another). Throws the first problem found.
template <typename F>
void launch(int64_t grid, int cluster, size_t smem, int threads, F body) {
  {
    std::lock_guard<std::mutex> lock(error_mutex);
    first_error.clear();
  }
  if (grid % cluster != 0) throw std::runtime_error("emulate: grid not a multiple of the cluster size");
  for (int64_t c0 = 0; c0 < grid; c0 += cluster) {
    Cluster cl(cluster * threads);
    std::vector<std::unique_ptr<Block>> blocks;
    for (int g = 0; g < cluster; ++g) {
      blocks.emplace_back(new Block(threads, smem));
      cl.blocks.push_back(blocks.back().get());
    }
    std::vector<std::thread> ts;
    ts.reserve(size_t(cluster) * threads);
    for (int g = 0; g < cluster; ++g)
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, g, t] {
          self = Self{t, c0 + g, blocks[g].get(), &cl};
          body();
        });
    for (auto& t : ts) t.join();
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!first_error.empty()) throw std::runtime_error("emulate: " + first_error);
  }
}

}  // namespace emu

inline int thread_id() { return emu::self.tid; }
inline int64_t block_id() { return emu::self.bid; }
inline void sync_block() { emu::self.block->bar.arrive_and_wait(); }
inline void sync_cluster() { emu::self.cluster->bar.arrive_and_wait(); }

template <typename X>
X* cluster_map(X* p, int rank) {
  const auto* base = emu::self.block->smem;
  const auto off = reinterpret_cast<const unsigned char*>(p) - base;
  if (off < 0 || size_t(off) >= emu::self.block->size) emu::fail("cluster_map: pointer outside shared memory");
  if (rank < 0 || size_t(rank) >= emu::self.cluster->blocks.size()) {
    emu::fail("cluster_map: rank outside the cluster");
    return p;
  }
  return reinterpret_cast<X*>(emu::self.cluster->blocks[rank]->smem + off);
}

template <int N, typename X>
void add_shfl_xor(X* v, int lane_mask) {
  static_assert(N <= 64, "emulated shuffles carry up to 64 values");
  auto& w = emu::self.block->warps[emu::self.tid / 32];
  const int lane = emu::self.tid % 32;
  for (int i = 0; i < N; ++i) w.buf[lane][i] = static_cast<double>(v[i]);
  w.bar.arrive_and_wait();
  for (int i = 0; i < N; ++i) v[i] += static_cast<X>(w.buf[lane ^ lane_mask][i]);
  w.bar.arrive_and_wait();
}

inline unsigned char* dynamic_smem() { return emu::self.block->smem; }

inline void cp_async16(void* smem_dst, const void* gmem_src) {
  emu::check_aligned(smem_dst, 16, "cp_async16 destination");
  emu::check_aligned(gmem_src, 16, "cp_async16 source");
  const auto off = static_cast<unsigned char*>(smem_dst) - emu::self.block->smem;
  if (off < 0 || size_t(off) + 16 > emu::self.block->size) emu::fail("cp_async16: destination outside shared memory");
  std::memcpy(smem_dst, gmem_src, 16);
}
inline void cp_async_wait_all() {}

inline void atomic_add(float* p, float v) { std::atomic_ref<float>(*p).fetch_add(v); }
inline void atomic_add(double* p, double v) { std::atomic_ref<double>(*p).fetch_add(v); }
inline void atomic_add4(float* p, const float* v) {
  emu::check_aligned(p, 16, "atomic_add4");  // float4 atomics on sm_90
  for (int i = 0; i < 4; ++i) atomic_add(p + i, v[i]);
}
inline void atomic_add4(double* p, const double* v) {
  for (int i = 0; i < 4; ++i) atomic_add(p + i, v[i]);
}

template <int N, typename X>
void load_vec(const X* p, X* out) {
  emu::check_aligned(p, 16, "load_vec");
  std::memcpy(out, p, N * sizeof(X));
}

template <typename T>
void load4(const T* p, T* out) {
  emu::check_aligned(p, std::min<size_t>(4 * sizeof(T), 16), "load4");
  std::memcpy(static_cast<void*>(out), p, 4 * sizeof(T));
}
template <typename T>
void store4(T* p, const T* v) {
  emu::check_aligned(p, std::min<size_t>(4 * sizeof(T), 16), "store4");
  std::memcpy(static_cast<void*>(p), v, 4 * sizeof(T));
}

}  // namespace dev
}  // namespace pissa_fast

using std::fma;
