// The small dense steps of pissa_factors, device-generic ATen on stacked float64 factors [b, ., .].
//
// Batched by construction: every function takes a group of b matrices and makes the same number of
// ATen calls and host synchronizations whatever b is. Factorizations (Cholesky, eigh) only ever see
// matrices whose two dimensions are both at most the basis width; the tall n x l blocks only go
// through GEMMs and triangular solves.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace pissa_fast {

// On CPU the small dense steps (tens of ATen calls on n x l and L x L tensors) are latency-bound:
// each parallel region costs a barrier over all threads, which on a busy machine costs far more than
// the work. They run on one thread; the passes over W get every thread back while they run.
struct SmallStepsOnOneThread {
  explicit SmallStepsOnOneThread(bool cpu);
  ~SmallStepsOnOneThread();
  bool owner;
};

// Every thread, for the duration of a pass over W (or a full SVD).
struct AllThreads {
  AllThreads();
  ~AllThreads();
};

// The passes over the weights, through the dispatcher (CPU or CUDA kernels).
std::tuple<at::Tensor, at::Tensor> call_gram(at::TensorList W, const at::Tensor& V);
at::Tensor call_wx(at::TensorList W, const at::Tensor& X);
at::Tensor call_wtx(at::TensorList W, const at::Tensor& Y);

// Orthonormal basis of the columns of X [b, n, k] (float64). normalizer "cholqr2": CholeskyQR2,
// with the shifted CholeskyQR3 of Fukaya et al. (2020) for the matrices of the group whose Gram
// matrix is numerically singular; columns of X that are exactly dependent come out as zero
// columns (harmless downstream: they add nothing to any span). "qr": Householder (linalg_qr), the
// reference; it factorizes the tall block itself.
at::Tensor orthonormalize(const at::Tensor& X, const std::string& normalizer);

// X's columns made orthonormal against the orthonormal Qprev (block Gram-Schmidt, twice).
at::Tensor orthonormalize_against(const at::Tensor& X, const at::Tensor& Qprev, const std::string& normalizer);

// Symmetric eigendecomposition of a stack of small matrices, ascending, in one call. On CUDA the
// stack goes to the host in one transfer (see small_dense.cpp for why), unless
// PISSA_FAST_SMALL_EIGH=device.
std::tuple<at::Tensor, at::Tensor> small_eigh(const at::Tensor& G);

}  // namespace pissa_fast
