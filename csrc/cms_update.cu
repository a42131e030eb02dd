// CUDA cms_update (NL eq. 70-71, nl_l2_precond NL eq. 27-29): rmsnorm and GELU/GELU' fused kernels on the
// current stream, GEMMs through ATen (cuBLAS). No host sync: every size is known on the host up front.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace hope {
namespace {

// One block per row (b, c): n = x * rsqrt(mean(x^2) + eps).
__global__ void rmsnorm_rows_kernel(const float* __restrict__ p_x, float* __restrict__ p_n, int64_t D) {
  const int64_t o_row = static_cast<int64_t>(blockIdx.x) * D;
  __shared__ float b_partial[32];
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += p_x[o_row + d] * p_x[o_row + d];
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_down_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) b_partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? b_partial[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) b_partial[0] = rsqrtf(v / static_cast<float>(D) + kRmsEps);
  }
  __syncthreads();
  const float inv = b_partial[0];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) p_n[o_row + d] = p_x[o_row + d] * inv;
}

// a = gelu(h), dh = back * gelu'(h) in one pass over h (exact erf GELU).
__global__ void gelu_fwd_bwd_kernel(const float* __restrict__ p_h, const float* __restrict__ p_back,
                                    float* __restrict__ p_a, float* __restrict__ p_dh, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = p_h[i];
    const float cdf = 0.5f * (1.f + erff(v * kInvSqrt2));
    const float pdf = __expf(-0.5f * v * v) * kInvSqrt2Pi;
    p_a[i] = v * cdf;
    p_dh[i] = p_back[i] * (cdf + v * pdf);
  }
}

}  // namespace

std::vector<at::Tensor> cms_update_cuda(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                        const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                        double lr, double beta, bool precond) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp)
  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2);
  at::Tensor n = at::empty_like(x);
  if (B * C > 0) {
    rmsnorm_rows_kernel<<<static_cast<unsigned>(B * C), 256, 0, stream>>>(x.data_ptr<float>(), n.data_ptr<float>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor h = at::bmm(n, w1.transpose(1, 2));
  at::Tensor back = at::bmm(delta, w2);
  at::Tensor a = at::empty_like(h);
  at::Tensor dh = at::empty_like(h);
  const int64_t numel = h.numel();
  if (numel > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535);
    gelu_fwd_bwd_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        h.data_ptr<float>(), back.data_ptr<float>(), a.data_ptr<float>(), dh.data_ptr<float>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor g2 = at::bmm(delta.transpose(1, 2), a);
  at::Tensor g1 = at::bmm(dh.transpose(1, 2), n);
  at::Tensor m1_new = at::add(g1, m1, beta);
  at::Tensor m2_new = at::add(g2, m2, beta);
  at::Tensor w1_new;
  if (precond) {
    at::Tensor xbar = n.mean(1);
    w1_new = w1 - lr * at::bmm(at::bmm(w1, xbar.unsqueeze(2)), xbar.unsqueeze(1)) - lr * m1_new;
  } else {
    w1_new = at::add(w1, m1_new, -lr);
  }
  return {w1_new, at::add(w2, m2_new, -lr), m1_new, m2_new};
}

}  // namespace hope
