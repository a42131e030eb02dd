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
// (W1, W2, S1, S2 flattened; empty unless store_states)]; all fp32. dgd when khat is given.
std::vector<at::Tensor> titan_mlp_fwd_cpu(const TitanInputs& in, bool store_states) {
  const MlpDims d = check_titan_mlp_inputs(in, /*cuda=*/false);
  return run_fwd(d, mlp_host::params<float>(d, in), in.q, /*write_out=*/true, store_states).list();
}

// The gradient of every input (TitanInputs' names), fp32; khat / akk / tinv / aqw are empty for titans; entries of
// padded tokens are zero. Every element is written by the body.
TitanInputs titan_mlp_bwd_cpu(const TitanInputs& in, const TitanGradsIn& grads) {
  const MlpDims d = check_titan_mlp_inputs(in, /*cuda=*/false);
  check_titan_mlp_grads(in, grads);
  Params p = mlp_host::params<float>(d, in);
  // the chunk-start states (the forward kept only its inputs)
  const mlp_host::FwdOut f = run_fwd(d, p, in.q, /*write_out=*/false, /*store_states=*/true);
  TitanInputs g = mlp_host::bwd_outputs<float>(d, p, in, f.states, grads);
  const int64_t floats = mlp::MlpLayout(d.C, d.D, d.E).total;
  for_each_bh(d, p, floats, [](const Params& pp, int64_t bh) { bwd_one(pp, bh); });
  return g;
}

}  // namespace hope
