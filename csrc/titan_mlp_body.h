// The mlp memory's state pass (titan_memory_update, memory="mlp", rules titans and dgd), forward and backward of one
// (b, h), written once for the CPU (titan_mlp_cpu.cpp) and CUDA (titan_mlp.cu): the math of
// chunk_terms.mlp_state_pass (docs/kernels/titan_memory.md) with the tensor contract of state_pass.py's mlp ops.
//
// "Block-phased": the body is a sequence of phases, each a parallel-for over an index range (HOPE_PFOR) followed by
// a barrier (HOPE_SYNC). Under nvcc one thread block runs one (b, h): HOPE_PFOR strides the range over the block's
// threads and HOPE_SYNC is __syncthreads(). On the CPU HOPE_PFOR is a plain loop and HOPE_SYNC a no-op, one
// at::parallel_for task per (b, h). Every element of a phase is computed by one iteration from data written in
// earlier phases (or by the same iteration), so both run the same formulas in the same phase order: the CPU tests
// validate the CUDA kernels' math (only the summation order inside a dot product differs: omp-simd partial sums on
// the CPU, a sequential FMA chain per thread on the GPU).
//
// Memory: the state (working copy: the output state buffers, initialized from the inputs; backward: the gradient
// buffers, initialized from the incoming gradients) and a per-(b, h) fp32 scratch (MlpLayout) hold everything;
// inside a chunk every product is a dot product over contiguous rows of the scratch (each intermediate the later
// phases read by columns is also written transposed, by the iteration that computes it). Rows t >= L (padding of
// the last chunk) are never read from q, k, v, do and never computed; gradient entries of padded rows / columns
// are written as zeros.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define HOPE_MLP_DEV __device__
#define HOPE_MLP_INL __device__ __forceinline__
#define HOPE_MLP_HD __host__ __device__
#define HOPE_PFOR(i, n) for (int64_t i = threadIdx.x; i < static_cast<int64_t>(n); i += blockDim.x)
#define HOPE_SYNC() __syncthreads()
#define HOPE_SIMD_ACC
#else
#define HOPE_MLP_DEV inline
#define HOPE_MLP_INL inline
#define HOPE_MLP_HD inline
#define HOPE_PFOR(i, n) for (int64_t i = 0; i < static_cast<int64_t>(n); ++i)
#define HOPE_SYNC() ((void)0)
// the CPU's dot products: vectorized reductions over `acc` (compiled with -fopenmp)
#define HOPE_SIMD_ACC _Pragma("omp simd reduction(+ : acc)")
#endif

