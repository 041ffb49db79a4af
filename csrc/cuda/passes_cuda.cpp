// pissa_fast::{wx, wtx, gram, residual_, residual} on CUDA: the switch between the ATen/cuBLAS passes
// (csrc/passes_aten.h, the default) and the hand-written kernels (gram_cuda.cu, residual_cuda.cu),
// plus the *_aten ops, which run the ATen passes whatever the switch says.
//
// The ATen passes run with float32-exact cuBLAS settings: TF32 off for float32 weights (a
// thread-local at::NoTF32Guard inside them), and for bf16/fp16 weights no reduced-precision split-K
// reductions and no fp16 accumulation. Those two are process-wide flags with no thread-local guard:
// they are switched off for the duration of a call and restored after (a bf16/fp16 GEMM that another
// thread runs at that moment is, if anything, more precise).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../checks.h"
#include "../cuda_passes.h"
#include "../passes_aten.h"
#include "kernels.h"

namespace pissa_fast {
namespace {

// ---- Where "default" runs the hand-written kernels.
// An architecture goes here once benchmarks/gpu_check.sh has passed on it with both implementations
// AND found the kernels at least as fast as the ATen passes. Record the compute capability with the
// date, the GPU and the benchmarks/RESULTS.md section that proved it, e.g.
//   {9, 0, "2027-01-05, H100 SXM 80GB, RESULTS.md 'CUDA passes on a GPU'"},
// None yet: no GPU has run the kernels, so every architecture defaults to the ATen passes.
struct ProvenArch {
  int major, minor;
  const char* evidence;
};
constexpr std::array<ProvenArch, 0> kKernelsProven{};

bool kernels_by_default(int64_t device) {
  if (kKernelsProven.empty() || !at::cuda::is_available()) return false;
  const int dev = device >= 0 ? static_cast<int>(device) : static_cast<int>(at::cuda::current_device());
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(dev);
  return std::any_of(kKernelsProven.begin(), kKernelsProven.end(),
                     [&](const ProvenArch& a) { return a.major == p->major && a.minor == p->minor; });
}

[[maybe_unused]] const bool kRegistered = (register_cuda_kernels(&kernels_by_default), true);

// ---- The ATen passes on CUDA.

// Disallows reduced-precision (bf16/fp16) split-K reductions and fp16 accumulation in cuBLAS while it
// lives, restoring what it changed.
class ExactLowPrecisionGemms {
 public:
  explicit ExactLowPrecisionGemms(at::ScalarType dt) {
    if (dt != at::kBFloat16 && dt != at::kHalf) return;
    auto& ctx = at::globalContext();
    constexpr auto kAllow = at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
    bf16_ = ctx.allowBF16ReductionCuBLAS() == kAllow;
    fp16_ = ctx.allowFP16ReductionCuBLAS() == kAllow;
    fp16_acc_ = ctx.allowFP16AccumulationCuBLAS();
    if (bf16_) ctx.setAllowBF16ReductionCuBLAS(false, /*allow_splitk=*/true);
    if (fp16_) ctx.setAllowFP16ReductionCuBLAS(false, /*allow_splitk=*/true);
    if (fp16_acc_) ctx.setAllowFP16AccumulationCuBLAS(false);
  }
  ~ExactLowPrecisionGemms() {
    auto& ctx = at::globalContext();
    if (bf16_) ctx.setAllowBF16ReductionCuBLAS(true, true);
    if (fp16_) ctx.setAllowFP16ReductionCuBLAS(true, true);
    if (fp16_acc_) ctx.setAllowFP16AccumulationCuBLAS(true);
  }
  ExactLowPrecisionGemms(const ExactLowPrecisionGemms&) = delete;
  ExactLowPrecisionGemms& operator=(const ExactLowPrecisionGemms&) = delete;

 private:
  bool bf16_ = false, fp16_ = false, fp16_acc_ = false;
};

// Row blocks of half the L2: the fused gram pass reads a block for W_b V and again right after for
// W_b^T Y_b, and the second read should come from L2 (50 MB on H100/H200, 40 MB on A100); the other
// half is left to the skinny operands and to what the GEMM tiles stream through. Blocks are kept as
// large as that allows because each costs about six kernel launches.
aten_passes::Config cuda_config(const at::Tensor& w) {
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(w.get_device());
  return {std::max<int64_t>(int64_t(4) << 20, static_cast<int64_t>(p->l2CacheSize) / 2),
          /*native_low_precision=*/true};
}

at::Tensor wx_aten(at::TensorList W, const at::Tensor& X) {
  check_pass_args("wx", W, X, /*transposed=*/false);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const ExactLowPrecisionGemms exact(W[0].scalar_type());
  return aten_passes::wx(W, X, cuda_config(W[0]));
}

at::Tensor wtx_aten(at::TensorList W, const at::Tensor& Y) {
  check_pass_args("wtx", W, Y, /*transposed=*/true);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const ExactLowPrecisionGemms exact(W[0].scalar_type());
  return aten_passes::wtx(W, Y, cuda_config(W[0]));
}

std::tuple<at::Tensor, at::Tensor> gram_aten(at::TensorList W, const at::Tensor& V) {
  check_pass_args("gram", W, V, /*transposed=*/false);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const ExactLowPrecisionGemms exact(W[0].scalar_type());
  return aten_passes::gram(W, V, cuda_config(W[0]));
}

void residual_aten_(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual_args("residual_", W, B, A);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const ExactLowPrecisionGemms exact(W[0].scalar_type());
  aten_passes::residual_(W, B, A, cuda_config(W[0]));
}

std::vector<at::Tensor> residual_aten(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual_args("residual", W, B, A);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const ExactLowPrecisionGemms exact(W[0].scalar_type());
  return aten_passes::residual(W, B, A, cuda_config(W[0]));
}

// ---- The switch.

bool kernels_for(at::TensorList W) { return !W.empty() && cuda_passes_use_kernels(W[0].device().index()); }

at::Tensor wx_cuda(at::TensorList W, const at::Tensor& X) {
  return kernels_for(W) ? cuda_kernels::wx(W, X) : wx_aten(W, X);
}

at::Tensor wtx_cuda(at::TensorList W, const at::Tensor& Y) {
  return kernels_for(W) ? cuda_kernels::wtx(W, Y) : wtx_aten(W, Y);
}

std::tuple<at::Tensor, at::Tensor> gram_cuda(at::TensorList W, const at::Tensor& V) {
  return kernels_for(W) ? cuda_kernels::gram(W, V) : gram_aten(W, V);
}

void residual_inplace_cuda(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  if (kernels_for(W)) cuda_kernels::residual_(W, B, A); else residual_aten_(W, B, A);
}

std::vector<at::Tensor> residual_cuda(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  return kernels_for(W) ? cuda_kernels::residual(W, B, A) : residual_aten(W, B, A);
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CUDA, m) {
  m.impl("wx", &wx_cuda);
  m.impl("wtx", &wtx_cuda);
  m.impl("gram", &gram_cuda);
  m.impl("residual_", &residual_inplace_cuda);
  m.impl("residual", &residual_cuda);
  m.impl("wx_aten", &wx_aten);
  m.impl("wtx_aten", &wtx_aten);
  m.impl("gram_aten", &gram_aten);
  m.impl("residual_aten_", &residual_aten_);
  m.impl("residual_aten", &residual_aten);
}

}  // namespace pissa_fast
