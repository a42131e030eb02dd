// Input checks of the CUDA entry points, called from bindings_cuda.cpp before any .cu function runs (flash-attention's
// layout: the API layer checks, the kernels assume). Integers in messages go through fmt() (common.h says why).
#pragma once
#include <climits>

#include "common.h"

namespace hope {

inline void check_teach_signal_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                      int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D [N, D], got ", fmt(hidden.dim()), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, D], got ", fmt(weight.dim()), "-D");
  TORCH_CHECK(targets.dim() == 1, "targets must be 1-D [N], got ", fmt(targets.dim()), "-D");
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor, got ", hidden.device());
  TORCH_CHECK(weight.device() == hidden.device(), "weight must be on hidden's device ", hidden.device(), ", got ",
              weight.device());
  TORCH_CHECK(targets.device() == hidden.device(), "targets must be on hidden's device ", hidden.device(), ", got ",
              targets.device());
  const at::ScalarType dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "weight must have hidden's dtype ", dtype, ", got ", weight.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(hidden.is_contiguous(), "hidden must be contiguous");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(targets.is_contiguous(), "targets must be contiguous");
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == D, "weight has D=", fmt(weight.size(1)), ", expected hidden's D=", fmt(D));
  TORCH_CHECK(targets.size(0) == N, "targets must have shape (", fmt(N), ",) (one per row of hidden), got ", fmt(targets.sizes()));
  TORCH_CHECK(V > 0, "weight must have at least one row (V > 0)");
  TORCH_CHECK(V <= INT_MAX && D <= INT_MAX, "weight is too large for cuBLAS int sizes: ", fmt(weight.sizes()));
  TORCH_CHECK(chunk_rows >= 0, "chunk_rows must be >= 0 (0 = automatic), got ", fmt(chunk_rows));
}

}  // namespace hope
