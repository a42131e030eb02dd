// Entry points of the csrc/ kernels, declared once: each is defined in its own .cpp / .cu file, which includes this
// header, and bound in bindings_cpu.cpp / bindings_cuda.cpp.
#pragma once
#include <optional>
#include <vector>

#include "common.h"

namespace hope {
// C++ CPU kernels (_C_cpu)
std::vector<at::Tensor> cms_update_cpu(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                       const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                       double lr, double beta, bool precond);
std::vector<at::Tensor> teach_signal_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& targets, int64_t ignore_index);
std::vector<at::Tensor> titan_linear_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                             const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                             const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                             const std::optional<at::Tensor>& tinv,
                                             const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                             const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                             int64_t chunk_size, bool store_states);
std::vector<at::Tensor> titan_linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& dWT, const at::Tensor& dST,
                                             const at::Tensor& q, const at::Tensor& k,
                                             const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                             const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                             const std::optional<at::Tensor>& tinv,
                                             const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                             const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                             int64_t chunk_size);

std::vector<at::Tensor> titan_mlp_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                          const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                          const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size,
                                          bool store_states);
std::vector<at::Tensor> titan_mlp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& dW1T, const at::Tensor& dW2T,
                                          const at::Tensor& dS1T, const at::Tensor& dS2T, const at::Tensor& q,
                                          const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                          const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size);

// CUDA kernels (_C_cuda); their inputs are checked by the bindings (checks_cuda.h, titan_linear_checks.h)
std::vector<at::Tensor> cms_update_cuda(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                        const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                        double lr, double beta, bool precond);
std::vector<at::Tensor> teach_signal_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                          int64_t ignore_index, bool compute_dw, int64_t chunk_rows);
std::vector<at::Tensor> titan_linear_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                              const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                              const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                              const std::optional<at::Tensor>& tinv,
                                              const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                              const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                              int64_t chunk_size, bool store_states);
std::vector<at::Tensor> titan_linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& dWT,
                                              const at::Tensor& dST, const at::Tensor& q, const at::Tensor& k,
                                              const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                              const at::Tensor& aqk, const std::optional<at::Tensor>& akk,
                                              const std::optional<at::Tensor>& tinv,
                                              const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                              const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                              int64_t chunk_size);
std::vector<at::Tensor> titan_mlp_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                          const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                          const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size,
                                          bool store_states);
std::vector<at::Tensor> titan_mlp_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& dW1T, const at::Tensor& dW2T,
                                          const at::Tensor& dS1T, const at::Tensor& dS2T, const at::Tensor& q,
                                          const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                          const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size);
}  // namespace hope
