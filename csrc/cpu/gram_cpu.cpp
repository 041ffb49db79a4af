// CPU kernels for the passes that read the full weights: wx (W @ X), wtx (W^T @ Y) and gram
// ((W @ V, W^T (W @ V)) in one read of W).
//
// gram, the pass the default algorithm lives on, has an AVX2/FMA kernel (gram_avx2.h) that reads
// bf16/fp16 rows natively. Everything else walks W in row blocks sized to stay in cache; a bf16/fp16
// block is widened into a small float32 buffer (never a full-size copy) and multiplied with the BLAS
// that ATen links. Both are bitwise reproducible for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "gram_avx2.h"

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
    for_each_block(W[j], [&](const at::Tensor& blk, int64_t i) {
      auto Yb = Yj.narrow(0, i, blk.size(0));
      at::mm_out(Yb, blk, Xj);
    });
  }
  return Y;
}

// Z[j] = sum over row blocks of W_b^T @ Y_b, Y_b = make_y(W_b, row0).
template <typename BlockFn>
void accumulate_wt(const at::Tensor& Wj, at::Tensor Zj, BlockFn make_y) {
  Zj.zero_();
  for_each_block(Wj, [&](const at::Tensor& blk, int64_t i) { Zj.addmm_(blk.t(), make_y(blk, i)); });
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

#ifdef PF_HAVE_AVX2_KERNEL
// The AVX2 path: columns padded to a multiple of 8, rows split statically over the threads (each
// with its own Z partial, summed in order), bf16/fp16 rows widened 64 at a time into a small
// per-thread float32 buffer.
void gram_avx2(const at::Tensor& Wj, const at::Tensor& Vp, at::Tensor Yp, at::Tensor Zp) {
  const int64_t m = Wj.size(0), n = Wj.size(1), lp = Vp.size(1);
  const bool widen = Wj.scalar_type() != at::kFloat;
  const bool bf16 = Wj.scalar_type() == at::kBFloat16;
  const int64_t chunk = 64;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + 15) / 16));
  std::vector<at::Tensor> partial(parts);
  partial[0] = Zp;
  for (int64_t p = 1; p < parts; ++p) partial[p] = at::empty({n, lp}, Zp.options());
  for (auto& z : partial) z.zero_();
  const float* V = Vp.const_data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(widen ? std::min(chunk, m) * n : 0);
    for (int64_t p = p0; p < p1; ++p) {
      float* Z = partial[p].data_ptr<float>();
      const int64_t lo = m * p / parts, hi = m * (p + 1) / parts;
      for (int64_t i = lo; i < hi; i += chunk) {
        const int64_t rows = std::min(chunk, hi - i);
        const float* Wf;
        int64_t ldw;
        if (widen) {
          const auto* src = static_cast<const uint16_t*>(Wj.const_data_ptr()) + i * Wj.stride(0);
          for (int64_t r = 0; r < rows; ++r) {
            if (bf16) cpu::widen_bf16(src + r * Wj.stride(0), buf.data() + r * n, n);
            else cpu::widen_fp16(src + r * Wj.stride(0), buf.data() + r * n, n);
          }
          Wf = buf.data();
          ldw = n;
        } else {
          Wf = Wj.const_data_ptr<float>() + i * Wj.stride(0);
          ldw = Wj.stride(0);
        }
        cpu::gram_block(Wf, ldw, rows, n, V, lp, Yp.data_ptr<float>() + i * lp, Z);
      }
    }
  });
  for (int64_t p = 1; p < parts; ++p) Zp.add_(partial[p]);
}
#endif

std::tuple<at::Tensor, at::Tensor> gram_cpu(at::TensorList W, const at::Tensor& V) {
  check_skinny("gram", W, V, W.empty() ? 0 : W[0].size(1));
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = V.size(2);
#ifdef PF_HAVE_AVX2_KERNEL
  if (W[0].scalar_type() != at::kDouble && cpu::cpu_has_avx2_fma()) {
    const int64_t lp = (k + 7) / 8 * 8;
    auto Vp = lp == k ? V : at::constant_pad_nd(V, {0, lp - k});
    auto Yp = at::empty({b, m, lp}, V.options());
    auto Zp = at::empty({b, n, lp}, V.options());
    for (int64_t j = 0; j < b; ++j) gram_avx2(W[j], Vp[j], Yp[j], Zp[j]);
    if (lp == k) return {Yp, Zp};
    return {Yp.narrow(2, 0, k).contiguous(), Zp.narrow(2, 0, k).contiguous()};
  }
#endif
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
