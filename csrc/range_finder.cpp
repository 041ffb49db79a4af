// Range finders of pissa_factors (see factors.cpp for the op and the methods' overview).
//
// Block Krylov keeps its basis Q = [Q_0 .. Q_i], the images Y = W Q and Z = W^T W Q, and the Gram
// matrices Y^T Y and Z^T Z, which grow by one block row per pass (incremental: each pass adds
// O((m + n) L l) work instead of recomputing O((m + n) L^2)). The Rayleigh-Ritz step works on the
// Gram matrices alone (two L x L eigenproblems); only the final factors touch the tall blocks.
//
// Accuracy estimate. The left Ritz vectors u_j = Y t_j and v_j = Z t_j / s_j of two consecutive
// steps have inner products t'^T (Y^T Y) t and t'^T (Z^T Z) t / (s' s): the change d_j between steps
// costs nothing beyond L x L products. Krylov convergence is geometric (and faster), so the error
// left after step i is estimated as d_i q / (1 - q), q = d_i / d_{i-1} (at most 0.9), per vector
// (the larger of u's and v's change), and averaged with weights sqrt(s_j): for delocalized singular
// vectors that is the l1_rel error of pissa_fast.error_vs_exact (mean |A - A*|, |B - B*| over the
// mean |A*|, |B*|). It never reads W.
//
// Predicted error of torch.svd_lowrank(q = r, niter = N): subspace iteration without oversampling
// leaves direction j off by about (s_{r+1} / s_j)^(2N + 1) (Halko, Martinsson, Tropp 2011, sec. 10;
// the constant in front, a heavy-tailed random factor, is set to 1, which measured 1.3-2.9x below
// svd_lowrank's actual error on synthetic and real (SmolLM2) weights: conservative).
#include "range_finder.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "small_dense.h"

