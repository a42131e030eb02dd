// CUDA teach signal (NL F1): chunked fused linear + cross-entropy (Liger-style), never the full [N, V] logits.
// Per chunk of rows: Z = H_c W^T (cuBLAS, fp32 out) -> one kernel turns each row of Z into its CE term and
// G = (softmax - onehot) * valid / N_valid -> delta_c = G W and dW += G^T H_c (cuBLAS). No host sync: N_valid
// stays on the device and an out-of-range target is reported by a NaN loss, not by a check that reads targets.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "ops.h"

namespace hope {
namespace {

// One register pack of N elements: a single vectorised load / store when the row is N-aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Merges (m2, s2) into the running (max m, sum exp(z - m)); a -inf max is rebased at 0 so exp(-inf - -inf) is never formed.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float m_new = fmaxf(m, m2);
  const float ref = m_new == -INFINITY ? 0.f : m_new;
  s = s * expf(m - ref) + s2 * expf(m2 - ref);
  m = m_new;
}

// Block-wide (max, sum-exp): every warp reduces the per-warp partials itself, so all threads get it after one sync.
__device__ __forceinline__ void block_lse(float& m, float& s) {
  __shared__ float sh_m[32], sh_s[32];
  for (int off = 16; off > 0; off >>= 1)
    lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  const bool live = lane < static_cast<int>(blockDim.x >> 5);
  m = live ? sh_m[lane] : -INFINITY;
  s = live ? sh_s[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1)
    lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
}

// One block per logits row: online max / sum-exp over V, then G = (softmax - onehot) * scale written to p_g and the
// row's CE term to p_loss. p_g may alias p_z (fp32 inputs: G overwrites the logits in place), hence no __restrict__.
// Ignored rows: G = 0, loss 0. A target outside [0, V): G and loss NaN (device-side signal, no host sync).
template <typename out_t, int VEC>
__global__ void ce_grad_rows_kernel(const float* p_z, out_t* p_g, const int64_t* __restrict__ p_t,
                                    const int64_t* __restrict__ p_n_valid, float* __restrict__ p_loss, int64_t V,
                                    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const float* b_z = p_z + row * V;
  out_t* b_g = p_g + row * V;
  const int64_t t = p_t[row];
  const bool ignored = t == ignore_index;
  if (ignored || t < 0 || t >= V) {  // uniform over the block, so returning before the block reduction is safe
    const float fill = ignored ? 0.f : NAN;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) b_g[v] = static_cast<out_t>(fill);
    if (threadIdx.x == 0) p_loss[row] = fill;
    return;
  }
  // read before the block sync in block_lse: after it, G may already overwrite the row in place
  const float z_t = threadIdx.x == 0 ? b_z[t] : 0.f;
  const int64_t n_vec = V / VEC;
  const Pack<float, VEC>* b_zv = reinterpret_cast<const Pack<float, VEC>*>(b_z);
  float m = -INFINITY, s = 0.f;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const Pack<float, VEC> x = b_zv[i];
    float x_max = x.v[0];
#pragma unroll
    for (int j = 1; j < VEC; ++j) x_max = fmaxf(x_max, x.v[j]);
    // one rescale per pack; a NaN logit is skipped by fmaxf but reaches the sum through expf, so it poisons the row
    const float m_new = fmaxf(m, x_max);
    const float ref = m_new == -INFINITY ? 0.f : m_new;
    float acc = s * expf(m - ref);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc += expf(x.v[j] - ref);
    m = m_new;
    s = acc;
  }
  block_lse(m, s);
  const float lse = m + logf(s);
  const float scale = 1.f / static_cast<float>(*p_n_valid > 1 ? *p_n_valid : 1);
  Pack<out_t, VEC>* b_gv = reinterpret_cast<Pack<out_t, VEC>*>(b_g);
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const Pack<float, VEC> x = b_zv[i];
    Pack<out_t, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float onehot = i * VEC + j == t ? 1.f : 0.f;
      g.v[j] = static_cast<out_t>((expf(x.v[j] - lse) - onehot) * scale);
    }
    b_gv[i] = g;
  }
  if (threadIdx.x == 0) p_loss[row] = lse - z_t;
}

