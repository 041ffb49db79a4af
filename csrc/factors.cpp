// pissa_factors: the PiSSA adapter factors of a group of same-shape weights, device-generic ATen.
//
// Methods (niter = number of applications of W^T W, as in torch.svd_lowrank):
//   krylov   block Krylov (Musco & Musco 2015). Pass i reads W once through the fused `gram` op,
//            giving W Q_i and W^T W Q_i; Q_{i+1} is W^T W Q_i orthogonalized against all earlier
//            blocks. niter+1 reads of W give the basis Q = [Q_0 .. Q_niter] of dimension
//            l (niter+1), and with it W Q and W^T W Q. The Rayleigh-Ritz step is taken on the *left*
//            space P = range(W Q) (one Krylov degree higher than Q): P^T W = S^-1 X^T (W^T W Q)^T
//            needs no further read of W.
//   subspace the same fused passes with plain subspace iteration (only the last block is kept):
//            the subspace torch.svd_lowrank ends with, in niter+1 reads instead of 2 niter + 2.
//   halko    torch.svd_lowrank's algorithm on the unfused wx/wtx passes (2 niter + 2 reads), with
//            oversampling: the reference the others are measured against.
//   exact    torch.linalg.svd of each weight (float32, float64 for float64 weights).
// The small dense steps (orthonormalization, Gram matrices, small eigenproblems) run in float64:
// they cost O((m + n) l^2), nothing next to a pass over W, and keep the float32 passes the only
// source of rounding error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"

namespace pissa_fast {
namespace {

using at::Tensor;

// On CPU the small dense steps (tens of ATen calls on n x l and L x L tensors) are latency-bound:
// each parallel region costs a barrier over all threads, which on a busy machine costs far more than
// the work. They run on one thread; the passes over W get every thread back while they run.
thread_local int full_threads = 0;

struct SmallStepsOnOneThread {
  explicit SmallStepsOnOneThread(bool cpu) {
    const int n = at::get_num_threads();
    if (cpu && n > 1 && full_threads == 0) {
      full_threads = n;
      at::set_num_threads(1);
    }
  }
  ~SmallStepsOnOneThread() {
    if (full_threads > 0 && owner) {
      at::set_num_threads(full_threads);
      full_threads = 0;
    }
  }
  bool owner = full_threads == 0;
};

struct AllThreads {
  AllThreads() {
    if (full_threads > 1) at::set_num_threads(full_threads);
  }
  ~AllThreads() {
    if (full_threads > 1) at::set_num_threads(1);
  }
};

std::tuple<Tensor, Tensor> call_gram(at::TensorList W, const Tensor& V) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::gram", "")
                       .typed<std::tuple<Tensor, Tensor>(at::TensorList, const Tensor&)>();
  auto Vc = V.contiguous();
  AllThreads all;
  return op.call(W, Vc);
}

Tensor call_wx(at::TensorList W, const Tensor& X) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::wx", "")
                       .typed<Tensor(at::TensorList, const Tensor&)>();
  auto Xc = X.contiguous();
  AllThreads all;
  return op.call(W, Xc);
}

Tensor call_wtx(at::TensorList W, const Tensor& Y) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::wtx", "")
                       .typed<Tensor(at::TensorList, const Tensor&)>();
  auto Yc = Y.contiguous();
  AllThreads all;
  return op.call(W, Yc);
}

// Orthonormal basis of the columns of X [b, n, k], float64.
Tensor orthonormalize(const Tensor& X, const std::string& normalizer) {
  if (normalizer == "cholqr2") {
    // CholeskyQR2: two Gram + Cholesky sweeps; falls back to Householder when the Gram matrix is
    // numerically singular (a rank-deficient block).
    Tensor Q = X;
    for (int sweep = 0; sweep < 2; ++sweep) {
      auto [L, info] = at::linalg_cholesky_ex(at::matmul(Q.mT(), Q));
      if (info.ne(0).any().item<bool>()) return std::get<0>(at::linalg_qr(X));
      Q = at::linalg_solve_triangular(L.mH(), Q, /*upper=*/true, /*left=*/false);
    }
    return Q;
  }
  return std::get<0>(at::linalg_qr(X));
}

