// Small dense steps of pissa_factors: thread control, pass calls, CholeskyQR2 with a shifted
// fallback, batched small eigenproblems. See small_dense.h.
#include "small_dense.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <strings.h>
#include <limits>

namespace pissa_fast {

using at::Tensor;

namespace {
thread_local int full_threads = 0;
}

SmallStepsOnOneThread::SmallStepsOnOneThread(bool cpu) : owner(full_threads == 0) {
  const int n = at::get_num_threads();
  if (cpu && n > 1 && full_threads == 0) {
    full_threads = n;
    at::set_num_threads(1);
  } else {
    owner = false;
  }
}

SmallStepsOnOneThread::~SmallStepsOnOneThread() {
  if (owner && full_threads > 0) {
    at::set_num_threads(full_threads);
    full_threads = 0;
  }
}

AllThreads::AllThreads(bool on) : on(on && full_threads > 1) {
  if (this->on) at::set_num_threads(full_threads);
}

AllThreads::~AllThreads() {
  if (on) at::set_num_threads(1);
}

bool pass_wants_threads(at::TensorList W) { return !W.empty() && W[0].numel() >= (int64_t(1) << 20); }

bool small_steps_want_threads(at::TensorList W, int64_t l) {
  static const bool passive = [] {
    const char* v = std::getenv("OMP_WAIT_POLICY");
    return v != nullptr && strcasecmp(v, "passive") == 0;
  }();
  return l >= 64 && !passive && pass_wants_threads(W);
}

namespace {
std::mutex heap_mutex;
int heap_defer_depth = 0;
bool heap_release_pending = false;
int64_t heap_releases = 0;

void release_free_heap() {
  {
    std::lock_guard<std::mutex> lock(heap_mutex);
    ++heap_releases;
  }
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}
}  // namespace

ReleaseFreeHeap::~ReleaseFreeHeap() {
  if (!on) return;
  {
    std::lock_guard<std::mutex> lock(heap_mutex);
    if (heap_defer_depth > 0) {
      heap_release_pending = true;
      return;
    }
  }
  release_free_heap();
}

int64_t defer_heap_release(int64_t mode) {
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(heap_mutex);
    if (mode == 1) {
      ++heap_defer_depth;
    } else if (mode == 0) {
      TORCH_CHECK(heap_defer_depth > 0, "_defer_heap_release(0) without a matching _defer_heap_release(1)");
      release = --heap_defer_depth == 0 && heap_release_pending;
      if (release) heap_release_pending = false;
    } else {
      TORCH_CHECK(mode == -1, "_defer_heap_release: mode must be 1 (open), 0 (close) or -1 (query), got ", mode);
    }
  }
  if (release) release_free_heap();
  std::lock_guard<std::mutex> lock(heap_mutex);
  return heap_releases;
}

std::tuple<Tensor, Tensor> call_gram(at::TensorList W, const Tensor& V) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::gram", "")
                       .typed<std::tuple<Tensor, Tensor>(at::TensorList, const Tensor&)>();
  auto Vc = V.contiguous();
  AllThreads all(pass_wants_threads(W));
  return op.call(W, Vc);
}

Tensor call_wx(at::TensorList W, const Tensor& X) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::wx", "")
                       .typed<Tensor(at::TensorList, const Tensor&)>();
  auto Xc = X.contiguous();
  AllThreads all(pass_wants_threads(W));
  return op.call(W, Xc);
}

Tensor call_wtx(at::TensorList W, const Tensor& Y) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pissa_fast::wtx", "")
                       .typed<Tensor(at::TensorList, const Tensor&)>();
  auto Yc = Y.contiguous();
  AllThreads all(pass_wants_threads(W));
  return op.call(W, Yc);
}

