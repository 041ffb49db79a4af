// pissa_factors: the PiSSA adapter factors of a group of same-shape weights, device-generic ATen.
//
// Methods (niter = number of applications of W^T W, as in torch.svd_lowrank):
//   krylov   block Krylov (Musco & Musco 2015). Pass i reads W once through the fused `gram` op,
//            giving W Q_i and W^T W Q_i; Q_{i+1} is W^T W Q_i orthogonalized against all earlier
//            blocks. niter+1 reads of W give the basis Q = [Q_0 .. Q_niter] of dimension
//            l (niter+1), and with it W Q and W^T W Q. The Rayleigh-Ritz step is taken on the *left*
//            space P = range(W Q) (one Krylov degree higher than Q): P^T W = S^-1 X^T (W^T W Q)^T
//            needs no further read of W. With a tolerance, each matrix stops at the first niter
//            whose accuracy estimate meets it (range_finder.cpp).
//   subspace the same fused passes with plain subspace iteration (only the last block is kept):
//            the subspace torch.svd_lowrank ends with, in niter+1 reads instead of 2 niter + 2.
//   halko    torch.svd_lowrank's algorithm on the unfused wx/wtx passes (2 niter + 2 reads), with
//            oversampling: the reference the others are measured against.
//   exact    torch.linalg.svd of each weight (float32, float64 for float64 weights).
// The Gram matrices and small eigenproblems of the small dense steps run in float64, and so does the
// orthonormalization of a float64 basis. A block Krylov basis that the passes see in float32 (every
// weight but a float64 one) is orthonormalized in float32: the Rayleigh-Ritz step does not need its
// orthonormality beyond what the passes see, and an ill-conditioned block is redone in float64
// (small_dense.cpp). The small dense steps are batched over the group (small_dense.h): the number of ATen
// calls and host syncs does not grow with the number of matrices, except on the exact path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "range_finder.h"
#include "small_dense.h"

