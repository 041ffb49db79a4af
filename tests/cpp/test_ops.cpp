// libtorch-side check of the registered ops: call each through the dispatcher on CPU and compare
// with float64 ATen math. Exit code 0 on success; prints what failed otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, double value) {
  std::printf("%s %-52s %.3e\n", ok ? "ok  " : "FAIL", what, value);
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

double rel(const at::Tensor& x, const at::Tensor& ref) {
  return ((x.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>();
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t m = 300, n = 200, k = 12, r = 5;
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const char* tag = dtype == at::kFloat ? "fp32" : "bf16";
    auto W = at::randn({m, n}).to(dtype);
    auto Wd = W.to(at::kDouble);
    std::vector<at::Tensor> Ws{W};
    auto V = at::randn({1, n, k});

    auto gram = op("pissa_fast::gram").typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&)>();
    auto [Y, Z] = gram.call(Ws, V);
    auto Yr = at::matmul(Wd, V[0].to(at::kDouble));
    char buf[96];
    std::snprintf(buf, sizeof buf, "gram Y = W V (%s)", tag);
    expect(rel(Y[0], Yr) < 1e-5, buf, rel(Y[0], Yr));
    std::snprintf(buf, sizeof buf, "gram Z = W^T W V (%s)", tag);
    expect(rel(Z[0], at::matmul(Wd.t(), Yr)) < 1e-5, buf, rel(Z[0], at::matmul(Wd.t(), Yr)));

    auto factors = op("pissa_fast::pissa_factors")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           at::TensorList, const at::Tensor&, int64_t, int64_t, c10::string_view, c10::string_view,
                           double, int64_t, bool)>();
    auto [A, B, S, used, est] = factors.call(Ws, at::randn({1, n, r + 5}), r, 6, "krylov", "cholqr2", 0.0, -1, false);
    auto sv = at::linalg_svdvals(Wd).narrow(0, 0, r);
    std::snprintf(buf, sizeof buf, "pissa_factors singular values (%s)", tag);
    expect(rel(S[0], sv) < 5e-2, buf, rel(S[0], sv));

    auto residual_ = op("pissa_fast::residual_").typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
    auto Wc = W.clone();
    std::vector<at::Tensor> Wcs{Wc};
    residual_.call(Wcs, B, A);
    auto back = Wc.to(at::kDouble) + at::matmul(B[0].to(at::kDouble), A[0].to(at::kDouble));
    const double tol = dtype == at::kFloat ? 1e-5 : 1e-2;
    std::snprintf(buf, sizeof buf, "residual_ + B A == W (%s)", tag);
    expect(rel(back, Wd) < tol, buf, rel(back, Wd));
  }
  return failures == 0 ? 0 : 1;
}
