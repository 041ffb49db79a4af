// Device primitives shared by the pissa_fast CUDA kernels (gram_kernels.cuh, residual_kernels.cuh).
//
// The kernels touch the hardware only through this small set of functions (thread and block ids,
// barriers, warp shuffles, cp.async, atomics, distributed shared memory, vector loads), so that
// tests/cuda_emu can run the very same kernel source on the CPU, one std::thread per CUDA thread:
// built with -DPISSA_FAST_EMULATE and tests/cuda_emu on the include path, the host versions of
// pissa_fast_emulate.h replace them. Nothing here changes what the CUDA build compiles.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef PISSA_FAST_EMULATE
#include "pissa_fast_emulate.h"
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#define PF_DEVICE __device__ __forceinline__
#define PF_HOST_DEVICE __host__ __device__ __forceinline__
#define PF_GLOBAL __global__
#define PF_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)

namespace pissa_fast {
namespace dev {

PF_DEVICE int thread_id() { return static_cast<int>(threadIdx.x); }
PF_DEVICE int64_t block_id() { return static_cast<int64_t>(blockIdx.x); }
PF_DEVICE void sync_block() { __syncthreads(); }

// Clusters exist from sm_90 on; the host launches a cluster only when the kernel it runs was
// compiled for sm_90+ (cudaFuncAttributes::ptxVersion), so the other branches are unreachable.
PF_DEVICE void sync_cluster() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <typename X>
PF_DEVICE X* cluster_map(X* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return p;
#endif
}

// v[i] += v[i] of lane (lane ^ lane_mask), for each of N register values; every lane of the warp
// takes part.
template <int N, typename X>
PF_DEVICE void add_shfl_xor(X* v, int lane_mask) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], lane_mask);
}

PF_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char pf_dynamic_smem[];
  return pf_dynamic_smem;
}

// 16 bytes global -> shared without a round trip through registers, so a whole tile of W is in
// flight at once (both addresses 16-byte aligned). Completed by cp_async_wait_all + sync_block.
PF_DEVICE void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

PF_DEVICE void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

PF_DEVICE void atomic_add(float* p, float v) { atomicAdd(p, v); }
PF_DEVICE void atomic_add(double* p, double v) { atomicAdd(p, v); }

// Four consecutive values, p 16-byte aligned: one vector reduction on sm_90 (a quarter of the
// atomic operations L2 has to process), four scalar ones before.
PF_DEVICE void atomic_add4(float* p, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
#else
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
#endif
}
PF_DEVICE void atomic_add4(double* p, const double* v) {
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
}

// N consecutive accumulator values from shared memory with 16-byte loads (p 16-byte aligned).
template <int N>
PF_DEVICE void load_vec(const float* p, float* out) {
  static_assert(N % 4 == 0, "load_vec<float> reads float4s");
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 t = reinterpret_cast<const float4*>(p)[q];
    out[4 * q] = t.x;
    out[4 * q + 1] = t.y;
    out[4 * q + 2] = t.z;
    out[4 * q + 3] = t.w;
  }
}
template <int N>
PF_DEVICE void load_vec(const double* p, double* out) {
  static_assert(N % 2 == 0, "load_vec<double> reads double2s");
#pragma unroll
  for (int q = 0; q < N / 2; ++q) {
    const double2 t = reinterpret_cast<const double2*>(p)[q];
    out[2 * q] = t.x;
    out[2 * q + 1] = t.y;
  }
}

// Four consecutive weights, p aligned to min(4 * sizeof(T), 16) bytes: one 8- or 16-byte access
// (two for double).
template <typename T>
PF_DEVICE void load4(const T* p, T* out) {
  if constexpr (sizeof(T) == 2) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    memcpy(out, &u, sizeof(u));
  } else if constexpr (sizeof(T) == 4) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    memcpy(out, &u, sizeof(u));
  } else {
    const uint4 u0 = reinterpret_cast<const uint4*>(p)[0];
    const uint4 u1 = reinterpret_cast<const uint4*>(p)[1];
    memcpy(out, &u0, sizeof(u0));
    memcpy(out + 2, &u1, sizeof(u1));
  }
}
template <typename T>
PF_DEVICE void store4(T* p, const T* v) {
  if constexpr (sizeof(T) == 2) {
    uint2 u;
    memcpy(&u, v, sizeof(u));
    *reinterpret_cast<uint2*>(p) = u;
  } else if constexpr (sizeof(T) == 4) {
    uint4 u;
    memcpy(&u, v, sizeof(u));
    *reinterpret_cast<uint4*>(p) = u;
  } else {
    uint4 u0, u1;
    memcpy(&u0, v, sizeof(u0));
    memcpy(&u1, v + 2, sizeof(u1));
    reinterpret_cast<uint4*>(p)[0] = u0;
    reinterpret_cast<uint4*>(p)[1] = u1;
  }
}

}  // namespace dev
}  // namespace pissa_fast
#endif  // PISSA_FAST_EMULATE

namespace pissa_fast {
namespace dev {

// Weights are read in their own dtype and widened once; float32 accumulation (float64 for double).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename Acc, typename T>
PF_DEVICE Acc to_acc(T x) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    return static_cast<Acc>(static_cast<float>(x));
  } else {
    return static_cast<Acc>(x);
  }
}

// The single rounding back to the weight dtype (round to nearest even, as the CPU twin's copy_).
template <typename T, typename Acc>
PF_DEVICE T from_acc(Acc x) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    return T(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

}  // namespace dev

namespace cuda {

constexpr PF_HOST_DEVICE int64_t ceil_div(int64_t x, int64_t a) { return (x + a - 1) / a; }
constexpr PF_HOST_DEVICE int64_t round_up(int64_t x, int64_t a) { return ceil_div(x, a) * a; }

}  // namespace cuda
}  // namespace pissa_fast
