// C++ CPU titan_memory_update state pass for the mlp memory (M(x) = x + W1 gelu(W2 x)), rules titans and dgd,
// forward and backward, fp32: the block-phased body of titan_mlp_body.h (shared with csrc/titan_mlp.cu) with its
// parallel-for a plain loop and its barrier a no-op, one at::parallel_for task per (b, h) with its own scratch.
#include <ATen/Parallel.h>

#include <vector>

#include "ops.h"
#include "titan_mlp_body.h"
#include "titan_mlp_checks.h"

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

const float* opt_ptr(const std::optional<at::Tensor>& t, bool dgd) { return dgd ? t->data_ptr<float>() : nullptr; }

Params params(const MlpDims& d, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kh,
              const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth, const std::optional<at::Tensor>& akk,
              const std::optional<at::Tensor>& tinv, const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
              const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2, const at::Tensor& S1,
              const at::Tensor& S2) {
  Params p{};
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.kh = opt_ptr(kh, d.dgd);
  p.aqk = aqk.data_ptr<float>();
  p.gth = gth.data_ptr<float>();
  p.akk = opt_ptr(akk, d.dgd);
  p.tinv = opt_ptr(tinv, d.dgd);
  p.aqw = opt_ptr(aqw, d.dgd);
  p.vec = vec.data_ptr<float>();
  p.end = end.data_ptr<float>();
  p.W1 = W1.data_ptr<float>();
  p.W2 = W2.data_ptr<float>();
  p.S1 = S1.data_ptr<float>();
  p.S2 = S2.data_ptr<float>();
  p.T = d.T;
  p.NC = d.NC;
  p.C = static_cast<int>(d.C);
  p.D = static_cast<int>(d.D);
  p.E = static_cast<int>(d.E);
  p.dgd = d.dgd;
  return p;
}

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

struct FwdOut {
  at::Tensor out, W1T, W2T, S1T, S2T, states;
};

FwdOut run_fwd(const MlpDims& d, Params p, bool write_out, bool store_states) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  FwdOut r;
  r.out = write_out ? at::empty({d.B, d.H, d.T, d.D}, f32) : at::empty({0}, f32);
  r.W1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.W2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.S1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.S2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.states = store_states ? at::empty({d.B, d.H, d.NC, 4, d.D, d.E}, f32) : at::empty({0}, f32);
  p.out = write_out ? r.out.data_ptr<float>() : nullptr;
  p.W1T = r.W1T.data_ptr<float>();
  p.W2T = r.W2T.data_ptr<float>();
  p.S1T = r.S1T.data_ptr<float>();
  p.S2T = r.S2T.data_ptr<float>();
  p.states = store_states ? r.states.data_ptr<float>() : nullptr;
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
  FwdOut r = run_fwd(d, params(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2),
                     /*write_out=*/true, store_states);
  return {r.out, r.W1T, r.W2T, r.S1T, r.S2T, r.states};
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
  Params p = params(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2);
  // the chunk-start states (the forward kept only its inputs)
  const FwdOut f = run_fwd(d, p, /*write_out=*/false, /*store_states=*/true);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C, D = d.D, E = d.E;
  auto none = [&] { return at::empty({0}, f32); };
  auto cc = [&] { return at::empty({B, H, NC, C, C}, f32); };
  at::Tensor dq = at::empty({B, H, d.T, D}, f32), dk = at::empty({B, H, d.T, D}, f32);
  at::Tensor dv = at::empty({B, H, d.T, D}, f32);
  at::Tensor dkh = d.dgd ? at::empty({B, H, d.Tp, D}, f32) : none();
  at::Tensor daqk = cc(), dgth = cc();
  at::Tensor dakk = d.dgd ? cc() : none(), dtinv = d.dgd ? cc() : none(), daqw = d.dgd ? cc() : none();
  at::Tensor dvec = at::empty({B, H, NC, mlp::kNVec, C}, f32), dend = at::empty({B, H, NC, 3}, f32);
  at::Tensor dW1 = at::empty({B, H, D, E}, f32), dW2 = at::empty({B, H, E, D}, f32);
  at::Tensor dS1 = at::empty({B, H, D, E}, f32), dS2 = at::empty({B, H, E, D}, f32);
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  p.states = f.states.data_ptr<float>();
  p.dout = grad_out.data_ptr<float>();
  p.dW1T = dW1T.data_ptr<float>();
  p.dW2T = dW2T.data_ptr<float>();
  p.dS1T = dS1T.data_ptr<float>();
  p.dS2T = dS2T.data_ptr<float>();
  p.dq = ptr(dq);
  p.dk = ptr(dk);
  p.dv = ptr(dv);
  p.dkh = ptr(dkh);
  p.daqk = ptr(daqk);
  p.dgth = ptr(dgth);
  p.dakk = ptr(dakk);
  p.dtinv = ptr(dtinv);
  p.daqw = ptr(daqw);
  p.dvec = ptr(dvec);
  p.dend = ptr(dend);
  p.dW1 = ptr(dW1);
  p.dW2 = ptr(dW2);
  p.dS1 = ptr(dS1);
  p.dS2 = ptr(dS2);
  const int64_t floats = mlp::MlpLayout(d.C, d.D, d.E).total;
  for_each_bh(d, p, floats, [](const Params& pp, int64_t bh) { bwd_one(pp, bh); });
  return {dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, dW1, dW2, dS1, dS2};
}

}  // namespace hope
