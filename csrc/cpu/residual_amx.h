// The residual W - B A of a bf16 weight on the CPU's AMX tiles, used by the CPU residual ops where the
// CPU and the shapes allow it.
#pragma once
#include <ATen/ATen.h>

namespace pissa_fast {
namespace cpu_amx {

// Whether residual() takes W: AMX usable (amx_tiles.h), W bf16 with unit column stride, m a multiple
// of 16, n of 32.
bool takes_residual(const at::Tensor& W);

// out = W - B A rounded to bf16 (out may be W itself: in place); B [m, r], A [r, n] float32, contiguous.
void residual(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A, at::Tensor out);

}  // namespace cpu_amx
}  // namespace pissa_fast
