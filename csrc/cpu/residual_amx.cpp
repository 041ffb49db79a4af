// The bf16 residual W - B A on AMX tiles (see residual_amx.h).
//
// Why: with the passes on AMX (gram_amx.cpp), the float32 residual (widen a block of W, one sgemm of
// depth r, round back) was the largest pass left; it is bound by MKL's rate at depth r = 4-64.
//
// Precision: B and A are split into bf16 parts (amx_tiles.h), x = hi + mid to 2^-16 relative, and the
// three products hi hi, hi mid, mid hi are summed, stacked along the depth of one AMX product, in
// float32: the arithmetic of the CUDA residual (passes_aten.cpp) and its bound (pissa_fast/_bounds.py,
// residual_bound with split). The terms left out are about 3 2^-16 |B| |A|, a small fraction of the
// bf16 ulp that W - B A is then rounded to, once (round to nearest even): on the 4096^2 benchmark
// matrix at r 16 and 64, 0.17-0.24 % of the entries round to the other neighbour than the float32
// path's, and the mean and largest errors against float64 agree to four digits. Summing the six
// products down to 2^-24 (float32's own rounding) took twice the tile work: 9.5 against 4.8 ms for
// that matrix at r 64.
#include "residual_amx.h"

#include <ATen/Parallel.h>

#include "amx_tiles.h"

namespace pissa_fast {
namespace cpu_amx {
namespace {

#ifdef PF_HAVE_AMX

constexpr int kTerms = 3;
constexpr int kBPart[kTerms] = {0, 0, 1};  // the part of B in each product
constexpr int kAPart[kTerms] = {0, 1, 0};  // and the part of A
constexpr int kCols = 4;                            // accumulator tiles per sweep: 64 columns

// A tiles of B's terms: tile (s, kc) holds rows [16 s, 16 s + 16) and depth [32 kc, 32 kc + 32), depth
// q = term r + c standing for part kBPart[term] of B[row][c] (zero beyond kTerms r).
void pack_b_terms(const float* B, int64_t rows, int64_t r, int64_t KC, uint16_t* out) {
  std::memset(out, 0, sizeof(uint16_t) * (rows / 16) * KC * kTile);
  uint16_t parts[kParts];
  for (int64_t row = 0; row < rows; ++row) {
    uint16_t* dst = out + (row / 16) * KC * kTile + (row % 16) * 32;
    for (int64_t c = 0; c < r; ++c) {
      split(B[row * r + c], parts);
      for (int t = 0; t < kTerms; ++t) {
        const int64_t q = t * r + c;
        dst[(q / 32) * kTile + q % 32] = parts[kBPart[t]];
      }
    }
  }
}

// B tiles (VNNI) of A's terms: tile (kc, ct), row i, pair e: depth q = 32 kc + 2 i + e, the part
// kAPart[q / r] of A[q % r][16 ct + j]. Columns [c0, c1) only (multiples of 16).
void pack_a_terms(const float* A, int64_t r, int64_t n, int64_t KC, int64_t c0, int64_t c1, uint16_t* out) {
  const int64_t nct = n / 16;
  uint16_t parts[kParts];
  for (int64_t kc = 0; kc < KC; ++kc)
    for (int64_t ct = c0 / 16; ct < c1 / 16; ++ct) std::memset(out + (kc * nct + ct) * kTile, 0, 2 * kTile);
  for (int64_t c = 0; c < r; ++c)
    for (int64_t col = c0; col < c1; ++col) {
      split(A[c * n + col], parts);
      for (int t = 0; t < kTerms; ++t) {
        const int64_t q = t * r + c;
        out[((q / 32) * nct + col / 16) * kTile + ((q % 32) / 2) * 32 + (col % 16) * 2 + q % 2] = parts[kAPart[t]];
      }
    }
}

// cbuf[16, 64] (float32) = columns [16 ct0, 16 (ct0 + NC)) of the 16 rows of B A whose A tiles are Bt.
template <int NC>
__attribute__((target("amx-tile,amx-bf16"))) void product_tiles(const uint16_t* Bt, const uint16_t* At, int64_t KC,
                                                               int64_t nct, float* cbuf) {
#define PF_EACH4(X) X(0) X(1) X(2) X(3)
#define PF_ZERO(g) \
  if constexpr (NC > g) _tile_zero(g);
  PF_EACH4(PF_ZERO)
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(6, Bt + kc * kTile, 64);
#define PF_DOT(g)                                       \
  if constexpr (NC > g) {                               \
    _tile_loadd(7, At + (kc * nct + g) * kTile, 64);    \
    _tile_dpbf16ps(g, 6, 7);                            \
  }
    PF_EACH4(PF_DOT)
  }
#define PF_STORE(g) \
  if constexpr (NC > g) _tile_stored(g, cbuf + g * 16, 64 * 4);
  PF_EACH4(PF_STORE)
}

void product(int64_t nc, const uint16_t* Bt, const uint16_t* At, int64_t KC, int64_t nct, float* cbuf) {
  switch (nc) {
    case 1: product_tiles<1>(Bt, At, KC, nct, cbuf); break;
    case 2: product_tiles<2>(Bt, At, KC, nct, cbuf); break;
    case 3: product_tiles<3>(Bt, At, KC, nct, cbuf); break;
    default: product_tiles<4>(Bt, At, KC, nct, cbuf); break;
  }
}

// O[16, cols] = bf16(W[16, cols] - cbuf), rows strided by ldw / ldo elements; O may be W.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void subtract_rows(const uint16_t* W, int64_t ldw, uint16_t* O,
                                                                           int64_t ldo, const float* cbuf,
                                                                           int64_t cols) {
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + i * ldw + c));
      // bf16 -> float32: the bits shifted up by 16 (the maskz forms: GCC 12 warns about the plain ones'
      // undefined pass-through operand).
      const __m512i wi = _mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, w), 16);
      const __m512 wf = _mm512_castsi512_ps(wi);
      const __m512 d = _mm512_sub_ps(wf, _mm512_loadu_ps(cbuf + i * 64 + c));
      const __m256bh b = _mm512_cvtneps_pbh(d);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + i * ldo + c), reinterpret_cast<const __m256i&>(b));
    }
}

