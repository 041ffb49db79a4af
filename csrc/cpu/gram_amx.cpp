// The gram pass of a bf16 weight on AMX tiles (see gram_amx.h).
//
// Why: on the project's CPU (a 2-core Xeon with AMX) the float32 gram pass ran at MKL's thin-GEMM
// rate, about 100 GFLOP/s, and the passes were two thirds of a decomposition. AMX multiplies bf16
// pairs with float32 accumulation at many times that rate, so the pass becomes bound by reading W
// (benchmarks/RESULTS.md has the measurements).
//
// Precision: a product of two bf16 values is exact in float32 and AMX accumulates in float32, so W is
// used as it is. The float32 operand that is not W (V for Y = W V, then Y for Z = W^T Y) is split
// into three bf16 parts, x = hi + mid + lo, each the rounding of what the earlier parts left (the
// differences are exact in float32): hi + mid + lo carries x to float32's own precision. The parts
// are stacked along the sum's dimension, so they accumulate into the same float32 tile. AMX flushes
// denormals; the caller's pass scale keeps the products far from that range.
//
// Layout. AMX computes C[16 x 16] += A[16 x 32] B[32 x 16] with B stored as 16 rows of 16 bf16 pairs
// (VNNI: row i holds B[2i][j], B[2i+1][j] side by side). Y = W V takes A tiles straight from W's rows
// and B tiles from a packed copy of V's parts. Z^T = Y^T W needs W as the B operand, so each block of
// rows of W (about 1 MiB) is first repacked in VNNI order (a copy that stays in L2); its A tiles are Y's
// parts, transposed. Rows are split over the threads in fixed ranges, each with its own Z^T partial,
// summed in a fixed order: the result is deterministic for a given thread count.
#include "gram_amx.h"

#include "amx_tiles.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pissa_fast {
namespace cpu_amx {
namespace {

constexpr int kGroup = 5;  // accumulator tiles per sweep: tiles 0-4; tile 6 is A, tile 7 is B

#ifdef PF_HAVE_AMX

// B tiles of the parts of X [rows, k] (float32, contiguous): tile (kc, t, p) holds part p of rows
// [32 kc, 32 kc + 32), columns [16 t, 16 t + 16): element (i, j, e) = part p of X[32 kc + 2 i + e][16 t + j]
// (zero for columns >= k).
void pack_b(const float* X, int64_t rows, int64_t k, int64_t NT, uint16_t* out) {
  std::memset(out, 0, sizeof(uint16_t) * (rows / 32) * NT * kParts * kTile);
  uint16_t parts[kParts];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kc = r / 32, i = (r % 32) / 2, e = r % 2;
    for (int64_t c = 0; c < k; ++c) {
      split(X[r * k + c], parts);
      uint16_t* dst = out + ((kc * NT + c / 16) * kParts) * kTile + i * 32 + (c % 16) * 2 + e;
      for (int p = 0; p < kParts; ++p) dst[p * kTile] = parts[p];
    }
  }
}

// A tiles of the transposed parts of Y [rows, k]: tile (kc, t, p) holds part p of columns
// [16 t, 16 t + 16) as rows and Y's rows [32 kc, 32 kc + 32) as columns.
void pack_a_transposed(const float* Y, int64_t rows, int64_t k, int64_t NT, uint16_t* out) {
  std::memset(out, 0, sizeof(uint16_t) * (rows / 32) * NT * kParts * kTile);
  uint16_t parts[kParts];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kc = r / 32, col = r % 32;
    for (int64_t c = 0; c < k; ++c) {
      split(Y[r * k + c], parts);
      uint16_t* dst = out + ((kc * NT + c / 16) * kParts) * kTile + (c % 16) * 32 + col;
      for (int p = 0; p < kParts; ++p) dst[p * kTile] = parts[p];
    }
  }
}

