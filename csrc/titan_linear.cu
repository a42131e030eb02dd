// CUDA titan_memory_update, linear memory, rules titans and dgd: the two state-pass kernels (forward and
// backward) of docs/kernels/titan_memory.md ("kernel split", "CUDA port"). A line-by-line port of the Triton
// kernels _linear_fwd_kernel / _linear_bwd_kernel in hope_kernels/titan_memory_update/triton/linear.py, with the
// same tensors (titan_inputs.h); the chunk terms come from chunk.chunk_terms, and tests/kernels/titan_oracle.py's
// linear_state_pass is the forward kernel in plain PyTorch.
//
// One thread block per (batch * head, block of kBV value rows); the state tiles W, S [kBV, Dk] (backward
// also dW, dS) stay in shared memory, fp32, across the chunk loop. Inside a chunk every product is a plain
// fp32 FMA loop over shared-memory tiles. Padding of T to NC * C is handled with masks as in Triton: rows
// t >= L (L = valid tokens of the chunk) read as zero and are never stored; the per-value-block partial
// outputs of the backward are written entirely (zeros where Triton's masked stores leave its zeros) and
// summed on the host with at::sum (no atomics). No host sync: every size is known on the host. Inputs are
// checked before any function here runs, in g++-compiled code (titan_linear_checks.h, bindings_cuda.cpp).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace hope {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBV = 16;          // value rows per block (row reductions below use 16-lane groups)
constexpr int kBS = kBV + 1;     // row stride of the [C, kBV] tiles (+1: no bank conflicts on columns)
constexpr int kNVec = 7;         // rows of `rows` (titan_inputs.h kRow*)
constexpr int kBc = 0, kCc = 1, kBp = 2, kCp = 3, kWg = 4, kWp = 5, kWb = 6;
static_assert(kBV == 16, "the row reductions over the value block are 16-lane shuffles");
static_assert(kThreads % 32 == 0, "whole warps");

// Shared-memory layout of the forward kernel, in floats (host: size; device: offsets).
// [*, Dk] tiles have row stride Dk + 1, [C, C] tiles C + 1, [C, kBV] tiles kBV + 1.
struct FwdLayout {
  int ks, cs, W, S, K, X, A, E, O, R, w, vec, end, total;
  __host__ __device__ FwdLayout(int C, int Dk, bool dgd) {
    ks = Dk + 1;
    cs = C + 1;
    int o = 0;
    W = o; o += kBV * ks;    // state W (this block's rows)
    S = o; o += kBV * ks;    // momentum S
    K = o; o += C * ks;      // keys of the chunk
    X = o; o += C * ks;      // queries, then (dgd) unit keys k^
    A = o; o += C * cs;      // one [C, C] chunk term at a time: Aqk, Akk, Tinv, Aqw
    E = o; o += C * kBS;     // errors E = K W^T - V
    O = o; o += C * kBS;     // outputs before the dgd read-out
    R = o; if (dgd) o += C * kBS;
    w = o; if (dgd) o += C * kBS;  // pseudo-values w = Tinv R
    vec = o; o += kNVec * C;
    end = o; o += 4;
    total = o;
  }
};

// Backward: W, S (chunk-start state), dW, dS (gradient of the state after the chunk), two token tiles
// (K; Q, or k^ under dgd with Q reloaded for the last step), one [C, C] term at a time and the [C, kBV]
// intermediates.
struct BwdLayout {
  int ks, cs, W, S, dW, dS, T1, T2, A, dO, E, dE, KhW, KhS, R, w, khdW, dw, dR, vec, end, red, total;
  __host__ __device__ BwdLayout(int C, int Dk, bool dgd) {
    ks = Dk + 1;
    cs = C + 1;
    int o = 0;
    W = o; o += kBV * ks;
    S = o; o += kBV * ks;
    dW = o; o += kBV * ks;
    dS = o; o += kBV * ks;
    T1 = o; o += C * ks;
    T2 = o; o += C * ks;
    A = o; o += C * cs;
    dO = o; o += C * kBS;
    E = o; o += C * kBS;
    dE = o; o += C * kBS;
    const int dgd_tiles = dgd ? C * kBS : 0;
    KhW = o; o += dgd_tiles;
    KhS = o; o += dgd_tiles;
    R = o; o += dgd_tiles;
    w = o; o += dgd_tiles;
    khdW = o; o += dgd_tiles;
    dw = o; o += dgd_tiles;
    dR = o; o += dgd_tiles;
    vec = o; o += kNVec * C;
    end = o; o += 4;
    red = o; o += 3 * kWarps;
    total = o;
  }
};

// Rows [0, L) of a [rows, D] global slice into a [C, ks] tile as fp32; rows L..C-1 are zero (Triton's m_tk).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* __restrict__ src, int L, int C, int D, int ks) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < C; t += kWarps)
    for (int d = lane; d < D; d += 32)
      dst[t * ks + d] = t < L ? static_cast<float>(src[static_cast<int64_t>(t) * D + d]) : 0.f;
}

// A [C, C] chunk term (row stride C in global) into [C, cs]; entries outside [0, L)^2 are zero (m_tt).
__device__ __forceinline__ void load_mat(float* dst, const float* __restrict__ src, int L, int C, int cs) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < C; t += kWarps)
    for (int i = lane; i < C; i += 32) dst[t * cs + i] = (t < L && i < L) ? src[t * C + i] : 0.f;
}