namespace pissa_fast {
namespace {

using at::Tensor;

Factors exact(at::TensorList W, int64_t r) {
  AllThreads all;  // a full SVD is big dense work
  std::vector<Tensor> U, S, V;
  for (size_t j = 0; j < W.size(); ++j) {
    const auto& w = W[j];
    // LAPACK fails on non-finite input with a convergence error; say what is wrong instead.
    auto mm = at::aminmax(w);
    TORCH_CHECK_VALUE(std::isfinite(std::get<0>(mm).item<double>()) && std::isfinite(std::get<1>(mm).item<double>()),
                      "pissa_factors: W[", j, "] contains NaN or Inf");
    auto [u, s, vh] = at::linalg_svd(w.to(acc_dtype(w.scalar_type())), /*full_matrices=*/false);
    U.push_back(u.narrow(-1, 0, r));
    S.push_back(s.narrow(-1, 0, r));
    V.push_back(vh.narrow(-2, 0, r).mT());
  }
  Factors f;
  f.U = at::stack(U).to(at::kDouble);
  f.S = at::stack(S).to(at::kDouble);
  f.V = at::stack(V).to(at::kDouble);
  f.niter_used.assign(W.size(), -1);  // -1: exact SVD
  f.met.assign(W.size(), true);
  f.estimate = at::zeros({int64_t(W.size())}, f.S.options());
  return f;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pissa_factors(at::TensorList W, const Tensor& omega, int64_t rank,
                                                                 int64_t niter, c10::string_view method_sv,
                                                                 c10::string_view normalizer_sv, double tol,
                                                                 int64_t like_svd_lowrank, bool estimate) {
  const char* op = "pissa_factors";
  check_weight_list(op, W);
  const std::string method(method_sv), normalizer(normalizer_sv);
  const auto& w0 = W[0];
  const int64_t b = W.size(), m = w0.size(0), n = w0.size(1), k = std::min(m, n);
  // Declared first, so it runs last: after every temporary of the call is freed (switched on below,
  // once the arguments are checked).
  ReleaseFreeHeap trim(false);
  SmallStepsOnOneThread one_thread(w0.device().is_cpu() &&
                                   !small_steps_want_threads(W, omega.dim() == 3 ? omega.size(2) : 0));
  PF_CHECK(k > 0, op, "W must be non-empty, got shape ", w0.sizes());
  PF_CHECK(rank >= 1 && rank <= k, op, "rank must be in [1, min(m, n) = ", k, "], got ", rank);
  PF_CHECK(niter >= 0, op, "niter must be >= 0, got ", niter);
  PF_CHECK(method == "krylov" || method == "subspace" || method == "halko" || method == "exact", op,
           "method must be one of krylov, subspace, halko, exact; got '", method, "'");
  PF_CHECK(normalizer == "qr" || normalizer == "cholqr2", op,
           "normalizer must be 'qr' or 'cholqr2', got '", normalizer, "'");
  PF_CHECK(tol >= 0 && std::isfinite(tol), op, "tol must be a finite number >= 0 (0: off), got ", tol);
  PF_CHECK(like_svd_lowrank >= -1, op, "like_svd_lowrank must be >= 0 (or -1: off), got ", like_svd_lowrank);
  PF_CHECK((tol == 0 && like_svd_lowrank < 0) || method == "krylov" || method == "exact", op,
           "a stopping criterion (tol, like_svd_lowrank) needs method krylov, got '", method, "'");
  PF_CHECK(omega.dim() == 3, op, "omega must be 3-D [", b, ", ", n, ", l], got ", omega.sizes());
  // [b, m, l] puts the krylov/subspace basis on W's output side (range_finder.h).
  const bool out_side = omega.size(1) == m && m != n && (method == "krylov" || method == "subspace");
  check_factor(op, "omega", omega, b, out_side ? m : n, omega.size(2), w0);
  const int64_t l = omega.size(2);
  PF_CHECK(l >= rank, op, "omega must have at least rank = ", rank, " columns, got ", l);

  // Only where the call's tall blocks are large enough for holes to matter (a trim walks the heap).
  trim.on = w0.device().is_cpu() && b * (2 * n + m) * l * (niter + 1) * 4 >= (int64_t(1) << 21);

  Stopping stop;
  stop.tol = tol;
  stop.like_svd_lowrank = like_svd_lowrank;
  // A working subspace as large as min(m, n) is no cheaper than the exact SVD and would not fit.
  const int64_t width = method == "krylov" ? l * (niter + 1) : l;
  // With a stopping criterion the cap is rarely reached: run to the largest niter whose subspace
  // fits, and give the exact SVD only to the weights that did not meet their target there (a small
  // weight under peft's pissa_niter_16, e.g. 192 x 576 at r 16, took the exact SVD outright).
  const int64_t fits = l > 0 ? (k - 1) / l - 1 : 0;  // the largest niter with l (niter + 1) < k
  const bool fit = method == "krylov" && stop.active() && width >= k && fits >= 1;
  const int64_t run_niter = fit ? fits : niter;
  Factors f = (method == "exact" || (width >= k && !fit)) ? exact(W, rank)
              : method == "halko" ? halko(W, omega, rank, niter, normalizer)
                                  : fused_passes(W, omega, rank, run_niter, method == "krylov", normalizer, stop,
                                                 estimate);
  if (fit) {
    std::vector<int64_t> miss;
    std::vector<Tensor> Wm;
    for (int64_t j = 0; j < b; ++j)
      if (!f.met[j]) {
        miss.push_back(j);
        Wm.push_back(W[j]);
      }
    if (!miss.empty()) {
      Factors e = exact(Wm, rank);
      auto idx = host_index(miss, w0.device());
      f.U.index_copy_(0, idx, e.U.to(f.U.device()));
      f.S.index_copy_(0, idx, e.S.to(f.S.device()));
      f.V.index_copy_(0, idx, e.V.to(f.V.device()));
      f.estimate.index_fill_(0, idx, 0.0);
      for (auto j : miss) f.niter_used[j] = -1;
    }
  }

  // A deterministic sign per singular pair: the largest-magnitude entry of each u is positive.
  auto idx = f.U.abs().argmax(-2, /*keepdim=*/true);
  auto sign = f.U.gather(-2, idx).sign();
  sign = at::where(sign == 0, at::ones_like(sign), sign);
  auto root = f.S.clamp_min(0).sqrt();
  const auto acc = acc_dtype(w0.scalar_type());
  auto A = ((f.V * sign) * root.unsqueeze(-2)).mT().to(acc).contiguous();
  auto B = ((f.U * sign) * root.unsqueeze(-2)).to(acc).contiguous();
  auto used = host_index(f.niter_used, w0.device());
  return {A, B, f.S.to(acc).contiguous(), used, f.estimate.to(acc).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CompositeExplicitAutograd, m) {
  m.impl("pissa_factors", &pissa_factors);
}

TORCH_LIBRARY_IMPL(pissa_fast, CompositeImplicitAutograd, m) {
  m.impl("_defer_heap_release", [](int64_t mode) { return defer_heap_release(mode); });
}

}  // namespace pissa_fast
