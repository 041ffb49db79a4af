// The pass over a list of weights behind pissa_fast::wx, ::wtx and ::gram, and its launch geometry
// (plan_pass), shared by the host wrapper in gram_cuda.cu and the CPU emulation in tests/cuda_emu.
//
// One launch covers every matrix of the list: block -> (matrix j, row block, column slice g).
// A block copies its tile of W -- bm rows x one column slice -- into shared memory once (cp.async,
// 16-byte, coalesced) and keeps it there for every k-chunk of the small factor:
//   phase 1  Y_tile = W_tile V_slice: each thread owns 4 rows x kK columns of Y and a strided set of
//            W columns; partial sums meet through warp shuffles and shared memory. With more than one
//            slice per row block (groups > 1) the slices of a row block form a thread-block cluster
//            (sm_90) and add their partial Y through distributed shared memory.
//   phase 2  Z_slice += W_tile^T Y_tile: each thread owns up to 4 W columns x kK columns of Z, reads
//            W and (broadcast) Y from shared memory, and adds its result to Z with atomics.
// gram runs both phases on the resident tile, so W is read from global memory exactly once; wx runs
// phase 1 only, wtx phase 2 only (Y read from its input). Splitting the columns over a cluster lets
// a block hold 4-16x more rows than a whole-row tile could, which is what keeps the traffic of the
// small factors (V read per tile, Z atomics per tile, both ~ kK / bm per weight) well below the
// traffic of W itself.
//
// Only when not even 4 full rows (or row slices) fit in shared memory does a block stream its
// columns in chunks; phase 1 and phase 2 then re-read W per k-chunk, and gram is run as wx then wtx.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device.cuh"