// The [7, C] vectors of the chunk (entries t >= L zero, m_t) and the 3 end-of-chunk scalars.
__device__ __forceinline__ void load_vec_end(float* s_vec, float* s_end, const float* __restrict__ vec,
                                             const float* __restrict__ end, int L, int C) {
  for (int idx = threadIdx.x; idx < kNVec * C; idx += kThreads) s_vec[idx] = (idx % C) < L ? vec[idx] : 0.f;
  if (threadIdx.x < 3) s_end[threadIdx.x] = end[threadIdx.x];
}

// The [C, kBV] slice (t < L, j < nv) of a [T, Dv] tensor (src at row t0, column v0) as fp32; zero elsewhere.
template <typename T>
__device__ __forceinline__ void load_cv(float* dst, const T* __restrict__ src, int L, int nv, int C, int Dv) {
  for (int idx = threadIdx.x; idx < C * kBV; idx += kThreads) {
    const int t = idx / kBV, j = idx % kBV;
    dst[t * kBS + j] = (t < L && j < nv) ? static_cast<float>(src[static_cast<int64_t>(t) * Dv + j]) : 0.f;
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma unroll 4
  for (int d = 0; d < n; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

// Sum over the 16 lanes of a half warp (one row t of a [C, kBV] tile); every lane of the warp must call it.
__device__ __forceinline__ float sum16(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}

__device__ __forceinline__ float sum32(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ------------------------------------------------------------------------------------------------ forward
// Per chunk (chunk_terms.linear_state_pass), with the chunk-start state (W, S):
//   E = K W^T - V;  O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E
//   dgd: R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E;  w = Tinv R;  O -= Aqw w
//   W' = B_L W + c_L S - E^T diag(wg) K [- w^T diag(wb) K^];  S' = A_L S - E^T diag(wp) K
template <typename scalar_t, bool DGD>
__global__ void __launch_bounds__(kThreads) titan_linear_fwd_kernel(
    const scalar_t* __restrict__ p_q, const scalar_t* __restrict__ p_k, const float* __restrict__ p_kh,
    const scalar_t* __restrict__ p_v, const float* __restrict__ p_aqk, const float* __restrict__ p_akk,
    const float* __restrict__ p_tinv, const float* __restrict__ p_aqw, const float* __restrict__ p_vec,
    const float* __restrict__ p_end, const float* __restrict__ p_w0, const float* __restrict__ p_s0,
    scalar_t* __restrict__ p_o, float* __restrict__ p_wT, float* __restrict__ p_sT, float* __restrict__ p_states,
    int64_t T, int64_t NC, int C, int Dk, int Dv, bool write_out, bool store_states) {
  extern __shared__ float smem[];
  const FwdLayout lay(C, Dk, DGD);
  float* sW = smem + lay.W;
  float* sS = smem + lay.S;
  float* sK = smem + lay.K;
  float* sX = smem + lay.X;
  float* sA = smem + lay.A;
  float* sE = smem + lay.E;
  float* sO = smem + lay.O;
  float* sR = smem + lay.R;
  float* sw = smem + lay.w;
  float* sVec = smem + lay.vec;
  float* sEnd = smem + lay.end;
  const int ks = lay.ks, cs = lay.cs;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t i_bh = blockIdx.x;
  const int v0 = blockIdx.y * kBV;
  const int nv = min(kBV, Dv - v0);  // valid value rows of this block (m_v)
  const int64_t Tp = NC * C;
  const int64_t DvDk = static_cast<int64_t>(Dv) * Dk;
  const int64_t o_state = i_bh * DvDk + static_cast<int64_t>(v0) * Dk;

  for (int j = warp; j < kBV; j += kWarps)
    for (int d = lane; d < Dk; d += 32) {
      sW[j * ks + d] = j < nv ? p_w0[o_state + j * Dk + d] : 0.f;
      sS[j * ks + d] = j < nv ? p_s0[o_state + j * Dk + d] : 0.f;
    }
  __syncthreads();

  for (int64_t i_c = 0; i_c < NC; ++i_c) {
    const int64_t t0 = i_c * C;
    const int L = static_cast<int>(min(static_cast<int64_t>(C), T - t0));
    const int64_t cid = i_bh * NC + i_c;
    if (store_states) {  // chunk-start state, for the backward
      float* st = p_states + cid * 2 * DvDk + static_cast<int64_t>(v0) * Dk;
      for (int j = warp; j < nv; j += kWarps)
        for (int d = lane; d < Dk; d += 32) {
          st[j * Dk + d] = sW[j * ks + d];
          st[DvDk + j * Dk + d] = sS[j * ks + d];
        }
    }
    load_tile(sK, p_k + (i_bh * T + t0) * Dk, L, C, Dk, ks);
    if (write_out) {
      load_tile(sX, p_q + (i_bh * T + t0) * Dk, L, C, Dk, ks);
      load_mat(sA, p_aqk + cid * C * C, L, C, cs);
    }
    load_vec_end(sVec, sEnd, p_vec + cid * kNVec * C, p_end + cid * 3, L, C);
    __syncthreads();
    const float* Bc = sVec + kBc * C;
    const float* cc = sVec + kCc * C;
    const float* Bp = sVec + kBp * C;
    const float* cp = sVec + kCp * C;
    const float* wg = sVec + kWg * C;
    const float* wp = sVec + kWp * C;
    const float* wb = sVec + kWb * C;
    const float B_L = sEnd[0], c_L = sEnd[1], A_L = sEnd[2];
    const int64_t o_tv = (i_bh * T + t0) * Dv + v0;  // (t0, v0) of [B, H, T, Dv]

    // errors of every token of the chunk at the chunk-start state: E = K W^T - V
    for (int idx = tid; idx < C * kBV; idx += kThreads) {
      const int t = idx / kBV, j = idx % kBV;
      const float vv = (t < L && j < nv) ? static_cast<float>(p_v[o_tv + static_cast<int64_t>(t) * Dv + j]) : 0.f;
      sE[t * kBS + j] = dot(sK + t * ks, sW + j * ks, Dk) - vv;
    }
    __syncthreads();
    if (write_out) {  // O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        const float* qr = sX + t * ks;
        const float* wr = sW + j * ks;
        const float* sr = sS + j * ks;
        float qw = 0.f, qs = 0.f;
        for (int d = 0; d < Dk; ++d) {
          qw = fmaf(qr[d], wr[d], qw);
          qs = fmaf(qr[d], sr[d], qs);
        }
        float ae = 0.f;
        for (int i = 0; i < C; ++i) ae = fmaf(sA[t * cs + i], sE[i * kBS + j], ae);
        const float o = Bc[t] * qw + cc[t] * qs - ae;
        if (DGD) {
          sO[t * kBS + j] = o;
        } else if (t < L && j < nv) {
          p_o[o_tv + static_cast<int64_t>(t) * Dv + j] = static_cast<scalar_t>(o);
        }
      }
    }
    if (DGD) {
      // pseudo-values w_t = W_{t-1} k^_t by the UT transform: w = (I + M)^-1 R
      __syncthreads();  // Q and Aqk no longer read
      load_tile(sX, p_kh + (i_bh * Tp + t0) * Dk, L, C, Dk, ks);
      load_mat(sA, p_akk + cid * C * C, L, C, cs);
      __syncthreads();
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        const float* hr = sX + t * ks;
        const float* wr = sW + j * ks;
        const float* sr = sS + j * ks;
        float hw = 0.f, hs = 0.f;
        for (int d = 0; d < Dk; ++d) {
          hw = fmaf(hr[d], wr[d], hw);
          hs = fmaf(hr[d], sr[d], hs);
        }
        float ae = 0.f;
        for (int i = 0; i < C; ++i) ae = fmaf(sA[t * cs + i], sE[i * kBS + j], ae);
        sR[t * kBS + j] = Bp[t] * hw + cp[t] * hs - ae;
      }
      __syncthreads();
      load_mat(sA, p_tinv + cid * C * C, L, C, cs);
      __syncthreads();
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[t * cs + i], sR[i * kBS + j], acc);
        sw[t * kBS + j] = acc;
      }
      __syncthreads();
      if (write_out) {  // O -= Aqw w
        load_mat(sA, p_aqw + cid * C * C, L, C, cs);
        __syncthreads();
        for (int idx = tid; idx < C * kBV; idx += kThreads) {
          const int t = idx / kBV, j = idx % kBV;
          if (t < L && j < nv) {
            float acc = 0.f;
            for (int i = 0; i < C; ++i) acc = fmaf(sA[t * cs + i], sw[i * kBS + j], acc);
            p_o[o_tv + static_cast<int64_t>(t) * Dv + j] = static_cast<scalar_t>(sO[t * kBS + j] - acc);
          }
        }
      }
    }
    __syncthreads();  // W, S no longer read by the products above
    // W' = B_L W + c_L S - E^T diag(wg) K [- w^T diag(wb) K^];  S' = A_L S - E^T diag(wp) K  (in place: each
    // element reads only its own old W, S)
    for (int j = warp; j < kBV; j += kWarps)
      for (int d = lane; d < Dk; d += 32) {
        float gw = 0.f, gs = 0.f, gb = 0.f;
        for (int t = 0; t < C; ++t) {
          const float kd = sK[t * ks + d];
          const float e = sE[t * kBS + j];
          gw = fmaf(e * wg[t], kd, gw);
          gs = fmaf(e * wp[t], kd, gs);
          if (DGD) gb = fmaf(sw[t * kBS + j] * wb[t], sX[t * ks + d], gb);
        }
        const float w_old = sW[j * ks + d], s_old = sS[j * ks + d];
        float w_new = B_L * w_old + c_L * s_old - gw;
        if (DGD) w_new -= gb;
        sW[j * ks + d] = w_new;
        sS[j * ks + d] = A_L * s_old - gs;
      }
    __syncthreads();
  }
  for (int j = warp; j < nv; j += kWarps)
    for (int d = lane; d < Dk; d += 32) {
      p_wT[o_state + j * Dk + d] = sW[j * ks + d];
      p_sT[o_state + j * Dk + d] = sS[j * ks + d];
    }
}

