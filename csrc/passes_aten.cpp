// pissa_fast::{wx, wtx, gram, residual_, residual} on ATen GEMMs (declared in passes_aten.h), and
// their CPU registration as pissa_fast::<op>_aten.
//
// Precision. float32/float64 weights: plain GEMMs in that dtype, with TF32 off (at::NoTF32Guard, a
// thread-local guard: the global setting is never touched). bf16/fp16 weights are never copied to
// float32 in full: the float32 test vector x is split into two parts of W's dtype, hi = fl(x) and
// lo = fl(x - hi) (x - hi is exact in float32), both multiplied in one GEMM ([hi | lo] side by side)
// with float32 accumulation, and the two results added. A product of two bf16/fp16 values is exact in
// float32, so the only new error is |x - hi - lo| <= u^2 |x| (u = 2^-8 for bf16, 2^-11 for fp16) --
// 2^-16 and 2^-22 relative, next to float32's 2^-24 per rounding of a length-n sum.
// bf16 shares float32's exponent range; fp16 does not, so fp16 operands are scaled by a power of two
// per column first (exact), which keeps hi below 65504 and lo a normal number.
//
// No atomics and a fixed order of every sum: results are deterministic.
#include "passes_aten.h"

#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "checks.h"

namespace pissa_fast {
namespace aten_passes {
namespace {

using at::Tensor;

constexpr int64_t kParts = 2;  // hi and lo

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Rows per block: block_bytes of W in its own dtype (at least 16 rows).
int64_t block_rows(const Config& cfg, const Tensor& w) {
  const int64_t row_bytes = std::max<int64_t>(1, w.size(1) * w.element_size());
  return std::max<int64_t>(16, cfg.block_bytes / row_bytes);
}

// 2^e as float32, built from its exponent bits so that it is exact; e is clamped to the normal range.
Tensor pow2(const Tensor& e) {
  auto biased = (e.clamp(-126, 127) + 127).to(at::kInt);
  return at::bitwise_left_shift(biased, 23).view(at::kFloat);
}

// e with |x| = f 2^e, f in [0.5, 1) (0 for x = 0).
Tensor exponent(const Tensor& x) { return std::get<1>(at::frexp(x)); }

// hi = fl(X), lo = fl(X - hi) in dt, written into the views hi and lo, which are either of dtype dt
// or float32 holding values of dt (the CPU's widened path).
void write_split(const Tensor& X, Tensor hi, Tensor lo, at::ScalarType dt) {
  if (hi.scalar_type() == dt) {
    hi.copy_(X);
    at::sub_out(lo, X, hi);  // X - hi in float32 (exact), rounded to dt once on the store
  } else {
    auto h = X.to(dt);
    hi.copy_(h);
    lo.copy_(at::sub(X, h).to(dt));
  }
}

// An operand X [b, d, k] in parts [b, d, 2k] = [hi | lo], and the per-column factor that undoes the
// scaling of the result (undefined: no scaling).
struct Split {
  Tensor parts, unscale;
};

Split split_columns(const Tensor& X, at::ScalarType dt, bool native) {
  Tensor Xs = X, unscale;
  if (dt == at::kHalf) {
    // Column maximum into [2^14, 2^15): hi <= 2^15 < 65504, lo ~ 2^-11 hi stays normal. Powers of two
    // make X s and Y / s exact.
    auto shift = (15 - exponent(X.abs().amax(-2, /*keepdim=*/true))).clamp(-126, 126);
    Xs = X * pow2(shift);
    unscale = pow2(-shift);
  }
  const int64_t k = X.size(-1);
  auto parts = at::empty({X.size(0), X.size(1), kParts * k}, X.options().dtype(native ? dt : at::kFloat));
  write_split(Xs, parts.narrow(-1, 0, k), parts.narrow(-1, k, k), dt);
  return {parts, unscale};
}

// out = hi-part result + lo-part result (P = [P_hi | P_lo], float32), times unscale if defined.
void combine_into(Tensor out, const Tensor& P, const Tensor& unscale) {
  const int64_t k = out.size(-1);
  at::add_out(out, P.narrow(-1, 0, k), P.narrow(-1, k, k));
  if (unscale.defined()) out.mul_(unscale);
}

// out (float32) = a @ b for a, b of one low-precision dtype, with float32 accumulation: cuBLAS with a
// float32 output on CUDA; on the CPU (no out_dtype there) a float32 GEMM of widened copies, the same
// exact products summed in float32.
void mm_f32(Tensor out, const Tensor& a, const Tensor& b) {
  if (a.is_cuda()) {
    at::mm_out(out, a, b, at::kFloat);
  } else {
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

// C += alpha a b in C's low-precision dtype, rounded once: cuBLAS computes alpha (a b) + C in float32
// and rounds the sum to C's dtype; the CPU emulation does the same explicitly.
void addmm_low_(const Tensor& C, const Tensor& a, const Tensor& b, double alpha) {
  if (C.is_cuda()) {
    C.addmm_(a, b, 1, alpha);
  } else {
    C.copy_(at::addmm(C.to(at::kFloat), a.to(at::kFloat), b.to(at::kFloat), 1, alpha));
  }
}

// out (float32) = op(Wj) @ P for a low-precision Wj and parts P (op: identity, or transpose).
void gemm_parts(Tensor out, const Tensor& Wj, bool transpose, const Tensor& P, const Config& cfg) {
  if (cfg.native_low_precision) {
    mm_f32(out, transpose ? Wj.t() : Wj, P);
    return;
  }
  const int64_t m = Wj.size(0), rows = block_rows(cfg, Wj);
  auto buf = at::empty({std::min(rows, m), Wj.size(1)}, Wj.options().dtype(at::kFloat));
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t mb = std::min(rows, m - i);
    auto Wb = buf.narrow(0, 0, mb).copy_(Wj.narrow(0, i, mb));
    if (!transpose) {
      auto rows_out = out.narrow(0, i, mb);
      at::mm_out(rows_out, Wb, P);
    } else if (i == 0) {
      at::mm_out(out, Wb.t(), P.narrow(0, 0, mb));
    } else {
      out.addmm_(Wb.t(), P.narrow(0, i, mb));
    }
  }
}

// out[j] = op(W[j]) @ X[j] for the whole list (op: identity for wx, transpose for wtx).
Tensor skinny(at::TensorList W, const Tensor& X, bool transpose, const Config& cfg) {
  const int64_t b = W.size(), k = X.size(2);
  const int64_t rows = transpose ? W[0].size(1) : W[0].size(0), inner = X.size(1);
  if (rows == 0 || inner == 0 || k == 0) return at::zeros({b, rows, k}, X.options());
  const at::NoTF32Guard exact_fp32;
  auto out = at::empty({b, rows, k}, X.options());
  const auto dt = W[0].scalar_type();
  if (!low_precision(dt)) {
    for (int64_t j = 0; j < b; ++j) {
      auto oj = out[j];
      at::mm_out(oj, transpose ? W[j].t() : W[j], X[j]);
    }
    return out;
  }
  const Split s = split_columns(X, dt, cfg.native_low_precision);
  auto P = at::empty({b, rows, kParts * k}, X.options());
  for (int64_t j = 0; j < b; ++j) gemm_parts(P[j], W[j], transpose, s.parts[j], cfg);
  combine_into(out, P, s.unscale);
  return out;
}

}  // namespace

Tensor wx(at::TensorList W, const Tensor& X, const Config& cfg) {
  check_pass_args("wx", W, X, /*transposed=*/false);
  return skinny(W, X, /*transpose=*/false, cfg);
}

Tensor wtx(at::TensorList W, const Tensor& Y, const Config& cfg) {
  check_pass_args("wtx", W, Y, /*transposed=*/true);
  return skinny(W, Y, /*transpose=*/true, cfg);
}

// Y = W V and Z = W^T Y, walking W in row blocks: Y_b = W_b V, then Z += W_b^T Y_b while W_b is
// still in cache (L2 on a GPU), so W is read about once. bf16: Y_b is split into parts for the second
// GEMM as V was for the first. fp16 would need Y's per-column scale before its first block is used,
// i.e. all of Y: it takes two reads of W (wx, then wtx).
std::tuple<Tensor, Tensor> gram(at::TensorList W, const Tensor& V, const Config& cfg) {
  check_pass_args("gram", W, V, /*transposed=*/false);
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = V.size(2);
  if (m == 0 || n == 0 || k == 0) return {at::zeros({b, m, k}, V.options()), at::zeros({b, n, k}, V.options())};
  const auto dt = W[0].scalar_type();
  if (dt == at::kHalf) {
    auto Y = skinny(W, V, false, cfg);
    return {Y, skinny(W, Y, true, cfg)};
  }
  const at::NoTF32Guard exact_fp32;
  const bool split = dt == at::kBFloat16, native = cfg.native_low_precision;
  const bool widen = split && !native;
  const int64_t kk = split ? kParts * k : k, rows = block_rows(cfg, W[0]), mb_max = std::min(rows, m);
  auto Y = at::empty({b, m, k}, V.options());
  auto Zacc = at::empty({b, n, kk}, V.options());
  Split sv;
  Tensor wbuf, yp, yparts, zp;  // scratch reused by every block (one stream: in order)
  if (split) {
    sv = split_columns(V, dt, native);
    yp = at::empty({mb_max, kk}, V.options());
    yparts = at::empty({mb_max, kk}, V.options().dtype(native ? dt : at::kFloat));
    if (native) zp = at::empty({n, kk}, V.options());
  }
  if (widen) wbuf = at::empty({mb_max, n}, V.options());
  for (int64_t j = 0; j < b; ++j) {
    auto Zj = Zacc[j];
    for (int64_t i = 0; i < m; i += rows) {
      const int64_t mb = std::min(rows, m - i);
      Tensor Wb = W[j].narrow(0, i, mb);
      if (widen) Wb = wbuf.narrow(0, 0, mb).copy_(Wb);
      auto Yb = Y[j].narrow(0, i, mb);
      if (!split) {  // float32 / float64
        at::mm_out(Yb, Wb, V[j]);
        if (i == 0) at::mm_out(Zj, Wb.t(), Yb); else Zj.addmm_(Wb.t(), Yb);
        continue;
      }
      auto Pb = yp.narrow(0, 0, mb), Yparts = yparts.narrow(0, 0, mb);
      if (native) mm_f32(Pb, Wb, sv.parts[j]); else at::mm_out(Pb, Wb, sv.parts[j]);
      combine_into(Yb, Pb, Tensor());
      write_split(Yb, Yparts.narrow(-1, 0, k), Yparts.narrow(-1, k, k), dt);
      if (i == 0) {
        if (native) mm_f32(Zj, Wb.t(), Yparts); else at::mm_out(Zj, Wb.t(), Yparts);
      } else if (native) {  // out_dtype GEMMs cannot accumulate into float32: a partial sum, then add
        mm_f32(zp, Wb.t(), Yparts);
        Zj.add_(zp);
      } else {
        Zj.addmm_(Wb.t(), Yparts);
      }
    }
  }
  if (!split) return {Y, Zacc};
  auto Z = at::empty({b, n, k}, V.options());
  combine_into(Z, Zacc, Tensor());
  return {Y, Z};
}

namespace {

// B A for low-precision W as one GEMM of inner size 3r: [Bh | Bl | Bh] @ [Ah ; Ah ; Al] =
// Bh Ah + Bl Ah + Bh Al. The dropped Bl Al is below the parts' own rounding (u^2 |B| |A|).
// fp16: column t of B and row t of A are scaled by 2^s_t and 2^-s_t (B A unchanged, exactly), s_t
// balancing their magnitudes so that neither part leaves fp16's range.
std::pair<Tensor, Tensor> residual_parts(const Tensor& B, const Tensor& A, at::ScalarType dt, bool native) {
  Tensor Bs = B, As = A;
  if (dt == at::kHalf) {
    auto eB = exponent(B.abs().amax(-2, /*keepdim=*/true));        // [b, 1, r]
    auto eA = exponent(A.abs().amax(-1, /*keepdim=*/true)).mT();   // [b, 1, r]
    auto s = at::div(eA - eB, 2, "floor").clamp(-126, 126);
    Bs = B * pow2(s);
    As = A * pow2(-s).mT();
  }
  const int64_t r = B.size(2);
  const auto pdt = native ? dt : at::kFloat;
  auto Bp = at::empty({B.size(0), B.size(1), 3 * r}, B.options().dtype(pdt));
  auto Ap = at::empty({A.size(0), 3 * r, A.size(2)}, A.options().dtype(pdt));
  write_split(Bs, Bp.narrow(-1, 0, r), Bp.narrow(-1, r, r), dt);
  Bp.narrow(-1, 2 * r, r).copy_(Bp.narrow(-1, 0, r));
  write_split(As, Ap.narrow(-2, 0, r), Ap.narrow(-2, 2 * r, r), dt);
  Ap.narrow(-2, r, r).copy_(Ap.narrow(-2, 0, r));
  return {Bp, Ap};
}

// out[j] = W[j] - B[j] A[j], rounded once to W's dtype; out[j] is W[j] itself when in place.
void apply_residual(at::TensorList W, at::TensorList out, const Tensor& B, const Tensor& A, const Config& cfg,
                    bool inplace) {
  const int64_t b = W.size();
  const auto dt = W[0].scalar_type();
  const at::NoTF32Guard exact_fp32;
  if (!low_precision(dt)) {
    for (int64_t j = 0; j < b; ++j) {
      auto oj = out[j];
      if (inplace) oj.addmm_(B[j], A[j], 1, -1); else at::addmm_out(oj, W[j], B[j], A[j], 1, -1);
    }
    return;
  }
  const bool native = cfg.native_low_precision;
  auto [Bp, Ap] = residual_parts(B, A, dt, native);
  if (native) {  // one GEMM per weight, reading and writing W once in its own dtype
    for (int64_t j = 0; j < b; ++j) {
      if (!inplace) out[j].copy_(W[j]);
      addmm_low_(out[j], Bp[j], Ap[j], -1);
    }
    return;
  }
  const int64_t m = W[0].size(0), rows = block_rows(cfg, W[0]);
  auto buf = at::empty({std::min(rows, m), W[0].size(1)}, B.options());
  for (int64_t j = 0; j < b; ++j) {
    for (int64_t i = 0; i < m; i += rows) {
      const int64_t mb = std::min(rows, m - i);
      auto blk = buf.narrow(0, 0, mb).copy_(W[j].narrow(0, i, mb));
      blk.addmm_(Bp[j].narrow(0, i, mb), Ap[j], 1, -1);
      out[j].narrow(0, i, mb).copy_(blk);
    }
  }
}

}  // namespace

void residual_(at::TensorList W, const Tensor& B, const Tensor& A, const Config& cfg) {
  check_residual_args("residual_", W, B, A);
  if (W[0].numel() == 0) return;
  apply_residual(W, W, B, A, cfg, /*inplace=*/true);
}

std::vector<Tensor> residual(at::TensorList W, const Tensor& B, const Tensor& A, const Config& cfg) {
  check_residual_args("residual", W, B, A);
  std::vector<Tensor> out;
  out.reserve(W.size());
  for (const auto& w : W) out.push_back(at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous)));
  if (W[0].numel() > 0) apply_residual(W, out, B, A, cfg, /*inplace=*/false);
  return out;
}

}  // namespace aten_passes

