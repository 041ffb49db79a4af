// The passes of a bf16 weight on the CPU's AMX tiles (Intel Sapphire Rapids and later): gram
// (Y = W V, Z = W^T Y in one read of W), wx and wtx, used by the CPU ops where the CPU and the shapes
// allow it.
#pragma once
#include <ATen/ATen.h>

namespace pissa_fast {
namespace cpu_amx {

// Whether gram(), wx() and wtx() take W: AMX-BF16 present and granted by the OS, the path switched on (see
// set_mode), W bf16 with unit column stride, both dimensions multiples of 32.
bool takes(const at::Tensor& W);

// Y [m, k] = W V, Z [n, k] = W^T Y for V [n, k] float32 (contiguous); Y and Z are written in place.
void gram(const at::Tensor& W, const at::Tensor& V, at::Tensor Y, at::Tensor Z);

// Y [m, k] = W X for X [n, k] float32 (contiguous), written in place.
void wx(const at::Tensor& W, const at::Tensor& X, at::Tensor Y);

// Z [n, k] = W^T Y for Y [m, k] float32 (contiguous), written in place.
void wtx(const at::Tensor& W, const at::Tensor& Y, at::Tensor Z);

}  // namespace cpu_amx
}  // namespace pissa_fast
