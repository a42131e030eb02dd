// pybind11 module hope_kernels._C_cuda: the CUDA kernels.
#include "checks_cuda.h"
#include "ops.h"
#include "titan_linear_checks.h"
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

std::vector<at::Tensor> titan_linear_fwd_checked(const at::Tensor& q, const at::Tensor& k,
                                                 const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                                 const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                                 const std::optional<at::Tensor>& tinv,
                                                 const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                                 const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                                 int64_t chunk_size, bool store_states) {
  hope::check_titan_linear_inputs(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size, false);
  return hope::titan_linear_fwd_cuda(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size, store_states);
}

std::vector<at::Tensor> titan_linear_bwd_checked(const at::Tensor& grad_out, const at::Tensor& dWT,
                                                 const at::Tensor& dST, const at::Tensor& q, const at::Tensor& k,
                                                 const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                                 const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                                 const std::optional<at::Tensor>& tinv,
                                                 const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                                 const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                                 int64_t chunk_size) {
  hope::check_titan_linear_inputs(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size, true);
  hope::check_titan_linear_grads(grad_out, dWT, dST, q, v, W0);
  return hope::titan_linear_bwd_cuda(grad_out, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0,
                                     chunk_size);
}

std::vector<at::Tensor> titan_mlp_fwd_checked(const at::Tensor& q, const at::Tensor& k,
                                              const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                              const at::Tensor& aqk, const at::Tensor& gth,
                                              const std::optional<at::Tensor>& akk,
                                              const std::optional<at::Tensor>& tinv,
                                              const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                              const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                              const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size,
                                              bool store_states) {
  hope::check_titan_mlp_inputs(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size, true);
  return hope::titan_mlp_fwd_cuda(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size,
                                  store_states);
}

std::vector<at::Tensor> titan_mlp_bwd_checked(const at::Tensor& grad_out, const at::Tensor& dW1T,
                                              const at::Tensor& dW2T, const at::Tensor& dS1T, const at::Tensor& dS2T,
                                              const at::Tensor& q, const at::Tensor& k,
                                              const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                              const at::Tensor& aqk, const at::Tensor& gth,
                                              const std::optional<at::Tensor>& akk,
                                              const std::optional<at::Tensor>& tinv,
                                              const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                              const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                              const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size) {
  hope::check_titan_mlp_inputs(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size, true);
  hope::check_titan_mlp_grads(grad_out, dW1T, dW2T, dS1T, dS2T, q, W1, W2);
  return hope::titan_mlp_bwd_cuda(grad_out, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end,
                                  W1, W2, S1, S2, chunk_size);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope CUDA kernels";
  m.def("cms_update", &cms_update_checked, "CMS level update (CUDA)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
  m.def("teach_signal", &teach_signal_checked, "CE loss, delta and dW of a linear head, chunked (CUDA)",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"), py::arg("compute_dw"),
        py::arg("chunk_rows"));
  m.def("titan_linear_fwd", &titan_linear_fwd_checked,
        "titan_memory_update linear state pass, forward: [out, W_T, S_T, chunk-start states] (CUDA)", py::arg("q"),
        py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("akk"), py::arg("tinv"), py::arg("aqw"),
        py::arg("vec"), py::arg("end"), py::arg("W0"), py::arg("S0"), py::arg("chunk_size"),
        py::arg("store_states"));
  m.def("titan_linear_bwd", &titan_linear_bwd_checked,
        "titan_memory_update linear state pass, backward: [dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, "
        "dW0, dS0] (CUDA)", py::arg("do"), py::arg("dWT"), py::arg("dST"), py::arg("q"), py::arg("k"), py::arg("kh"),
        py::arg("v"), py::arg("aqk"), py::arg("akk"), py::arg("tinv"), py::arg("aqw"), py::arg("vec"), py::arg("end"),
        py::arg("W0"), py::arg("S0"), py::arg("chunk_size"));
  m.def("titan_mlp_fwd", &titan_mlp_fwd_checked,
        "titan_memory_update mlp state pass, forward: [out, W1_T, W2_T, S1_T, S2_T, chunk-start states] (CUDA)",
        py::arg("q"), py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("gth"), py::arg("akk"),
        py::arg("tinv"), py::arg("aqw"), py::arg("vec"), py::arg("end"), py::arg("W1"), py::arg("W2"), py::arg("S1"),
        py::arg("S2"), py::arg("chunk_size"), py::arg("store_states"));
  m.def("titan_mlp_bwd", &titan_mlp_bwd_checked,
        "titan_memory_update mlp state pass, backward: [dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, "
        "dW1, dW2, dS1, dS2] (CUDA)", py::arg("do"), py::arg("dW1T"), py::arg("dW2T"), py::arg("dS1T"),
        py::arg("dS2T"), py::arg("q"), py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("gth"),
        py::arg("akk"), py::arg("tinv"), py::arg("aqw"), py::arg("vec"), py::arg("end"), py::arg("W1"), py::arg("W2"),
        py::arg("S1"), py::arg("S2"), py::arg("chunk_size"));
}
