// pissa_fast op schemas, in one place, and the stub that makes the shared library importable.
//
// Every op takes a *list* of weights that share shape, dtype and device, and stacked small
// factors [b, ...]: a single matrix is a list of one, and a group of same-shape layers is one call
// (one launch per pass on CUDA). Weights are read in their own dtype; factors are float32
// (float64 for float64 weights).
#include <torch/library.h>

#ifdef PISSA_FAST_CUDA_ARCHS
#define PISSA_FAST_BUILD "cuda:" PISSA_FAST_CUDA_ARCHS
#else
#define PISSA_FAST_BUILD "cpu"
#endif

#ifndef PISSA_FAST_NO_PYTHON  // the CMake (libtorch) build has no Python module
#include <Python.h>

extern "C" {
// `import pissa_fast._C` only has to load the library so the TORCH_LIBRARY blocks run; the module
// carries one attribute, what was compiled in ("cpu" or "cuda:<archs>").
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod != nullptr && PyModule_AddStringConstant(mod, "build", PISSA_FAST_BUILD) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
}
#endif

namespace pissa_fast {

TORCH_LIBRARY(pissa_fast, m) {
  // Y[i] = W[i] @ X[i]            X: [b, n, k] -> Y: [b, m, k]
  m.def("wx(Tensor[] W, Tensor X) -> Tensor");
  // Z[i] = W[i]^T @ Y[i]          Y: [b, m, k] -> Z: [b, n, k]
  m.def("wtx(Tensor[] W, Tensor Y) -> Tensor");
  // (Y, Z) with Y[i] = W[i] @ V[i], Z[i] = W[i]^T @ Y[i], reading each block of W once.
  m.def("gram(Tensor[] W, Tensor V) -> (Tensor, Tensor)");
  // W[i] -= B[i] @ A[i] in W's own storage and dtype, float32 accumulation.
  m.def("residual_(Tensor(a!)[] W, Tensor B, Tensor A) -> ()");
  // out[i] = W[i] - B[i] @ A[i], new contiguous tensors in W's dtype.
  m.def("residual(Tensor[] W, Tensor B, Tensor A) -> Tensor[]");
  // The PiSSA factors of every W[i]: A [b, r, n] = sqrt(S) V^T, B [b, m, r] = U sqrt(S), S [b, r].
  // method: "krylov" | "subspace" | "halko" | "exact"; normalizer: "qr" | "cholqr2".
  // omega [b, n, l] is the random test matrix (l = r + oversampling), drawn by the caller; krylov and
  // subspace also take [b, m, l] (m != n), which puts the basis on W's output side.
  // niter is a cap when a stopping criterion is given (krylov): a matrix stops at the first niter
  // whose estimated l1_rel error is <= tol (if tol > 0) and <= the error predicted for
  // torch.svd_lowrank(q = rank, niter = like_svd_lowrank) (if >= 0). niter_used [b] (int64; -1 for
  // the exact SVD) and estimate [b] (the estimated l1_rel; -1 where none was made; made when
  // stopping or when `estimate` is set, krylov only) say what each matrix got. A cap whose working
  // subspace would reach min(m, n) runs to the largest niter that fits instead, and the matrices that
  // did not meet their target there get the exact SVD.
  m.def(
      "pissa_factors(Tensor[] W, Tensor omega, int rank, int niter, str method, str normalizer,"
      " float tol=0., int like_svd_lowrank=-1, bool estimate=False)"
      " -> (Tensor A, Tensor B, Tensor S, Tensor niter_used, Tensor estimate)");

  // The ATen/cuBLAS implementation of the five passes above (csrc/passes_aten.h), by name, on CPU
  // and CUDA whatever the switch below says: for tests and benchmarks.
  m.def("wx_aten(Tensor[] W, Tensor X) -> Tensor");
  m.def("wtx_aten(Tensor[] W, Tensor Y) -> Tensor");
  m.def("gram_aten(Tensor[] W, Tensor V) -> (Tensor, Tensor)");
  m.def("residual_aten_(Tensor(a!)[] W, Tensor B, Tensor A) -> ()");
  m.def("residual_aten(Tensor[] W, Tensor B, Tensor A) -> Tensor[]");
  // Which implementation wx/wtx/gram/residual(_) run on CUDA tensors (csrc/cuda_passes.h):
  // impl "aten" | "kernels" | "default"; get returns (setting, what a call on `device` runs now).
  m.def("set_cuda_passes(str impl) -> ()");
  m.def("get_cuda_passes(int device=-1) -> (str, str)");
  // The bf16 gram pass on AMX tiles (csrc/cpu/gram_amx.h): mode 1 on where the CPU has it (the default
  // unless PISSA_FAST_CPU_AMX=0), 0 off, -1 query; returns whether it is on now.
  m.def("_cpu_amx(int mode=-1) -> bool");
  // Brackets a batch of pissa_factors calls whose heap release (small_dense.h, ReleaseFreeHeap) waits
  // for the batch's end: 1 opens, 0 closes (nested: the outermost close releases), -1 asks; returns
  // the number of releases made so far.
  m.def("_defer_heap_release(int mode=-1) -> int");
  // Test hooks: the row-block size and the code path of the CPU registration of the *_aten ops.
  m.def("_set_aten_cpu_config(int block_bytes, bool native) -> ()");
  m.def("_get_aten_cpu_config() -> (int, bool)");
}

}  // namespace pissa_fast
