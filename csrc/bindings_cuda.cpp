// pybind11 module hope_kernels._C_cuda: the CUDA kernels.
#include "checks_cuda.h"
#include "ops.h"
#include "titan_linear_checks.h"
#include "titan_bindings.h"
#include "titan_mlp_checks.h"

// The entry points check their inputs here, in g++-compiled host code, before any .cu function runs (see
// checks_cuda.h for why).
std::vector<at::Tensor> cms_update_checked(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                           const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                           double lr, double beta, bool precond) {
  hope::check_cms_inputs(w1, w2, m1, m2, x, delta);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  return hope::cms_update_cuda(w1, w2, m1, m2, x, delta, lr, beta, precond);
}

std::vector<at::Tensor> teach_signal_checked(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& targets, int64_t ignore_index, bool compute_dw,
                                             int64_t chunk_rows) {
  hope::check_teach_signal_inputs(hidden, weight, targets, chunk_rows);
  return hope::teach_signal_cuda(hidden, weight, targets, ignore_index, compute_dw, chunk_rows);
}

std::vector<at::Tensor> titan_linear_fwd_checked(const hope::TitanInputs& in, bool store_states) {
  hope::check_titan_linear_inputs(in, false);
  return hope::titan_linear_fwd_cuda(in, store_states);
}

hope::TitanInputs titan_linear_bwd_checked(const hope::TitanInputs& in, const hope::TitanGradsIn& grads) {
  hope::check_titan_linear_inputs(in, true);
  hope::check_titan_linear_grads(in, grads);
  return hope::titan_linear_bwd_cuda(in, grads);
}

std::vector<at::Tensor> titan_mlp_fwd_checked(const hope::TitanInputs& in, bool store_states) {
  hope::check_titan_mlp_inputs(in, true);
  return hope::titan_mlp_fwd_cuda(in, store_states);
}

hope::TitanInputs titan_mlp_bwd_checked(const hope::TitanInputs& in, const hope::TitanGradsIn& grads) {
  hope::check_titan_mlp_inputs(in, true);
  hope::check_titan_mlp_grads(in, grads);
  return hope::titan_mlp_bwd_cuda(in, grads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope CUDA kernels";
  m.def("cms_update", &cms_update_checked, "CMS level update (CUDA)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
  m.def("teach_signal", &teach_signal_checked, "CE loss, delta and dW of a linear head, chunked (CUDA)",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"), py::arg("compute_dw"),
        py::arg("chunk_rows"));
  hope::def_titan(m, "CUDA", &titan_linear_fwd_checked, &titan_linear_bwd_checked, &titan_mlp_fwd_checked,
                  &titan_mlp_bwd_checked);
}