namespace {

// The CPU registration's configuration: 1 MiB row blocks (a core's L2, as the CPU kernels use) and the
// widened path. Tests switch it (pissa_fast::_set_aten_cpu_config) to small blocks, or to the native
// path that CUDA runs, so every branch of the code above runs here.
std::atomic<int64_t> cpu_block_bytes{int64_t(1) << 20};
std::atomic<bool> cpu_native{false};

aten_passes::Config cpu_config() { return {cpu_block_bytes.load(), cpu_native.load()}; }

at::Tensor wx_aten_cpu(at::TensorList W, const at::Tensor& X) { return aten_passes::wx(W, X, cpu_config()); }
at::Tensor wtx_aten_cpu(at::TensorList W, const at::Tensor& Y) { return aten_passes::wtx(W, Y, cpu_config()); }
std::tuple<at::Tensor, at::Tensor> gram_aten_cpu(at::TensorList W, const at::Tensor& V) {
  return aten_passes::gram(W, V, cpu_config());
}
void residual_aten_inplace_cpu(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  aten_passes::residual_(W, B, A, cpu_config());
}
std::vector<at::Tensor> residual_aten_cpu(at::TensorList W, const at::Tensor& B, const at::Tensor& A) {
  return aten_passes::residual(W, B, A, cpu_config());
}

void set_aten_cpu_config(int64_t block_bytes, bool native) {
  PF_CHECK(block_bytes > 0, "_set_aten_cpu_config", "block_bytes must be > 0, got ", block_bytes);
  cpu_block_bytes = block_bytes;
  cpu_native = native;
}

std::tuple<int64_t, bool> get_aten_cpu_config() { return {cpu_block_bytes.load(), cpu_native.load()}; }

}  // namespace

TORCH_LIBRARY_IMPL(pissa_fast, CPU, m) {
  m.impl("wx_aten", &wx_aten_cpu);
  m.impl("wtx_aten", &wtx_aten_cpu);
  m.impl("gram_aten", &gram_aten_cpu);
  m.impl("residual_aten_", &residual_aten_inplace_cpu);
  m.impl("residual_aten", &residual_aten_cpu);
}

TORCH_LIBRARY_IMPL(pissa_fast, CompositeImplicitAutograd, m) {
  m.impl("_set_aten_cpu_config", &set_aten_cpu_config);
  m.impl("_get_aten_cpu_config", &get_aten_cpu_config);
}

}  // namespace pissa_fast
