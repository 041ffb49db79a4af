// CUDA kernels for the passes that read the full weights: pissa_fast::wx (W @ X), ::wtx (W^T @ Y)
// and ::gram ((W @ V, W^T (W @ V)) with each element of W read once from global memory).
//
// These are the kernels behind the switch of csrc/cuda_passes.h (passes_cuda.cpp registers the ops).
// One launch per call covers the whole list: the kernel gets a device table of the weights'
// addresses and row strides (weights are never stacked or copied) and reads each W in its own dtype,
// accumulating in float32 (float64 for double). The algorithm -- resident W tiles in shared memory,
// column slices of a row block joined as a thread-block cluster on sm_90, Z reduced with atomics --
// is described in gram_kernels.cuh; this file holds the checks, the launch geometry and the launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../checks.h"
#include "gram_kernels.cuh"
#include "kernels.h"

namespace pissa_fast {
namespace {

using cuda::PassPlan;

// Device table [2b]: W[j]'s address, then its row stride in elements. *vec: every W[j] allows 16-byte
// loads (address and row stride multiples of 16 bytes).
at::Tensor weight_table(at::TensorList W, bool* vec) {
  const int64_t b = W.size();
  auto host = at::empty({2 * b}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.data_ptr<int64_t>();
  bool v = true;
  for (int64_t j = 0; j < b; ++j) {
    const auto addr = reinterpret_cast<int64_t>(W[j].data_ptr());
    const int64_t ld = W[j].size(0) > 1 ? W[j].stride(0) : 0;  // a single row needs no stride
    p[j] = addr;
    p[b + j] = ld;
    v = v && addr % 16 == 0 && (ld * W[j].element_size()) % 16 == 0;
  }
  *vec = v;
  return host.to(W[0].device(), /*non_blocking=*/true);
}

template <typename T>
cuda::DeviceLimits device_limits() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cuda::DeviceLimits lim;
  lim.smem_per_sm = static_cast<int64_t>(prop->sharedMemPerMultiprocessor);
  lim.smem_per_block = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  lim.smem_reserved = static_cast<int64_t>(prop->reservedSharedMemPerBlock);
  // Clusters need an sm_90+ device *and* sm_90+ code: an sm_80-only build JIT-run on Hopper has none.
  cudaFuncAttributes fa;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, cuda::pass_kernel<T>));
  lim.max_cluster = prop->major >= 9 && fa.ptxVersion >= 90 ? cuda::PassTiling<dev::acc_t<T>>::kMaxGroups : 1;
  return lim;
}

template <typename T>
void set_smem_attributes(const PassPlan& plan) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(cuda::pass_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.smem)));
  // Ask for the largest shared-memory carveout so that two blocks with big tiles fit on one SM.
  C10_CUDA_CHECK(cudaFuncSetAttribute(cuda::pass_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
}

cudaLaunchConfig_t cluster_config(const PassPlan& plan, int64_t grid, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(cuda::PassTiling<float>::kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem);
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(plan.groups);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether a cluster of plan.groups blocks with this much shared memory can be resident at all.
template <typename T>
bool cluster_fits(const PassPlan& plan) {
  set_smem_attributes<T>(plan);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(plan, plan.groups, nullptr, &attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, cuda::pass_kernel<T>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so the next launch check does not see it
    return false;
  }
  return clusters > 0;
}

template <typename T>
PassPlan plan_for(int64_t m, int64_t n, bool p1, bool p2) {
  using Acc = dev::acc_t<T>;
  cuda::DeviceLimits lim = device_limits<T>();
  PassPlan plan = cuda::plan_pass<Acc>(m, n, sizeof(T), p1, p2, lim);
  if (plan.cluster && !cluster_fits<T>(plan)) {
    lim.max_cluster = 1;
    plan = cuda::plan_pass<Acc>(m, n, sizeof(T), p1, p2, lim);
  }
  return plan;
}

// One pass over W: phase 1 (Y = W V) and/or phase 2 (Z += W^T Y; Z zeroed by the caller).
template <typename T>
void run_pass(const char* op, at::TensorList W, const at::Tensor& V, const at::Tensor& Y, const at::Tensor& Z,
              bool p1, bool p2) {
  using Acc = dev::acc_t<T>;
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = Y.size(2);
  const PassPlan plan = plan_for<T>(m, n, p1, p2);
  if (p1 && p2 && !plan.resident) {
    // Not even four rows fit in shared memory (n in the tens of thousands): two reads of W.
    run_pass<T>(op, W, V, Y, Z, true, false);
    run_pass<T>(op, W, V, Y, Z, false, true);
    return;
  }
  bool vec = false;
  const at::Tensor table = weight_table(W, &vec);
  auto args = cuda::make_pass_args<T>(plan, table.data_ptr<int64_t>(), b, m, n, k, p1, p2, vec);
  args.V = p1 ? V.data_ptr<Acc>() : nullptr;
  args.Y = Y.data_ptr<Acc>();
  args.Z = p2 ? Z.data_ptr<Acc>() : nullptr;

  const int64_t grid = b * plan.row_blocks * plan.groups;
  PF_CHECK(grid <= INT_MAX, op, "too many blocks for one launch: ", b, " matrices of shape [", m, ", ", n,
           "] need ", grid);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  set_smem_attributes<T>(plan);
  if (plan.cluster) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(plan, grid, stream, &attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, cuda::pass_kernel<T>, args));
  } else {
    cuda::pass_kernel<T><<<static_cast<unsigned>(grid), cuda::PassTiling<Acc>::kThreads,
                           static_cast<size_t>(plan.smem), stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace cuda_kernels {

at::Tensor wx(at::TensorList W, const at::Tensor& X) {
  check_pass_args("wx", W, X, /*transposed=*/false);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = X.size(2);
  if (m == 0 || n == 0 || k == 0) return at::zeros({b, m, k}, X.options());
  auto Y = at::empty({b, m, k}, X.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "wx", [&] {
    run_pass<scalar_t>("wx", W, X, Y, Y, /*p1=*/true, /*p2=*/false);
  });
  return Y;
}

at::Tensor wtx(at::TensorList W, const at::Tensor& Y) {
  check_pass_args("wtx", W, Y, /*transposed=*/true);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = Y.size(2);
  auto Z = at::zeros({b, n, k}, Y.options());  // phase 2 adds into it
  if (m == 0 || n == 0 || k == 0) return Z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "wtx", [&] {
    run_pass<scalar_t>("wtx", W, Y, Y, Z, /*p1=*/false, /*p2=*/true);
  });
  return Z;
}

std::tuple<at::Tensor, at::Tensor> gram(at::TensorList W, const at::Tensor& V) {
  check_pass_args("gram", W, V, /*transposed=*/false);
  const c10::cuda::CUDAGuard guard(W[0].device());
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = V.size(2);
  auto Z = at::zeros({b, n, k}, V.options());
  if (m == 0 || n == 0 || k == 0) return {at::zeros({b, m, k}, V.options()), Z};
  auto Y = at::empty({b, m, k}, V.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "gram", [&] {
    run_pass<scalar_t>("gram", W, V, Y, Z, /*p1=*/true, /*p2=*/true);
  });
  return {Y, Z};
}

}  // namespace cuda_kernels
}  // namespace pissa_fast