// Orthonormal basis of X's columns orthogonal to the orthonormal Qprev (block Gram-Schmidt, twice).
// A block that is (numerically) inside span(Qprev) still yields an orthonormal complement.
Tensor orthonormalize_against(const Tensor& X, const Tensor& Qprev, const std::string& normalizer) {
  auto project = [&](Tensor Y) { return Y - at::matmul(Qprev, at::matmul(Qprev.mT(), Y)); };
  Tensor Q = orthonormalize(project(X), normalizer);
  return orthonormalize(project(Q), normalizer);
}

struct Factors {
  Tensor U, S, V;  // [b, m, r], [b, r], [b, n, r], float64
};

// Top-r SVD of C [b, k, n] given as C = P^T W for an orthonormal P [b, m, k]: U = P Uc.
Factors svd_of_projection(const Tensor& P, const Tensor& C, int64_t r) {
  auto [ev, Uc] = at::linalg_eigh(at::matmul(C, C.mT()));
  const int64_t k = ev.size(-1);
  auto top = at::arange(k - 1, k - 1 - r, -1, ev.options().dtype(at::kLong));
  auto s = ev.index_select(-1, top).clamp_min(0).sqrt();
  Uc = Uc.index_select(-1, top);
  auto inv = at::where(s > 0, s.reciprocal(), at::zeros_like(s));
  auto V = at::matmul(C.mT(), Uc) * inv.unsqueeze(-2);
  return {at::matmul(P, Uc), s, V};
}

// Rayleigh-Ritz from Q [b, n, L] (orthonormal), Y = W Q and Z = W^T W Q, all float64, using only
// L x L Gram matrices and the final m x r / n x r products (no extra m x L or L x n buffers).
//   Y^T Y = X s^2 X^T  ->  P = Y T, T = X s^-1, is an orthonormal basis of range(W Q);
//   C = P^T W = T^T Z^T, so C C^T = T^T (Z^T Z) T = Uc sc^2 Uc^T and
//   U = P Uc = Y (T Uc),  V = C^T Uc / sc = Z (T Uc) / sc.
Factors rayleigh_ritz(const Tensor& Q, const Tensor& Y, const Tensor& Z, int64_t r, double tol) {
  const int64_t L = Q.size(-1);
  auto [ev, X] = at::linalg_eigh(at::matmul(Y.mT(), Y));
  auto sig = ev.clamp_min(0).sqrt();
  auto smax = std::get<0>(sig.max(-1, /*keepdim=*/true));
  auto keep = sig > smax * tol;
  auto inv = at::where(keep, sig.reciprocal(), at::zeros_like(sig));
  auto T = X * inv.unsqueeze(-2);
  auto H = at::matmul(T.mT(), at::matmul(at::matmul(Z.mT(), Z), T));
  auto [ec, Uc] = at::linalg_eigh(H);
  auto top = at::arange(L - 1, L - 1 - r, -1, ev.options().dtype(at::kLong));
  auto sc = ec.index_select(-1, top).clamp_min(0).sqrt();
  auto TU = at::matmul(T, Uc.index_select(-1, top));
  auto sinv = at::where(sc > 0, sc.reciprocal(), at::zeros_like(sc));
  Factors left{at::matmul(Y, TU), sc, at::matmul(Z, TU) * sinv.unsqueeze(-2)};
  // Where fewer than r directions of W Q are numerically nonzero, the left step has nothing to
  // offer beyond them: use the right Rayleigh-Ritz W ~ (W Q) Q^T, which needs no division.
  auto enough = keep.sum(-1) >= r;  // [b]
  if (enough.all().item<bool>()) return left;
  Factors right{at::matmul(Y, T.index_select(-1, top)), sig.index_select(-1, top),
                at::matmul(Q, X.index_select(-1, top))};
  auto e3 = enough.view({-1, 1, 1}), e2 = enough.view({-1, 1});
  return {at::where(e3, left.U, right.U), at::where(e2, left.S, right.S), at::where(e3, left.V, right.V)};
}