// Rows [0, rows) of W (row stride ldw elements) in VNNI order: tile (kc, ct) at out + (kc (n / 16) + ct)
// kTile, row i = W[32 kc + 2 i][16 ct + j] and W[32 kc + 2 i + 1][16 ct + j] interleaved, j < 16.
__attribute__((target("avx512f,avx512bw"))) void pack_w(const uint16_t* W, int64_t ldw, int64_t rows, int64_t n,
                                                         uint16_t* out) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 16; ++j) {
    lo_idx[2 * j] = uint16_t(j);
    lo_idx[2 * j + 1] = uint16_t(32 + j);
    hi_idx[2 * j] = uint16_t(16 + j);
    hi_idx[2 * j + 1] = uint16_t(48 + j);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const int64_t nct = n / 16;
  for (int64_t r = 0; r < rows; r += 2) {
    const int64_t kc = r / 32, i = (r % 32) / 2;
    const uint16_t* a = W + r * ldw;
    const uint16_t* b = a + ldw;
    uint16_t* dst = out + kc * nct * kTile + i * 32;
    for (int64_t c = 0; c < n; c += 32) {
      const __m512i va = _mm512_loadu_si512(a + c), vb = _mm512_loadu_si512(b + c);
      _mm512_store_si512(dst + (c / 16) * kTile, _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_store_si512(dst + (c / 16 + 1) * kTile, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

// Tile indices are immediates: the NG accumulators of a sweep are unrolled with these.
#define PF_EACH(X) X(0) X(1) X(2) X(3) X(4)

// Yb[16, 16 NT] (float32, row stride ldo bytes), columns [16 g0, 16 (g0 + NG)): the 16 rows of W at Wr
// times V, over V's rows [32 kc0, 32 kc1), its three parts accumulated in the same tile; added to what
// Yb holds unless `first`.
template <int NG>
__attribute__((target("amx-tile,amx-bf16"))) void y_strip(const uint16_t* Wr, int64_t ldw_bytes, int64_t kc0,
                                                         int64_t kc1, const uint16_t* Vp, int64_t NT, int64_t g0,
                                                         float* Yb, int64_t ldo_bytes, bool first) {
  float* C = Yb + g0 * 16;
#define PF_INIT(g)                                     \
  if constexpr (NG > g) {                              \
    if (first) {                                       \
      _tile_zero(g);                                   \
    } else {                                           \
      _tile_loadd(g, C + g * 16, ldo_bytes);           \
    }                                                  \
  }
  PF_EACH(PF_INIT)
  for (int64_t kc = kc0; kc < kc1; ++kc) {
    _tile_loadd(6, Wr + kc * 32, ldw_bytes);
    const uint16_t* B = Vp + (kc * NT + g0) * kParts * kTile;
#define PF_DOT(g)                                                \
  if constexpr (NG > g) {                                        \
    for (int p = 0; p < kParts; ++p) {                           \
      _tile_loadd(7, B + (g * kParts + p) * kTile, 64);          \
      _tile_dpbf16ps(g, 6, 7);                                   \
    }                                                            \
  }
    PF_EACH(PF_DOT)
  }
#define PF_STORE(g) \
  if constexpr (NG > g) _tile_stored(g, C + g * 16, ldo_bytes);
  PF_EACH(PF_STORE)
}

// Zt[16 rt0 .. 16 (rt0 + NG), :] (float32, row stride ldz elements) += Y^T W for one repacked block of
// KCb * 32 rows, Y's three parts accumulated in the same tile.
template <int NG>
__attribute__((target("amx-tile,amx-bf16"))) void z_block(const uint16_t* Wv, int64_t nct, int64_t ct0, int64_t ct1,
                                                         const uint16_t* Yt, int64_t NT, int64_t KCb, int64_t rt0,
                                                         float* Zt, int64_t ldz) {
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    float* C = Zt + rt0 * 16 * ldz + ct * 16;
#define PF_LOAD(g) \
  if constexpr (NG > g) _tile_loadd(g, C + g * 16 * ldz, ldz * 4);
    PF_EACH(PF_LOAD)
    for (int64_t kc = 0; kc < KCb; ++kc) {
      _tile_loadd(7, Wv + (kc * nct + ct) * kTile, 64);
      const uint16_t* A = Yt + (kc * NT + rt0) * kParts * kTile;
#define PF_DOTA(g)                                               \
  if constexpr (NG > g) {                                        \
    for (int p = 0; p < kParts; ++p) {                           \
      _tile_loadd(6, A + (g * kParts + p) * kTile, 64);          \
      _tile_dpbf16ps(g, 6, 7);                                   \
    }                                                            \
  }
      PF_EACH(PF_DOTA)
    }
#define PF_STOREZ(g) \
  if constexpr (NG > g) _tile_stored(g, C + g * 16 * ldz, ldz * 4);
    PF_EACH(PF_STOREZ)
  }
}

template <template <int> class F, typename... Args>
void with_group(int64_t ng, Args... args) {
  switch (ng) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    default: F<5>::run(args...); break;
  }
}

template <int NG>
struct YStrip {
  template <typename... A>
  static void run(A... a) { y_strip<NG>(a...); }
};

template <int NG>
struct ZBlock {
  template <typename... A>
  static void run(A... a) { z_block<NG>(a...); }
};

void* scratch(at::Tensor& t, int64_t numel, at::ScalarType dt) {
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, at::TensorOptions().dtype(dt));
  return t.data_ptr();
}

// Rows of W per repacked block: its VNNI copy (2 n bytes per row) at most about 1 MiB, so that it stays
// in L2 next to the Z^T tiles it updates; a multiple of 32.
int64_t block_rows(int64_t n) { return std::max<int64_t>(32, ((int64_t(1) << 20) / (2 * n)) / 32 * 32); }

// Which products a sweep over W's rows makes: Y = W V (the rows of Y), Z^T += Y^T W (from those rows of
// Y), or both in one read of W (gram).
enum Products { kY = 1, kZ = 2, kYZ = 3 };

// Rows [r0, r1) of W (multiples of 32): with kY, their rows of Y from V's packed parts Vp; with kZ,
// their share of Z^T in Zt [16 NT, n] from their rows of Ysrc (the Y just made, with kYZ).
void sweep_rows(Products what, const uint16_t* W, int64_t ldw, int64_t n, int64_t k, int64_t r0, int64_t r1,
                const uint16_t* Vp, int64_t NT, float* Y, const float* Ysrc, float* Zt) {
  const int64_t rows = block_rows(n);
  // Per-thread scratch, kept between calls (at most about 1 MiB): fresh buffers would be fresh
  // mappings, page-faulted on every pass.
  thread_local at::Tensor Wv, Yt, strip;
  uint16_t *wv = nullptr, *yt = nullptr;
  float* s = nullptr;
  if (what & kZ) {
    wv = reinterpret_cast<uint16_t*>(scratch(Wv, rows * n, at::kShort));
    yt = reinterpret_cast<uint16_t*>(scratch(Yt, (rows / 32) * NT * kParts * kTile, at::kShort));
  }
  if (what & kY) s = static_cast<float*>(scratch(strip, rows * NT * 16, at::kFloat));
  const int64_t ldo = NT * 16, KC = n / 32;
  // V's packed parts are 3 KiB per 32 rows and 16 columns: taken in slices of at most ~512 KiB, which
  // stay in L2 while every row strip of the block passes over them.
  const int64_t kc_step = std::max<int64_t>(1, (int64_t(512) << 10) / (NT * kParts * kTile * 2));
  tiles_on();
  for (int64_t R0 = r0; R0 < r1; R0 += rows) {
    const int64_t MB = std::min(rows, r1 - R0);
    if (what & kY) {
      for (int64_t kc0 = 0; kc0 < KC; kc0 += kc_step) {
        const int64_t kc1 = std::min(KC, kc0 + kc_step);
        for (int64_t row = R0; row < R0 + MB; row += 16)
          for (int64_t g0 = 0; g0 < NT; g0 += kGroup)
            with_group<YStrip>(std::min<int64_t>(kGroup, NT - g0), W + row * ldw, ldw * 2, kc0, kc1, Vp, NT, g0,
                               s + (row - R0) * ldo, ldo * 4, kc0 == 0);
      }
      for (int64_t i = 0; i < MB; ++i) std::memcpy(Y + (R0 + i) * k, s + i * ldo, sizeof(float) * k);
    }
    if (!(what & kZ)) continue;
    pack_a_transposed(Ysrc + R0 * k, MB, k, NT, yt);
    pack_w(W + R0 * ldw, ldw, MB, n, wv);
    // 256 columns at a time, every accumulator group over them: that slice of the repacked block stays
    // in L1/L2 while the groups pass (with more than one group, a sweep over all columns per group
    // streamed the whole block once per group).
    const int64_t nct = n / 16;
    for (int64_t ct0 = 0; ct0 < nct; ct0 += 16)
      for (int64_t rt0 = 0; rt0 < NT; rt0 += kGroup)
        with_group<ZBlock>(std::min<int64_t>(kGroup, NT - rt0), static_cast<const uint16_t*>(wv), nct, ct0,
                           std::min(nct, ct0 + 16), static_cast<const uint16_t*>(yt), NT, MB / 32, rt0, Zt, n);
  }
  tiles_off();
}

// One sweep over W [m, n] making `what`: Y [m, k] from V [n, k] (kY), Z [n, k] = W^T Ysrc (kZ; with
// kYZ, Ysrc is the Y made). Row ranges of whole 32-row chunks go one per task; with kZ each task has a
// Z^T partial of 64 NT n bytes, the partials together within 1/8 of W's bytes (and within the
// threads), summed in task order: deterministic for a given thread count.
void sweep(Products what, const at::Tensor& W, const float* V, float* Y, const float* Ysrc, float* Z, int64_t k) {
  const int64_t m = W.size(0), n = W.size(1), ldw = W.stride(0);
  const int64_t NT = (k + 15) / 16;
  at::Tensor Vp;
  uint16_t* vp = nullptr;
  if (what & kY) {
    Vp = at::empty({(n / 32) * NT * kParts * kTile}, at::kShort);
    vp = reinterpret_cast<uint16_t*>(Vp.data_ptr<int16_t>());
    pack_b(V, n, k, NT, vp);
  }
  const int64_t chunks = m / 32;
  const int64_t by_memory = (what & kZ) ? std::max<int64_t>(1, m / (16 * 16 * NT)) : chunks;
  const int64_t tasks = std::max<int64_t>(1, std::min({int64_t(at::get_num_threads()), chunks, by_memory}));
  at::Tensor Zt;
  float* zt = nullptr;
  if (what & kZ) {
    Zt = at::zeros({tasks, NT * 16, n}, at::kFloat);
    zt = Zt.data_ptr<float>();
  }
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      sweep_rows(what, w, ldw, n, k, chunks * t / tasks * 32, chunks * (t + 1) / tasks * 32, vp, NT, Y, Ysrc,
                 zt ? zt + t * NT * 16 * n : nullptr);
  });
  if (!(what & kZ)) return;
  // Z[c][col] = the partials' sum, in task order.
  at::parallel_for(0, n, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t col = 0; col < k; ++col) {
        float acc = 0;
        for (int64_t t = 0; t < tasks; ++t) acc += zt[(t * NT * 16 + col) * n + c];
        Z[c * k + col] = acc;
      }
  });
}

