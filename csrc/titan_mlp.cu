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

#include "ops.h"
#include "titan_mlp_body.h"
#include "titan_mlp_host.h"

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

// The forward kernel: out (when write_out, in q's dtype), the final state and (when store_states) the chunk-start
// states [B, H, NC, 4, D, E]; scratch [B * H, >= MlpLayout.fwd_total] fp32.
template <typename scalar_t>
mlp_host::FwdOut launch_fwd(const MlpDims& d, mlp::MlpParams<scalar_t> p, const at::Tensor& q,
                            const at::Tensor& scratch, bool write_out, bool store_states) {
  mlp_host::FwdOut r = mlp_host::fwd_outputs<scalar_t>(d, p, q, write_out, store_states);
  if (d.B * d.H == 0) return r;
  p.scratch = scratch.data_ptr<float>();
  p.scratch_stride = scratch.size(1);
  titan_mlp_fwd_kernel<scalar_t><<<static_cast<unsigned>(d.B * d.H), kMlpThreads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return r;
}

}  // namespace

std::vector<at::Tensor> titan_mlp_fwd_cuda(const TitanInputs& in, bool store_states) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_mlp_checks.h)
  const MlpDims d = mlp_host::dims(in);
  const c10::cuda::CUDAGuard device_guard(in.q.device());
  const at::Tensor scratch =
      at::empty({d.B * d.H, mlp::MlpLayout(d.C, d.D, d.E).fwd_total}, in.q.options().dtype(at::kFloat));
  mlp_host::FwdOut r;
  HOPE_DISPATCH_FLOAT_HALF(in.q.scalar_type(), "titan_mlp_fwd_cuda", [&] {
    r = launch_fwd<scalar_t>(d, mlp_host::params<scalar_t>(d, in), in.q, scratch, /*write_out=*/true, store_states);
  });
  return r.list();
}

TitanInputs titan_mlp_bwd_cuda(const TitanInputs& in, const TitanGradsIn& grads) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_mlp_checks.h)
  const MlpDims d = mlp_host::dims(in);
  const c10::cuda::CUDAGuard device_guard(in.q.device());
  // one scratch for both kernels (the backward's layout extends the forward's)
  const at::Tensor scratch =
      at::empty({d.B * d.H, mlp::MlpLayout(d.C, d.D, d.E).total}, in.q.options().dtype(at::kFloat));
  TitanInputs g;
  HOPE_DISPATCH_FLOAT_HALF(in.q.scalar_type(), "titan_mlp_bwd_cuda", [&] {
    auto p = mlp_host::params<scalar_t>(d, in);
    // the chunk-start states (the forward kept only its inputs); same stream, so ordered before the backward
    const mlp_host::FwdOut f = launch_fwd<scalar_t>(d, p, in.q, scratch, /*write_out=*/false, /*store_states=*/true);
    // every element of the outputs is written by the kernel (zeros for padded rows / columns)
    g = mlp_host::bwd_outputs<scalar_t>(d, p, in, f.states, grads);
    if (d.B * d.H == 0) return;
    p.scratch = scratch.data_ptr<float>();
    p.scratch_stride = scratch.size(1);
    titan_mlp_bwd_kernel<scalar_t><<<static_cast<unsigned>(d.B * d.H), kMlpThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

}  // namespace hope
