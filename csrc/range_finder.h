// The randomized range finders of pissa_factors: block Krylov and subspace iteration on the fused
// gram pass (with the accuracy estimate and per-matrix stopping), and torch.svd_lowrank's algorithm.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace pissa_fast {

struct Factors {
  at::Tensor U, S, V;  // [b, m, r], [b, r], [b, n, r], float64
  std::vector<int64_t> niter_used;  // per matrix
  at::Tensor estimate;              // [b] float64: estimated l1_rel (-1 where none was made)
  std::vector<bool> met;            // per matrix: its stopping target was met (true when not stopping)
};

// When to stop early, per matrix (krylov only). A matrix stops at the first niter >= 1 whose
// estimate is at most its target: tol if tol > 0, and the predicted error of torch.svd_lowrank(q = r,
// niter = like_svd_lowrank) on a matrix with the current Ritz values if like_svd_lowrank >= 0
// (the smaller of the two when both are given). Neither: run to niter.
struct Stopping {
  double tol = 0.0;
  int64_t like_svd_lowrank = -1;
  bool active() const { return tol > 0.0 || like_svd_lowrank >= 0; }
};

// omega [b, n, l] puts the Krylov basis on W's input side; omega [b, m, l] (m != n) on its output side,
// where the small steps are cheaper when m < n. The factors come back in W's orientation either way.
Factors fused_passes(at::TensorList W, const at::Tensor& omega, int64_t r, int64_t niter, bool krylov,
                     const std::string& normalizer, const Stopping& stop, bool want_estimate);

at::Tensor host_index(const std::vector<int64_t>& v, const at::Device& device);

Factors halko(at::TensorList W, const at::Tensor& omega, int64_t r, int64_t niter, const std::string& normalizer);

}  // namespace pissa_fast
