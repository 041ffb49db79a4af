// The CUDA kernels of csrc/cuda run on the CPU through tests/cuda_emu/pissa_fast_emulate.h, with the same launch
// geometry (plan_pass) and argument packing as the host wrappers in csrc/cuda/*_cuda.cu, for device
// limits the caller chooses (H100-like with clusters, A100-like without, or tiny shared memory to
// force the streaming paths). Used by tests/test_cuda_emulated.py; built with
// torch.utils.cpp_extension.load, -DPISSA_FAST_EMULATE and this folder on the include path.
#include <torch/extension.h>

#include <limits>
#include <vector>

#include "../../csrc/checks.h"
#include "../../csrc/cuda/gram_kernels.cuh"
#include "../../csrc/cuda/residual_kernels.cuh"

namespace pf = pissa_fast;

namespace {

pf::cuda::DeviceLimits limits_from(const std::vector<int64_t>& l) {
  TORCH_CHECK(l.size() == 4, "limits: [smem_per_sm, smem_per_block, smem_reserved, max_cluster]");
  pf::cuda::DeviceLimits lim;
  lim.smem_per_sm = l[0];
  lim.smem_per_block = l[1];
  lim.smem_reserved = l[2];
  lim.max_cluster = static_cast<int>(l[3]);
  return lim;
}

py::dict plan_dict(const pf::cuda::PassPlan& p) {
  py::dict d;
  d["groups"] = p.groups;
  d["bm"] = p.bm;
  d["pitch"] = p.pitch;
  d["vcols"] = p.vcols;
  d["slice"] = p.slice;
  d["chunk"] = p.chunk;
  d["row_blocks"] = p.row_blocks;
  d["resident"] = p.resident;
  d["cluster"] = p.cluster;
  d["smem"] = p.smem;
  return d;
}

// Mirrors run_pass in csrc/cuda/gram_cuda.cu (the table lives on the CPU here).
template <typename T>
void run_pass(const std::vector<at::Tensor>& W, const at::Tensor& V, const at::Tensor& Y, const at::Tensor& Z,
              bool p1, bool p2, const pf::cuda::DeviceLimits& lim, py::list& plans) {
  using Acc = pf::dev::acc_t<T>;
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = Y.size(2);
  const auto plan = pf::cuda::plan_pass<Acc>(m, n, sizeof(T), p1, p2, lim);
  if (p1 && p2 && !plan.resident) {
    run_pass<T>(W, V, Y, Z, true, false, lim, plans);
    run_pass<T>(W, V, Y, Z, false, true, lim, plans);
    return;
  }
  plans.append(plan_dict(plan));
  auto table = at::empty({2 * b}, at::kLong);
  bool vec = true;
  for (int64_t j = 0; j < b; ++j) {
    const auto addr = reinterpret_cast<int64_t>(W[j].data_ptr());
    const int64_t ld = W[j].size(0) > 1 ? W[j].stride(0) : 0;
    table[j] = addr;
    table[b + j] = ld;
    vec = vec && addr % 16 == 0 && (ld * W[j].element_size()) % 16 == 0;
  }
  auto args = pf::cuda::make_pass_args<T>(plan, table.data_ptr<int64_t>(), b, m, n, k, p1, p2, vec);
  args.V = p1 ? V.data_ptr<Acc>() : nullptr;
  args.Y = Y.data_ptr<Acc>();
  args.Z = p2 ? Z.data_ptr<Acc>() : nullptr;
  const int64_t grid = b * plan.row_blocks * plan.groups;
  pf::dev::emu::launch(grid, plan.cluster ? plan.groups : 1, plan.smem, pf::cuda::PassTiling<Acc>::kThreads,
                       [&] { pf::cuda::pass_kernel<T>(args); });
}

template <typename F>
void dispatch(at::ScalarType t, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "emu", [&] { f(scalar_t(0.0f)); });
}