// ----------------------------------------------------------------------------------------------- backward
// Walks the chunks in reverse with dW, dS (gradient of the state after the chunk) in shared memory; the
// chunk-start states come from the forward kernel re-run with store_states. Equations: triton.py's
// _linear_bwd_kernel and docs/kernels/titan_memory.md ("Backward"). Gradients that sum over the value rows
// are written per value block at i_v * (size of one copy): dq, dk, dkh [NV, B, H, Tp, Dk], the [C, C]
// terms [NV, B, H, NC, C, C], dvec [NV, B, H, NC, 7, C], dend [NV, B, H, NC, 3].
template <typename scalar_t, bool DGD>
__global__ void __launch_bounds__(kThreads) titan_linear_bwd_kernel(
    const scalar_t* __restrict__ p_q, const scalar_t* __restrict__ p_k, const float* __restrict__ p_kh,
    const scalar_t* __restrict__ p_v, const float* __restrict__ p_aqk, const float* __restrict__ p_akk,
    const float* __restrict__ p_tinv, const float* __restrict__ p_aqw, const float* __restrict__ p_vec,
    const float* __restrict__ p_end, const float* __restrict__ p_states, const scalar_t* __restrict__ p_do,
    const float* __restrict__ p_dwT, const float* __restrict__ p_dsT, float* __restrict__ p_dq,
    float* __restrict__ p_dk, float* __restrict__ p_dkh, scalar_t* __restrict__ p_dv, float* __restrict__ p_daqk,
    float* __restrict__ p_dakk, float* __restrict__ p_dtinv, float* __restrict__ p_daqw,
    float* __restrict__ p_dvec, float* __restrict__ p_dend, float* __restrict__ p_dw0, float* __restrict__ p_ds0,
    int64_t T, int64_t NC, int C, int Dk, int Dv, int64_t BH) {
  extern __shared__ float smem[];
  const BwdLayout lay(C, Dk, DGD);
  float* sW = smem + lay.W;
  float* sS = smem + lay.S;
  float* sdW = smem + lay.dW;
  float* sdS = smem + lay.dS;
  float* sT1 = smem + lay.T1;  // K
  float* sT2 = smem + lay.T2;  // Q (titans); dgd: Q, then k^, then Q again
  float* sA = smem + lay.A;
  float* sDO = smem + lay.dO;
  float* sE = smem + lay.E;
  float* sdE = smem + lay.dE;
  float* sKhW = smem + lay.KhW;
  float* sKhS = smem + lay.KhS;
  float* sR = smem + lay.R;
  float* sw = smem + lay.w;
  float* skhdW = smem + lay.khdW;
  float* sdw = smem + lay.dw;
  float* sdR = smem + lay.dR;
  float* sVec = smem + lay.vec;
  float* sEnd = smem + lay.end;
  float* sRed = smem + lay.red;
  const int ks = lay.ks, cs = lay.cs;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t i_bh = blockIdx.x;
  const int64_t i_v = blockIdx.y;
  const int v0 = static_cast<int>(i_v) * kBV;
  const int nv = min(kBV, Dv - v0);
  const int64_t Tp = NC * C;
  const int64_t DvDk = static_cast<int64_t>(Dv) * Dk;
  const int64_t o_state = i_bh * DvDk + static_cast<int64_t>(v0) * Dk;
  // partial (per value block) outputs live at i_v * (size of one copy)
  const int64_t part_tk = i_v * BH * Tp * Dk;
  const int64_t part_tt = i_v * BH * NC * C * C;
  const int64_t part_vec = i_v * BH * NC * kNVec * C;
  const int64_t part_end = i_v * BH * NC * 3;

  // gradient of the state after the current chunk (starts as that of the final state)
  for (int j = warp; j < kBV; j += kWarps)
    for (int d = lane; d < Dk; d += 32) {
      sdW[j * ks + d] = j < nv ? p_dwT[o_state + j * Dk + d] : 0.f;
      sdS[j * ks + d] = j < nv ? p_dsT[o_state + j * Dk + d] : 0.f;
    }

  for (int64_t i_r = 0; i_r < NC; ++i_r) {
    const int64_t i_c = NC - 1 - i_r;
    const int64_t t0 = i_c * C;
    const int L = static_cast<int>(min(static_cast<int64_t>(C), T - t0));
    const int64_t cid = i_bh * NC + i_c;
    const int64_t o_tv = (i_bh * T + t0) * Dv + v0;
    const float* st = p_states + cid * 2 * DvDk + static_cast<int64_t>(v0) * Dk;
    for (int j = warp; j < kBV; j += kWarps)
      for (int d = lane; d < Dk; d += 32) {
        sW[j * ks + d] = j < nv ? st[j * Dk + d] : 0.f;
        sS[j * ks + d] = j < nv ? st[DvDk + j * Dk + d] : 0.f;
      }
    load_tile(sT1, p_k + (i_bh * T + t0) * Dk, L, C, Dk, ks);
    load_tile(sT2, p_q + (i_bh * T + t0) * Dk, L, C, Dk, ks);
    load_cv(sDO, p_do + o_tv, L, nv, C, Dv);
    load_vec_end(sVec, sEnd, p_vec + cid * kNVec * C, p_end + cid * 3, L, C);
    load_mat(sA, p_aqk + cid * C * C, L, C, cs);
    __syncthreads();
    const float* Bc = sVec + kBc * C;
    const float* cc = sVec + kCc * C;
    const float* Bp = sVec + kBp * C;
    const float* cp = sVec + kCp * C;
    const float* wg = sVec + kWg * C;
    const float* wp = sVec + kWp * C;
    const float* wb = sVec + kWb * C;
    float* dvec = p_dvec + part_vec + cid * kNVec * C;
    const int64_t o_tt = part_tt + cid * C * C;  // this chunk's [C, C] block of a partial [C, C] term

    // E = K W^T - V, QW, QS, kdW = K dW^T, kdS = K dS^T; dE (titans part without -Aqk^T dO);
    // row sums dBc = sum(dO * QW), dc = sum(dO * QS), dwg = -sum(E * kdW), dwp = -sum(E * kdS).
    // Warp-uniform loop: every lane reaches the shuffles; a 16-lane group is one row t.
    for (int base = 0; base < C * kBV; base += kThreads) {
      const int idx = base + tid;
      const bool act = idx < C * kBV;
      const int t = act ? idx / kBV : 0, j = idx % kBV;
      const float* kr = sT1 + t * ks;
      const float* qr = sT2 + t * ks;
      const float* wr = sW + j * ks;
      const float* sr = sS + j * ks;
      const float* dwr = sdW + j * ks;
      const float* dsr = sdS + j * ks;
      float e = 0.f, qw = 0.f, qs = 0.f, kdw = 0.f, kds = 0.f;
      for (int d = 0; d < Dk; ++d) {
        const float kd = kr[d], qd = qr[d];
        e = fmaf(kd, wr[d], e);
        qw = fmaf(qd, wr[d], qw);
        qs = fmaf(qd, sr[d], qs);
        kdw = fmaf(kd, dwr[d], kdw);
        kds = fmaf(kd, dsr[d], kds);
      }
      const float vv =
          (act && t < L && j < nv) ? static_cast<float>(p_v[o_tv + static_cast<int64_t>(t) * Dv + j]) : 0.f;
      e -= vv;
      const float dob = sDO[t * kBS + j];
      const float r_dBc = sum16(dob * qw);
      const float r_dc = sum16(dob * qs);
      const float r_dwg = -sum16(e * kdw);
      const float r_dwp = -sum16(e * kds);
      if (act) {
        sE[t * kBS + j] = e;
        sdE[t * kBS + j] = -wg[t] * kdw - wp[t] * kds;
        if (j == 0) {
          const bool ok = t < L;
          dvec[kBc * C + t] = ok ? r_dBc : 0.f;
          dvec[kCc * C + t] = ok ? r_dc : 0.f;
          dvec[kWg * C + t] = ok ? r_dwg : 0.f;
          dvec[kWp * C + t] = ok ? r_dwp : 0.f;
          if (!DGD) {  // rows Triton leaves at zero for titans
            dvec[kBp * C + t] = 0.f;
            dvec[kCp * C + t] = 0.f;
            dvec[kWb * C + t] = 0.f;
          }
        }
      }
    }
    {  // dB_L = <dW, W>, dc_L = <dW, S>, dA_L = <dS, S>
      float a0 = 0.f, a1 = 0.f, a2 = 0.f;
      for (int j = warp; j < kBV; j += kWarps)
        for (int d = lane; d < Dk; d += 32) {
          const float dw = sdW[j * ks + d], ds = sdS[j * ks + d], s = sS[j * ks + d];
          a0 = fmaf(dw, sW[j * ks + d], a0);
          a1 = fmaf(dw, s, a1);
          a2 = fmaf(ds, s, a2);
        }
      a0 = sum32(a0);
      a1 = sum32(a1);
      a2 = sum32(a2);
      if (lane == 0) {
        sRed[warp * 3 + 0] = a0;
        sRed[warp * 3 + 1] = a1;
        sRed[warp * 3 + 2] = a2;
      }
    }
    __syncthreads();
    if (tid < 3) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += sRed[w * 3 + tid];
      p_dend[part_end + cid * 3 + tid] = s;
    }
    // dE -= Aqk^T dO;  dAqk = -dO E^T
    for (int idx = tid; idx < C * kBV; idx += kThreads) {
      const int t = idx / kBV, j = idx % kBV;
      float acc = 0.f;
      for (int i = 0; i < C; ++i) acc = fmaf(sA[i * cs + t], sDO[i * kBS + j], acc);
      sdE[t * kBS + j] -= acc;
    }
    for (int t = warp; t < C; t += kWarps)
      for (int i = lane; i < C; i += 32) {
        float acc = 0.f;
        for (int j = 0; j < kBV; ++j) acc = fmaf(sDO[t * kBS + j], sE[i * kBS + j], acc);
        p_daqk[o_tt + t * C + i] = (t < L && i < L) ? -acc : 0.f;
      }
    if (DGD) load_tile(sT2, p_kh + (i_bh * Tp + t0) * Dk, L, C, Dk, ks);  // Q not read again until reloaded
    __syncthreads();

    if (DGD) {
      // KhW = K^ W^T, KhS = K^ S^T, khdW = K^ dW^T (row i: dW_L k^_i); Akk for R
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        const float* hr = sT2 + t * ks;
        const float* wr = sW + j * ks;
        const float* sr = sS + j * ks;
        const float* dwr = sdW + j * ks;
        float hw = 0.f, hs = 0.f, hdw = 0.f;
        for (int d = 0; d < Dk; ++d) {
          const float hd = hr[d];
          hw = fmaf(hd, wr[d], hw);
          hs = fmaf(hd, sr[d], hs);
          hdw = fmaf(hd, dwr[d], hdw);
        }
        sKhW[t * kBS + j] = hw;
        sKhS[t * kBS + j] = hs;
        skhdW[t * kBS + j] = hdw;
      }
      load_mat(sA, p_akk + cid * C * C, L, C, cs);
      __syncthreads();
      // R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[t * cs + i], sE[i * kBS + j], acc);
        sR[t * kBS + j] = Bp[t] * sKhW[t * kBS + j] + cp[t] * sKhS[t * kBS + j] - acc;
      }
      __syncthreads();
      load_mat(sA, p_tinv + cid * C * C, L, C, cs);
      __syncthreads();
      // w = Tinv R
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[t * cs + i], sR[i * kBS + j], acc);
        sw[t * kBS + j] = acc;
      }
      __syncthreads();
      load_mat(sA, p_aqw + cid * C * C, L, C, cs);
      __syncthreads();
      // O -= Aqw w and W_L -= w^T diag(wb) K^:  dw = -Aqw^T dO - diag(wb) khdW;  dwb = -sum(w * khdW);
      // dAqw = -dO w^T
      for (int base = 0; base < C * kBV; base += kThreads) {
        const int idx = base + tid;
        const bool act = idx < C * kBV;
        const int t = act ? idx / kBV : 0, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[i * cs + t], sDO[i * kBS + j], acc);
        const float hdw = skhdW[t * kBS + j];
        const float r_dwb = -sum16(sw[t * kBS + j] * hdw);
        if (act) {
          sdw[t * kBS + j] = -acc - wb[t] * hdw;
          if (j == 0) dvec[kWb * C + t] = t < L ? r_dwb : 0.f;
        }
      }
      for (int t = warp; t < C; t += kWarps)
        for (int i = lane; i < C; i += 32) {
          float acc = 0.f;
          for (int j = 0; j < kBV; ++j) acc = fmaf(sDO[t * kBS + j], sw[i * kBS + j], acc);
          p_daqw[o_tt + t * C + i] = (t < L && i < L) ? -acc : 0.f;
        }
      __syncthreads();
      // w = Tinv R:  dTinv = dw R^T (here), dR = Tinv^T dw (next)
      load_mat(sA, p_tinv + cid * C * C, L, C, cs);
      for (int t = warp; t < C; t += kWarps)
        for (int i = lane; i < C; i += 32) {
          float acc = 0.f;
          for (int j = 0; j < kBV; ++j) acc = fmaf(sdw[t * kBS + j], sR[i * kBS + j], acc);
          p_dtinv[o_tt + t * C + i] = (t < L && i < L) ? acc : 0.f;
        }
      __syncthreads();
      // R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E:  dBp = sum(dR * KhW), dcp = sum(dR * KhS)
      for (int base = 0; base < C * kBV; base += kThreads) {
        const int idx = base + tid;
        const bool act = idx < C * kBV;
        const int t = act ? idx / kBV : 0, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[i * cs + t], sdw[i * kBS + j], acc);
        const float r_dBp = sum16(acc * sKhW[t * kBS + j]);
        const float r_dcp = sum16(acc * sKhS[t * kBS + j]);
        if (act) {
          sdR[t * kBS + j] = acc;
          if (j == 0) {
            dvec[kBp * C + t] = t < L ? r_dBp : 0.f;
            dvec[kCp * C + t] = t < L ? r_dcp : 0.f;
          }
        }
      }
      __syncthreads();
      // dAkk = -dR E^T; then dE -= Akk^T dR
      load_mat(sA, p_akk + cid * C * C, L, C, cs);
      for (int t = warp; t < C; t += kWarps)
        for (int i = lane; i < C; i += 32) {
          float acc = 0.f;
          for (int j = 0; j < kBV; ++j) acc = fmaf(sdR[t * kBS + j], sE[i * kBS + j], acc);
          p_dakk[o_tt + t * C + i] = (t < L && i < L) ? -acc : 0.f;
        }
      __syncthreads();
      for (int idx = tid; idx < C * kBV; idx += kThreads) {
        const int t = idx / kBV, j = idx % kBV;
        float acc = 0.f;
        for (int i = 0; i < C; ++i) acc = fmaf(sA[i * cs + t], sdR[i * kBS + j], acc);
        sdE[t * kBS + j] -= acc;
      }
      __syncthreads();
    }

    // dq = diag(Bc) dO W + diag(c) dO S;  dk = dE W - diag(wg) E dW - diag(wp) E dS;
    // dgd: dkh = -diag(wb) w dW + diag(Bp) dR W + diag(cp) dR S.  Rows t >= L are written as zero.
    for (int t = warp; t < C; t += kWarps) {
      const bool ok = t < L;
      const int64_t o_row = part_tk + (i_bh * Tp + t0 + t) * Dk;
      for (int d = lane; d < Dk; d += 32) {
        float aW = 0.f, aS = 0.f, eW = 0.f, gW = 0.f, gS = 0.f, hW = 0.f, rW = 0.f, rS = 0.f;
        for (int j = 0; j < kBV; ++j) {
          const float Wv = sW[j * ks + d], Sv = sS[j * ks + d];
          const float dWv = sdW[j * ks + d], dSv = sdS[j * ks + d];
          const float dob = sDO[t * kBS + j], e = sE[t * kBS + j];
          aW = fmaf(dob, Wv, aW);
          aS = fmaf(dob, Sv, aS);
          eW = fmaf(sdE[t * kBS + j], Wv, eW);
          gW = fmaf(e, dWv, gW);
          gS = fmaf(e, dSv, gS);
          if (DGD) {
            const float r = sdR[t * kBS + j];
            hW = fmaf(sw[t * kBS + j], dWv, hW);
            rW = fmaf(r, Wv, rW);
            rS = fmaf(r, Sv, rS);
          }
        }
        p_dq[o_row + d] = ok ? Bc[t] * aW + cc[t] * aS : 0.f;
        p_dk[o_row + d] = ok ? eW - wg[t] * gW - wp[t] * gS : 0.f;
        if (DGD) p_dkh[o_row + d] = ok ? -wb[t] * hW + Bp[t] * rW + cp[t] * rS : 0.f;
      }
    }
    // E = K W^T - V:  dV = -dE
    for (int idx = tid; idx < C * kBV; idx += kThreads) {
      const int t = idx / kBV, j = idx % kBV;
      if (t < L && j < nv) p_dv[o_tv + static_cast<int64_t>(t) * Dv + j] = static_cast<scalar_t>(-sdE[t * kBS + j]);
    }
    __syncthreads();  // dW, dS no longer read: update them in place (each element reads only its own)
    const float B_L = sEnd[0], c_L = sEnd[1], A_L = sEnd[2];
    // dW0 = dO^T diag(Bc) Q + B_L dW [+ dR^T diag(Bp) K^] + dE^T K
    // dS0 = dO^T diag(c) Q + c_L dW + A_L dS [+ dR^T diag(cp) K^]
    for (int j = warp; j < kBV; j += kWarps)
      for (int d = lane; d < Dk; d += 32) {
        float gW = 0.f, gS = 0.f;
        for (int t = 0; t < C; ++t) {
          gW = fmaf(sdE[t * kBS + j], sT1[t * ks + d], gW);
          const float x = sT2[t * ks + d];  // Q (titans) or K^ (dgd)
          if (DGD) {
            const float r = sdR[t * kBS + j];
            gW = fmaf(r * Bp[t], x, gW);
            gS = fmaf(r * cp[t], x, gS);
          } else {
            const float dob = sDO[t * kBS + j];
            gW = fmaf(dob * Bc[t], x, gW);
            gS = fmaf(dob * cc[t], x, gS);
          }
        }
        const float dw_old = sdW[j * ks + d], ds_old = sdS[j * ks + d];
        sdW[j * ks + d] = B_L * dw_old + gW;
        sdS[j * ks + d] = c_L * dw_old + A_L * ds_old + gS;
      }
    if (DGD) {  // the Q terms, with Q reloaded over K^
      __syncthreads();
      load_tile(sT2, p_q + (i_bh * T + t0) * Dk, L, C, Dk, ks);
      __syncthreads();
      for (int j = warp; j < kBV; j += kWarps)
        for (int d = lane; d < Dk; d += 32) {
          float gW = 0.f, gS = 0.f;
          for (int t = 0; t < C; ++t) {
            const float x = sT2[t * ks + d];
            const float dob = sDO[t * kBS + j];
            gW = fmaf(dob * Bc[t], x, gW);
            gS = fmaf(dob * cc[t], x, gS);
          }
          sdW[j * ks + d] += gW;
          sdS[j * ks + d] += gS;
        }
    }
    __syncthreads();
  }
  for (int j = warp; j < nv; j += kWarps)
    for (int d = lane; d < Dk; d += 32) {
      p_dw0[o_state + j * Dk + d] = sdW[j * ks + d];
      p_ds0[o_state + j * Dk + d] = sdS[j * ks + d];
    }
}