#endif  // PF_HAVE_AMX

}  // namespace

bool takes_residual(const at::Tensor& W) { return takes_bf16(W, 16); }

void residual(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A, at::Tensor out) {
#ifdef PF_HAVE_AMX
  const int64_t m = W.size(0), n = W.size(1), r = B.size(1), ldw = W.stride(0), ldo = out.stride(0);
  const int64_t KC = (kTerms * r + 31) / 32, nct = n / 16;
  auto Bp = at::empty({(m / 16) * KC * kTile}, at::kShort);
  auto Ap = at::empty({KC * nct * kTile}, at::kShort);
  auto* bp = reinterpret_cast<uint16_t*>(Bp.data_ptr<int16_t>());
  auto* ap = reinterpret_cast<uint16_t*>(Ap.data_ptr<int16_t>());
  const float* b = B.data_ptr<float>();
  const float* a = A.data_ptr<float>();
  at::parallel_for(0, m / 16, 64, [&](int64_t s0, int64_t s1) {
    pack_b_terms(b + s0 * 16 * r, (s1 - s0) * 16, r, KC, bp + s0 * KC * kTile);
  });
  at::parallel_for(0, nct, 16, [&](int64_t t0, int64_t t1) { pack_a_terms(a, r, n, KC, t0 * 16, t1 * 16, ap); });
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // Row strips in blocks of 256 rows; within a block, 64 columns at a time over every strip, so that
  // the A tiles of those columns stay in L1 while the strips pass.
  at::parallel_for(0, m / 16, 16, [&](int64_t s0, int64_t s1) {
    alignas(64) float cbuf[16 * 64];
    tiles_on();
    for (int64_t blk = s0; blk < s1; blk += 16) {
      const int64_t blk_end = std::min(s1, blk + 16);
      for (int64_t ct0 = 0; ct0 < nct; ct0 += kCols) {
        const int64_t nc = std::min<int64_t>(kCols, nct - ct0);
        for (int64_t s = blk; s < blk_end; ++s) {
          product(nc, bp + s * KC * kTile, ap + ct0 * kTile, KC, nct, cbuf);
          subtract_rows(w + s * 16 * ldw + ct0 * 16, ldw, o + s * 16 * ldo + ct0 * 16, ldo, cbuf, nc * 16);
        }
      }
    }
    tiles_off();
  });
#else
  TORCH_CHECK(false, "pissa_fast: the AMX residual is not built for this platform");
#endif
}

}  // namespace cpu_amx
}  // namespace pissa_fast
