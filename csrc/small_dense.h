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

// On CPU the small dense steps (tens of ATen calls on n x l and L x L tensors per pass) run on one
// thread, and the passes over W get every thread back while they run (AllThreads). Each parallel
// region of a small step costs a barrier over all threads, and with OMP_WAIT_POLICY=PASSIVE a wake-up
// of each sleeping thread: more than most of these operations gain. Only the wide blocks (l >= 64) of
// a big weight keep the threads, and only while they spin (not under PASSIVE): there the float64
// GEMMs are large enough. Measurements: benchmarks/RESULTS.md, "Small steps and threads".
struct SmallStepsOnOneThread {
  explicit SmallStepsOnOneThread(bool cpu);
  ~SmallStepsOnOneThread();
  bool owner;
};

// Every thread, for the duration of a pass over W (or a full SVD); `on` false keeps the one thread.
struct AllThreads {
  explicit AllThreads(bool on = true);
  ~AllThreads();
  bool on;
};

// Whether a pass over W is big enough to gain from more threads: below 2^20 elements per matrix a
// pass (a few MFLOP) is latency-bound, and on the project's 2-core machine with OMP_WAIT_POLICY=PASSIVE
// waking the second thread for each parallel region cost more than it saved (576 x 576 bf16, r 16,
// niter 4: 6.3-6.5 ms per decompose on 1 thread, 8.2-9.5 ms on 2; benchmarks/RESULTS.md).
bool pass_wants_threads(at::TensorList W);

// Whether the small steps of W with blocks of l columns keep every thread (see SmallStepsOnOneThread).
bool small_steps_want_threads(at::TensorList W, int64_t l);

// Hands the free pages of the C heap back to the system when it goes out of scope (glibc's
// malloc_trim; a no-op elsewhere or when `on` is false). glibc serves allocations below its dynamic
// mmap threshold (raised to the largest block freed so far, often several MiB once a model is loaded)
// from the heap, whose freed pages stay resident: the float64 temporaries of one weight's small steps
// then left holes that the next weight's did not fit, and one bf16 LLaMA-2-7B layer in place peaked
// at 15 % extra resident memory instead of the 8 % its tensors reach (benchmarks/RESULTS.md).
//
// Inside a defer_heap_release(1) ... (0) bracket (decompose_many over many weights, the peft
// backend's injection) the release waits for the bracket's end: the next weight reuses the freed pages
// instead of faulting fresh ones in (8-10 % of a TinyLlama layer's decomposition), and the pages still
// go back once the batch is done. One LLaMA-2-7B layer in place peaked at 6.7 % extra (6.4-6.9 % before).
struct ReleaseFreeHeap {
  explicit ReleaseFreeHeap(bool on) : on(on) {}
  ~ReleaseFreeHeap();
  bool on;
};

// mode 1 opens a bracket of deferred heap releases, 0 closes one (brackets nest; the outermost close
// releases the heap if any call inside wanted it to), -1 only asks. Returns how many releases the
// process has made so far (for tests).
int64_t defer_heap_release(int64_t mode);

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

// X's columns made orthonormal against the orthonormal Qprev (block Gram-Schmidt, twice). X float64:
// Qprev may be stored in float32 (it is widened a row chunk at a time), the result is float64. X and
// Qprev float32: the work is float32 and so is the result, except for a block too ill-conditioned
// for float32 CholeskyQR2, which is redone in float64 (a float64 result). coeffs,
// where defined, is Qprev^T X to within rounding error, known by other means: cholqr2 then skips
// computing it for the first projection.
at::Tensor orthonormalize_against(const at::Tensor& X, const at::Tensor& Qprev, const std::string& normalizer,
                                  const at::Tensor& coeffs = at::Tensor());

// Products with a tall block A [b, n, L] of any floating dtype, computed in float64 with A widened a
// row chunk (about 1 MiB of float64) at a time: a float32-stored Krylov block never has a full
// float64 copy. A float64 A, or one whose float64 copy fits in a chunk, takes one call.
at::Tensor tn_f64(const at::Tensor& A, const at::Tensor& B);  // A^T B, B [b, n, k] float64
// A^T A[.., L - l:] for A [b, n, L]: a Gram matrix's new block column, A widened a chunk at a time.
at::Tensor tn_last_f64(const at::Tensor& A, int64_t l);
at::Tensor nn_f64(const at::Tensor& A, const at::Tensor& C);  // A C, C [b, L, k] float64
at::Tensor minus_nn_f64(const at::Tensor& Y, const at::Tensor& A, const at::Tensor& C);  // Y - A C

// Symmetric eigendecomposition of a stack of small matrices, ascending, in one call. On CUDA the
// stack goes to the host in one transfer (see small_dense.cpp for why), unless
// PISSA_FAST_SMALL_EIGH=device.
std::tuple<at::Tensor, at::Tensor> small_eigh(const at::Tensor& G);

}  // namespace pissa_fast
