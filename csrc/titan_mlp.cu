// CUDA titan_memory_update state pass for the mlp memory (M(x) = x + W1 gelu(W2 x)), rules titans and dgd,
// forward and backward: the block-phased body of titan_mlp_body.h (shared with csrc/titan_mlp_cpu.cpp, which the
// CPU tests run) with one thread block per (b, h): each phase strides its index range over the block's threads,
// each barrier is __syncthreads(). The working state (forward: the output state buffers; backward: the output
// gradient buffers) and the per-(b, h) scratch (MlpLayout: token tiles, [C, E] / [C, D] intermediates, [C, C]
// terms) live in global memory (fp32; L1 / L2 cached), so there is no shared memory and no E tiling; no warp
// shuffles, no atomics, no host sync, launches on the current stream. q, k, v, do in fp32 / bf16 / fp16 are read as
// fp32; out, dq, dk, dv are written in q's dtype. Inputs are checked before any function here runs, in
// g++-compiled code (titan_mlp_checks.h, bindings_cuda.cpp).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "ops.h"
#include "titan_mlp_body.h"

namespace hope {
namespace {

constexpr int kMlpThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kMlpThreads) titan_mlp_fwd_kernel(const mlp::MlpParams<scalar_t> p) {
  mlp::fwd_body(p, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMlpThreads) titan_mlp_bwd_kernel(const mlp::MlpParams<scalar_t> p) {
  mlp::bwd_body(p, static_cast<int64_t>(blockIdx.x));
}

#define HOPE_MLP_DISPATCH(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

struct Dims {
  int64_t B, H, T, D, E, C, NC, Tp;
  bool dgd;
};

Dims dims(const at::Tensor& q, const std::optional<at::Tensor>& kh, const at::Tensor& W1, int64_t chunk_size) {
  Dims d{};
  d.B = q.size(0), d.H = q.size(1), d.T = q.size(2), d.D = q.size(3), d.E = W1.size(3), d.C = chunk_size;
  d.NC = (d.T + d.C - 1) / d.C;
  d.Tp = d.NC * d.C;
  d.dgd = kh.has_value() && kh->defined();
  return d;
}

const float* opt_ptr(const std::optional<at::Tensor>& t, bool dgd) { return dgd ? t->data_ptr<float>() : nullptr; }

template <typename scalar_t>
mlp::MlpParams<scalar_t> params(const Dims& d, const at::Tensor& q, const at::Tensor& k,
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

struct FwdOut {
  at::Tensor out, W1T, W2T, S1T, S2T, states;
};

// The forward kernel: out (when write_out, in q's dtype), the final state and (when store_states) the chunk-start
// states [B, H, NC, 4, D, E]; scratch [B * H, >= MlpLayout.fwd_total] fp32.
template <typename scalar_t>
FwdOut launch_fwd(const Dims& d, mlp::MlpParams<scalar_t> p, const at::Tensor& q, const at::Tensor& scratch,
                  bool write_out, bool store_states) {
  const auto f32 = q.options().dtype(at::kFloat);
  FwdOut r;
  r.out = write_out ? at::empty({d.B, d.H, d.T, d.D}, q.options()) : at::empty({0}, q.options());
  r.W1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.W2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.S1T = at::empty({d.B, d.H, d.D, d.E}, f32);
  r.S2T = at::empty({d.B, d.H, d.E, d.D}, f32);
  r.states = store_states ? at::empty({d.B, d.H, d.NC, 4, d.D, d.E}, f32) : at::empty({0}, f32);
  if (d.B * d.H == 0) return r;
  p.out = write_out ? r.out.data_ptr<scalar_t>() : nullptr;
  p.W1T = r.W1T.data_ptr<float>();
  p.W2T = r.W2T.data_ptr<float>();
  p.S1T = r.S1T.data_ptr<float>();
  p.S2T = r.S2T.data_ptr<float>();
  p.states = store_states ? r.states.data_ptr<float>() : nullptr;
  p.scratch = scratch.data_ptr<float>();
  p.scratch_stride = scratch.size(1);
  titan_mlp_fwd_kernel<scalar_t><<<static_cast<unsigned>(d.B * d.H), kMlpThreads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return r;
}

}  // namespace

std::vector<at::Tensor> titan_mlp_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                           const std::optional<at::Tensor>& kh, const at::Tensor& v,
                                           const at::Tensor& aqk, const at::Tensor& gth,
                                           const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                           const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                           const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                           const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size,
                                           bool store_states) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_mlp_checks.h)
  const Dims d = dims(q, kh, W1, chunk_size);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor scratch =
      at::empty({d.B * d.H, mlp::MlpLayout(d.C, d.D, d.E).fwd_total}, q.options().dtype(at::kFloat));
  FwdOut r;
  HOPE_MLP_DISPATCH(q.scalar_type(), "titan_mlp_fwd_cuda", [&] {
    r = launch_fwd<scalar_t>(d, params<scalar_t>(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2),
                             q, scratch, /*write_out=*/true, store_states);
  });
  return {r.out, r.W1T, r.W2T, r.S1T, r.S2T, r.states};
}

