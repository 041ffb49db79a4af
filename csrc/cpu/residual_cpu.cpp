// CPU kernels for the PiSSA residual W - B @ A, in place (residual_) or into new tensors (residual).
//
// Each row block of W is widened to the accumulation dtype in a small per-thread buffer (a no-op
// view for float32/float64 weights), updated with one BLAS call and rounded back once, so the result
// is W - B A rounded to W's dtype and no full-size float32 buffer ever exists. A bf16 weight takes the
// AMX tiles instead where the CPU has them (residual_amx.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "residual_amx.h"

namespace pissa_fast {
namespace {

void check_residual(const char* op, at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_weight_list(op, W);
  const auto& w0 = W[0];
  const int64_t b = W.size(), m = w0.size(0), n = w0.size(1);
  PF_CHECK(B.dim() == 3, op, "B must be 3-D [", b, ", ", m, ", r], got ", B.sizes());
  check_factor(op, "B", B, b, m, B.size(2), w0);
  check_factor(op, "A", A, b, B.size(2), n, w0);
}

// out = W - B @ A row block by row block (~1 MiB each, so the block is still in cache when it is
// written back); out is W itself when in place. Blocks run in order; ATen's kernels inside use the
// threads.
void residual_rows(const at::Tensor& Wj, const at::Tensor& Bj, const at::Tensor& Aj, at::Tensor out,
                   bool inplace) {
  if (cpu_amx::takes_residual(Wj) && Bj.scalar_type() == at::kFloat) {  // bf16 on AMX tiles
    cpu_amx::residual(Wj, Bj.contiguous(), Aj.contiguous(), out);
    return;
  }
  const int64_t m = Wj.size(0), n = Wj.size(1);
  const auto acc = acc_dtype(Wj.scalar_type());
  const bool widen = Wj.scalar_type() != acc;
  const int64_t rows = std::max<int64_t>(16, (int64_t(1) << 20) / std::max<int64_t>(1, n * 4));
  at::Tensor buf;
  if (widen) buf = at::empty({std::min(rows, m), n}, Wj.options().dtype(acc));
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t b = std::min(rows, m - i);
    auto Bb = Bj.narrow(0, i, b);
    auto Ob = out.narrow(0, i, b);
    if (widen) {
      auto tmp = buf.narrow(0, 0, b).copy_(Wj.narrow(0, i, b));
      tmp.addmm_(Bb, Aj, 1, -1);
      Ob.copy_(tmp);
    } else {
      if (!inplace) Ob.copy_(Wj.narrow(0, i, b));
      Ob.addmm_(Bb, Aj, 1, -1);
    }
  }
}

void residual_inplace_cpu(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual("residual_", W, B, A);
  for (size_t j = 0; j < W.size(); ++j) residual_rows(W[j], B[j], A[j], W[j], /*inplace=*/true);
}

std::vector<at::Tensor> residual_cpu(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_residual("residual", W, B, A);
  std::vector<at::Tensor> out;
  out.reserve(W.size());
  for (size_t j = 0; j < W.size(); ++j) {
    auto o = at::empty(W[j].sizes(), W[j].options().memory_format(at::MemoryFormat::Contiguous));
    residual_rows(W[j], B[j], A[j], o, /*inplace=*/false);
    out.push_back(o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CPU, m) {
  m.impl("residual_", &residual_inplace_cpu);
  m.impl("residual", &residual_cpu);
}

}  // namespace pissa_fast