namespace {

// One CholeskyQR sweep: X = Q R with R from the Cholesky factor of X^T X. Where the Gram matrix of
// some matrix of the group is not numerically positive definite, the whole group is redone with a
// shift on those matrices only: s = 11 (n k + k (k + 1)) u ||X||_F^2 (Fukaya, Kannan, Nakatsukasa,
// Yamamoto, Yanagisawa 2020), which makes the Cholesky succeed and leaves Q with condition number
// about u^-1/2, so two more plain sweeps make it orthonormal. One host sync per sweep, for the whole
// group. Returns (Q, whether any matrix needed the shift).
// With ill_below > 0, also *ill: whether some matrix has a Cholesky factor whose smallest diagonal
// entry is below ill_below times its largest (then X's condition number is at least 1 / ill_below),
// or failed; in the same host sync.
std::pair<Tensor, bool> cholqr_sweep(const Tensor& X, double ill_below = 0, bool* ill = nullptr) {
  auto G = at::bmm(X.mT(), X);
  auto [L, info] = at::linalg_cholesky_ex(G);
  bool failed;
  if (ill != nullptr) {
    auto d = L.diagonal(0, -2, -1);
    auto fail = info.ne(0);
    auto bad = fail | (std::get<0>(d.min(-1)) < std::get<0>(d.max(-1)) * ill_below);
    const int flags = (fail.any().to(at::kInt) + 2 * bad.any().to(at::kInt)).item<int>();
    failed = flags & 1;
    *ill = flags & 2;
  } else {
    failed = info.any().item<bool>();
  }
  if (failed) {
    const int64_t n = X.size(-2), k = X.size(-1);
    const bool f64 = X.scalar_type() == at::kDouble;
    const double u = f64 ? std::numeric_limits<double>::epsilon() / 2 : std::numeric_limits<float>::epsilon() / 2;
    const double c = 11.0 * double(n * k + k * (k + 1)) * u;
    auto fro2 = G.diagonal(0, -2, -1).sum(-1);  // ||X||_F^2 per matrix
    // The floor makes an all-zero block well defined: G + s I = s I, Q = X / sqrt(s) = 0.
    auto shift = at::where(info.ne(0), (fro2 * c).clamp_min(f64 ? 1e-280 : 1e-30), at::zeros_like(fro2));
    auto eye = at::eye(k, G.options());
    G = G + eye * shift.view({-1, 1, 1});
    L = std::get<0>(at::linalg_cholesky_ex(G));
  }
  auto Q = at::linalg_solve_triangular(L.mH(), X, /*upper=*/true, /*left=*/false);
  return {Q, failed};
}

bool host_eigh() {
  static const bool host = [] {
    const char* v = std::getenv("PISSA_FAST_SMALL_EIGH");
    return !(v != nullptr && std::strcmp(v, "device") == 0);
  }();
  return host;
}

}  // namespace

Tensor orthonormalize(const Tensor& X, const std::string& normalizer) {
  if (normalizer == "qr") return std::get<0>(at::linalg_qr(X));
  auto [Q, shifted] = cholqr_sweep(X);
  Q = cholqr_sweep(Q).first;
  if (shifted) Q = cholqr_sweep(Q).first;  // shifted CholeskyQR3 for the hard matrices
  return Q;
}

namespace {

// Rows of A per chunk: about 256 KiB of float64 per matrix (it stays in the core's L2 cache between
// the widening copy and the GEMM that reads it); all of them when A is float64 or its float64 copy
// is at most 1 MiB (one call beats several there). Independent of the group size, so that a group
// makes the same calls as one matrix.
constexpr int64_t kChunkBytes = int64_t(1) << 18, kWholeBytes = int64_t(1) << 20;

int64_t wide_rows(const Tensor& A) {
  const int64_t n = A.size(1);
  if (A.scalar_type() == at::kDouble) return n;
  const int64_t per_row = std::max<int64_t>(1, A.size(2) * 8);
  if (n * per_row <= kWholeBytes) return n;
  return std::max<int64_t>(16, std::min<int64_t>(n, kChunkBytes / per_row));
}

// The chunks of rows [0, n) in fixed contiguous runs, one run per task: fn(task, begin, end). On the CPU the
// runs go to the threads (one parallel region, where a loop of ATen calls would pay a barrier per
// call); the split depends only on n, R and the thread count, so results are reproducible.
template <typename Fn>
int64_t over_runs(const Tensor& like, int64_t n, int64_t R, Fn fn) {
  const int64_t chunks = (n + R - 1) / R;
  const int64_t tasks = like.is_cpu() ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)) : 1;
  auto run = [&](int64_t t) { fn(t, std::min(n, chunks * t / tasks * R), std::min(n, chunks * (t + 1) / tasks * R)); };
  if (tasks == 1) {
    run(0);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) run(t);
    });
  }
  return tasks;
}

