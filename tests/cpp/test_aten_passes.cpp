// libtorch-side check of the ATen passes and of the CUDA-passes switch, through the dispatcher only (as
// a C++ user without Python calls them): gram_aten / residual_aten_ against float64 ATen math, and
// set_cuda_passes / get_cuda_passes. Exit code 0 on success; prints what failed otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, double value) {
  std::printf("%s %-52s %.3e\n", ok ? "ok  " : "FAIL", what, value);
  if (!ok) ++failures;
}

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

double rel(const at::Tensor& x, const at::Tensor& ref) {
  return ((x.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>();
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t m = 300, n = 200, k = 12, r = 5;
  char buf[96];
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const char* tag = dtype == at::kFloat ? "fp32" : dtype == at::kBFloat16 ? "bf16" : "fp16";
    auto W = at::randn({m, n}).to(dtype);
    auto Wd = W.to(at::kDouble);
    std::vector<at::Tensor> Ws{W};
    auto V = at::randn({1, n, k});
    auto gram = op("pissa_fast::gram_aten").typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&)>();
    auto [Y, Z] = gram.call(Ws, V);
    auto Yr = at::matmul(Wd, V[0].to(at::kDouble));
    // Split bf16/fp16 parts: relative error ~2^-16 (bf16) and ~2^-22 (fp16) per element of V.
    const double tol = dtype == at::kBFloat16 ? 1e-4 : 1e-5;
    std::snprintf(buf, sizeof buf, "gram_aten Y = W V (%s)", tag);
    expect(rel(Y[0], Yr) < tol, buf, rel(Y[0], Yr));
    std::snprintf(buf, sizeof buf, "gram_aten Z = W^T W V (%s)", tag);
    expect(rel(Z[0], at::matmul(Wd.t(), Yr)) < tol, buf, rel(Z[0], at::matmul(Wd.t(), Yr)));

    auto B = at::randn({1, m, r}), A = at::randn({1, r, n});
    auto residual_ = op("pissa_fast::residual_aten_").typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
    auto Wc = W.clone();
    std::vector<at::Tensor> Wcs{Wc};
    residual_.call(Wcs, B, A);
    auto ref = Wd - at::matmul(B[0].to(at::kDouble), A[0].to(at::kDouble));
    const double rtol = dtype == at::kFloat ? 1e-6 : dtype == at::kBFloat16 ? 1e-2 : 1e-3;  // one rounding
    std::snprintf(buf, sizeof buf, "residual_aten_ == W - B A (%s)", tag);
    expect(rel(Wc, ref) < rtol, buf, rel(Wc, ref));
  }

  auto set = op("pissa_fast::set_cuda_passes").typed<void(c10::string_view)>();
  auto get = op("pissa_fast::get_cuda_passes").typed<std::tuple<std::string, std::string>(int64_t)>();
  set.call("aten");
  auto [setting, in_use] = get.call(-1);
  expect(setting == "aten" && in_use == "aten", "set_cuda_passes(aten) -> get_cuda_passes", 0.0);
  bool refused = false;
  try {
    set.call("fast");
  } catch (const c10::Error&) {
    refused = true;
  }
  expect(refused, "set_cuda_passes(fast) is refused", 0.0);
  set.call("default");
  expect(std::get<0>(get.call(-1)) == "default", "set_cuda_passes(default)", 0.0);
  return failures == 0 ? 0 : 1;
}
