// Host-side code shared by the mlp memory's CPU (titan_mlp_cpu.cpp, g++) and CUDA (titan_mlp.cu, nvcc) entry
// points: the sizes of checked inputs, the kernel parameters (titan_mlp_body.h MlpParams) from the tensors, and the
// output tensors of the forward and backward with the parameters pointed at them. Inputs are checked before any
// function here runs (titan_mlp_checks.h: by the CPU entry points, by bindings_cuda.cpp for CUDA). Outputs take the
// dtype and device of their input (q, k, v: q's dtype; everything else fp32); on the CPU that is always fp32.
#pragma once
#include <optional>
#include <vector>

#include "common.h"
#include "titan_mlp_body.h"
#include "titan_mlp_checks.h"  // MlpDims

namespace hope {
namespace mlp_host {

// The sizes of inputs that check_titan_mlp_inputs accepted (it returns the same MlpDims).
inline MlpDims dims(const at::Tensor& q, const std::optional<at::Tensor>& kh, const at::Tensor& W1,
                    int64_t chunk_size) {
  MlpDims d{};
  d.B = q.size(0), d.H = q.size(1), d.T = q.size(2), d.D = q.size(3), d.E = W1.size(3), d.C = chunk_size;
  d.NC = (d.T + d.C - 1) / d.C;
  d.Tp = d.NC * d.C;
  d.dgd = kh.has_value() && kh->defined();
  return d;
}

inline const float* opt_ptr(const std::optional<at::Tensor>& t, bool dgd) {
  return dgd ? t->data_ptr<float>() : nullptr;
}

// The inputs and sizes; outputs, gradients and scratch are null (set by fwd_outputs / bwd_outputs and the caller).
template <typename scalar_t>
mlp::MlpParams<scalar_t> params(const MlpDims& d, const at::Tensor& q, const at::Tensor& k,
                                const std::optional<at::Tensor>& kh, const at::Tensor& v, const at::Tensor& aqk,
                                const at::Tensor& gth, const std::optional<at::Tensor>& akk,
                                const std::optional<at::Tensor>& tinv, const std::optional<at::Tensor>& aqw,
                                const at::Tensor& vec, const at::Tensor& end, const at::Tensor& W1,
                                const at::Tensor& W2, const at::Tensor& S1, const at::Tensor& S2) {
  mlp::MlpParams<scalar_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
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

// The forward's outputs: out [B, H, T, D] in q's dtype (empty unless write_out), the final state W1_T, W2_T, S1_T,
// S2_T and the chunk-start states [B, H, NC, 4, D, E] (empty unless store_states), fp32.
struct FwdOut {
  at::Tensor out, W1T, W2T, S1T, S2T, states;
  std::vector<at::Tensor> list() const { return {out, W1T, W2T, S1T, S2T, states}; }
};

// Allocates the forward's outputs on q's device and points p's forward outputs at them (null where not written).
template <typename scalar_t>
FwdOut fwd_outputs(const MlpDims& d, mlp::MlpParams<scalar_t>& p, const at::Tensor& q, bool write_out,
                   bool store_states) {
  const auto f32 = q.options().dtype(at::kFloat);
  FwdOut r;
  r.out = write_out ? at::empty({d.B, d.H, d.T, d.D}, q.options()) : at::empty({0}, q.options());
  r.W1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.W2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.S1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.S2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.states = store_states ? at::empty({d.B, d.H, d.NC, 4, d.D, d.E}, f32) : at::empty({0}, f32);
  p.out = write_out ? r.out.data_ptr<scalar_t>() : nullptr;
  p.W1T = r.W1T.data_ptr<float>();
  p.W2T = r.W2T.data_ptr<float>();
  p.S1T = r.S1T.data_ptr<float>();
  p.S2T = r.S2T.data_ptr<float>();
  p.states = store_states ? r.states.data_ptr<float>() : nullptr;
  return r;
}

// The backward's outputs: dq, dk, dv [B, H, T, D] in q's dtype, dkh [B, H, NC * C, D], daqk, dgth, dakk, dtinv,
// daqw [B, H, NC, C, C], dvec [B, H, NC, 7, C], dend [B, H, NC, 3], dW1, dW2, dS1, dS2 (the state's shapes), fp32;
// dkh / dakk / dtinv / daqw are empty for titans. Every element is written by the body (zeros for padded rows /
// columns).
struct BwdOut {
  at::Tensor dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, dW1, dW2, dS1, dS2;
  std::vector<at::Tensor> list() const {
    return {dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, dW1, dW2, dS1, dS2};
  }
};

// Allocates the backward's outputs on q's device and points p's incoming gradients (grad_out, dW1T..dS2T), the
// chunk-start states and the outputs at them (null for an empty output).
template <typename scalar_t>
BwdOut bwd_outputs(const MlpDims& d, mlp::MlpParams<scalar_t>& p, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& states, const at::Tensor& grad_out, const at::Tensor& dW1T,
                   const at::Tensor& dW2T, const at::Tensor& dS1T, const at::Tensor& dS2T) {
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C, D = d.D, E = d.E;
  const auto f32 = q.options().dtype(at::kFloat);
  auto none = [&] { return at::empty({0}, f32); };  // a distinct empty tensor per output (no aliasing)
  auto cc = [&] { return at::empty({B, H, NC, C, C}, f32); };
  BwdOut g;
  g.dq = at::empty({B, H, d.T, D}, q.options());
  g.dk = at::empty({B, H, d.T, D}, k.options());
  g.dv = at::empty({B, H, d.T, D}, v.options());
  g.dkh = d.dgd ? at::empty({B, H, d.Tp, D}, f32) : none();
  g.daqk = cc();
  g.dgth = cc();
  g.dakk = d.dgd ? cc() : none();
  g.dtinv = d.dgd ? cc() : none();
  g.daqw = d.dgd ? cc() : none();
  g.dvec = at::empty({B, H, NC, mlp::kNVec, C}, f32);
  g.dend = at::empty({B, H, NC, 3}, f32);
  g.dW1 = at::empty({B, H, D, E}, f32);
  g.dW2 = at::empty({B, H, E, D}, f32);
  g.dS1 = at::empty({B, H, D, E}, f32);
  g.dS2 = at::empty({B, H, E, D}, f32);
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  auto sptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
  p.states = states.data_ptr<float>();
  p.dout = grad_out.data_ptr<scalar_t>();
  p.dW1T = dW1T.data_ptr<float>();
  p.dW2T = dW2T.data_ptr<float>();
  p.dS1T = dS1T.data_ptr<float>();
  p.dS2T = dS2T.data_ptr<float>();
  p.dq = sptr(g.dq);
  p.dk = sptr(g.dk);
  p.dv = sptr(g.dv);
  p.dkh = ptr(g.dkh);
  p.daqk = ptr(g.daqk);
  p.dgth = ptr(g.dgth);
  p.dakk = ptr(g.dakk);
  p.dtinv = ptr(g.dtinv);
  p.daqw = ptr(g.daqw);
  p.dvec = ptr(g.dvec);
  p.dend = ptr(g.dend);
  p.dW1 = ptr(g.dW1);
  p.dW2 = ptr(g.dW2);
  p.dS1 = ptr(g.dS1);
  p.dS2 = ptr(g.dS2);
  return g;
}

}  // namespace mlp_host
}  // namespace hope