py::tuple pass_op(const std::string& op, const std::vector<at::Tensor>& W, const at::Tensor& X,
                  const std::vector<int64_t>& limits) {
  const auto lim = limits_from(limits);
  const bool p1 = op != "wtx", p2 = op != "wx";
  pf::check_weight_list(op.c_str(), W);
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), k = X.size(2);
  pf::check_factor(op.c_str(), "the second argument", X, b, p1 ? n : m, k, W[0]);
  // Outputs start as NaN: an entry the kernel fails to write cannot pass.
  auto Y = p1 ? at::full({b, m, k}, std::numeric_limits<double>::quiet_NaN(), X.options()) : X;
  auto Z = at::zeros({b, n, k}, X.options());
  py::list plans;
  if (m > 0 && n > 0 && k > 0) {
    dispatch(W[0].scalar_type(), [&](auto tag) { run_pass<decltype(tag)>(W, X, Y, Z, p1, p2, lim, plans); });
  } else if (p1) {
    Y.zero_();
  }
  return py::make_tuple(p1 ? Y : at::Tensor(), p2 ? Z : at::Tensor(), plans);
}

// Mirrors run_residual in csrc/cuda/residual_cuda.cu.
std::vector<at::Tensor> residual_op(const std::vector<at::Tensor>& W, const at::Tensor& B, const at::Tensor& A,
                                    bool inplace) {
  pf::check_weight_list("residual", W);
  const int64_t b = W.size(), m = W[0].size(0), n = W[0].size(1), r = B.size(2);
  pf::check_factor("residual", "B", B, b, m, r, W[0]);
  pf::check_factor("residual", "A", A, b, r, n, W[0]);
  std::vector<at::Tensor> out;
  for (const auto& w : W)
    out.push_back(inplace ? w : at::full(w.sizes(), std::numeric_limits<double>::quiet_NaN(), w.options()));
  if (W[0].numel() == 0) return out;
  dispatch(W[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = pf::dev::acc_t<T>;
    using Tl = pf::cuda::ResidualTiling<Acc>;
    auto table = at::empty({4 * b}, at::kLong);
    const int64_t align = std::min<int64_t>(4 * W[0].element_size(), 16);
    bool vec = true;
    for (int64_t j = 0; j < b; ++j) {
      const at::Tensor* ts[2] = {&W[j], &out[j]};
      for (int s = 0; s < 2; ++s) {
        const auto addr = reinterpret_cast<int64_t>(ts[s]->data_ptr());
        const int64_t ld = ts[s]->size(0) > 1 ? ts[s]->stride(0) : 0;
        table[2 * s * b + j] = addr;
        table[(2 * s + 1) * b + j] = ld;
        vec = vec && addr % align == 0 && ld % 4 == 0;
      }
    }
    pf::cuda::ResidualArgs<T> args;
    args.table = table.data_ptr<int64_t>();
    args.B = B.data_ptr<Acc>();
    args.A = A.data_ptr<Acc>();
    args.b = b, args.m = m, args.n = n, args.r = r;
    args.tiles_m = pf::cuda::ceil_div(m, Tl::kTM);
    args.tiles_n = pf::cuda::ceil_div(n, Tl::kTN);
    args.vec = vec;
    pf::dev::emu::launch(b * args.tiles_m * args.tiles_n, 1, Tl::kSmem, Tl::kThreads,
                         [&] { pf::cuda::residual_kernel<T>(args); });
  });
  return out;
}

py::dict plan(int64_t m, int64_t n, int64_t elem, bool dbl, bool p1, bool p2, const std::vector<int64_t>& limits) {
  const auto lim = limits_from(limits);
  return plan_dict(dbl ? pf::cuda::plan_pass<double>(m, n, elem, p1, p2, lim)
                       : pf::cuda::plan_pass<float>(m, n, elem, p1, p2, lim));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pass_op", &pass_op, "wx / wtx / gram through the emulated pass kernel: (Y, Z, plans)");
  m.def("residual", &residual_op, "residual / residual_ through the emulated residual kernel");
  m.def("plan", &plan, "plan_pass for a shape and device limits");
}
