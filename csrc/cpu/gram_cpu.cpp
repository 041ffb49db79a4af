// CPU kernels for the passes that read the full weights: wx (W @ X), wtx (W^T @ Y) and gram
// ((W @ V, W^T (W @ V)) in one read of W).
//
// W is walked in row blocks of ~1 MiB, sized to stay in cache between W_b @ V and W_b^T @ Y_b; a
// bf16/fp16 block is widened into a small float32 buffer (never a full-size copy) and multiplied with
// the BLAS that ATen links, which uses the threads. (A hand-written AVX2/FMA micro-kernel was
// measured slower than this on the project's 2-core machines: 38 vs 23 ms for a 4096^2 bf16 pass,
// 99 vs 59 ms for 11008 x 4096, since its V and Z traffic per row group spilled out of L2.)
// Bitwise reproducible for a given thread count. A bf16 weight takes the AMX tiles instead where the
// CPU has them (gram_amx.cpp), in all three ops.
#include <ATen/ATen.h>
#include <torch/library.h>


#include "../checks.h"
#include "gram_amx.h"

namespace pissa_fast {
namespace {

// Rows per block: ~1 MiB of W per block keeps the block in cache between W_b @ V and W_b^T @ Y_b.
int64_t block_rows(int64_t n, int64_t elem_size) {
  const int64_t target = int64_t(1) << 20;
  return std::max<int64_t>(16, target / std::max<int64_t>(1, n * elem_size));
}

// Calls fn(block_of_W_in_acc_dtype, row0) for every row block of W, in order. The blocks run one
// after another and the BLAS calls inside use the threads (BLAS inside at::parallel_for would
// oversubscribe the cores).
template <typename Fn>
void for_each_block(const at::Tensor& W, Fn fn) {
  const int64_t m = W.size(0), n = W.size(1);
  const auto acc = acc_dtype(W.scalar_type());
  const bool widen = W.scalar_type() != acc;
  const int64_t rows = block_rows(n, W.element_size());
  at::Tensor buf;
  if (widen) buf = at::empty({std::min(rows, m), n}, W.options().dtype(acc));
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t b = std::min(rows, m - i);
    at::Tensor blk = W.narrow(0, i, b);
    if (widen) blk = buf.narrow(0, 0, b).copy_(blk);
    fn(blk, i);
  }
}

void check_skinny(const char* op, at::TensorList W, const at::Tensor& X, int64_t inner) {
  check_weight_list(op, W);
  const auto& w0 = W[0];
  PF_CHECK(X.dim() == 3, op, "the second argument must be 3-D [b, ", inner, ", k], got ", X.sizes());
  check_factor(op, "the second argument", X, int64_t(W.size()), inner, X.size(2), w0);
}

at::Tensor wx_cpu(at::TensorList W, const at::Tensor& X) {
  check_skinny("wx", W, X, W.empty() ? 0 : W[0].size(1));
  const int64_t b = W.size(), m = W[0].size(0), k = X.size(2);
  auto Y = at::empty({b, m, k}, X.options());
  for (int64_t j = 0; j < b; ++j) {
    auto Xj = X[j], Yj = Y[j];
    if (cpu_amx::takes(W[j]) && X.scalar_type() == at::kFloat) {  // bf16 on AMX tiles (gram_amx.h)
      cpu_amx::wx(W[j], Xj.contiguous(), Yj);
      continue;
    }
    for_each_block(W[j], [&](const at::Tensor& blk, int64_t i) {
      auto Yb = Yj.narrow(0, i, blk.size(0));
      at::mm_out(Yb, blk, Xj);
    });
  }
  return Y;
}

// Z[j] = sum over row blocks of W_b^T @ Y_b, Y_b = make_y(W_b, row0), accumulated as its transpose
// Z^T += Y_b^T W_b in a k x n buffer and transposed once at the end: MKL's sgemm with the tall W_b
// as the transposed operand ran 2.2x slower on 2 threads than with it as is (4096^2, k = 16: 32 vs
// 14 ms; 576^2: 0.9 vs 0.14 ms; torch 2.14.1's MKL 2024.2, benchmarks/RESULTS.md), and that product
// is half of every pass.
template <typename BlockFn>
void accumulate_wt(const at::Tensor& Wj, at::Tensor Zj, BlockFn make_y) {
  auto Zt = at::zeros({Zj.size(1), Zj.size(0)}, Zj.options());
  for_each_block(Wj, [&](const at::Tensor& blk, int64_t i) { Zt.addmm_(make_y(blk, i).t(), blk); });
  Zj.copy_(Zt.t());
}

at::Tensor wtx_cpu(at::TensorList W, const at::Tensor& Y) {
  check_skinny("wtx", W, Y, W.empty() ? 0 : W[0].size(0));
  const int64_t b = W.size(), n = W[0].size(1), k = Y.size(2);
  auto Z = at::empty({b, n, k}, Y.options());
  for (int64_t j = 0; j < b; ++j) {
    auto Yj = Y[j];
    if (cpu_amx::takes(W[j]) && Y.scalar_type() == at::kFloat) {
      cpu_amx::wtx(W[j], Yj.contiguous(), Z[j]);
      continue;
    }
    accumulate_wt(W[j], Z[j], [&](const at::Tensor& blk, int64_t i) {
      return Yj.narrow(0, i, blk.size(0));
    });
  }
  return Z;
}

std::tuple<at::Tensor, at::Tensor> gram_cpu(at::TensorList W, const at::Tensor& V) {
  check_skinny("gram", W, V, W.empty() ? 0 : W[0].size(1));
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = V.size(2);
  auto Y = at::empty({b, m, k}, V.options());
  auto Z = at::empty({b, n, k}, V.options());
  for (int64_t j = 0; j < b; ++j) {
    auto Vj = V[j], Yj = Y[j];
    if (cpu_amx::takes(W[j]) && V.scalar_type() == at::kFloat) {
      cpu_amx::gram(W[j], Vj.contiguous(), Yj, Z[j]);
      continue;
    }
    accumulate_wt(W[j], Z[j], [&](const at::Tensor& blk, int64_t i) {
      auto Yb = Yj.narrow(0, i, blk.size(0));
      at::mm_out(Yb, blk, Vj);
      return Yb;
    });
  }
  return {Y, Z};
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CPU, m) {
  m.impl("wx", &wx_cpu);
  m.impl("wtx", &wtx_cpu);
  m.impl("gram", &gram_cpu);
}

}  // namespace pissa_fast