// Per-matrix scale c [b, 1, 1] (float64) for the test vectors so that W c V and W^T W c V stay well
// inside float32's range: W^T W squares the weights' magnitude, so weights near 1e+-20 would
// overflow or underflow. Only pathological scales pay for the second look at W.
Tensor pass_scale(at::TensorList W, const Tensor& Y, const Tensor& Z, bool* redo) {
  const int64_t b = Y.size(0);
  auto Yf = Y.reshape({b, -1}), Zf = Z.reshape({b, -1});
  auto finite = at::isfinite(Yf).all(-1) & at::isfinite(Zf).all(-1);
  auto s = Yf.abs().amax(-1).to(at::kDouble);  // |W V| for orthonormal V: about ||W|| in scale
  const double lo = std::ldexp(1.0, -40), hi = std::ldexp(1.0, 40);
  auto ok = finite & (((s >= lo) & (s <= hi)) | (s == 0));
  *redo = !ok.all().item<bool>();
  if (!*redo) return at::ones({b, 1, 1}, Y.options().dtype(at::kDouble));
  auto scale = at::ones({b}, Y.options().dtype(at::kDouble));
  auto ok_cpu = ok.cpu();
  auto s_cpu = s.cpu();
  for (int64_t j = 0; j < b; ++j) {
    if (ok_cpu[j].item<bool>()) continue;
    auto mm = at::aminmax(W[j]);
    const double amax = std::max(std::abs(std::get<0>(mm).item<double>()),
                                 std::abs(std::get<1>(mm).item<double>()));
    TORCH_CHECK_VALUE(std::isfinite(amax), "pissa_factors: W[", j, "] contains NaN or Inf");
    const double sj = s_cpu[j].item<double>();
    const double ref = std::isfinite(sj) && sj > 0 ? sj : amax;
    if (ref > 0) scale[j] = 1.0 / ref;
  }
  return scale.view({b, 1, 1});
}

Factors fused_passes(at::TensorList W, const Tensor& omega, int64_t r, int64_t niter, bool krylov,
                     const std::string& normalizer) {
  const auto acc = omega.scalar_type();
  const double tol = acc == at::kDouble ? 1e-9 : 1e-3;
  Tensor Q = orthonormalize(omega.to(at::kDouble), normalizer);
  auto run = [&](const Tensor& Qi, const Tensor& c) {
    auto [Y, Z] = call_gram(W, (Qi * c).to(acc));
    return std::make_pair(Y.to(at::kDouble) / c, Z.to(at::kDouble) / c);
  };
  auto [Y, Z] = call_gram(W, Q.to(acc));
  bool redo = false;
  const Tensor c = pass_scale(W, Y, Z, &redo);
  Tensor Yd, Zd;
  if (redo) {
    std::tie(Yd, Zd) = run(Q, c);
    TORCH_CHECK_VALUE(at::isfinite(Zd).all().item<bool>(), "pissa_factors: a weight contains NaN or Inf");
  } else {
    Yd = Y.to(at::kDouble);
    Zd = Z.to(at::kDouble);
  }
  // The Krylov basis and its images, preallocated: block i lives in columns [i l, (i + 1) l).
  const int64_t l = Q.size(-1), blocks = krylov ? niter + 1 : 1;
  auto Qall = at::empty({Q.size(0), Q.size(1), l * blocks}, Q.options());
  auto Yall = at::empty({Yd.size(0), Yd.size(1), l * blocks}, Q.options());
  auto Zall = at::empty({Zd.size(0), Zd.size(1), l * blocks}, Q.options());
  Qall.narrow(-1, 0, l).copy_(Q);
  Yall.narrow(-1, 0, l).copy_(Yd);
  Zall.narrow(-1, 0, l).copy_(Zd);
  for (int64_t i = 1; i <= niter; ++i) {
    const int64_t prev = krylov ? i - 1 : 0, next = krylov ? i : 0;
    auto Zprev = Zall.narrow(-1, prev * l, l);
    Tensor Qn = krylov ? orthonormalize_against(Zprev, Qall.narrow(-1, 0, i * l), normalizer)
                       : orthonormalize(Zprev, normalizer);
    auto [Yi, Zi] = run(Qn, c);
    Qall.narrow(-1, next * l, l).copy_(Qn);
    Yall.narrow(-1, next * l, l).copy_(Yi);
    Zall.narrow(-1, next * l, l).copy_(Zi);
  }
  return rayleigh_ritz(Qall, Yall, Zall, r, tol);
}

