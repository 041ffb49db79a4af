// The passes over the weights -- wx, wtx, gram, residual_, residual -- written on ATen GEMMs: the
// second implementation of the ops whose hand-written CUDA kernels live in csrc/cuda/. The code is
// device-generic; csrc/cuda/passes_cuda.cpp runs it on CUDA (the default there, see
// csrc/cuda_passes.h), csrc/passes_aten.cpp registers it on the CPU as pissa_fast::<op>_aten so that
// it is tested against the CPU kernels on machines without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace pissa_fast {
namespace aten_passes {

struct Config {
  // Bytes of W per row block where the passes walk W in blocks: the fused gram pass reads block W_b
  // for W_b V and again right after for W_b^T (W_b V), so the block is sized to still be in cache.
  int64_t block_bytes;
  // How bf16/fp16 weights meet the float32 test vectors (split into bf16/fp16 hi + lo parts):
  //   true:  GEMMs in W's own dtype with float32 output (at::mm(..., out_dtype) -- tensor cores on
  //          CUDA; on the CPU, where out_dtype does not exist, the same products are formed by a
  //          float32 GEMM on widened copies: a test mode that runs the CUDA code path here);
  //   false: each row block of W widened to float32 in a small buffer and multiplied in float32.
  // Both are float32 accumulations of the same exact products (a product of two bf16/fp16 values is
  // exact in float32); they differ only in summation order.
  bool native_low_precision;
};

at::Tensor wx(at::TensorList W, const at::Tensor& X, const Config& cfg);
at::Tensor wtx(at::TensorList W, const at::Tensor& Y, const Config& cfg);
std::tuple<at::Tensor, at::Tensor> gram(at::TensorList W, const at::Tensor& V, const Config& cfg);
void residual_(at::TensorList W, const at::Tensor& B, const at::Tensor& A, const Config& cfg);
std::vector<at::Tensor> residual(at::TensorList W, const at::Tensor& B, const at::Tensor& A, const Config& cfg);

}  // namespace aten_passes
}  // namespace pissa_fast