#endif  // PF_HAVE_AMX

}  // namespace

bool takes(const at::Tensor& W) { return takes_bf16(W, 32); }

#ifndef PF_HAVE_AMX
[[noreturn]] static void not_built() { TORCH_CHECK(false, "pissa_fast: the AMX passes are not built for this platform"); }
#endif

#ifdef PF_HAVE_AMX
void gram(const at::Tensor& W, const at::Tensor& V, at::Tensor Y, at::Tensor Z) {
  sweep(kYZ, W, V.data_ptr<float>(), Y.data_ptr<float>(), Y.data_ptr<float>(), Z.data_ptr<float>(), V.size(1));
}

void wx(const at::Tensor& W, const at::Tensor& X, at::Tensor Y) {
  sweep(kY, W, X.data_ptr<float>(), Y.data_ptr<float>(), nullptr, nullptr, X.size(1));
}

void wtx(const at::Tensor& W, const at::Tensor& Y, at::Tensor Z) {
  sweep(kZ, W, nullptr, nullptr, Y.data_ptr<float>(), Z.data_ptr<float>(), Y.size(1));
}
#else
void gram(const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor) { not_built(); }
void wx(const at::Tensor&, const at::Tensor&, at::Tensor) { not_built(); }
void wtx(const at::Tensor&, const at::Tensor&, at::Tensor) { not_built(); }
#endif

}  // namespace cpu_amx
}  // namespace pissa_fast
