// Host-side code shared by the mlp memory's CPU (titan_mlp_cpu.cpp, g++) and CUDA (titan_mlp.cu, nvcc) entry
// points: the sizes of checked inputs, the kernel parameters (titan_mlp_body.h MlpParams) from the tensors, and the
// output tensors of the forward and backward with the parameters pointed at them. Inputs are checked before any
// function here runs (titan_mlp_checks.h: by the CPU entry points, by bindings_cuda.cpp for CUDA). Outputs take the
// dtype and device of their input (q, k, v: q's dtype; everything else fp32); on the CPU that is always fp32.
#pragma once
#include <vector>

#include "common.h"
#include "titan_inputs.h"
#include "titan_mlp_body.h"
#include "titan_mlp_checks.h"  // MlpDims

namespace hope {
namespace mlp_host {

// The sizes of inputs that check_titan_mlp_inputs accepted (it returns the same MlpDims).
inline MlpDims dims(const TitanInputs& in) {
  MlpDims d{};
  d.B = in.q.size(0), d.H = in.q.size(1), d.T = in.q.size(2), d.D = in.q.size(3), d.E = in.state[0].size(3);
  d.C = in.chunk_size;
  d.NC = (d.T + d.C - 1) / d.C;
  d.Tp = d.NC * d.C;
  d.dgd = in.dgd();
  return d;
}

// The inputs and sizes; outputs, gradients and scratch are null (set by fwd_outputs / bwd_outputs and the caller).
template <typename scalar_t>
mlp::MlpParams<scalar_t> params(const MlpDims& d, const TitanInputs& in) {
  auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  mlp::MlpParams<scalar_t> p{};
  p.q = in.q.data_ptr<scalar_t>();
  p.k = in.k.data_ptr<scalar_t>();
  p.v = in.v.data_ptr<scalar_t>();
  p.kh = d.dgd ? f(in.khat) : nullptr;
  p.aqk = f(in.aqk);
  p.gth = f(in.gth);
  p.akk = d.dgd ? f(in.akk) : nullptr;
  p.tinv = d.dgd ? f(in.tinv) : nullptr;
  p.aqw = d.dgd ? f(in.aqw) : nullptr;
  p.vec = f(in.rows);
  p.end = f(in.ends);
  p.W1 = f(in.state[0]);
  p.W2 = f(in.state[1]);
  p.S1 = f(in.state[2]);
  p.S2 = f(in.state[3]);
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

// Allocates the backward's outputs on q's device (the gradient of each input, TitanInputs' names: q, k, v in q's
// dtype, the rest fp32; khat / akk / tinv / aqw empty for titans) and points p's incoming gradients, the chunk-start
// states and the outputs at them (null for an empty output). Every element is written by the body (zeros for
// padded rows / columns).
template <typename scalar_t>
TitanInputs bwd_outputs(const MlpDims& d, mlp::MlpParams<scalar_t>& p, const TitanInputs& in,
                        const at::Tensor& states, const TitanGradsIn& grads) {
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C, D = d.D, E = d.E;
  const auto f32 = in.q.options().dtype(at::kFloat);
  auto none = [&] { return at::empty({0}, f32); };  // a distinct empty tensor per output (no aliasing)
  auto cc = [&] { return at::empty({B, H, NC, C, C}, f32); };
  TitanInputs g;
  g.q = at::empty({B, H, d.T, D}, in.q.options());
  g.k = at::empty({B, H, d.T, D}, in.k.options());
  g.v = at::empty({B, H, d.T, D}, in.v.options());
  g.khat = d.dgd ? at::empty({B, H, d.Tp, D}, f32) : none();
  g.aqk = cc();
  g.gth = cc();
  g.akk = d.dgd ? cc() : none();
  g.tinv = d.dgd ? cc() : none();
  g.aqw = d.dgd ? cc() : none();
  g.rows = at::empty({B, H, NC, mlp::kNVec, C}, f32);
  g.ends = at::empty({B, H, NC, 3}, f32);
  g.state = {at::empty({B, H, D, E}, f32), at::empty({B, H, E, D}, f32), at::empty({B, H, D, E}, f32),
             at::empty({B, H, E, D}, f32)};
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  auto sptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
  p.states = states.data_ptr<float>();
  p.dout = grads.out.data_ptr<scalar_t>();
  p.dW1T = grads.state[0].data_ptr<float>();
  p.dW2T = grads.state[1].data_ptr<float>();
  p.dS1T = grads.state[2].data_ptr<float>();
  p.dS2T = grads.state[3].data_ptr<float>();
  p.dq = sptr(g.q);
  p.dk = sptr(g.k);
  p.dv = sptr(g.v);
  p.dkh = ptr(g.khat);
  p.daqk = ptr(g.aqk);
  p.dgth = ptr(g.gth);
  p.dakk = ptr(g.akk);
  p.dtinv = ptr(g.tinv);
  p.daqw = ptr(g.aqw);
  p.dvec = ptr(g.rows);
  p.dend = ptr(g.ends);
  p.dW1 = ptr(g.state[0]);
  p.dW2 = ptr(g.state[1]);
  p.dS1 = ptr(g.state[2]);
  p.dS2 = ptr(g.state[3]);
  return g;
}

}  // namespace mlp_host
}  // namespace hope