// --------------------------------------------------------------------------------------------------- host
struct LinearDims {
  int64_t B, H, T, Dk, Dv, NC, C;
  bool dgd;
};

// Sizes of a call; the arguments were checked by the g++-compiled entry point (titan_linear_checks.h).
LinearDims linear_dims(const TitanInputs& in) {
  LinearDims a{};
  a.B = in.q.size(0);
  a.H = in.q.size(1);
  a.T = in.q.size(2);
  a.Dk = in.q.size(3);
  a.Dv = in.v.size(3);
  a.NC = in.rows.size(2);
  a.C = in.chunk_size;
  a.dgd = in.dgd();
  return a;
}

template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes) {
  // bytes <= the device's opt-in limit was checked by the entry point
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

const float* opt_f32(const at::Tensor& t, bool dgd) { return dgd ? t.data_ptr<float>() : nullptr; }

struct FwdOut {
  at::Tensor out, WT, ST, states;
};

template <typename scalar_t, bool DGD>
void launch_fwd(const LinearDims& a, const TitanInputs& in, FwdOut& r, bool write_out, bool store_states) {
  const size_t bytes = static_cast<size_t>(FwdLayout(a.C, a.Dk, DGD).total) * sizeof(float);
  auto kernel = titan_linear_fwd_kernel<scalar_t, DGD>;
  prepare_smem(kernel, bytes);
  const dim3 grid(static_cast<unsigned>(a.B * a.H), static_cast<unsigned>((a.Dv + kBV - 1) / kBV));
  kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      in.q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(), opt_f32(in.khat, DGD), in.v.data_ptr<scalar_t>(),
      in.aqk.data_ptr<float>(), opt_f32(in.akk, DGD), opt_f32(in.tinv, DGD), opt_f32(in.aqw, DGD),
      in.rows.data_ptr<float>(), in.ends.data_ptr<float>(), in.state[0].data_ptr<float>(),
      in.state[1].data_ptr<float>(), write_out ? r.out.data_ptr<scalar_t>() : nullptr, r.WT.data_ptr<float>(),
      r.ST.data_ptr<float>(), store_states ? r.states.data_ptr<float>() : nullptr, a.T, a.NC, static_cast<int>(a.C),
      static_cast<int>(a.Dk), static_cast<int>(a.Dv), write_out, store_states);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward state pass: out (when write_out), W_T, S_T and, when store_states, the chunk-start states
// [B, H, NC, 2, Dv, Dk]. Arguments already checked; q's device is current.
FwdOut run_fwd(const LinearDims& a, const TitanInputs& in, bool write_out, bool store_states) {
  const auto f32 = in.q.options().dtype(at::kFloat);
  FwdOut r;
  r.out = write_out ? at::empty({a.B, a.H, a.T, a.Dv}, in.q.options()) : at::empty({0}, in.q.options());
  r.WT = at::empty({a.B, a.H, a.Dv, a.Dk}, f32);
  r.ST = at::empty({a.B, a.H, a.Dv, a.Dk}, f32);
  r.states = store_states ? at::empty({a.B, a.H, a.NC, 2, a.Dv, a.Dk}, f32) : at::empty({0}, f32);
  if (a.B * a.H == 0) return r;
  HOPE_DISPATCH_FLOAT_HALF(in.q.scalar_type(), "titan_linear_fwd_cuda", [&] {
    if (a.dgd)
      launch_fwd<scalar_t, true>(a, in, r, write_out, store_states);
    else
      launch_fwd<scalar_t, false>(a, in, r, write_out, store_states);
  });
  return r;
}

template <typename scalar_t, bool DGD>
void launch_bwd(const LinearDims& a, const TitanInputs& in, const at::Tensor& states, const TitanGradsIn& grads,
                TitanInputs& g) {
  const size_t bytes = static_cast<size_t>(BwdLayout(a.C, a.Dk, DGD).total) * sizeof(float);
  auto kernel = titan_linear_bwd_kernel<scalar_t, DGD>;
  prepare_smem(kernel, bytes);
  const dim3 grid(static_cast<unsigned>(a.B * a.H), static_cast<unsigned>((a.Dv + kBV - 1) / kBV));
  auto dgd_out = [&](at::Tensor& t) { return DGD ? t.data_ptr<float>() : nullptr; };
  kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      in.q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(), opt_f32(in.khat, DGD), in.v.data_ptr<scalar_t>(),
      in.aqk.data_ptr<float>(), opt_f32(in.akk, DGD), opt_f32(in.tinv, DGD), opt_f32(in.aqw, DGD),
      in.rows.data_ptr<float>(), in.ends.data_ptr<float>(), states.data_ptr<float>(),
      grads.out.data_ptr<scalar_t>(), grads.state[0].data_ptr<float>(), grads.state[1].data_ptr<float>(),
      g.q.data_ptr<float>(), g.k.data_ptr<float>(), dgd_out(g.khat), g.v.data_ptr<scalar_t>(),
      g.aqk.data_ptr<float>(), dgd_out(g.akk), dgd_out(g.tinv), dgd_out(g.aqw), g.rows.data_ptr<float>(),
      g.ends.data_ptr<float>(), g.state[0].data_ptr<float>(), g.state[1].data_ptr<float>(), a.T, a.NC,
      static_cast<int>(a.C), static_cast<int>(a.Dk), static_cast<int>(a.Dv), a.B * a.H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t titan_linear_smem_bytes(int64_t chunk_size, int64_t Dk, bool dgd, bool backward) {
  const int C = static_cast<int>(chunk_size), D = static_cast<int>(Dk);
  const int floats = backward ? BwdLayout(C, D, dgd).total : FwdLayout(C, D, dgd).total;
  return static_cast<int64_t>(floats) * static_cast<int64_t>(sizeof(float));
}

std::vector<at::Tensor> titan_linear_fwd_cuda(const TitanInputs& in, bool store_states) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_linear_checks.h)
  const LinearDims a = linear_dims(in);
  const c10::cuda::CUDAGuard device_guard(in.q.device());
  FwdOut r = run_fwd(a, in, /*write_out=*/true, store_states);
  return {r.out, r.WT, r.ST, r.states};
}

