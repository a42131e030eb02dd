// Entry points of the csrc/ kernels, declared once: each is defined in its own .cpp / .cu file, which includes this
// header, and bound in bindings_cpu.cpp / bindings_cuda.cpp. The titan_memory_update state passes take their tensors
// as one TitanInputs (titan_inputs.h) and return the backward's gradients as one too.
#pragma once
#include <vector>

#include "common.h"
#include "titan_inputs.h"

namespace hope {
// C++ CPU kernels (_C_cpu)
std::vector<at::Tensor> cms_update_cpu(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                       const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                       double lr, double beta, bool precond);
std::vector<at::Tensor> titan_linear_fwd_cpu(const TitanInputs& in, bool store_states);
TitanInputs titan_linear_bwd_cpu(const TitanInputs& in, const TitanGradsIn& grads);
std::vector<at::Tensor> titan_mlp_fwd_cpu(const TitanInputs& in, bool store_states);
TitanInputs titan_mlp_bwd_cpu(const TitanInputs& in, const TitanGradsIn& grads);

// CUDA kernels (_C_cuda); their inputs are checked by the bindings (checks_cuda.h, titan_*_checks.h)
std::vector<at::Tensor> cms_update_cuda(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                        const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                        double lr, double beta, bool precond);
std::vector<at::Tensor> teach_signal_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                          int64_t ignore_index, bool compute_dw, int64_t chunk_rows);
std::vector<at::Tensor> titan_linear_fwd_cuda(const TitanInputs& in, bool store_states);
TitanInputs titan_linear_bwd_cuda(const TitanInputs& in, const TitanGradsIn& grads);
std::vector<at::Tensor> titan_mlp_fwd_cuda(const TitanInputs& in, bool store_states);
TitanInputs titan_mlp_bwd_cuda(const TitanInputs& in, const TitanGradsIn& grads);
}  // namespace hope
