// C++ CPU titan_memory_update state pass for the mlp memory (M(x) = x + W1 gelu(W2 x)), rules titans and dgd,
// forward and backward, fp32: the block-phased body of titan_mlp_body.h (shared with csrc/titan_mlp.cu) with its
// parallel-for a plain loop and its barrier a no-op, one at::parallel_for task per (b, h) with its own scratch.
#include <ATen/Parallel.h>

#include <vector>

#include "ops.h"
#include "titan_mlp_body.h"
#include "titan_mlp_checks.h"
#include "titan_mlp_host.h"

namespace hope {
namespace {

using Params = mlp::MlpParams<float>;

// The body of one (b, h), compiled for AVX-512 / AVX2+FMA / baseline x86-64 with run-time selection (GCC
// target_clones; flatten inlines the body and its dot products into each clone, so the omp-simd reductions use
// that clone's vector width).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOPE_MLP_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default"), flatten))
#else
#define HOPE_MLP_CLONES
#endif
HOPE_MLP_CLONES void fwd_one(const Params& p, int64_t bh) { mlp::fwd_body(p, bh); }
HOPE_MLP_CLONES void bwd_one(const Params& p, int64_t bh) { mlp::bwd_body(p, bh); }

// one scratch row per task (at::parallel_for chunk): the body indexes p.scratch by bh, so point it back by lo
template <typename Body>
void for_each_bh(const MlpDims& d, const Params& p0, int64_t floats, Body body) {
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(static_cast<size_t>(floats));
    Params p = p0;
    p.scratch_stride = 0;
    p.scratch = scratch.data();
    for (int64_t bh = lo; bh < hi; ++bh) body(p, bh);
  });
}

mlp_host::FwdOut run_fwd(const MlpDims& d, Params p, const at::Tensor& q, bool write_out, bool store_states) {
  mlp_host::FwdOut r = mlp_host::fwd_outputs<float>(d, p, q, write_out, store_states);
  const int64_t floats = mlp::MlpLayout(d.C, d.D, d.E).fwd_total;
  for_each_bh(d, p, floats, [](const Params& pp, int64_t bh) { fwd_one(pp, bh); });
  return r;
}

}  // namespace

// [out [B, H, T, D], W1_T [B, H, D, E], W2_T [B, H, E, D], S1_T, S2_T, chunk-start states [B, H, NC, 4, D, E]
// (W1, W2, S1, S2 flattened; empty unless store_states)]; all fp32. dgd when kh is given.
std::vector<at::Tensor> titan_mlp_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                          const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                          const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size,
                                          bool store_states) {
  const MlpDims d = check_titan_mlp_inputs(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2,
                                           chunk_size, /*cuda=*/false);
  return run_fwd(d, mlp_host::params<float>(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2),
                 q, /*write_out=*/true, store_states)
      .list();
}

// [dq, dk [B, H, T, D], dkh [B, H, NC * C, D], dv [B, H, T, D], daqk, dgth, dakk, dtinv, daqw [B, H, NC, C, C],
// dvec [B, H, NC, 7, C], dend [B, H, NC, 3], dW1, dW2, dS1, dS2 (the state's shapes)]; fp32; dkh / dakk / dtinv /
// daqw are empty for titans; entries of padded tokens are zero. Every element is written by the body.
std::vector<at::Tensor> titan_mlp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& dW1T, const at::Tensor& dW2T,
                                          const at::Tensor& dS1T, const at::Tensor& dS2T, const at::Tensor& q,
                                          const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                          const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth,
                                          const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                          const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                          const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                          const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size) {
  const MlpDims d = check_titan_mlp_inputs(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2,
                                           chunk_size, /*cuda=*/false);
  check_titan_mlp_grads(grad_out, dW1T, dW2T, dS1T, dS2T, q, W1, W2);
  Params p = mlp_host::params<float>(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2);
  // the chunk-start states (the forward kept only its inputs)
  const mlp_host::FwdOut f = run_fwd(d, p, q, /*write_out=*/false, /*store_states=*/true);
  mlp_host::BwdOut g = mlp_host::bwd_outputs<float>(d, p, q, k, v, f.states, grad_out, dW1T, dW2T, dS1T, dS2T);
  const int64_t floats = mlp::MlpLayout(d.C, d.D, d.E).total;
  for_each_bh(d, p, floats, [](const Params& pp, int64_t bh) { bwd_one(pp, bh); });
  return g.list();
}

}  // namespace hope
