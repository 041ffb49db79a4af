// The hand-written CUDA kernels of the passes (gram_cuda.cu, residual_cuda.cu), as plain functions:
// passes_cuda.cpp registers pissa_fast::wx/wtx/gram/residual_/residual for CUDA and calls these or the
// ATen passes, whichever the switch of csrc/cuda_passes.h selects.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace pissa_fast {
namespace cuda_kernels {

at::Tensor wx(at::TensorList W, const at::Tensor& X);
at::Tensor wtx(at::TensorList W, const at::Tensor& Y);
std::tuple<at::Tensor, at::Tensor> gram(at::TensorList W, const at::Tensor& V);
void residual_(at::TensorList W, const at::Tensor& B, const at::Tensor& A);
std::vector<at::Tensor> residual(at::TensorList W, const at::Tensor& B, const at::Tensor& A);

}  // namespace cuda_kernels
}  // namespace pissa_fast
