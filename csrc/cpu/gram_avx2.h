// AVX2/FMA micro-kernel for the fused Gram pass on float32 rows: for a group of R rows of W,
// Y_rows = W_rows @ V and Z += W_rows^T @ Y_rows, with Y_rows kept in registers between the two.
// W_rows is read from memory once (the second sweep hits L1/L2); Z and V stay in L2.
// Compiled with a target attribute and chosen at run time, so the library still loads on CPUs
// without AVX2 (the blocked BLAS path in gram_cpu.cpp serves them).
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PF_HAVE_AVX2_KERNEL 1

namespace pissa_fast {
namespace cpu {

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// Widen `count` bfloat16 values (raw bits) to float32: a bf16 is the top half of a float32.
__attribute__((target("avx2"))) inline void widen_bf16(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  for (; i < count; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    dst[i] = f;
  }
}

// Widen `count` float16 values (raw bits) to float32 with F16C.
__attribute__((target("avx2,f16c"))) inline void widen_fp16(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// One column chunk of NV*8 columns starting at c0, for R rows. lp: padded column count (multiple
// of 8) of V, Y and Z, all row-major with leading dimension lp.
template <int R, int NV>
__attribute__((target("avx2,fma"))) inline void gram_chunk(const float* W, int64_t ldw, int64_t n,
                                                            const float* V, int64_t lp, int64_t c0,
                                                            float* Y, float* Z) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = V + j * lp + c0;
    __m256 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm256_loadu_ps(vj + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(W + r * ldw + j);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(w, vv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(Y + r * lp + c0 + 8 * v, acc[r][v]);
  for (int64_t j = 0; j < n; ++j) {
    float* zj = Z + j * lp + c0;
    __m256 zz[NV];
    for (int v = 0; v < NV; ++v) zz[v] = _mm256_loadu_ps(zj + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(W + r * ldw + j);
      for (int v = 0; v < NV; ++v) zz[v] = _mm256_fmadd_ps(w, acc[r][v], zz[v]);
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(zj + 8 * v, zz[v]);
  }
}

template <int R>
inline void gram_rows(const float* W, int64_t ldw, int64_t n, const float* V, int64_t lp, float* Y,
                      float* Z) {
  int64_t c0 = 0;
  for (; c0 + 16 <= lp; c0 += 16) gram_chunk<R, 2>(W, ldw, n, V, lp, c0, Y, Z);
  if (c0 < lp) gram_chunk<R, 1>(W, ldw, n, V, lp, c0, Y, Z);
}

// rows x n block of float32 W (leading dimension ldw): Y (rows x lp) = W V, Z (n x lp) += W^T Y.
inline void gram_block(const float* W, int64_t ldw, int64_t rows, int64_t n, const float* V,
                       int64_t lp, float* Y, float* Z) {
  constexpr int R = 6;  // 6 rows x 16 columns: 12 accumulators + 2 + 1 of the 16 ymm registers
  int64_t i = 0;
  for (; i + R <= rows; i += R) gram_rows<R>(W + i * ldw, ldw, n, V, lp, Y + i * lp, Z);
  const float* Wi = W + i * ldw;
  float* Yi = Y + i * lp;
  switch (rows - i) {
    case 5: gram_rows<5>(Wi, ldw, n, V, lp, Yi, Z); break;
    case 4: gram_rows<4>(Wi, ldw, n, V, lp, Yi, Z); break;
    case 3: gram_rows<3>(Wi, ldw, n, V, lp, Yi, Z); break;
    case 2: gram_rows<2>(Wi, ldw, n, V, lp, Yi, Z); break;
    case 1: gram_rows<1>(Wi, ldw, n, V, lp, Yi, Z); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace pissa_fast
#endif
