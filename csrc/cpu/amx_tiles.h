// What the AMX kernels of the CPU passes share (gram_amx.cpp, residual_amx.cpp): whether the tiles
// may be used, the tile configuration, and the three-part bf16 split of a float32 value.
#pragma once
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define PF_HAVE_AMX 1
#include <immintrin.h>
#endif

namespace pissa_fast {
namespace cpu_amx {

constexpr int kParts = 3;       // hi, mid, lo
constexpr int64_t kTile = 512;  // bf16 elements per A or B tile (16 rows x 64 bytes)

// AMX-BF16 (with AVX-512 F, BW, BF16) present, granted by the OS, and the path switched on.
bool usable();

// Whether an AMX pass takes W: usable(), W a non-empty bf16 CPU matrix with unit column stride, its
// rows a multiple of row_multiple and its columns of 32.
bool takes_bf16(const at::Tensor& W, int64_t row_multiple);

// mode 1: on where supported (the default, unless PISSA_FAST_CPU_AMX=0); 0: off; -1: only query.
// Returns usable() (the op pissa_fast::_cpu_amx).
bool set_mode(int64_t mode);

// Every tile 16 rows x 64 bytes on this thread, and back.
void tiles_on();
void tiles_off();

inline uint16_t to_bf16(float x) { return c10::BFloat16(x).x; }  // round to nearest even

inline float from_bf16(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// x = hi + mid + lo to float32's precision: each part the bf16 rounding of what the earlier ones left
// (the differences are exact in float32).
inline void split(float x, uint16_t out[kParts]) {
  for (int p = 0; p < kParts; ++p) {
    out[p] = to_bf16(x);
    x -= from_bf16(out[p]);
  }
}

}  // namespace cpu_amx
}  // namespace pissa_fast