namespace pissa_fast {
namespace cuda {

template <typename Acc>
struct PassTiling {
  static constexpr int kThreads = 256;
  static constexpr int kRows = 4;                             // W rows per thread in phase 1
  static constexpr int kK = sizeof(Acc) == 4 ? 16 : 8;        // factor columns per k-chunk
  static constexpr int kVCols = 256;                          // rows of V staged at a time (or half)
  static constexpr int kVPitch = kK + 16 / int(sizeof(Acc));  // padding: conflict-free 16-byte reads
  static constexpr int kMaxRows = 64;                         // rows per block (power of 2, >= 4)
  static constexpr int kMaxGroups = 8;                        // slices per row block (portable cluster)
};

// What the host knows about the device: shared memory sizes (cudaDeviceProp) and the largest
// cluster the kernel may be launched with (1: no clusters).
struct DeviceLimits {
  int64_t smem_per_sm = 0;
  int64_t smem_per_block = 0;  // opt-in maximum
  int64_t smem_reserved = 0;   // per block, taken by the system
  int max_cluster = 1;
};

struct PassPlan {
  int groups = 1;          // column slices per row block
  int bm = 4;              // rows per block
  int pitch = 0;           // elements per shared-memory row of the W tile
  int vcols = 0;           // rows of V staged in shared memory at a time (phase 1)
  int64_t slice = 0;       // columns per slice (multiple of the 16-byte vector)
  int64_t chunk = 0;       // columns of a slice staged at a time (== slice when resident)
  int64_t row_blocks = 0;  // ceil(m / bm)
  bool resident = true;    // the whole slice fits: W read once for every k
  bool cluster = false;    // phase 1 with groups > 1: launch as clusters of `groups` blocks
  int64_t off_v = 0, off_yp = 0, off_yf = 0, off_red = 0, smem = 0;  // shared-memory layout (bytes)
};

// Row pitch of the W tile: a 16-byte multiple (cp.async). When a warp holds two row groups in
// phase 1 (16 lanes per group), their rows are 4 apart; a pitch of 16 mod 32 bytes puts them 16
// banks apart, so the two half-warps' reads do not conflict.
inline int tile_pitch(int64_t width, int elem, bool two_groups_per_warp) {
  const int64_t ve = 16 / elem;
  int64_t w = std::max<int64_t>(ve, round_up(width, ve));
  if (two_groups_per_warp)
    while ((w * elem) % 32 != 16) w += ve;
  return static_cast<int>(w);
}

template <typename Acc>
PassPlan layout_pass(int64_t width, int bm, int elem, bool p1, int vcols = PassTiling<Acc>::kVCols) {
  using Tl = PassTiling<Acc>;
  const int64_t acc = sizeof(Acc);
  PassPlan p;
  p.bm = bm;
  p.vcols = vcols;
  p.pitch = tile_pitch(width, elem, p1 && Tl::kThreads / (bm / Tl::kRows) < 32);
  int64_t off = round_up(int64_t(bm) * p.pitch * elem, 16);
  if (p1) {
    p.off_v = off;
    off += round_up(int64_t(vcols) * Tl::kVPitch * acc, 16);
    p.off_yp = off;
    off += round_up(int64_t(bm) * Tl::kK * acc, 16);
  }
  p.off_yf = off;
  off += round_up(int64_t(bm) * Tl::kK * acc, 16);
  if (p1) {
    const int lanes = Tl::kThreads / (bm / Tl::kRows);
    const int seg = std::min(lanes, 32);
    p.off_red = off;
    off += round_up(int64_t(Tl::kThreads / seg) * Tl::kRows * Tl::kK * acc, 16);
  }
  p.smem = off;
  return p;
}

// Geometry of one pass over m x n weights of `elem` bytes. Largest row block first (it divides the
// factor traffic per weight), preferring 2 blocks per SM so one block's loads overlap the other's
// arithmetic; fewest slices among equals (clusters cost two cluster barriers per k-chunk).
template <typename Acc>
PassPlan plan_pass(int64_t m, int64_t n, int elem, bool p1, bool p2, const DeviceLimits& lim) {
  using Tl = PassTiling<Acc>;
  (void)p2;
  const int64_t ve = 16 / elem;
  int bm_cap = 4;
  while (bm_cap < Tl::kMaxRows && bm_cap < m) bm_cap *= 2;
  // wx/gram slices must add their partial Y inside a cluster; wtx slices are independent.
  const int max_groups = p1 ? std::min(lim.max_cluster, Tl::kMaxGroups) : Tl::kMaxGroups;
  const int64_t two_per_sm = std::min(lim.smem_per_block, lim.smem_per_sm / 2 - lim.smem_reserved);
  for (const int64_t budget : {two_per_sm, lim.smem_per_block}) {
    PassPlan best;
    bool found = false;
    for (int g = 1; g <= max_groups; g *= 2) {
      const int64_t slice = round_up(ceil_div(n, g), ve);
      if (g > 1 && (g - 1) * slice >= n) break;  // a slice would be empty
      bool fits = false;
      for (int bm = bm_cap; bm >= 4 && !fits; bm /= 2) {
        // Half the V staging buffer (more barriers) when that is what lets the larger tile fit.
        for (const int vcols : {Tl::kVCols, Tl::kVCols / 2}) {
          PassPlan p = layout_pass<Acc>(slice, bm, elem, p1, vcols);
          if (p.smem > budget) continue;
          if (!found || bm > best.bm) {
            best = p;
            best.groups = g;
            best.slice = slice;
            found = true;
          }
          fits = true;
          break;
        }
      }
      if (found && best.bm == bm_cap) break;
    }
    if (found) {
      best.chunk = best.slice;
      best.resident = true;
      best.cluster = p1 && best.groups > 1;
      best.row_blocks = ceil_div(m, best.bm);
      return best;
    }
  }
  // Rows too long to keep even 4 of them: stream each row block in column chunks.
  for (int bm = bm_cap;; bm /= 2) {
    for (int64_t chunk = round_up(std::min<int64_t>(n, 4096), ve); chunk >= ve;
         chunk = chunk > ve ? round_up(chunk / 2, ve) : 0) {
      PassPlan p = layout_pass<Acc>(chunk, bm, elem, p1);
      if (p.smem <= two_per_sm || (bm == 4 && chunk == ve)) {
        p.groups = 1;
        p.slice = n;
        p.chunk = chunk;
        p.resident = chunk >= n;
        p.cluster = false;
        p.row_blocks = ceil_div(m, bm);
        return p;
      }
      if (chunk == ve) break;
    }
  }
}

template <typename T>
struct PassArgs {
  using Acc = dev::acc_t<T>;
  const int64_t* table = nullptr;  // [2b]: address of W[j], then row stride of W[j] (elements)
  const Acc* V = nullptr;          // [b, n, k] phase-1 input
  Acc* Y = nullptr;                // [b, m, k] phase-1 output, or phase-2 input without phase 1
  Acc* Z = nullptr;                // [b, n, k] phase-2 output, zeroed before the launch
  int64_t b = 0, m = 0, n = 0, k = 0;
  int64_t row_blocks = 0, slice = 0, chunk = 0;
  int64_t off_v = 0, off_yp = 0, off_yf = 0, off_red = 0;
  int groups = 1, bm = 4, pitch = 0, vcols = 0;
  bool phase1 = false, phase2 = false, resident = true, cluster = false;
  bool vec = false;         // every W[j] allows 16-byte loads (address, row stride)
  bool vec_atomic = false;  // Z rows allow 16-byte atomics (k % 4 == 0)
};

template <typename T>
PassArgs<T> make_pass_args(const PassPlan& p, const int64_t* table, int64_t b, int64_t m, int64_t n,
                           int64_t k, bool p1, bool p2, bool vec) {
  PassArgs<T> a;
  a.table = table;
  a.b = b, a.m = m, a.n = n, a.k = k;
  a.row_blocks = p.row_blocks, a.slice = p.slice, a.chunk = p.chunk;
  a.off_v = p.off_v, a.off_yp = p.off_yp, a.off_yf = p.off_yf, a.off_red = p.off_red;
  a.groups = p.groups, a.bm = p.bm, a.pitch = p.pitch, a.vcols = p.vcols;
  a.phase1 = p1, a.phase2 = p2, a.resident = p.resident, a.cluster = p.cluster;
  a.vec = vec;
  a.vec_atomic = k % 4 == 0;
  return a;
}

// Phase 2 for Q columns per thread (c = (q0 + q) * kThreads + tid): z = W_tile[:, c]^T Y_tile,
// then added to Z. Q is 4, 2 or 1 so the last columns of a slice do not waste a 4-wide pass.
template <int Q, typename T, typename Acc>
PF_DEVICE void phase2_columns(const T* wt, int pitch, const Acc* yf, int rows, int64_t cw, int q0,
                              Acc* z0, int64_t k, int kw, bool vec_atomic, int tid) {
  using Tl = PassTiling<Acc>;
  constexpr int NT = Tl::kThreads, KC = Tl::kK;
  Acc z[Q][KC];
#pragma unroll
  for (int q = 0; q < Q; ++q)
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) z[q][kk] = Acc(0);
  for (int r = 0; r < rows; ++r) {
    Acc yv[KC];
    dev::load_vec<KC>(yf + r * KC, yv);
    const T* wr = wt + int64_t(r) * pitch;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int64_t c = int64_t(q0 + q) * NT + tid;
      const Acc wv = c < cw ? dev::to_acc<Acc>(wr[c]) : Acc(0);
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) z[q][kk] = fma(wv, yv[kk], z[q][kk]);
    }
  }
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int64_t c = int64_t(q0 + q) * NT + tid;
    if (c >= cw) continue;
    Acc* zp = z0 + c * k;
    if (vec_atomic && kw == KC) {
#pragma unroll
      for (int kk = 0; kk < KC; kk += 4) dev::atomic_add4(zp + kk, &z[q][kk]);
    } else {
#pragma unroll
      for (int kk = 0; kk < KC; ++kk)  // constant bound: z stays in registers
        if (kk < kw) dev::atomic_add(zp + kk, z[q][kk]);
    }
  }
}