template <typename out_t>
void launch_ce_grad_rows(const at::Tensor& z, at::Tensor& g, const at::Tensor& targets, const at::Tensor& n_valid,
                         at::Tensor& row_loss, int64_t ignore_index, cudaStream_t stream) {
  const int64_t rows = z.size(0), V = z.size(1);
  // more threads for long rows; untuned until the GPU run (multiple of 32, at most 1024 for block_lse)
  const int threads = V >= 8192 ? 512 : (V >= 1024 ? 256 : 128);
  const float* p_z = z.data_ptr<float>();
  out_t* p_g = static_cast<out_t*>(g.data_ptr());
  const int64_t* p_t = targets.data_ptr<int64_t>();
  const int64_t* p_nv = n_valid.data_ptr<int64_t>();
  float* p_loss = row_loss.data_ptr<float>();
  // rows start 16-byte aligned (fp32) / 8-byte aligned (half) only when V % 4 == 0: otherwise scalar accesses
  if (V % 4 == 0) {
    ce_grad_rows_kernel<out_t, 4><<<static_cast<unsigned>(rows), threads, 0, stream>>>(p_z, p_g, p_t, p_nv, p_loss, V,
                                                                                       ignore_index);
  } else {
    ce_grad_rows_kernel<out_t, 1><<<static_cast<unsigned>(rows), threads, 0, stream>>>(p_z, p_g, p_t, p_nv, p_loss, V,
                                                                                       ignore_index);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dW [V, D] fp32 += G^T H with G [c, V], H [c, D] in half precision. ATen's addmm cannot accumulate half inputs
// into an fp32 matrix on every torch version we support, so cuBLAS directly: row-major dW is column-major dW^T
// [D, V], and dW^T += H^T G is C = A op(B) with A = H (column-major [D, c]) and B = G (column-major [V, c]) transposed.
void addmm_half_into_float(at::Tensor& dw, const at::Tensor& g, const at::Tensor& h) {
  const int64_t c = g.size(0), V = g.size(1), D = h.size(1);
  if (c == 0 || D == 0) return;
  const cudaDataType_t dtype = g.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const float alpha = 1.f, beta = 1.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream by ATen
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(D), static_cast<int>(V),
                                    static_cast<int>(c), &alpha, h.data_ptr(), dtype, static_cast<int>(D),
                                    g.data_ptr(), dtype, static_cast<int>(V), &beta, dw.data_ptr(), CUDA_R_32F,
                                    static_cast<int>(D), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Liger's rule: a [rows, V] chunk about as large as hidden [N, D], rounded up to a power of two; >= 256 rows so the
// GEMMs stay large, <= N.
int64_t default_chunk_rows(int64_t N, int64_t V, int64_t D) {
  const int64_t d = std::max<int64_t>(D, 1);
  const int64_t inc = (V + d - 1) / d;
  const int64_t want = (N + inc - 1) / inc;
  int64_t rows = 1;
  while (rows < want) rows <<= 1;
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(rows, 256), N));
}

}  // namespace

// Returns {loss fp32 scalar (mean CE over valid rows, 0 when none), delta [N, D] in hidden's dtype (= d loss / d hidden),
// dW [V, D] fp32 (= d loss / d weight; [0, D] when !compute_dw)}. chunk_rows = 0 picks default_chunk_rows.
// Extra memory: chunk_rows x V fp32 logits (+ the same in hidden's dtype for bf16/fp16), dW, and O(N) per-row terms.
std::vector<at::Tensor> teach_signal_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                          int64_t ignore_index, bool compute_dw, int64_t chunk_rows) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, checks_cuda.h)
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const at::ScalarType dtype = hidden.scalar_type();
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  const bool half = dtype != at::kFloat;
  at::Tensor n_valid = targets.ne(ignore_index).sum();  // int64 on the device: read by the kernel, never by the host
  at::Tensor row_loss = at::empty({N}, f32);
  at::Tensor delta = at::empty({N, D}, hidden.options());
  at::Tensor dw = compute_dw ? at::zeros({V, D}, f32) : at::empty({0, D}, f32);
  if (N == 0) return {at::zeros({}, f32), delta, dw};

  const int64_t rows = std::min<int64_t>(chunk_rows > 0 ? chunk_rows : default_chunk_rows(N, V, D), N);
  at::Tensor z_buf = at::empty({rows, V}, f32);
  // fp32: G overwrites the logits in place; half: G in the input dtype for the tensor-core GEMMs (as the triton path)
  at::Tensor g_buf = half ? at::empty({rows, V}, hidden.options()) : z_buf;
  at::Tensor d_buf = half ? at::empty({rows, D}, f32) : at::Tensor();  // fp32 delta rows before the final rounding
  const at::Tensor w_t = weight.t();
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t c = std::min<int64_t>(rows, N - r0);
    const at::Tensor h_c = hidden.narrow(0, r0, c);
    at::Tensor z = z_buf.narrow(0, 0, c);
    at::Tensor g = g_buf.narrow(0, 0, c);
    at::Tensor loss_c = row_loss.narrow(0, r0, c);
    at::Tensor delta_c = delta.narrow(0, r0, c);
    const at::Tensor t_c = targets.narrow(0, r0, c);
    if (half) {
      at::mm_out(z, h_c, w_t, at::kFloat);  // half inputs, fp32 accumulation and output
    } else {
      at::mm_out(z, h_c, w_t);
    }
    switch (dtype) {
      case at::kFloat:
        launch_ce_grad_rows<float>(z, g, t_c, n_valid, loss_c, ignore_index, stream);
        break;
      case at::kBFloat16:
        launch_ce_grad_rows<c10::BFloat16>(z, g, t_c, n_valid, loss_c, ignore_index, stream);
        break;
      default:
        launch_ce_grad_rows<c10::Half>(z, g, t_c, n_valid, loss_c, ignore_index, stream);
        break;
    }
    if (half) {
      at::Tensor d_c = d_buf.narrow(0, 0, c);
      at::mm_out(d_c, g, weight, at::kFloat);
      delta_c.copy_(d_c);
      if (compute_dw) addmm_half_into_float(dw, g, h_c);
    } else {
      at::mm_out(delta_c, g, weight);
      if (compute_dw) dw.addmm_(g.t(), h_c);
    }
  }
  at::Tensor loss = row_loss.sum().div_(n_valid.clamp_min(1));
  return {loss, delta, dw};
}

}  // namespace hope