namespace hope {
namespace mlp {

constexpr int kNVec = 7;  // rows of `rows` (titan_inputs.h kRow*)
constexpr int kBc = 0, kCc = 1, kBp = 2, kCp = 3, kWg = 4, kWp = 5, kWb = 6;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

HOPE_MLP_INL float gelu(float x) { return 0.5f * x * (1.f + erff(x * kInvSqrt2)); }
// gelu'(x) = Phi(x) + x phi(x);  gelu''(x) = phi(x) (2 - x^2)
HOPE_MLP_INL float gelu_p(float x) { return 0.5f * (1.f + erff(x * kInvSqrt2)) + x * expf(-0.5f * x * x) * kInvSqrt2Pi; }
HOPE_MLP_INL float gelu_pp(float x) { return expf(-0.5f * x * x) * kInvSqrt2Pi * (2.f - x * x); }

HOPE_MLP_INL float dot(const float* __restrict a, const float* __restrict b, int n) {
  float acc = 0.f;
  HOPE_SIMD_ACC
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// sum_i a[i] w[i] b[i]
HOPE_MLP_INL float dot3(const float* __restrict a, const float* __restrict w, const float* __restrict b, int n) {
  float acc = 0.f;
  HOPE_SIMD_ACC
  for (int i = 0; i < n; ++i) acc += a[i] * w[i] * b[i];
  return acc;
}

// Per-(b, h) fp32 scratch, in floats: [C, X] row-major tiles ("t" suffix: transposed [X, C]); C = chunk size,
// D = head dim, E = hidden width. The forward uses the first part, the backward all of it.
struct MlpLayout {
  int64_t Q, Qt, K, Kt, V, Kh, Kht;                                  // token tiles [C, D] / [D, C]
  int64_t W1t, S1t, W2t, S2t;                                        // chunk-start state transposed
  int64_t Hk, A, At, U, G, Gt, QW2, QS2, Hq, Aq, Aqt, KhW2, KhS2, R, Rt, w, wt;  // [C, E] / [E, C]
  int64_t Err, Errt;                                                 // [C, D] / [D, C]
  int64_t Z;                                                         // [C, C]: Aq A^T
  int64_t fwd_total;
  // backward
  int64_t dO, dOt, dW1t, dS1t, dW2t, dS2t;
  int64_t aqkT, akkT, tinvT, aqwT, AaaT, dZ, dZt;
  int64_t KdW2, KdS2, dOW1, dOS1, KhdW2, dHq, dHqt, dG, dw, dwt, dR, dRt, dU, dUt, dHk, dHkt;
  int64_t AdW1, AdS1, dErr, dErrt;
  int64_t part;  // [6, max(D, E)]: partial sums of dend
  int64_t total;
  HOPE_MLP_HD MlpLayout(int64_t C, int64_t D, int64_t E) {
    int64_t o = 0;
    const int64_t CD = C * D, CE = C * E, DE = D * E, CC = C * C;
    Q = o; o += CD; Qt = o; o += CD; K = o; o += CD; Kt = o; o += CD; V = o; o += CD; Kh = o; o += CD;
    Kht = o; o += CD;
    W1t = o; o += DE; S1t = o; o += DE; W2t = o; o += DE; S2t = o; o += DE;
    Hk = o; o += CE; A = o; o += CE; At = o; o += CE; U = o; o += CE; G = o; o += CE; Gt = o; o += CE;
    QW2 = o; o += CE; QS2 = o; o += CE; Hq = o; o += CE; Aq = o; o += CE; Aqt = o; o += CE;
    KhW2 = o; o += CE; KhS2 = o; o += CE; R = o; o += CE; Rt = o; o += CE; w = o; o += CE; wt = o; o += CE;
    Err = o; o += CD; Errt = o; o += CD;
    Z = o; o += CC;
    fwd_total = o;
    dO = o; o += CD; dOt = o; o += CD;
    dW1t = o; o += DE; dS1t = o; o += DE; dW2t = o; o += DE; dS2t = o; o += DE;
    aqkT = o; o += CC; akkT = o; o += CC; tinvT = o; o += CC; aqwT = o; o += CC; AaaT = o; o += CC;
    dZ = o; o += CC; dZt = o; o += CC;
    KdW2 = o; o += CE; KdS2 = o; o += CE; dOW1 = o; o += CE; dOS1 = o; o += CE; KhdW2 = o; o += CE;
    dHq = o; o += CE; dHqt = o; o += CE; dG = o; o += CE; dw = o; o += CE; dwt = o; o += CE;
    dR = o; o += CE; dRt = o; o += CE; dU = o; o += CE; dUt = o; o += CE; dHk = o; o += CE; dHkt = o; o += CE;
    AdW1 = o; o += CD; AdS1 = o; o += CD; dErr = o; o += CD; dErrt = o; o += CD;
    part = o; o += 6 * (D > E ? D : E);
    total = o;
  }
};

// Pointers and sizes of one call (all (b, h) at once; the body offsets them by bh). scalar_t: q, k, v, do, out,
// dq, dk, dv (fp32 / bf16 / fp16, read as fp32); everything else fp32.
template <typename scalar_t>
struct MlpParams {
  const scalar_t *q, *k, *v;
  const float *kh, *aqk, *gth, *akk, *tinv, *aqw, *vec, *end, *W1, *W2, *S1, *S2;  // kh..aqw: dgd only
  // forward outputs: out [B, H, T, D] (null: not written), final state (also the working state), chunk-start
  // states [B, H, NC, 4, D * E] in the order W1, W2, S1, S2 (null: not stored)
  scalar_t* out;
  float *W1T, *W2T, *S1T, *S2T, *states;
  // backward: incoming gradients, then the 15 outputs (dkh, dakk, dtinv, daqw: dgd only); dW1..dS2 are also the
  // working gradient of the state
  const scalar_t* dout;
  const float *dW1T, *dW2T, *dS1T, *dS2T;
  scalar_t *dq, *dk, *dv;
  float *dkh, *daqk, *dgth, *dakk, *dtinv, *daqw, *dvec, *dend, *dW1, *dW2, *dS1, *dS2;
  float* scratch;  // [B * H, MlpLayout.total (backward) or fwd_total (forward)]
  int64_t scratch_stride, T, NC;
  int C, D, E;
  bool dgd;
};

template <typename scalar_t>
HOPE_MLP_INL float ld(const scalar_t* p, int64_t i) { return static_cast<float>(p[i]); }

// Chunk ic's intermediates from the chunk-start state (W1, W2, S1, S2 of this (b, h)): loads the tiles, then
// Hk, A = gelu(Hk), Err, U, G, Hq, (dgd: R, w), Aq, Z = Aq A^T (chunk_terms.mlp_state_pass). backward: also loads
// do, the transposed state gradients and [C, C] terms. Ends with a barrier.
template <typename scalar_t>
HOPE_MLP_DEV void chunk_fwd(const MlpParams<scalar_t>& p, const MlpLayout& ly, float* sc, int64_t bh, int64_t ic,
                            const float* W1, const float* W2, const float* S1, const float* S2, bool backward) {
  const int C = p.C, D = p.D, E = p.E;
  const int64_t t0 = ic * C;
  const int L = static_cast<int>(p.T - t0 < C ? p.T - t0 : C);
  const int64_t tok = (bh * p.T + t0) * D;
  const int64_t mo = (bh * p.NC + ic) * C * C;
  const float* vc = p.vec + (bh * p.NC + ic) * kNVec * C;
  float *Qs = sc + ly.Q, *Qt = sc + ly.Qt, *Ks = sc + ly.K, *Kt = sc + ly.Kt, *Vs = sc + ly.V, *Khs = sc + ly.Kh,
        *Kht = sc + ly.Kht;
  float *W1t = sc + ly.W1t, *S1t = sc + ly.S1t, *W2t = sc + ly.W2t, *S2t = sc + ly.S2t;
  float *Hk = sc + ly.Hk, *A = sc + ly.A, *At = sc + ly.At, *U = sc + ly.U, *G = sc + ly.G, *Gt = sc + ly.Gt;
  float *QW2 = sc + ly.QW2, *QS2 = sc + ly.QS2, *Hq = sc + ly.Hq, *Aq = sc + ly.Aq, *Aqt = sc + ly.Aqt;
  float *KhW2 = sc + ly.KhW2, *KhS2 = sc + ly.KhS2, *R = sc + ly.R, *Rt = sc + ly.Rt, *w = sc + ly.w, *wt = sc + ly.wt;
  float *Err = sc + ly.Err, *Errt = sc + ly.Errt, *Z = sc + ly.Z;

  // phase 0: tiles (fp32), transposes of the state
  HOPE_PFOR(i, L * D) {
    const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
    const float qv = ld(p.q, tok + i), kv = ld(p.k, tok + i);
    Qs[i] = qv;
    Qt[d * C + t] = qv;
    Ks[i] = kv;
    Kt[d * C + t] = kv;
    Vs[i] = ld(p.v, tok + i);
    if (p.dgd) {
      const float kh = p.kh[(bh * p.NC * C + t0) * D + i];
      Khs[i] = kh;
      Kht[d * C + t] = kh;
    }
  }
  HOPE_PFOR(i, D * E) {  // i = d * E + e
    const int d = static_cast<int>(i / E), e = static_cast<int>(i % E);
    W1t[e * D + d] = W1[i];
    if (backward) S1t[e * D + d] = S1[i];
  }
  if (backward) {
    HOPE_PFOR(i, E * D) {  // i = e * D + d
      const int e = static_cast<int>(i / D), d = static_cast<int>(i % D);
      W2t[d * E + e] = W2[i];
      S2t[d * E + e] = S2[i];
    }
    const int64_t DE = static_cast<int64_t>(D) * E;
    const float *dW1 = p.dW1 + bh * DE, *dS1 = p.dS1 + bh * DE, *dW2 = p.dW2 + bh * DE, *dS2 = p.dS2 + bh * DE;
    float *dW1t = sc + ly.dW1t, *dS1t = sc + ly.dS1t, *dW2t = sc + ly.dW2t, *dS2t = sc + ly.dS2t;
    HOPE_PFOR(i, D * E) {
      const int d = static_cast<int>(i / E), e = static_cast<int>(i % E);
      dW1t[e * D + d] = dW1[i];
      dS1t[e * D + d] = dS1[i];
    }
    HOPE_PFOR(i, E * D) {
      const int e = static_cast<int>(i / D), d = static_cast<int>(i % D);
      dW2t[d * E + e] = dW2[i];
      dS2t[d * E + e] = dS2[i];
    }
    float *dOs = sc + ly.dO, *dOt = sc + ly.dOt;
    HOPE_PFOR(i, L * D) {
      const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
      const float g = ld(p.dout, tok + i);
      dOs[i] = g;
      dOt[d * C + t] = g;
    }
    float *aqkT = sc + ly.aqkT, *akkT = sc + ly.akkT, *tinvT = sc + ly.tinvT, *aqwT = sc + ly.aqwT;
    HOPE_PFOR(i, C * C) {
      const int r = static_cast<int>(i / C), c = static_cast<int>(i % C);
      aqkT[c * C + r] = p.aqk[mo + i];
      if (p.dgd) {
        akkT[c * C + r] = p.akk[mo + i];
        tinvT[c * C + r] = p.tinv[mo + i];
        aqwT[c * C + r] = p.aqw[mo + i];
      }
    }
  }
  HOPE_SYNC();
  // phase 1: Hk = K W2^T, A = gelu(Hk); Q W2^T, Q S2^T; dgd: K^ W2^T, K^ S2^T
  HOPE_PFOR(i, L * E) {
    const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
    const float hk = dot(Ks + t * D, W2 + e * D, D);
    const float a = gelu(hk);
    Hk[i] = hk;
    A[i] = a;
    At[e * C + t] = a;
    QW2[i] = dot(Qs + t * D, W2 + e * D, D);
    QS2[i] = dot(Qs + t * D, S2 + e * D, D);
    if (p.dgd) {
      KhW2[i] = dot(Khs + t * D, W2 + e * D, D);
      KhS2[i] = dot(Khs + t * D, S2 + e * D, D);
    }
  }
  HOPE_SYNC();
  // phase 2: Err = K + A W1^T - V
  HOPE_PFOR(i, L * D) {
    const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
    const float err = Ks[i] + dot(A + t * E, W1 + d * E, E) - Vs[i];
    Err[i] = err;
    Errt[d * C + t] = err;
  }
  HOPE_SYNC();
  // phase 3: U = Err W1, G = U * gelu'(Hk)
  HOPE_PFOR(i, L * E) {
    const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
    const float u = dot(Err + t * D, W1t + e * D, D);
    const float g = u * gelu_p(Hk[i]);
    U[i] = u;
    G[i] = g;
    Gt[e * C + t] = g;
  }
  HOPE_SYNC();
  // phase 4: Hq = diag(Bc) Q W2^T + diag(c) Q S2^T - Aqk G;  dgd: R = diag(Bp) K^ W2^T + diag(cp) K^ S2^T - Akk G
  HOPE_PFOR(i, L * E) {
    const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
    const float hq = vc[kBc * C + t] * QW2[i] + vc[kCc * C + t] * QS2[i] - dot(p.aqk + mo + t * C, Gt + e * C, L);
    Hq[i] = hq;
    if (p.dgd) {
      const float r = vc[kBp * C + t] * KhW2[i] + vc[kCp * C + t] * KhS2[i] - dot(p.akk + mo + t * C, Gt + e * C, L);
      R[i] = r;
      Rt[e * C + t] = r;
    } else {
      const float aq = gelu(hq);
      Aq[i] = aq;
      Aqt[e * C + t] = aq;
    }
  }
  HOPE_SYNC();
  if (p.dgd) {
    // phase 5: w = Tinv R
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float wv = dot(p.tinv + mo + t * C, Rt + e * C, L);
      w[i] = wv;
      wt[e * C + t] = wv;
    }
    HOPE_SYNC();
    // phase 6: Hq -= Aqw w;  Aq = gelu(Hq)
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float hq = Hq[i] - dot(p.aqw + mo + t * C, wt + e * C, L);
      const float aq = gelu(hq);
      Hq[i] = hq;
      Aq[i] = aq;
      Aqt[e * C + t] = aq;
    }
    HOPE_SYNC();
  }
  // phase 7: Z = Aq A^T (the read-out's scores, decayed by gth)
  HOPE_PFOR(i, L * L) {
    const int t = static_cast<int>(i / L), j = static_cast<int>(i % L);
    Z[t * C + j] = dot(Aq + t * E, A + j * E, E);
  }
  HOPE_SYNC();
}

// Forward state pass of one (b, h): out (when p.out), the final state in p.W1T.. (the working state) and the
// chunk-start states (when p.states). p.scratch row bh (MlpLayout.fwd_total floats).
template <typename scalar_t>
HOPE_MLP_DEV void fwd_body(const MlpParams<scalar_t>& p, int64_t bh) {
  const int C = p.C, D = p.D, E = p.E;
  const int64_t DE = static_cast<int64_t>(D) * E;
  const MlpLayout ly(C, D, E);
  float* sc = p.scratch + bh * p.scratch_stride;
  float *W1 = p.W1T + bh * DE, *W2 = p.W2T + bh * DE, *S1 = p.S1T + bh * DE, *S2 = p.S2T + bh * DE;
  HOPE_PFOR(i, DE) {
    W1[i] = p.W1[bh * DE + i];
    W2[i] = p.W2[bh * DE + i];
    S1[i] = p.S1[bh * DE + i];
    S2[i] = p.S2[bh * DE + i];
  }
  HOPE_SYNC();
  const float *At = sc + ly.At, *Gt = sc + ly.Gt, *Aq = sc + ly.Aq, *Errt = sc + ly.Errt, *Z = sc + ly.Z,
              *Kt = sc + ly.Kt, *Kht = sc + ly.Kht, *wt = sc + ly.wt, *Qs = sc + ly.Q;
  for (int64_t ic = 0; ic < p.NC; ++ic) {
    const int64_t t0 = ic * C;
    const int L = static_cast<int>(p.T - t0 < C ? p.T - t0 : C);
    const float* vc = p.vec + (bh * p.NC + ic) * kNVec * C;
    const float* en = p.end + (bh * p.NC + ic) * 3;
    const int64_t mo = (bh * p.NC + ic) * C * C;
    if (p.states) {
      float* st = p.states + (bh * p.NC + ic) * 4 * DE;
      HOPE_PFOR(i, DE) {
        st[i] = W1[i];
        st[DE + i] = W2[i];
        st[2 * DE + i] = S1[i];
        st[3 * DE + i] = S2[i];
      }
    }
    chunk_fwd(p, ly, sc, bh, ic, W1, W2, S1, S2, /*backward=*/false);
    if (p.out) {
      // O = Q + diag(Bc) Aq W1^T + diag(c) Aq S1^T - (gth * Z) Err
      const float* gth = p.gth + mo;
      HOPE_PFOR(i, L * D) {
        const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
        const float o = Qs[i] + vc[kBc * C + t] * dot(Aq + t * E, W1 + d * E, E) +
                        vc[kCc * C + t] * dot(Aq + t * E, S1 + d * E, E) - dot3(gth + t * C, Z + t * C, Errt + d * C, L);
        p.out[(bh * p.T + t0) * D + i] = static_cast<scalar_t>(o);
      }
      HOPE_SYNC();
    }
    // W1' = B_L W1 + c_L S1 - Err^T diag(wg) A;  S1' = A_L S1 - Err^T diag(wp) A
    // W2' = B_L W2 + c_L S2 - G^T diag(wg) K [- w^T diag(wb) K^];  S2' = A_L S2 - G^T diag(wp) K
    const float BL = en[0], cL = en[1], AL = en[2];
    const float *wg = vc + kWg * C, *wp = vc + kWp * C, *wb = vc + kWb * C;
    HOPE_PFOR(i, DE) {  // i = d * E + e
      const int d = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float w1 = W1[i], s1 = S1[i];
      W1[i] = BL * w1 + cL * s1 - dot3(Errt + d * C, wg, At + e * C, L);
      S1[i] = AL * s1 - dot3(Errt + d * C, wp, At + e * C, L);
    }
    HOPE_PFOR(i, DE) {  // i = e * D + d
      const int e = static_cast<int>(i / D), d = static_cast<int>(i % D);
      const float w2 = W2[i], s2 = S2[i];
      float nw = BL * w2 + cL * s2 - dot3(Gt + e * C, wg, Kt + d * C, L);
      if (p.dgd) nw -= dot3(wt + e * C, wb, Kht + d * C, L);
      W2[i] = nw;
      S2[i] = AL * s2 - dot3(Gt + e * C, wp, Kt + d * C, L);
    }
    HOPE_SYNC();
  }
}

// Backward state pass of one (b, h): walks the chunks in reverse with the gradient of the state after the chunk
// (p.dW1.., initialized here from p.dW1T..), recomputing each chunk's intermediates from the chunk-start states
// p.states (forward with states stored); writes every element of the 15 outputs' (b, h) slices.
template <typename scalar_t>
HOPE_MLP_DEV void bwd_body(const MlpParams<scalar_t>& p, int64_t bh) {
  const int C = p.C, D = p.D, E = p.E;
  const int64_t DE = static_cast<int64_t>(D) * E;
  const int64_t Tp = p.NC * C;
  const MlpLayout ly(C, D, E);
  float* sc = p.scratch + bh * p.scratch_stride;
  float *dW1 = p.dW1 + bh * DE, *dW2 = p.dW2 + bh * DE, *dS1 = p.dS1 + bh * DE, *dS2 = p.dS2 + bh * DE;
  HOPE_PFOR(i, DE) {
    dW1[i] = p.dW1T[bh * DE + i];
    dW2[i] = p.dW2T[bh * DE + i];
    dS1[i] = p.dS1T[bh * DE + i];
    dS2[i] = p.dS2T[bh * DE + i];
  }
  HOPE_SYNC();
  const float *Qt = sc + ly.Qt, *Ks = sc + ly.K, *Kt = sc + ly.Kt, *Khs = sc + ly.Kh,
              *Kht = sc + ly.Kht;
  const float *W1t = sc + ly.W1t, *S1t = sc + ly.S1t, *W2t = sc + ly.W2t, *S2t = sc + ly.S2t;
  const float *Hk = sc + ly.Hk, *A = sc + ly.A, *At = sc + ly.At, *U = sc + ly.U, *G = sc + ly.G;
  const float *QW2 = sc + ly.QW2, *QS2 = sc + ly.QS2, *Hq = sc + ly.Hq, *Aq = sc + ly.Aq, *Aqt = sc + ly.Aqt;
  const float *KhW2 = sc + ly.KhW2, *KhS2 = sc + ly.KhS2, *R = sc + ly.R, *w = sc + ly.w;
  const float *Err = sc + ly.Err, *Errt = sc + ly.Errt, *Z = sc + ly.Z;
  const float *dOs = sc + ly.dO, *dOt = sc + ly.dOt, *dW1t = sc + ly.dW1t, *dS1t = sc + ly.dS1t,
              *dW2t = sc + ly.dW2t, *dS2t = sc + ly.dS2t;
  const float *aqkT = sc + ly.aqkT, *akkT = sc + ly.akkT, *tinvT = sc + ly.tinvT, *aqwT = sc + ly.aqwT;
  float *AaaT = sc + ly.AaaT, *dZ = sc + ly.dZ, *dZt = sc + ly.dZt;
  float *KdW2 = sc + ly.KdW2, *KdS2 = sc + ly.KdS2, *dOW1 = sc + ly.dOW1, *dOS1 = sc + ly.dOS1,
        *KhdW2 = sc + ly.KhdW2;
  float *dHq = sc + ly.dHq, *dHqt = sc + ly.dHqt, *dG = sc + ly.dG, *dw = sc + ly.dw, *dwt = sc + ly.dwt;
  float *dR = sc + ly.dR, *dRt = sc + ly.dRt, *dU = sc + ly.dU, *dUt = sc + ly.dUt, *dHk = sc + ly.dHk,
        *dHkt = sc + ly.dHkt;
  float *AdW1 = sc + ly.AdW1, *AdS1 = sc + ly.AdS1, *dErr = sc + ly.dErr, *dErrt = sc + ly.dErrt;
  float* part = sc + ly.part;
  const int PW = D > E ? D : E;

  for (int64_t ir = 0; ir < p.NC; ++ir) {
    const int64_t ic = p.NC - 1 - ir, t0 = ic * C;
    const int L = static_cast<int>(p.T - t0 < C ? p.T - t0 : C);
    const float* vc = p.vec + (bh * p.NC + ic) * kNVec * C;
    const float* en = p.end + (bh * p.NC + ic) * 3;
    const int64_t mo = (bh * p.NC + ic) * C * C;
    const float* st = p.states + (bh * p.NC + ic) * 4 * DE;
    const float *W1 = st, *W2 = st + DE, *S1 = st + 2 * DE, *S2 = st + 3 * DE;
    const float *Bc = vc + kBc * C, *cc = vc + kCc * C, *Bp = vc + kBp * C, *cp = vc + kCp * C, *wg = vc + kWg * C,
                *wp = vc + kWp * C, *wb = vc + kWb * C;
    const float* gth = p.gth + mo;
    chunk_fwd(p, ly, sc, bh, ic, W1, W2, S1, S2, /*backward=*/true);

    // B1: O -= (gth * Z) Err: dAaa = -dO Err^T, dZ = gth dAaa, dgth = dAaa Z; products with the state gradients;
    // partial sums of dend
    float* dgth = p.dgth + mo;
    HOPE_PFOR(i, C * C) {
      const int t = static_cast<int>(i / C), j = static_cast<int>(i % C);
      if (t < L && j < L) {
        const float da = -dot(dOs + t * D, Err + j * D, D);
        const float g = gth[i], z = Z[i];
        dZ[i] = g * da;
        dZt[j * C + t] = g * da;
        dgth[i] = da * z;
        AaaT[j * C + t] = g * z;
      } else {
        dgth[i] = 0.f;
      }
    }
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      KdW2[i] = dot(Ks + t * D, dW2 + e * D, D);
      KdS2[i] = dot(Ks + t * D, dS2 + e * D, D);
      dOW1[i] = dot(dOs + t * D, W1t + e * D, D);
      dOS1[i] = dot(dOs + t * D, S1t + e * D, D);
      if (p.dgd) KhdW2[i] = dot(Khs + t * D, dW2 + e * D, D);
    }
    HOPE_PFOR(i, L * D) {
      const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
      AdW1[i] = dot(A + t * E, dW1 + d * E, E);
      AdS1[i] = dot(A + t * E, dS1 + d * E, E);
    }
    HOPE_PFOR(i, D) {
      part[0 * PW + i] = dot(dW1 + i * E, W1 + i * E, E);
      part[1 * PW + i] = dot(dW1 + i * E, S1 + i * E, E);
      part[2 * PW + i] = dot(dS1 + i * E, S1 + i * E, E);
    }
    HOPE_PFOR(i, E) {
      part[3 * PW + i] = dot(dW2 + i * D, W2 + i * D, D);
      part[4 * PW + i] = dot(dW2 + i * D, S2 + i * D, D);
      part[5 * PW + i] = dot(dS2 + i * D, S2 + i * D, D);
    }
    HOPE_SYNC();
    // B2: dAq = diag(Bc) dO W1 + diag(c) dO S1 + dZ A;  dHq = dAq gelu'(Hq);  dErr = -Aaa^T dO (first part);  dend
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float daq = Bc[t] * dOW1[i] + cc[t] * dOS1[i] + dot(dZ + t * C, At + e * C, L);
      const float dhq = daq * gelu_p(Hq[i]);
      dHq[i] = dhq;
      dHqt[e * C + t] = dhq;
    }
    HOPE_PFOR(i, L * D) {
      const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
      dErr[i] = -dot(AaaT + t * C, dOt + d * C, L);
    }
    HOPE_PFOR(i, 3) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += part[i * PW + d];
      for (int e = 0; e < E; ++e) s += part[(3 + i) * PW + e];
      p.dend[(bh * p.NC + ic) * 3 + i] = s;
    }
    HOPE_SYNC();
    // B3: dG = -diag(wg) K dW2'^T - diag(wp) K dS2'^T - Aqk^T dHq;  dAqk = -dHq G^T
    //     dgd: dw = -Aqw^T dHq - diag(wb) K^ dW2'^T;  dAqw = -dHq w^T
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      dG[i] = -wg[t] * KdW2[i] - wp[t] * KdS2[i] - dot(aqkT + t * C, dHqt + e * C, L);
      if (p.dgd) {
        const float v = -dot(aqwT + t * C, dHqt + e * C, L) - wb[t] * KhdW2[i];
        dw[i] = v;
        dwt[e * C + t] = v;
      }
    }
    HOPE_PFOR(i, C * C) {
      const int t = static_cast<int>(i / C), j = static_cast<int>(i % C);
      const bool in = t < L && j < L;
      p.daqk[mo + i] = in ? -dot(dHq + t * E, G + j * E, E) : 0.f;
      if (p.dgd) p.daqw[mo + i] = in ? -dot(dHq + t * E, w + j * E, E) : 0.f;
    }
    HOPE_SYNC();
    if (p.dgd) {
      // B4: w = Tinv R: dR = Tinv^T dw, dTinv = dw R^T
      HOPE_PFOR(i, L * E) {
        const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
        const float v = dot(tinvT + t * C, dwt + e * C, L);
        dR[i] = v;
        dRt[e * C + t] = v;
      }
      HOPE_PFOR(i, C * C) {
        const int t = static_cast<int>(i / C), j = static_cast<int>(i % C);
        p.dtinv[mo + i] = t < L && j < L ? dot(dw + t * E, R + j * E, E) : 0.f;
      }
      HOPE_SYNC();
      // B5: R = ... - Akk G: dG -= Akk^T dR, dAkk = -dR G^T
      HOPE_PFOR(i, L * E) {
        const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
        dG[i] -= dot(akkT + t * C, dRt + e * C, L);
      }
      HOPE_PFOR(i, C * C) {
        const int t = static_cast<int>(i / C), j = static_cast<int>(i % C);
        p.dakk[mo + i] = t < L && j < L ? -dot(dR + t * E, G + j * E, E) : 0.f;
      }
      HOPE_SYNC();
    }
    // B6: G = U gelu'(Hk): dU = dG gelu'(Hk)
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float v = dG[i] * gelu_p(Hk[i]);
      dU[i] = v;
      dUt[e * C + t] = v;
    }
    HOPE_SYNC();
    // B7: dErr += dU W1^T - diag(wg) A dW1'^T - diag(wp) A dS1'^T
    HOPE_PFOR(i, L * D) {
      const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
      const float v = dErr[i] + dot(dU + t * E, W1 + d * E, E) - wg[t] * AdW1[i] - wp[t] * AdS1[i];
      dErr[i] = v;
      dErrt[d * C + t] = v;
    }
    HOPE_SYNC();
    // B8: dA = dErr W1 - diag(wg) Err dW1' - diag(wp) Err dS1' + dZ^T Aq;  dHk = dA gelu'(Hk) + dG U gelu''(Hk)
    HOPE_PFOR(i, L * E) {
      const int t = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float da = dot(dErr + t * D, W1t + e * D, D) - wg[t] * dot(Err + t * D, dW1t + e * D, D) -
                       wp[t] * dot(Err + t * D, dS1t + e * D, D) + dot(dZt + t * C, Aqt + e * C, L);
      const float hk = Hk[i];
      const float v = da * gelu_p(hk) + dG[i] * U[i] * gelu_pp(hk);
      dHk[i] = v;
      dHkt[e * C + t] = v;
    }
    HOPE_SYNC();
    // B9: dq, dk, dv, dkh, dvec; the chunk-start state gradients (in place: each element reads only its own
    // end-of-chunk gradient, every other read of them went through the transposed copies or earlier phases)
    HOPE_PFOR(i, C * D) {
      const int t = static_cast<int>(i / D), d = static_cast<int>(i % D);
      if (t < L) {
        const int64_t o = (bh * p.T + t0) * D + i;
        const float dq = dOs[i] + Bc[t] * dot(dHq + t * E, W2t + d * E, E) + cc[t] * dot(dHq + t * E, S2t + d * E, E);
        const float dk = dErr[i] + dot(dHk + t * E, W2t + d * E, E) - wg[t] * dot(G + t * E, dW2t + d * E, E) -
                         wp[t] * dot(G + t * E, dS2t + d * E, E);
        p.dq[o] = static_cast<scalar_t>(dq);
        p.dk[o] = static_cast<scalar_t>(dk);
        p.dv[o] = static_cast<scalar_t>(-dErr[i]);
      }
      if (p.dgd) {
        float v = 0.f;
        if (t < L)
          v = -wb[t] * dot(w + t * E, dW2t + d * E, E) + Bp[t] * dot(dR + t * E, W2t + d * E, E) +
              cp[t] * dot(dR + t * E, S2t + d * E, E);
        p.dkh[(bh * Tp + t0) * D + i] = v;
      }
    }
    float* dvec = p.dvec + (bh * p.NC + ic) * kNVec * C;
    HOPE_PFOR(i, kNVec * C) {
      const int r = static_cast<int>(i / C), t = static_cast<int>(i % C);
      float v = 0.f;
      if (t < L) {
        if (r == kBc) v = dot(Aq + t * E, dOW1 + t * E, E) + dot(dHq + t * E, QW2 + t * E, E);
        else if (r == kCc) v = dot(Aq + t * E, dOS1 + t * E, E) + dot(dHq + t * E, QS2 + t * E, E);
        else if (r == kWg) v = -dot(Err + t * D, AdW1 + t * D, D) - dot(G + t * E, KdW2 + t * E, E);
        else if (r == kWp) v = -dot(Err + t * D, AdS1 + t * D, D) - dot(G + t * E, KdS2 + t * E, E);
        else if (p.dgd && r == kBp) v = dot(dR + t * E, KhW2 + t * E, E);
        else if (p.dgd && r == kCp) v = dot(dR + t * E, KhS2 + t * E, E);
        else if (p.dgd && r == kWb) v = -dot(w + t * E, KhdW2 + t * E, E);
      }
      dvec[i] = v;
    }
    const float BL = en[0], cL = en[1], AL = en[2];
    // dW1 = B_L dW1' + (Bc dO)^T Aq + Err^T dU + dErr^T A;  dS1 = c_L dW1' + A_L dS1' + (c dO)^T Aq
    HOPE_PFOR(i, DE) {  // i = d * E + e
      const int d = static_cast<int>(i / E), e = static_cast<int>(i % E);
      const float gw = dW1[i], gs = dS1[i];
      dW1[i] = BL * gw + dot3(dOt + d * C, Bc, Aqt + e * C, L) + dot(Errt + d * C, dUt + e * C, L) +
               dot(dErrt + d * C, At + e * C, L);
      dS1[i] = cL * gw + AL * gs + dot3(dOt + d * C, cc, Aqt + e * C, L);
    }
    // dW2 = B_L dW2' + (Bc dHq)^T Q + dHk^T K [+ (Bp dR)^T K^];  dS2 = c_L dW2' + A_L dS2' + (c dHq)^T Q [+ (cp dR)^T K^]
    HOPE_PFOR(i, DE) {  // i = e * D + d
      const int e = static_cast<int>(i / D), d = static_cast<int>(i % D);
      const float gw = dW2[i], gs = dS2[i];
      float nw = BL * gw + dot3(dHqt + e * C, Bc, Qt + d * C, L) + dot(dHkt + e * C, Kt + d * C, L);
      float ns = cL * gw + AL * gs + dot3(dHqt + e * C, cc, Qt + d * C, L);
      if (p.dgd) {
        nw += dot3(dRt + e * C, Bp, Kht + d * C, L);
        ns += dot3(dRt + e * C, cp, Kht + d * C, L);
      }
      dW2[i] = nw;
      dS2[i] = ns;
    }
    HOPE_SYNC();
  }
}

}  // namespace mlp
}  // namespace hope