Factors halko(at::TensorList W, const Tensor& omega, int64_t r, int64_t niter, const std::string& normalizer) {
  const auto acc = omega.scalar_type();
  Tensor Q = orthonormalize(omega.to(at::kDouble), normalizer);
  Tensor Y = call_wx(W, Q.to(acc));
  if (!at::isfinite(Y).all().item<bool>()) {
    for (size_t j = 0; j < W.size(); ++j) {
      auto mm = at::aminmax(W[j]);
      TORCH_CHECK_VALUE(std::isfinite(std::get<0>(mm).item<double>()) &&
                            std::isfinite(std::get<1>(mm).item<double>()),
                        "pissa_factors: W[", j, "] contains NaN or Inf");
    }
  }
  Tensor P = orthonormalize(Y.to(at::kDouble), normalizer);
  for (int64_t i = 0; i < niter; ++i) {
    Q = orthonormalize(call_wtx(W, P.to(acc)).to(at::kDouble), normalizer);
    P = orthonormalize(call_wx(W, Q.to(acc)).to(at::kDouble), normalizer);
  }
  Tensor C = call_wtx(W, P.to(acc)).to(at::kDouble).mT();  // P^T W
  return svd_of_projection(P, C, r);
}

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
  return {at::stack(U).to(at::kDouble), at::stack(S).to(at::kDouble), at::stack(V).to(at::kDouble)};
}

std::tuple<Tensor, Tensor, Tensor> pissa_factors(at::TensorList W, const Tensor& omega, int64_t rank,
                                                 int64_t niter, c10::string_view method_sv,
                                                 c10::string_view normalizer_sv) {
  const char* op = "pissa_factors";
  check_weight_list(op, W);
  const std::string method(method_sv), normalizer(normalizer_sv);
  const auto& w0 = W[0];
  const int64_t b = W.size(), m = w0.size(0), n = w0.size(1), k = std::min(m, n);
  SmallStepsOnOneThread one_thread(w0.device().is_cpu());
  PF_CHECK(k > 0, op, "W must be non-empty, got shape ", w0.sizes());
  PF_CHECK(rank >= 1 && rank <= k, op, "rank must be in [1, min(m, n) = ", k, "], got ", rank);
  PF_CHECK(niter >= 0, op, "niter must be >= 0, got ", niter);
  PF_CHECK(method == "krylov" || method == "subspace" || method == "halko" || method == "exact", op,
           "method must be one of krylov, subspace, halko, exact; got '", method, "'");
  PF_CHECK(normalizer == "qr" || normalizer == "cholqr2", op,
           "normalizer must be 'qr' or 'cholqr2', got '", normalizer, "'");
  PF_CHECK(omega.dim() == 3, op, "omega must be 3-D [", b, ", ", n, ", l], got ", omega.sizes());
  check_factor(op, "omega", omega, b, n, omega.size(2), w0);
  const int64_t l = omega.size(2);
  PF_CHECK(l >= rank, op, "omega must have at least rank = ", rank, " columns, got ", l);

  // A working subspace as large as min(m, n) is no cheaper than the exact SVD and would not fit.
  const int64_t width = method == "krylov" ? l * (niter + 1) : l;
  Factors f = (method == "exact" || width >= k) ? exact(W, rank)
              : method == "halko"              ? halko(W, omega, rank, niter, normalizer)
                                               : fused_passes(W, omega, rank, niter, method == "krylov", normalizer);

  // A deterministic sign per singular pair: the largest-magnitude entry of each u is positive.
  auto idx = f.U.abs().argmax(-2, /*keepdim=*/true);
  auto sign = f.U.gather(-2, idx).sign();
  sign = at::where(sign == 0, at::ones_like(sign), sign);
  auto root = f.S.clamp_min(0).sqrt();
  const auto acc = acc_dtype(w0.scalar_type());
  auto A = ((f.V * sign) * root.unsqueeze(-2)).mT().to(acc).contiguous();
  auto B = ((f.U * sign) * root.unsqueeze(-2)).to(acc).contiguous();
  return {A, B, f.S.to(acc).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CompositeExplicitAutograd, m) {
  m.impl("pissa_factors", &pissa_factors);
}

}  // namespace pissa_fast