namespace pissa_fast {

using at::Tensor;

namespace {

// Rayleigh-Ritz from the Gram matrices YY = Y^T Y and ZZ = Z^T Z of one basis.
//   Y^T Y = T^-T T^-1 (any whitening T)  ->  P = Y T is an orthonormal basis of range(W Q);
//   C = P^T W = T^T Z^T, so C C^T = T^T (Z^T Z) T = Uc sc^2 Uc^T and
//   U = P Uc = Y (T Uc),  V = C^T Uc / sc = Z (T Uc) / sc.
// T comes from the Cholesky factor of Y^T Y where W Q is well conditioned (one L x L eigenproblem
// per step instead of two: the eigh of Y^T Y cost as much as that of C C^T). Where W Q is nearly
// rank-deficient it comes from eigh(Y^T Y) = X sig^2 X^T, T = X sig^-1, and directions of W Q below
// keep_tol * max are dropped (float32 pass error / sig would dominate).
struct Ritz {
  Tensor TU, sc, s_next;  // [b, L, r], [b, r], [b]: left Ritz vectors' coordinates and values
  Tensor Tr, Xr, sig_r;   // the right Rayleigh-Ritz W ~ (W Q) Q^T, for rank-deficient W Q (eigh path only)
  Tensor enough;          // [b]: at least r directions of W Q kept
};

// The Cholesky whitening T = C^-T (Y^T Y = C C^T) of every matrix of the group, or an undefined
// tensor where some W Q may have a direction below keep_tol times its largest. The test bounds
// both ends from the safe side, so the eigh path would keep every direction wherever this path is
// taken: sig_max^2 = lambda_max(Y^T Y) <= the largest absolute row sum of Y^T Y (Gershgorin), and
// 1 / sig_min = ||C^-1||_2 <= ||C^-1||_F. One host sync.
Tensor cholesky_whitening(const Tensor& YY, double keep_tol) {
  auto [C, info] = at::linalg_cholesky_ex(YY);
  auto eye = at::eye(YY.size(-1), YY.options());
  auto Cinv = at::linalg_solve_triangular(C, eye, /*upper=*/false);
  auto smax = std::get<0>(YY.abs().sum(-1).max(-1)).sqrt();
  auto inv_smin = Cinv.square().sum({-2, -1}).sqrt();
  auto cond = at::where(info == 0, smax * inv_smin, at::full_like(smax, INFINITY));
  if (!(cond * keep_tol < 1).all().item<bool>()) return Tensor();  // NaN fails too
  return Cinv.mT();
}

Ritz ritz(const Tensor& YY, const Tensor& ZZ, int64_t r, double keep_tol) {
  const int64_t L = YY.size(-1);
  auto top = at::arange(L - 1, L - 1 - r, -1, YY.options().dtype(at::kLong));
  Ritz out;
  Tensor T = cholesky_whitening(YY, keep_tol);
  Tensor X, sig, keep;
  if (!T.defined()) {
    auto [ev, X_] = small_eigh(YY);
    X = X_;
    sig = ev.clamp_min(0).sqrt();
    auto smax = std::get<0>(sig.max(-1, /*keepdim=*/true));
    keep = sig > smax * keep_tol;
    auto inv = at::where(keep, sig.reciprocal(), at::zeros_like(sig));
    T = X * inv.unsqueeze(-2);
  }
  auto H = at::bmm(T.mT(), at::bmm(ZZ, T));
  auto [ec, Uc] = small_eigh(H);
  out.sc = ec.index_select(-1, top).clamp_min(0).sqrt();
  out.TU = at::bmm(T, Uc.index_select(-1, top));
  out.s_next = L > r ? ec.select(-1, L - 1 - r).clamp_min(0).sqrt() : at::zeros_like(ec.select(-1, 0));
  if (X.defined()) {
    out.Tr = T.index_select(-1, top);
    out.Xr = X.index_select(-1, top);
    out.sig_r = sig.index_select(-1, top);
    out.enough = keep.sum(-1) >= r;
  } else {
    out.enough = at::ones({YY.size(0)}, YY.options().dtype(at::kBool));
  }
  return out;
}

Ritz select(const Ritz& a, const Tensor& idx) {
  auto pick = [&](const Tensor& t) { return t.defined() ? t.index_select(0, idx) : t; };
  return {pick(a.TU), pick(a.sc), pick(a.s_next), pick(a.Tr), pick(a.Xr), pick(a.sig_r), pick(a.enough)};
}

// (U, S, V) from a Ritz step and the basis it was taken on.
// Q, Y, Z may be stored in float32 (see fused_passes): the products widen them a row chunk at a time.
std::tuple<Tensor, Tensor, Tensor> ritz_vectors(const Ritz& z, const Tensor& Q, const Tensor& Y, const Tensor& Z) {
  auto sinv = at::where(z.sc > 0, z.sc.reciprocal(), at::zeros_like(z.sc));
  auto U = nn_f64(Y, z.TU);
  auto V = nn_f64(Z, z.TU) * sinv.unsqueeze(-2);
  // One sync for the group: only where fewer than r directions of W Q are numerically nonzero does
  // the left step have nothing to offer beyond them; there the right step needs no division.
  if (z.enough.all().item<bool>()) return {U, z.sc, V};
  auto e3 = z.enough.view({-1, 1, 1}), e2 = z.enough.view({-1, 1});
  return {at::where(e3, U, nn_f64(Y, z.Tr)), at::where(e2, z.sc, z.sig_r), at::where(e3, V, nn_f64(Q, z.Xr))};
}

// Change of each Ritz pair between two consecutive steps (prev's basis is a prefix of cur's).
Tensor ritz_change(const Ritz& prev, const Ritz& cur, const Tensor& YY, const Tensor& ZZ) {
  const int64_t Lp = prev.TU.size(1);
  auto cu = (prev.TU * at::bmm(YY.narrow(1, 0, Lp), cur.TU)).sum(-2).abs();
  auto ss = prev.sc * cur.sc;
  auto cv = (prev.TU * at::bmm(ZZ.narrow(1, 0, Lp), cur.TU)).sum(-2).abs();
  cv = at::where(ss > 0, cv / ss, at::ones_like(cv));
  auto du = (2 - 2 * cu.clamp_max(1)).clamp_min(0).sqrt();
  auto dv = (2 - 2 * cv.clamp_max(1)).clamp_min(0).sqrt();
  return at::maximum(du, dv);
}

Tensor weighted_mean(const Tensor& e, const Tensor& sc) {
  auto w = sc.clamp_min(0).sqrt();
  auto tot = w.sum(-1);
  return at::where(tot > 0, (w * e).sum(-1) / tot, at::zeros_like(tot));
}

Tensor error_estimate(const Tensor& d, const Tensor& d_prev, const Tensor& sc) {
  Tensor e = d;
  if (d_prev.defined()) {
    auto q = at::where(d_prev > 0, d / d_prev, at::full_like(d, 0.9)).clamp_max(0.9);
    e = d * q / (1 - q);
  }
  return weighted_mean(e.clamp_max(std::sqrt(2.0)), sc);
}

Tensor svd_lowrank_prediction(const Ritz& z, int64_t N) {
  auto ratio = at::where(z.sc > 0, z.s_next.unsqueeze(-1) / z.sc, at::ones_like(z.sc)).clamp(0, 1);
  auto e = ratio.pow(double(2 * N + 1)).clamp_max(std::sqrt(2.0));
  return weighted_mean(e, z.sc);
}

// Per-matrix scale c [b, 1, 1] (float64) for the test vectors so that W c V and W^T W c V stay well
// inside float32's range: W^T W squares the weights' magnitude, so weights near 1e+-20 would
// overflow or underflow. One sync for the group; only pathological scales pay for a second look at W.
Tensor pass_scale(at::TensorList W, const Tensor& Y, const Tensor& Z, bool* redo) {
  const int64_t b = Y.size(0);
  auto Yf = Y.reshape({b, -1}), Zf = Z.reshape({b, -1});
  // amax propagates NaN and Inf, so the range tests below also reject non-finite Y and Z.
  auto s = Yf.abs().amax(-1).to(at::kDouble);  // |W V| for orthonormal V: about ||W|| in scale
  auto finite = at::isfinite(Zf.abs().amax(-1));
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
    const double amax = std::max(std::abs(std::get<0>(mm).item<double>()), std::abs(std::get<1>(mm).item<double>()));
    TORCH_CHECK_VALUE(std::isfinite(amax), "pissa_factors: W[", j, "] contains NaN or Inf");
    const double sj = s_cpu[j].item<double>();
    const double ref = std::isfinite(sj) && sj > 0 ? sj : amax;
    if (ref > 0) scale[j] = std::ldexp(1.0, -std::ilogb(ref));  // a power of two: exact scaling
  }
  return scale.view({b, 1, 1});
}

// (W Q, W^T W Q) for the basis Q on W's input side; on its output side (transposed), (W^T Q, W W^T Q):
// two reads of W, each as cheap as the fused one where the AMX passes run (gram_amx.cpp).
std::tuple<Tensor, Tensor> passes(at::TensorList W, const Tensor& Q, bool transposed) {
  if (!transposed) return call_gram(W, Q);
  auto Y = call_wtx(W, Q);
  return {Y, call_wx(W, Y)};
}

Factors oriented(Factors f, bool transposed) {
  if (transposed) std::swap(f.U, f.V);
  return f;
}

}  // namespace

