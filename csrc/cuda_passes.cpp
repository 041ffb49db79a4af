// The switch between the two CUDA implementations of the passes (see cuda_passes.h): its state, the
// environment variable read at load, and the ops pissa_fast::set_cuda_passes / get_cuda_passes.
// Device-generic, so a CPU-only build reports the switch too (always the ATen passes there: a CPU-only
// build registers nothing for CUDA at all).
#include "cuda_passes.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>

#include "checks.h"

namespace pissa_fast {
namespace {

constexpr const char* kEnvVar = "PISSA_FAST_CUDA_PASSES";

bool parse(const std::string& s, CudaPasses* out) {
  if (s.empty() || s == "default") *out = CudaPasses::kDefault;
  else if (s == "aten") *out = CudaPasses::kAten;
  else if (s == "kernels") *out = CudaPasses::kKernels;
  else return false;
  return true;
}

struct State {
  std::atomic<int> setting{static_cast<int>(CudaPasses::kDefault)};
  std::atomic<bool> env_invalid{false};  // cleared by the first explicit set_cuda_passes
  std::string env_value;                 // written once, at load
  std::atomic<KernelsByDefault> kernels{nullptr};

  State() {
    const char* v = std::getenv(kEnvVar);
    env_value = v == nullptr ? "" : v;
    CudaPasses p;
    if (parse(env_value, &p)) setting = static_cast<int>(p);
    else env_invalid = true;
  }
};

State& state() {
  static State s;
  return s;
}

// Read the variable when the library loads, not at the first CUDA call.
[[maybe_unused]] const bool kEnvRead = (state(), true);

const char* build_name() { return state().kernels.load() != nullptr ? "this build" : "this CPU-only build"; }

}  // namespace

const char* cuda_passes_name(CudaPasses p) {
  switch (p) {
    case CudaPasses::kAten: return "aten";
    case CudaPasses::kKernels: return "kernels";
    default: return "default";
  }
}

CudaPasses cuda_passes_setting() {
  auto& s = state();
  TORCH_CHECK_VALUE(!s.env_invalid.load(), kEnvVar, " must be 'aten', 'kernels' or 'default' (or unset), got '",
                    s.env_value, "'");
  const auto p = static_cast<CudaPasses>(s.setting.load());
  TORCH_CHECK(p != CudaPasses::kKernels || s.kernels.load() != nullptr, "pissa_fast: the CUDA passes are set to "
              "'kernels' (", kEnvVar, " or set_cuda_passes), but ", build_name(),
              " has no CUDA kernels; use 'aten' or 'default'");
  return p;
}

void set_cuda_passes(CudaPasses p) {
  auto& s = state();
  TORCH_CHECK(p != CudaPasses::kKernels || s.kernels.load() != nullptr,
              "set_cuda_passes: 'kernels' needs pissa_fast's CUDA kernels, and ", build_name(),
              " has none; use 'aten' or 'default'");
  s.setting = static_cast<int>(p);
  s.env_invalid = false;
}

void register_cuda_kernels(KernelsByDefault by_default) { state().kernels = by_default; }

bool cuda_passes_use_kernels(int64_t device) {
  switch (cuda_passes_setting()) {
    case CudaPasses::kAten: return false;
    case CudaPasses::kKernels: return true;
    default: {
      const auto fn = state().kernels.load();
      return fn != nullptr && fn(device);
    }
  }
}

namespace {

void set_cuda_passes_op(c10::string_view impl) {
  CudaPasses p;
  TORCH_CHECK_VALUE(parse(std::string(impl), &p) && !impl.empty(),
                    "set_cuda_passes: impl must be 'aten', 'kernels' or 'default', got '", std::string(impl), "'");
  set_cuda_passes(p);
}

// (setting, implementation a CUDA call on `device` runs now).
std::tuple<std::string, std::string> get_cuda_passes_op(int64_t device) {
  const CudaPasses p = cuda_passes_setting();
  return {cuda_passes_name(p), cuda_passes_use_kernels(device) ? "kernels" : "aten"};
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CompositeImplicitAutograd, m) {
  m.impl("set_cuda_passes", &set_cuda_passes_op);
  m.impl("get_cuda_passes", &get_cuda_passes_op);
}

}  // namespace pissa_fast
