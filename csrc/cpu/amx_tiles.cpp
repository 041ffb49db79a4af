// The AMX runtime of the CPU passes: detection, the OS grant, the on/off switch, tile configuration.
#include "amx_tiles.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#ifdef PF_HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pissa_fast {
namespace cpu_amx {
namespace {

#ifdef PF_HAVE_AMX
bool supported() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool avx512 = ((b >> 16) & 1) && ((b >> 30) & 1);  // AVX-512 F and BW (the VNNI repacking)
    const bool amx = ((d >> 22) & 1) && ((d >> 24) & 1);     // AMX-BF16 and AMX-TILE
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    const bool bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && ((a1 >> 5) & 1);  // AVX512_BF16
    // Linux hands out the tile registers' state on request only (ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); a kernel that refuses leaves the float32 path.
    return avx512 && amx && bf16 && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}
#else
bool supported() { return false; }
#endif

std::atomic<int> g_mode{-1};  // -1: PISSA_FAST_CPU_AMX not read yet

bool switched_on() {
  int m = g_mode.load();
  if (m < 0) {
    const char* v = std::getenv("PISSA_FAST_CPU_AMX");
    m = (v != nullptr && std::strcmp(v, "0") == 0) ? 0 : 1;
    g_mode.store(m);
  }
  return m == 1;
}

#ifdef PF_HAVE_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
#endif

}  // namespace

bool usable() { return switched_on() && supported(); }

bool takes_bf16(const at::Tensor& W, int64_t row_multiple) {
  return W.device().is_cpu() && W.scalar_type() == at::kBFloat16 && W.dim() == 2 && W.size(0) > 0 &&
         W.size(1) > 0 && W.size(0) % row_multiple == 0 && W.size(1) % 32 == 0 && W.stride(1) == 1 &&
         W.stride(0) >= W.size(1) && usable();
}

bool set_mode(int64_t mode) {
  if (mode >= 0) g_mode.store(mode > 0 ? 1 : 0);
  return usable();
}

#ifdef PF_HAVE_AMX
__attribute__((target("amx-tile"))) void tiles_on() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC does not see ldtilecfg read cfg and dropped the stores above: a barrier keeps them.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void tiles_off() { _tile_release(); }
#else
void tiles_on() {}
void tiles_off() {}
#endif

}  // namespace cpu_amx

TORCH_LIBRARY_IMPL(pissa_fast, CompositeImplicitAutograd, m) {
  m.impl("_cpu_amx", [](int64_t mode) { return cpu_amx::set_mode(mode); });
}

}  // namespace pissa_fast
