// CUDA kernels for the PiSSA residual W - B @ A: pissa_fast::residual_ (in W's own storage) and
// pissa_fast::residual (new contiguous tensors).
//
// The kernels behind the switch of csrc/cuda_passes.h (passes_cuda.cpp registers the ops).
// One launch covers the whole list (a device table of input and output addresses and row strides).
// Each weight is read once and written once in its own dtype; B A is accumulated in float32 (float64
// for double) from B and A tiles staged in shared memory, and W - B A is rounded once to W's dtype,
// as the CPU twin does. Tiling and thread roles: residual_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "residual_kernels.cuh"

namespace pissa_fast {
namespace {

// Device table [4b]: W[j] address, W[j] row stride, out[j] address, out[j] row stride (elements).
// *vec: all of them allow 4-element vector accesses (8 bytes for 16-bit weights, 16 for float).
at::Tensor residual_table(at::TensorList W, at::TensorList out, bool* vec) {
  const int64_t b = W.size();
  auto host = at::empty({4 * b}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.data_ptr<int64_t>();
  const int64_t align = std::min<int64_t>(4 * W[0].element_size(), 16);
  bool v = true;
  for (int64_t j = 0; j < b; ++j) {
    const at::Tensor* ts[2] = {&W[j], &out[j]};
    for (int s = 0; s < 2; ++s) {
      const auto addr = reinterpret_cast<int64_t>(ts[s]->data_ptr());
      const int64_t ld = ts[s]->size(0) > 1 ? ts[s]->stride(0) : 0;  // a single row needs no stride
      p[2 * s * b + j] = addr;
      p[(2 * s + 1) * b + j] = ld;
      v = v && addr % align == 0 && ld % 4 == 0;
    }
  }
  *vec = v;
  return host.to(W[0].device(), /*non_blocking=*/true);
}

template <typename T>
void run_residual(at::TensorList W, at::TensorList out, const at::Tensor& B, const at::Tensor& A) {
  using Acc = dev::acc_t<T>;
  using Tl = cuda::ResidualTiling<Acc>;
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), r = B.size(2);
  bool vec = false;
  const at::Tensor table = residual_table(W, out, &vec);
  cuda::ResidualArgs<T> args;
  args.table = table.data_ptr<int64_t>();
  args.B = B.data_ptr<Acc>();
  args.A = A.data_ptr<Acc>();
  args.b = b, args.m = m, args.n = n, args.r = r;
  args.tiles_m = cuda::ceil_div(m, Tl::kTM);
  args.tiles_n = cuda::ceil_div(n, Tl::kTN);
  args.vec = vec;
  const int64_t grid = b * args.tiles_m * args.tiles_n;
  PF_CHECK(grid <= INT_MAX, "residual: too many blocks for one launch: ", b, " matrices of shape [", m, ", ", n,
           "] need ", grid);
  static_assert(Tl::kSmem <= 48 * 1024, "residual tiles must fit the default shared-memory limit");
  cuda::residual_kernel<T><<<static_cast<unsigned>(grid), Tl::kThreads, static_cast<size_t>(Tl::kSmem),
                             at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace cuda_kernels {

void residual_(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual_args("residual_", W, B, A);
  const c10::cuda::CUDAGuard guard(W[0].device());
  if (W[0].numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "residual_",
                                  [&] { run_residual<scalar_t>(W, W, B, A); });
}

std::vector<at::Tensor> residual(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual_args("residual", W, B, A);
  const c10::cuda::CUDAGuard guard(W[0].device());
  std::vector<at::Tensor> out;
  out.reserve(W.size());
  for (const auto& w : W) out.push_back(at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous)));
  if (W[0].numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "residual",
                                  [&] { run_residual<scalar_t>(W, out, B, A); });
  return out;
}

}  // namespace cuda_kernels
}  // namespace pissa_fast
