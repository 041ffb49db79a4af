// The residual kernel behind pissa_fast::residual_ (in place) and pissa_fast::residual (new tensors):
// out[j] = W[j] - B[j] A[j] for every matrix of a list in one launch, shared by the host wrapper in
// residual_cuda.cu and the CPU emulation in tests/cuda_emu.
//
// Block -> (matrix j, 64 x 128 output tile). Each thread owns 4 rows x 8 columns (two runs of 4
// adjacent columns, 64 apart, so the 16-byte reads of the A tile are bank-conflict free). It issues
// its W loads first, so they are in flight while B A is formed from B and A tiles staged in shared
// memory (r in chunks of kR), then writes W - B A rounded once to W's dtype. Every weight is read
// once and written once, with 8-byte (16-bit weights) or 16-byte (float) accesses, coalesced along
// rows; the factors are small and come from L2.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device.cuh"

namespace pissa_fast {
namespace cuda {

template <typename Acc>
struct ResidualTiling {
  static constexpr int kThreads = 256;
  static constexpr int kTM = 64;                        // rows per tile
  static constexpr int kTN = 128;                       // columns per tile
  static constexpr int kR = sizeof(Acc) == 4 ? 32 : 16;  // rank chunk staged in shared memory
  static constexpr int64_t kOffA = (int64_t(kR) * (kTM + 1) * int64_t(sizeof(Acc)) + 15) / 16 * 16;
  static constexpr int64_t kSmem = kOffA + int64_t(kR) * kTN * int64_t(sizeof(Acc));
};

template <typename T>
struct ResidualArgs {
  using Acc = dev::acc_t<T>;
  const int64_t* table = nullptr;  // [4b]: W[j] address, W[j] row stride, out[j] address, out[j] row stride
  const Acc* B = nullptr;          // [b, m, r]
  const Acc* A = nullptr;          // [b, r, n]
  int64_t b = 0, m = 0, n = 0, r = 0;
  int64_t tiles_m = 0, tiles_n = 0;
  bool vec = false;  // every W[j] and out[j] allows 4-element vector accesses
};

template <typename T>
PF_GLOBAL void PF_LAUNCH_BOUNDS(256, 2) residual_kernel(const ResidualArgs<T> a) {
  using Acc = dev::acc_t<T>;
  using Tl = ResidualTiling<Acc>;
  constexpr int NT = Tl::kThreads, TM = Tl::kTM, TN = Tl::kTN, RC = Tl::kR;

  const int tid = dev::thread_id();
  const int tx = tid % 16, ty = tid / 16;
  const int64_t bid = dev::block_id();
  const int64_t per_matrix = a.tiles_m * a.tiles_n;
  const int64_t j = bid / per_matrix;
  const int64_t t = bid % per_matrix;
  const int64_t row0 = (t / a.tiles_n) * TM;
  const int64_t col0 = (t % a.tiles_n) * TN;

  unsigned char* smem = dev::dynamic_smem();
  Acc* bs = reinterpret_cast<Acc*>(smem);               // [RC][TM + 1]: B chunk, transposed
  Acc* as = reinterpret_cast<Acc*>(smem + Tl::kOffA);  // [RC][TN]: A chunk

  const T* w = reinterpret_cast<const T*>(a.table[j]);
  const int64_t ld = a.table[a.b + j];
  T* out = reinterpret_cast<T*>(a.table[2 * a.b + j]);
  const int64_t ldo = a.table[3 * a.b + j];

  // W is loaded before B A is formed, so its loads are in flight during the arithmetic; float64
  // weights would not fit next to float64 accumulators in the registers and are loaded group by
  // group just before they are written.
  T wv[4][2][4];
  auto load_w = [&](int i, int h) {
    const int64_t row = row0 + ty + 16 * i;
    const int64_t col = col0 + 64 * h + 4 * tx;
    if (row < a.m && a.vec && col + 4 <= a.n) {
      dev::load4(w + row * ld + col, wv[i][h]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) wv[i][h][e] = row < a.m && col + e < a.n ? w[row * ld + col + e] : T(0.0f);
    }
  };
  constexpr bool kLoadFirst = sizeof(T) <= 4;
  if constexpr (kLoadFirst) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) load_w(i, h);
  }

  Acc acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[i][c] = Acc(0);

  for (int64_t rc0 = 0; rc0 < a.r; rc0 += RC) {
    const int rw = static_cast<int>(std::min<int64_t>(RC, a.r - rc0));
    dev::sync_block();  // the previous chunk is no longer read
    for (int e = tid; e < TM * RC; e += NT) {
      const int rr = e % RC, i = e / RC;  // consecutive threads read along a row of B
      const int64_t row = row0 + i;
      bs[rr * (TM + 1) + i] = rr < rw && row < a.m ? a.B[(j * a.m + row) * a.r + rc0 + rr] : Acc(0);
    }
    for (int e = tid; e < RC * TN; e += NT) {
      const int rr = e / TN, c = e % TN;
      const int64_t col = col0 + c;
      as[rr * TN + c] = rr < rw && col < a.n ? a.A[(j * a.r + rc0 + rr) * a.n + col] : Acc(0);
    }
    dev::sync_block();
    for (int rr = 0; rr < rw; ++rr) {
      Acc bv[4], av[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = bs[rr * (TM + 1) + ty + 16 * i];
      dev::load_vec<4>(as + rr * TN + 4 * tx, av);
      dev::load_vec<4>(as + rr * TN + 64 + 4 * tx, av + 4);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[i][c] = fma(bv[i], av[c], acc[i][c]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= a.m) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t col = col0 + 64 * h + 4 * tx;
      if constexpr (!kLoadFirst) load_w(i, h);
      T o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] = dev::from_acc<T>(dev::to_acc<Acc>(wv[i][h][e]) - acc[i][4 * h + e]);
      if (a.vec && col + 4 <= a.n) {
        dev::store4(out + row * ldo + col, o);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)  // constant indices: o stays in registers
          if (col + e < a.n) out[row * ldo + col + e] = o[e];
      }
    }
  }
}

}  // namespace cuda
}  // namespace pissa_fast