TitanInputs titan_linear_bwd_cuda(const TitanInputs& in, const TitanGradsIn& grads) {
  // inputs were checked by the host-compiled entry point (bindings_cuda.cpp, titan_linear_checks.h)
  const LinearDims a = linear_dims(in);
  const c10::cuda::CUDAGuard device_guard(in.q.device());
  const int64_t B = a.B, H = a.H, NC = a.NC, C = a.C, Tp = NC * C;
  const int64_t NV = (a.Dv + kBV - 1) / kBV;
  // recompute the chunk-start states (the forward pass kept only its inputs)
  const at::Tensor states = run_fwd(a, in, /*write_out=*/false, /*store_states=*/true).states;
  const auto f32 = in.q.options().dtype(at::kFloat);
  auto none = [&] { return at::empty({0}, f32); };  // a distinct empty tensor per output (no aliasing)
  // every element of these is written by the kernel (partials included: zeros where Triton leaves zeros); the
  // gradients that sum over the value dimension come per value block [NV, ...] and are summed below
  TitanInputs g;
  g.q = at::empty({NV, B, H, Tp, a.Dk}, f32);
  g.k = at::empty({NV, B, H, Tp, a.Dk}, f32);
  g.v = at::empty({B, H, a.T, a.Dv}, in.v.options());
  g.khat = a.dgd ? at::empty({NV, B, H, Tp, a.Dk}, f32) : none();
  g.aqk = at::empty({NV, B, H, NC, C, C}, f32);
  g.gth = none();
  g.akk = a.dgd ? at::empty({NV, B, H, NC, C, C}, f32) : none();
  g.tinv = a.dgd ? at::empty({NV, B, H, NC, C, C}, f32) : none();
  g.aqw = a.dgd ? at::empty({NV, B, H, NC, C, C}, f32) : none();
  g.rows = at::empty({NV, B, H, NC, kNVec, C}, f32);
  g.ends = at::empty({NV, B, H, NC, 3}, f32);
  g.state = {at::empty({B, H, a.Dv, a.Dk}, f32), at::empty({B, H, a.Dv, a.Dk}, f32)};
  if (B * H > 0) {
    HOPE_DISPATCH_FLOAT_HALF(in.q.scalar_type(), "titan_linear_bwd_cuda", [&] {
      if (a.dgd)
        launch_bwd<scalar_t, true>(a, in, states, grads, g);
      else
        launch_bwd<scalar_t, false>(a, in, states, grads, g);
    });
  }
  // sum the per-value-block partials (no atomics); titans leaves the dgd-only gradients empty
  auto red = [&](const at::Tensor& x) -> at::Tensor {
    if (x.dim() == 1) return x;
    return NV == 1 ? x.select(0, 0) : x.sum(0);
  };
  g.q = red(g.q).slice(2, 0, a.T).to(in.q.scalar_type()).contiguous();
  g.k = red(g.k).slice(2, 0, a.T).to(in.k.scalar_type()).contiguous();
  for (at::Tensor* t : {&g.khat, &g.aqk, &g.akk, &g.tinv, &g.aqw, &g.rows, &g.ends}) *t = red(*t);
  return g;
}

}  // namespace hope