// A host vector of int64 as a tensor on `device`: one copy whatever its length (at::tensor(vector)
// would make one call per element).
Tensor host_index(const std::vector<int64_t>& v, const at::Device& device) {
  auto t = at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::TensorOptions().dtype(at::kLong));
  return t.to(device, /*non_blocking=*/false, /*copy=*/true);
}

namespace {

}  // namespace

Factors fused_passes(at::TensorList W_all, const Tensor& omega, int64_t r, int64_t niter, bool krylov,
                     const std::string& normalizer, const Stopping& stop, bool want_estimate) {
  const auto acc = omega.scalar_type();
  const auto dev = omega.device();
  // Directions of W Q kept by the Rayleigh-Ritz step: sig comes from eigh(Y^T Y), whose absolute
  // error is about u64 ||Y||^2, i.e. sqrt(u64) ~ 1.5e-8 relative in sig; float32 passes add their
  // own 1e-7 relative error to Y, which 1/sig would amplify.
  const double keep_tol = acc == at::kDouble ? 1e-6 : 1e-3;
  // The basis lives on omega's side: n = W's columns, or its rows (transposed: then the passes are
  // Y = W^T Q, Z = W Y, and the roles of U and V swap at the end).
  const bool transposed = omega.size(1) != W_all[0].size(1);
  const int64_t b = omega.size(0), n = omega.size(1), l = omega.size(2), m = W_all[0].size(transposed ? 1 : 0);
  const auto f64 = omega.options().dtype(at::kDouble);
  const bool stopping = krylov && stop.active() && niter >= 1;
  const bool estimating = krylov && (want_estimate || stopping) && niter >= 1;

  // Outputs, filled as matrices finish (all at the last step unless they stop early).
  Factors out;
  out.U = at::empty({b, m, r}, f64);
  out.S = at::empty({b, r}, f64);
  out.V = at::empty({b, n, r}, f64);
  out.estimate = at::full({b}, -1.0, f64);
  out.niter_used.assign(b, niter);
  out.met.assign(b, !stopping);

  // The matrices still iterating: their weights, their positions in the group, their state.
  std::vector<Tensor> W(W_all.begin(), W_all.end());
  std::vector<int64_t> pos(b);
  for (int64_t j = 0; j < b; ++j) pos[j] = j;

  // A Gaussian test matrix is well conditioned (kappa below 6 for n >= 2 l), so where the Krylov basis
  // is kept in float32 (below) its first block is orthonormalized in float32 too.
  const bool f32_basis = krylov && acc == at::kFloat && normalizer == "cholqr2";
  Tensor Q = orthonormalize(omega.to(f32_basis ? at::kFloat : at::kDouble), normalizer);
  // c: the per-matrix pass scale, undefined when every matrix is fine unscaled (the usual case).
  // Pass outputs in the passes' dtype, and in float64 divided by c where a scale was needed.
  auto run = [&](const Tensor& Qi, const Tensor& c) {
    if (!c.defined()) return passes(W, Qi.to(acc), transposed);
    auto [Yi, Zi] = passes(W, (Qi * c).to(acc), transposed);
    return std::make_tuple(Yi.to(at::kDouble) / c, Zi.to(at::kDouble) / c);
  };
  auto [Yd, Zd] = run(Q, Tensor());
  bool redo = false;
  Tensor c = pass_scale(W, Yd, Zd, &redo);
  if (!redo) c = Tensor();
  if (redo) {
    std::tie(Yd, Zd) = run(Q, c);
    TORCH_CHECK_VALUE(at::isfinite(Zd).all().item<bool>(), "pissa_factors: a weight contains NaN or Inf");
  }
  // The Krylov basis, its images and their Gram matrices, preallocated: block i lives in columns
  // [i l, (i + 1) l). Q, Y and Z are stored in the passes' dtype (float32 for all but float64
  // weights): the passes' outputs Y and Z are float32 anyway, and the pass only ever sees Q rounded
  // to float32, so storing them in float64 adds nothing but memory (half of the peak extra memory of
  // a 4096 x 11008 weight). Only the pathological scales (c defined) keep float64: Y / c and Z / c
  // may be outside float32's range. The small steps widen them to float64 where they compute.
  const auto store_dt = c.defined() ? at::kDouble : acc;
  //
  // With a stopping criterion most matrices stop well before the cap (pissa_niter_16 weights mostly
  // at niter 4-5), and the first store into a [b, n, Lmax] tensor touches every one of its pages
  // (each row holds a piece of every block): a 5632 x 2048 weight at cap 16 faulted 14 MB in for
  // 5 blocks' use, about 3.5 ms. So the tall blocks start with room for kFirstBlocks and grow by
  // half when full; the Gram matrices (L x L) are allocated whole.
  constexpr int64_t kFirstBlocks = 6;
  const int64_t blocks = krylov ? niter + 1 : 1, Lmax = l * blocks;
  const auto sto = omega.options().dtype(store_dt);
  int64_t room = stopping ? std::min(blocks, kFirstBlocks) : blocks;
  auto Qall = at::empty({b, n, l * room}, sto), Yall = at::empty({b, m, l * room}, sto),
       Zall = at::empty({b, n, l * room}, sto);
  auto YY = at::empty({b, Lmax, Lmax}, f64), ZZ = at::empty({b, Lmax, Lmax}, f64);
  auto grow = [&](int64_t need) {
    if (need <= room) return;
    const int64_t used = l * room;
    room = std::min(blocks, std::max(need, room + room / 2));
    for (Tensor* t : {&Qall, &Yall, &Zall}) {
      auto bigger = at::empty({t->size(0), t->size(1), l * room}, t->options());
      bigger.narrow(-1, 0, used).copy_(*t);
      *t = bigger;
    }
  };
  auto store = [&](int64_t blk, const Tensor& Qi, const Tensor& Yi, const Tensor& Zi) {
    grow(blk + 1);
    Qall.narrow(-1, blk * l, l).copy_(Qi);
    Yall.narrow(-1, blk * l, l).copy_(Yi);
    Zall.narrow(-1, blk * l, l).copy_(Zi);
    // New block row and column of the Gram matrices (symmetric), in float64 from the exact widening
    // of the stored blocks.
    const int64_t L = (blk + 1) * l;
    // (the new block is the last l columns of the stored ones: widened with them, not separately)
    auto yy = tn_last_f64(Yall.narrow(-1, 0, L), l);  // [b, L, l]
    auto zz = tn_last_f64(Zall.narrow(-1, 0, L), l);
    YY.narrow(1, 0, L).narrow(2, blk * l, l).copy_(yy);
    YY.narrow(1, blk * l, l).narrow(2, 0, L).copy_(yy.mT());
    ZZ.narrow(1, 0, L).narrow(2, blk * l, l).copy_(zz);
    ZZ.narrow(1, blk * l, l).narrow(2, 0, L).copy_(zz.mT());
  };
  store(0, Q, Yd, Zd);

  Ritz prev, cur;
  Tensor d_prev, est;
  bool have_prev = false;
  // Finish the matrices at active positions `which`: their factors from the current Ritz step.
  auto finish = [&](const std::vector<int64_t>& which, int64_t L, int64_t used) {
    std::vector<int64_t> orig;
    for (auto w : which) orig.push_back(pos[w]);
    auto oidx = host_index(orig, dev);
    // All the active matrices at once (the usual case) read the basis where it is: no copy of it.
    const bool all = which.size() == W.size();
    auto idx = all ? Tensor() : host_index(which, dev);
    auto pick = [&](const Tensor& t) { return all ? t : t.index_select(0, idx); };
    auto [U, S, V] = ritz_vectors(all ? cur : select(cur, idx), pick(Qall).narrow(-1, 0, L), pick(Yall).narrow(-1, 0, L),
                                  pick(Zall).narrow(-1, 0, L));
    out.U.index_copy_(0, oidx, U);
    out.S.index_copy_(0, oidx, S);
    out.V.index_copy_(0, oidx, V);
    if (est.defined()) out.estimate.index_copy_(0, oidx, pick(est));
    for (auto o : orig) out.niter_used[o] = used;
  };

  for (int64_t i = 0; i <= niter; ++i) {
    const int64_t blk = krylov ? i : 0;
    if (i > 0) {
      // No heap trim here (only at the end of the call, factors.cpp): trimming between passes kept
      // a 7B layer's peak extra memory about a point lower (9.7 % without it), but the pages it
      // handed back were faulted in again by the next step, about 10 ms of a 35 ms 4096^2
      // decomposition (benchmarks/RESULTS.md).
      auto Zprev = Zall.narrow(-1, (krylov ? i - 1 : 0) * l, l);
      // The first projection's coefficients Q_{<i}^T Z_{i-1} = Q_{<i}^T W^T W Q_{i-1} = Y_{<i}^T Y_{i-1}:
      // the last block column of Y^T Y, computed by store() already.
      Tensor Qn = krylov ? orthonormalize_against(Zprev, Qall.narrow(-1, 0, i * l), normalizer,
                                                  YY.narrow(1, 0, i * l).narrow(2, (i - 1) * l, l))
                         : orthonormalize(Zprev.to(at::kDouble), normalizer);
      auto [Yi, Zi] = run(Qn, c);
      store(blk, Qn, Yi, Zi);
    }
    const int64_t L = (blk + 1) * l;
    const bool last = i == niter;
    const bool need_ritz = last || stopping || (estimating && i >= niter - 2);
    if (!need_ritz) continue;
    auto YYi = YY.narrow(1, 0, L).narrow(2, 0, L), ZZi = ZZ.narrow(1, 0, L).narrow(2, 0, L);
    cur = ritz(YYi, ZZi, r, keep_tol);
    if (estimating && have_prev) {
      auto d = ritz_change(prev, cur, YYi, ZZi);
      est = error_estimate(d, d_prev, cur.sc);
      d_prev = d;
    }
    prev = cur;
    have_prev = true;
    if (!stopping || !est.defined()) {
      if (last) break;
      continue;
    }
    // Which matrices are done: one transfer of b flags to the host, whatever b is.
    Tensor target = at::full_like(est, std::numeric_limits<double>::infinity());
    if (stop.tol > 0) target = target.clamp_max(stop.tol);
    if (stop.like_svd_lowrank >= 0) target = at::minimum(target, svd_lowrank_prediction(cur, stop.like_svd_lowrank));
    auto done = (est <= target).to(at::kCPU);
    auto flags = done.accessor<bool, 1>();
    std::vector<int64_t> fin, rest;
    for (int64_t j = 0; j < done.size(0); ++j) {
      (flags[j] ? fin : rest).push_back(j);
      if (flags[j]) out.met[pos[j]] = true;
    }
    if (last) break;
    if (fin.empty()) continue;
    finish(fin, L, i);
    if (rest.empty()) return oriented(std::move(out), transposed);
    // Keep iterating on the others only.
    auto keep = host_index(rest, dev);
    std::vector<Tensor> Wk;
    std::vector<int64_t> pk;
    for (auto j : rest) {
      Wk.push_back(W[j]);
      pk.push_back(pos[j]);
    }
    W = std::move(Wk);
    pos = std::move(pk);
    Qall = Qall.index_select(0, keep);
    Yall = Yall.index_select(0, keep);
    Zall = Zall.index_select(0, keep);
    YY = YY.index_select(0, keep);
    ZZ = ZZ.index_select(0, keep);
    if (c.defined()) c = c.index_select(0, keep);
    prev = select(prev, keep);
    cur = prev;
    est = est.index_select(0, keep);
    d_prev = d_prev.index_select(0, keep);
  }
  std::vector<int64_t> all(W.size());
  for (size_t j = 0; j < all.size(); ++j) all[j] = int64_t(j);
  finish(all, krylov ? l * (niter + 1) : l, niter);
  return oriented(std::move(out), transposed);
}