template <typename T>
PF_GLOBAL void PF_LAUNCH_BOUNDS(256, 2) pass_kernel(const PassArgs<T> a) {
  using Acc = dev::acc_t<T>;
  using Tl = PassTiling<Acc>;
  constexpr int NT = Tl::kThreads, RW = Tl::kRows, KC = Tl::kK, VP = Tl::kVPitch;
  constexpr int VE = 16 / int(sizeof(T));

  const int tid = dev::thread_id();
  const int64_t bid = dev::block_id();
  const int g = static_cast<int>(bid % a.groups);  // == rank in the cluster (clusters run along x)
  const int64_t rest = bid / a.groups;
  const int64_t j = rest / a.row_blocks;
  const int64_t r0 = (rest % a.row_blocks) * a.bm;
  const int rows = static_cast<int>(std::min<int64_t>(a.bm, a.m - r0));
  const int64_t c_begin = int64_t(g) * a.slice;
  const int64_t width = std::max<int64_t>(0, std::min<int64_t>(a.n, c_begin + a.slice) - c_begin);
  const int pitch = a.pitch;

  unsigned char* smem = dev::dynamic_smem();
  T* wt = reinterpret_cast<T*>(smem);
  Acc* vs = reinterpret_cast<Acc*>(smem + a.off_v);
  Acc* yp = reinterpret_cast<Acc*>(smem + a.off_yp);
  Acc* yf = reinterpret_cast<Acc*>(smem + a.off_yf);
  Acc* red = reinterpret_cast<Acc*>(smem + a.off_red);

  const T* w = reinterpret_cast<const T*>(a.table[j]);
  const int64_t ld = a.table[a.b + j];

  // Phase-1 roles: bm / 4 row groups of `lanes` threads; a group's lanes split the columns.
  const int lanes = NT / (a.bm / RW);
  const int grp = tid / lanes, lane = tid % lanes;
  const int seg = lanes < 32 ? lanes : 32;  // shuffle segment (a group never spans a partial warp)

  // Columns [col0, col0 + cw) of rows [r0, r0 + bm) -> wt; rows past m and columns past cw read 0.
  auto load_tile = [&](int64_t col0, int64_t cw) {
    dev::sync_block();  // every reader of the previous tile is done
    const int nv = static_cast<int>(ceil_div(cw, VE));
    const int total = a.bm * nv;
    for (int e = tid; e < total; e += NT) {
      const int r = e / nv;
      const int64_t c = int64_t(e - r * nv) * VE;
      T* dst = wt + int64_t(r) * pitch + c;
      if (r < rows) {
        const T* src = w + (r0 + r) * ld + col0 + c;
        if (a.vec && c + VE <= cw) {
          dev::cp_async16(dst, src);
        } else {
#pragma unroll
          for (int t = 0; t < VE; ++t) dst[t] = c + t < cw ? src[t] : T(0.0f);
        }
      } else {
#pragma unroll
        for (int t = 0; t < VE; ++t) dst[t] = T(0.0f);
      }
    }
    dev::cp_async_wait_all();
    dev::sync_block();
  };

  if (a.resident) load_tile(c_begin, width);

  const int64_t kchunks = ceil_div(a.k, KC);
  for (int64_t kc = 0; kc < kchunks; ++kc) {
    const int64_t kc0 = kc * KC;
    const int kw = static_cast<int>(std::min<int64_t>(KC, a.k - kc0));

    if (a.phase1) {
      Acc acc[RW][KC];
#pragma unroll
      for (int i = 0; i < RW; ++i)
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) acc[i][kk] = Acc(0);

      for (int64_t cc0 = 0; cc0 < width; cc0 += a.chunk) {
        const int64_t cw = std::min<int64_t>(a.chunk, width - cc0);
        if (!a.resident) load_tile(c_begin + cc0, cw);
        for (int64_t v0 = 0; v0 < cw; v0 += a.vcols) {
          const int vw = static_cast<int>(std::min<int64_t>(a.vcols, cw - v0));
          dev::sync_block();  // the previous V rows are no longer read
          const Acc* vsrc = a.V + (j * a.n + c_begin + cc0 + v0) * a.k + kc0;
          for (int e = tid; e < vw * KC; e += NT) {
            const int c = e / KC, kk = e % KC;
            vs[c * VP + kk] = kk < kw ? vsrc[int64_t(c) * a.k + kk] : Acc(0);
          }
          dev::sync_block();
          const T* wrow = wt + int64_t(grp * RW) * pitch + v0;
          for (int c = lane; c < vw; c += lanes) {
            Acc wv[RW];
#pragma unroll
            for (int i = 0; i < RW; ++i) wv[i] = dev::to_acc<Acc>(wrow[int64_t(i) * pitch + c]);
            Acc vv[KC];
            dev::load_vec<KC>(vs + c * VP, vv);
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
              for (int kk = 0; kk < KC; ++kk) acc[i][kk] = fma(wv[i], vv[kk], acc[i][kk]);
          }
        }
      }

      // Sum over a group's lanes: shuffles within each segment, then one partial per segment
      // through shared memory.
      for (int o = seg / 2; o > 0; o /= 2) dev::add_shfl_xor<RW * KC>(&acc[0][0], o);
      if (tid % seg == 0) {
        Acc* dst = red + (tid / seg) * (RW * KC);
#pragma unroll
        for (int i = 0; i < RW; ++i)
#pragma unroll
          for (int kk = 0; kk < KC; ++kk) dst[i * KC + kk] = acc[i][kk];
      }
      dev::sync_block();
      const int per_group = lanes / seg;
      for (int e = tid; e < a.bm * KC; e += NT) {
        const int r = e / KC, kk = e % KC;
        const int gr = r / RW, i = r % RW;
        Acc s = Acc(0);
        for (int q = 0; q < per_group; ++q) s += red[(gr * per_group + q) * (RW * KC) + i * KC + kk];
        yp[e] = s;
      }

      // The slices of a row block add their partial Y (distributed shared memory in a cluster).
      if (a.cluster) {
        dev::sync_cluster();
      } else {
        dev::sync_block();
      }
      const int nsrc = a.cluster ? a.groups : 1;
      for (int e = tid; e < a.bm * KC; e += NT) {
        // All (remote) loads first, then the sum in a fixed order: the loads overlap.
        Acc part[Tl::kMaxGroups];
#pragma unroll
        for (int q = 0; q < Tl::kMaxGroups; ++q)
          part[q] = q >= nsrc ? Acc(0) : a.cluster ? dev::cluster_map(yp, q)[e] : yp[e];
        Acc s = Acc(0);
#pragma unroll
        for (int q = 0; q < Tl::kMaxGroups; ++q) s += part[q];
        yf[e] = s;
      }
      // yf complete for this block, and no block of the cluster still reads another's yp (which the
      // next k-chunk overwrites, and which must outlive its readers).
      if (a.cluster) {
        dev::sync_cluster();
      } else {
        dev::sync_block();
      }
      if (g == 0) {
        for (int e = tid; e < a.bm * KC; e += NT) {
          const int r = e / KC, kk = e % KC;
          if (r < rows && kk < kw) a.Y[(j * a.m + r0 + r) * a.k + kc0 + kk] = yf[e];
        }
      }
    } else if (a.phase2) {
      dev::sync_block();  // the previous k-chunk's phase 2 no longer reads yf
      for (int e = tid; e < a.bm * KC; e += NT) {
        const int r = e / KC, kk = e % KC;
        yf[e] = r < rows && kk < kw ? a.Y[(j * a.m + r0 + r) * a.k + kc0 + kk] : Acc(0);
      }
      dev::sync_block();
    }

    if (a.phase2) {
      for (int64_t cc0 = 0; cc0 < width; cc0 += a.chunk) {
        const int64_t cw = std::min<int64_t>(a.chunk, width - cc0);
        if (!a.resident) load_tile(c_begin + cc0, cw);
        Acc* z0 = a.Z + (j * a.n + c_begin + cc0) * a.k + kc0;
        const int per_thread = static_cast<int>(ceil_div(cw, NT));
        int q0 = 0;
        for (; q0 + 4 <= per_thread; q0 += 4)
          phase2_columns<4>(wt, pitch, yf, rows, cw, q0, z0, a.k, kw, a.vec_atomic, tid);
        if (q0 + 2 <= per_thread) {
          phase2_columns<2>(wt, pitch, yf, rows, cw, q0, z0, a.k, kw, a.vec_atomic, tid);
          q0 += 2;
        }
        if (q0 < per_thread) phase2_columns<1>(wt, pitch, yf, rows, cw, q0, z0, a.k, kw, a.vec_atomic, tid);
      }
    }
  }
}

}  // namespace cuda
}  // namespace pissa_fast
