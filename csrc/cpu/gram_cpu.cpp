// CPU kernels for the passes that read the full weights: wx (W @ X), wtx (W^T @ Y) and gram
// ((W @ V, W^T (W @ V)) in one read of W).
//
// W is walked in row blocks sized to stay in cache; a bf16/fp16 block is widened into a small
// per-thread float32 buffer (never a full-size copy) and multiplied with the BLAS that ATen links.
// The row range is split statically over the threads, each summing its own W^T partial, so a run is
// bitwise reproducible for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace pissa_fast {
namespace {

// Rows per block: ~256 KiB of W per block keeps the block in cache between W_b @ V and W_b^T @ Y_b.
int64_t block_rows(int64_t n, int64_t elem_size) {
  const int64_t target = int64_t(256) << 10;
  return std::max<int64_t>(16, target / std::max<int64_t>(1, n * elem_size));
}

int64_t num_parts(int64_t m, int64_t rows) {
  const int64_t blocks = (m + rows - 1) / rows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// Calls fn(block_of_W_in_acc_dtype, row0, part) for every row block of W; parts run in parallel.
template <typename Fn>
void for_each_block(const at::Tensor& W, int64_t parts, Fn fn) {
  const int64_t m = W.size(0), n = W.size(1);
  const auto acc = acc_dtype(W.scalar_type());
  const bool widen = W.scalar_type() != acc;
  const int64_t rows = block_rows(n, W.element_size());
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor buf;
    if (widen) buf = at::empty({std::min(rows, m), n}, W.options().dtype(acc));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = m * p / parts, hi = m * (p + 1) / parts;
      for (int64_t i = lo; i < hi; i += rows) {
        const int64_t b = std::min(rows, hi - i);
        at::Tensor blk = W.narrow(0, i, b);
        if (widen) blk = buf.narrow(0, 0, b).copy_(blk);
        fn(blk, i, p);
      }
    }
  });
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
    for_each_block(W[j], num_parts(m, block_rows(W[j].size(1), W[j].element_size())),
                   [&](const at::Tensor& blk, int64_t i, int64_t) {
                     auto Yb = Yj.narrow(0, i, blk.size(0));
                     at::mm_out(Yb, blk, Xj);
                   });
  }
  return Y;
}

// Z[j] = sum over parts of W_part^T @ Y_part, parts summed in a fixed order.
template <typename BlockFn>
void accumulate_wt(const at::Tensor& Wj, at::Tensor Zj, BlockFn make_y) {
  const int64_t m = Wj.size(0), n = Wj.size(1), k = Zj.size(1);
  const int64_t parts = num_parts(m, block_rows(n, Wj.element_size()));
  std::vector<at::Tensor> partial(parts);
  partial[0] = Zj;
  for (int64_t p = 1; p < parts; ++p) partial[p] = at::empty({n, k}, Zj.options());
  for (auto& z : partial) z.zero_();
  for_each_block(Wj, parts, [&](const at::Tensor& blk, int64_t i, int64_t p) {
    auto Yb = make_y(blk, i);
    partial[p].addmm_(blk.t(), Yb);
  });
  for (int64_t p = 1; p < parts; ++p) Zj.add_(partial[p]);
}

at::Tensor wtx_cpu(at::TensorList W, const at::Tensor& Y) {
  check_skinny("wtx", W, Y, W.empty() ? 0 : W[0].size(0));
  const int64_t b = W.size(), n = W[0].size(1), k = Y.size(2);
  auto Z = at::empty({b, n, k}, Y.options());
  for (int64_t j = 0; j < b; ++j) {
    auto Yj = Y[j];
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