// Top-r SVD of C [b, k, n] given as C = P^T W for an orthonormal P [b, m, k]: U = P Uc.
static Factors svd_of_projection(const Tensor& P, const Tensor& C, int64_t r) {
  auto [ev, Uc] = small_eigh(at::bmm(C, C.mT()));
  const int64_t k = ev.size(-1);
  auto top = at::arange(k - 1, k - 1 - r, -1, ev.options().dtype(at::kLong));
  auto s = ev.index_select(-1, top).clamp_min(0).sqrt();
  Uc = Uc.index_select(-1, top);
  auto inv = at::where(s > 0, s.reciprocal(), at::zeros_like(s));
  auto V = at::bmm(C.mT(), Uc) * inv.unsqueeze(-2);
  Factors f;
  f.U = at::bmm(P, Uc);
  f.S = s;
  f.V = V;
  return f;
}

Factors halko(at::TensorList W, const Tensor& omega, int64_t r, int64_t niter, const std::string& normalizer) {
  const auto acc = omega.scalar_type();
  Tensor Q = orthonormalize(omega.to(at::kDouble), normalizer);
  Tensor Y = call_wx(W, Q.to(acc));
  if (!at::isfinite(Y).all().item<bool>()) {
    for (size_t j = 0; j < W.size(); ++j) {
      auto mm = at::aminmax(W[j]);
      TORCH_CHECK_VALUE(std::isfinite(std::get<0>(mm).item<double>()) && std::isfinite(std::get<1>(mm).item<double>()),
                        "pissa_factors: W[", j, "] contains NaN or Inf");
    }
  }
  Tensor P = orthonormalize(Y.to(at::kDouble), normalizer);
  for (int64_t i = 0; i < niter; ++i) {
    Q = orthonormalize(call_wtx(W, P.to(acc)).to(at::kDouble), normalizer);
    P = orthonormalize(call_wx(W, Q.to(acc)).to(at::kDouble), normalizer);
  }
  Tensor C = call_wtx(W, P.to(acc)).to(at::kDouble).mT();  // P^T W
  Factors f = svd_of_projection(P, C, r);
  f.niter_used.assign(W.size(), niter);
  f.met.assign(W.size(), true);
  f.estimate = at::full({int64_t(W.size())}, -1.0, f.S.options());
  return f;
}

}  // namespace pissa_fast