// out = Y - A C (Y defined) or A C, chunk by chunk of rows, each chunk widened into a buffer reused
// within its run (a fresh tensor per chunk would be a fresh mapping, page-faulted each time).
Tensor nn_rows(const Tensor* Y, const Tensor& A, const Tensor& C) {
  const int64_t n = A.size(1), R = wide_rows(A);
  if (R >= n) {
    auto Aw = A.to(at::kDouble);
    return Y ? at::baddbmm(*Y, Aw, C, 1, -1) : at::bmm(Aw, C);
  }
  auto out = Y ? Y->clone(at::MemoryFormat::Contiguous) : at::empty({A.size(0), n, C.size(-1)}, C.options());
  over_runs(A, n, R, [&](int64_t, int64_t i0, int64_t i1) {
    auto buf = at::empty({A.size(0), R, A.size(2)}, C.options());
    for (int64_t i = i0; i < i1; i += R) {
      const int64_t k = std::min(R, i1 - i);
      auto a = buf.narrow(1, 0, k);
      a.copy_(A.narrow(1, i, k));
      // beta 0 ignores what an uninitialized out holds (NaN included).
      out.narrow(1, i, k).baddbmm_(a, C, Y ? 1 : 0, Y ? -1 : 1);
    }
  });
  return out;
}

// A^T B in float64, chunk by chunk of A's rows, each chunk widened once into a buffer reused within its
// run; b_rows(a, i, k) is B's rows [i, i + k) given A's widened chunk a (B [b, n, cols] float64).
template <typename BRows>
Tensor tn_rows(const Tensor& A, int64_t cols, BRows b_rows) {
  const int64_t n = A.size(1), R = wide_rows(A);
  const auto f64 = A.options().dtype(at::kDouble);
  const int64_t chunks = (n + R - 1) / R;
  const int64_t most = A.is_cpu() ? std::min<int64_t>(at::get_num_threads(), chunks) : 1;
  // One partial sum per run, added in run order.
  auto part = at::zeros({std::max<int64_t>(1, most), A.size(0), A.size(2), cols}, f64);
  const int64_t tasks = over_runs(A, n, R, [&](int64_t t, int64_t i0, int64_t i1) {
    auto buf = at::empty({A.size(0), std::min(R, n), A.size(2)}, f64);
    auto acc = part[t];
    for (int64_t i = i0; i < i1; i += R) {
      const int64_t k = std::min(R, i1 - i);
      auto a = buf.narrow(1, 0, k);
      a.copy_(A.narrow(1, i, k));
      acc.baddbmm_(a.mT(), b_rows(a, i, k));
    }
  });
  auto out = part[0];
  for (int64_t t = 1; t < tasks; ++t) out = out + part[t];
  return out;
}

}  // namespace

Tensor tn_f64(const Tensor& A, const Tensor& B) {
  if (wide_rows(A) >= A.size(1)) return at::bmm(A.to(at::kDouble).mT(), B);
  return tn_rows(A, B.size(2), [&](const Tensor&, int64_t i, int64_t k) { return B.narrow(1, i, k); });
}

Tensor tn_last_f64(const Tensor& A, int64_t l) {
  const int64_t L = A.size(2);
  if (wide_rows(A) >= A.size(1)) {
    auto Aw = A.to(at::kDouble);
    return at::bmm(Aw.mT(), Aw.narrow(-1, L - l, l));
  }
  return tn_rows(A, l, [&](const Tensor& a, int64_t, int64_t) { return a.narrow(-1, L - l, l); });
}

