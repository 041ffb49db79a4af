// Which implementation of the passes over W (wx, wtx, gram, residual_, residual) runs on CUDA
// tensors: the ATen/cuBLAS passes (csrc/passes_aten.h) or the hand-written kernels (csrc/cuda/*.cu).
//
// The setting is read from the environment variable PISSA_FAST_CUDA_PASSES (aten | kernels | default)
// when the library loads, and changed at run time with the op pissa_fast::set_cuda_passes (Python:
// pissa_fast.set_cuda_passes). "default" resolves per device: the kernels only on architectures where
// benchmarks/gpu_check.sh has proven them (csrc/cuda/passes_cuda.cpp keeps that list), the ATen passes
// everywhere else. The ops pissa_fast::set_cuda_passes / get_cuda_passes give libtorch users the same
// switch through the dispatcher.
#pragma once

#include <cstdint>
#include <string>

namespace pissa_fast {

enum class CudaPasses : int { kDefault = 0, kAten = 1, kKernels = 2 };

const char* cuda_passes_name(CudaPasses p);

// The current setting; raises if PISSA_FAST_CUDA_PASSES held something else and nothing has been set
// since, or if it asks for kernels a build without CUDA does not have.
CudaPasses cuda_passes_setting();
void set_cuda_passes(CudaPasses p);

// Called once by the CUDA part of the library when it loads: says the kernels exist, and how
// "default" resolves on a device (index; -1: the current one): true = kernels.
using KernelsByDefault = bool (*)(int64_t device);
void register_cuda_kernels(KernelsByDefault by_default);

// Whether CUDA tensors on `device` run the hand-written kernels (false: the ATen passes).
bool cuda_passes_use_kernels(int64_t device);

}  // namespace pissa_fast