std::vector<at::Tensor> titan_mlp_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& dW1T, const at::Tensor& dW2T,
                                           const at::Tensor& dS1T, const at::Tensor& dS2T, const at::Tensor& q,
                                           const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                           const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth,
                                           const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                           const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                           const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                           const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_mlp_checks.h)
  const Dims d = dims(q, kh, W1, chunk_size);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C, D = d.D, E = d.E;
  const auto f32 = q.options().dtype(at::kFloat);
  // one scratch for both kernels (the backward's layout extends the forward's)
  const at::Tensor scratch = at::empty({B * H, mlp::MlpLayout(C, D, E).total}, f32);
  auto none = [&] { return at::empty({0}, f32); };  // a distinct empty tensor per output (no aliasing)
  auto cc = [&] { return at::empty({B, H, NC, C, C}, f32); };
  // every element of these is written by the kernel (zeros for padded rows / columns)
  at::Tensor dq = at::empty({B, H, d.T, D}, q.options()), dk = at::empty({B, H, d.T, D}, k.options());
  at::Tensor dv = at::empty({B, H, d.T, D}, v.options());
  at::Tensor dkh = d.dgd ? at::empty({B, H, d.Tp, D}, f32) : none();
  at::Tensor daqk = cc(), dgth = cc();
  at::Tensor dakk = d.dgd ? cc() : none(), dtinv = d.dgd ? cc() : none(), daqw = d.dgd ? cc() : none();
  at::Tensor dvec = at::empty({B, H, NC, mlp::kNVec, C}, f32), dend = at::empty({B, H, NC, 3}, f32);
  at::Tensor dW1 = at::empty({B, H, D, E}, f32), dW2 = at::empty({B, H, E, D}, f32);
  at::Tensor dS1 = at::empty({B, H, D, E}, f32), dS2 = at::empty({B, H, E, D}, f32);
  if (B * H > 0) {
    HOPE_MLP_DISPATCH(q.scalar_type(), "titan_mlp_bwd_cuda", [&] {
      auto p = params<scalar_t>(d, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2);
      // the chunk-start states (the forward kept only its inputs); same stream, so ordered before the backward
      const FwdOut f = launch_fwd<scalar_t>(d, p, q, scratch, /*write_out=*/false, /*store_states=*/true);
      auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
      p.states = f.states.data_ptr<float>();
      p.dout = grad_out.data_ptr<scalar_t>();
      p.dW1T = dW1T.data_ptr<float>();
      p.dW2T = dW2T.data_ptr<float>();
      p.dS1T = dS1T.data_ptr<float>();
      p.dS2T = dS2T.data_ptr<float>();
      p.dq = dq.data_ptr<scalar_t>();
      p.dk = dk.data_ptr<scalar_t>();
      p.dv = dv.data_ptr<scalar_t>();
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
      p.out = nullptr;
      p.scratch = scratch.data_ptr<float>();
      p.scratch_stride = scratch.size(1);
      titan_mlp_bwd_kernel<scalar_t><<<static_cast<unsigned>(B * H), kMlpThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, dW1, dW2, dS1, dS2};
}

}  // namespace hope
