// Shared argument checks for every pissa_fast op: each message names the op, the argument,
// what was expected and what was seen, so a failure deep in a batched call is still readable.
#pragma once
#include <ATen/ATen.h>

#define PF_CHECK(cond, op, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

namespace pissa_fast {

// Weights may be float32, float64, bfloat16 or float16; factors are float32 (float64 for float64 weights).
inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline at::ScalarType acc_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A list of weights sharing shape, dtype and device, each with unit column stride (row-major rows,
// any row stride >= n), which is what the kernels read.
inline void check_weight_list(const char* op, at::TensorList W) {
  PF_CHECK(!W.empty(), op, "W must hold at least one matrix, got an empty list");
  const auto& w0 = W[0];
  for (size_t i = 0; i < W.size(); ++i) {
    const auto& w = W[i];
    PF_CHECK(w.dim() == 2, op, "W[", i, "] must be 2-D, got shape ", w.sizes());
    PF_CHECK(is_weight_dtype(w.scalar_type()), op, "W[", i,
             "] must be float32/float64/bfloat16/float16, got ", w.scalar_type());
    PF_CHECK(w.sizes() == w0.sizes(), op, "W[", i, "] must have shape ", w0.sizes(),
             " like W[0], got ", w.sizes());
    PF_CHECK(w.scalar_type() == w0.scalar_type(), op, "W[", i, "] must have dtype ",
             w0.scalar_type(), " like W[0], got ", w.scalar_type());
    PF_CHECK(w.device() == w0.device(), op, "W[", i, "] must be on ", w0.device(),
             " like W[0], got ", w.device());
    PF_CHECK(w.size(1) <= 1 || w.stride(1) == 1, op, "W[", i,
             "] must have unit column stride, got strides ", w.strides());
    PF_CHECK(w.size(0) <= 1 || w.stride(0) >= w.size(1), op, "W[", i,
             "] rows overlap: strides ", w.strides(), " for shape ", w.sizes());
  }
}

// A stacked small factor: shape [b, d0, d1], dtype = accumulation dtype of W, same device, contiguous.
inline void check_factor(const char* op, const char* name, const at::Tensor& t, int64_t b, int64_t d0,
                         int64_t d1, const at::Tensor& w0) {
  PF_CHECK(t.dim() == 3 && t.size(0) == b && t.size(1) == d0 && t.size(2) == d1, op, name,
           " must have shape [", b, ", ", d0, ", ", d1, "], got ", t.sizes());
  PF_CHECK(t.scalar_type() == acc_dtype(w0.scalar_type()), op, name, " must have dtype ",
           acc_dtype(w0.scalar_type()), " for ", w0.scalar_type(), " weights, got ", t.scalar_type());
  PF_CHECK(t.device() == w0.device(), op, name, " must be on ", w0.device(), ", got ", t.device());
  PF_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
}

// Arguments of a pass over W: X is [b, inner, k] (inner = n for wx/gram, m for wtx).
inline void check_pass_args(const char* op, at::TensorList W, const at::Tensor& X, bool transposed) {
  check_weight_list(op, W);
  const auto& w0 = W[0];
  const int64_t inner = transposed ? w0.size(0) : w0.size(1);
  PF_CHECK(X.dim() == 3, op, "the second argument must be 3-D [", W.size(), ", ", inner, ", k], got ",
           X.sizes());
  check_factor(op, "the second argument", X, int64_t(W.size()), inner, X.size(2), w0);
}

// Arguments of residual(_): B [b, m, r], A [b, r, n].
inline void check_residual_args(const char* op, at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  check_weight_list(op, W);
  const auto& w0 = W[0];
  const int64_t b = W.size(), m = w0.size(0), n = w0.size(1);
  PF_CHECK(B.dim() == 3, op, "B must be 3-D [", b, ", ", m, ", r], got ", B.sizes());
  check_factor(op, "B", B, b, m, B.size(2), w0);
  check_factor(op, "A", A, b, B.size(2), n, w0);
}

}  // namespace pissa_fast