Tensor nn_f64(const Tensor& A, const Tensor& C) { return nn_rows(nullptr, A, C); }

Tensor minus_nn_f64(const Tensor& Y, const Tensor& A, const Tensor& C) { return nn_rows(&Y, A, C); }

// Smallest Cholesky diagonal, relative to the largest, that the float32 path accepts: a condition
// number of X below about 1e3, where float32 CholeskyQR leaves an orthogonality error of u32 k^2 ~ 6e-2,
// which the second sweep removes.
constexpr double kFloat32IllBelow = 1.0 / 1024;

Tensor orthonormalize_against(const Tensor& X, const Tensor& Qprev, const std::string& normalizer,
                              const Tensor& coeffs) {
  // In float32 (X and Qprev both float32) the products run as they are; in float64 Qprev is widened
  // a chunk at a time.
  const bool f32 = X.scalar_type() == at::kFloat;
  TORCH_CHECK(!f32 || Qprev.scalar_type() == at::kFloat, "orthonormalize_against: float32 X needs a float32 Qprev");
  auto tn = [&](const Tensor& Y) { return f32 ? at::bmm(Qprev.mT(), Y) : tn_f64(Qprev, Y); };
  auto minus_nn = [&](const Tensor& Y, const Tensor& C) {
    return f32 ? at::baddbmm(Y, Qprev, C, 1, -1) : minus_nn_f64(Y, Qprev, C);
  };
  auto project = [&](const Tensor& Y) { return minus_nn(Y, tn(Y)); };
  if (normalizer == "qr") {  // the reference: in float64 throughout
    if (f32) return orthonormalize_against(X.to(at::kDouble), Qprev, normalizer, coeffs);
    return orthonormalize(project(orthonormalize(project(X), normalizer)), normalizer);
  }
  // Block Gram-Schmidt twice with one CholeskyQR sweep each (BCGS2): the second projection and
  // sweep are the reorthogonalization that CholeskyQR2's second sweep would be. A block the
  // projection nearly annihilated takes the shifted path, and one more sweep after it. Coefficients
  // known to rounding error may replace the first projection's: the second one removes what they
  // leave, as it removes the first Gram-Schmidt's own rounding.
  auto first = coeffs.defined() ? minus_nn(X, coeffs.to(X.scalar_type())) : project(X);
  // float32 CholeskyQR2 makes a basis orthonormal to float32's rounding only while the block's
  // condition number stays below about u32^-1/2 (4e3). A block that the projection left nearly
  // rank-deficient (W's rank reached, or converged directions) is redone in float64.
  bool ill = false;
  auto [Q, shifted] = cholqr_sweep(first, f32 ? kFloat32IllBelow : 0.0, f32 ? &ill : nullptr);
  if (ill) return orthonormalize_against(X.to(at::kDouble), Qprev, normalizer, coeffs);
  if (shifted) Q = cholqr_sweep(Q).first;
  auto [Q2, shifted2] = cholqr_sweep(project(Q));
  if (shifted2) Q2 = cholqr_sweep(Q2).first;
  return Q2;
}

// On CUDA, torch.linalg.eigh runs a stack of L x L problems through cuSOLVER one matrix at a time
// (batched Jacobi only for L <= 32), each a chain of small kernels: the issue that asked for this
// estimated 2-7 ms per matrix, unmeasured here (no GPU was available). LAPACK on the host solves an
// 80 x 80 problem in about 0.3 ms (measured on this project's CPU), and the transfer is L^2 doubles
// per matrix. So the stack crosses to the host in one transfer each way. PISSA_FAST_SMALL_EIGH=device
// keeps it on the GPU, to measure the other choice.
std::tuple<Tensor, Tensor> small_eigh(const Tensor& G) {
  if (G.is_cuda() && host_eigh()) {
    auto [ev, vec] = at::linalg_eigh(G.to(at::kCPU, at::kDouble));
    return {ev.to(G.device()), vec.to(G.device())};
  }
  return at::linalg_eigh(G);
}

}  // namespace pissa_fast
