// C++ CPU titan_memory_update state pass for the linear memory, rules titans and dgd, forward and backward: the
// math of triton.py's _linear_fwd_kernel / _linear_bwd_kernel (and csrc/titan_linear.cu) with the same tensor
// contract, in fp32. One task per (b, h) (at::parallel_for), holding the full [Dv, Dk] state; per chunk the
// [C, Dk] / [C, C] / [Dv, Dk] products run through one small register-blocked row-major GEMM (gemm_acc; no
// per-call ATen dispatch). Padded tokens of the last chunk are skipped (the kernels' masks), so gradient
// entries of padded rows / columns are zero.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "ops.h"
#include "titan_inputs.h"

namespace hope {
namespace {

constexpr int64_t kNVec = kNRows;  // rows of `rows` (titan_inputs.h)

// 8 floats (one AVX register, two SSE ones): GCC vector extension, unaligned loads / stores through memcpy.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8 __attribute__((vector_size(32)));
__attribute__((always_inline)) inline v8 ld8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void st8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

// C[i, j] += alpha * sum_l A(i, l) B[l, j] for i < m, j < n, l < kk, with A(i, l) = A[i * ars + l * acs]
// (A or A^T) and row-major B (ldb), C (ldc). Register-blocked micro-kernel: a 4 x 16 tile of C in eight v8
// accumulators over l (measured ~100 GFLOP/s vs ~14 for a plain axpy loop at 64 x 32 x 32 on this 2-core
// AVX-512 machine); the last n % 16 columns take the plain loop. Compiled for AVX-512 / AVX2 / baseline x86-64
// with run-time selection (GCC target_clones).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void gemm_acc(int64_t m, int64_t n, int64_t kk, float alpha, const float* A, int64_t ars, int64_t acs,
              const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc) {
  const int64_t nb = n - n % 16;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const float *a0 = A + i * ars, *a1 = a0 + ars, *a2 = a1 + ars, *a3 = a2 + ars;
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      for (int64_t l = 0; l < kk; ++l) {
        const v8 b0 = ld8(B + l * ldb + j0), b1 = ld8(B + l * ldb + j0 + 8);
        const float x0 = a0[l * acs], x1 = a1[l * acs], x2 = a2[l * acs], x3 = a3[l * acs];
        c00 += x0 * b0;
        c01 += x0 * b1;
        c10 += x1 * b0;
        c11 += x1 * b1;
        c20 += x2 * b0;
        c21 += x2 * b1;
        c30 += x3 * b0;
        c31 += x3 * b1;
      }
      float* c = C + i * ldc + j0;
      st8(c, ld8(c) + alpha * c00);
      st8(c + 8, ld8(c + 8) + alpha * c01);
      c += ldc;
      st8(c, ld8(c) + alpha * c10);
      st8(c + 8, ld8(c + 8) + alpha * c11);
      c += ldc;
      st8(c, ld8(c) + alpha * c20);
      st8(c + 8, ld8(c + 8) + alpha * c21);
      c += ldc;
      st8(c, ld8(c) + alpha * c30);
      st8(c + 8, ld8(c + 8) + alpha * c31);
    }
  }
  for (; i < m; ++i) {
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      v8 c0 = {}, c1 = {};
      for (int64_t l = 0; l < kk; ++l) {
        const float x = A[i * ars + l * acs];
        c0 += x * ld8(B + l * ldb + j0);
        c1 += x * ld8(B + l * ldb + j0 + 8);
      }
      float* c = C + i * ldc + j0;
      st8(c, ld8(c) + alpha * c0);
      st8(c + 8, ld8(c + 8) + alpha * c1);
    }
  }
  if (nb == n) return;
  for (int64_t r = 0; r < m; ++r) {  // the last n % 16 columns
    float* __restrict c = C + r * ldc;
    for (int64_t l = 0; l < kk; ++l) {
      const float a = alpha * A[r * ars + l * acs];
      const float* __restrict b = B + l * ldb;
      for (int64_t j = nb; j < n; ++j) c[j] += a * b[j];
    }
  }
}
#pragma GCC diagnostic pop

// dst[c, r] = src[r, c] for a row-major [rows, cols] src (leading dim ld); dst is [cols, rows] contiguous.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
}

inline void zero(std::vector<float>& x, int64_t n) { std::fill(x.begin(), x.begin() + n, 0.f); }

// X [L, Dk] (row-major) times M^T, M [Dv, Dk] given as Mt [Dk, Dv]: out [L, Dv] = alpha X M^T (accumulated).
inline void mul_nt(int64_t L, int64_t Dk, int64_t Dv, float alpha, const float* X, const float* Mt, float* out) {
  gemm_acc(L, Dv, Dk, alpha, X, Dk, 1, Mt, Dv, out, Dv);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Dims {
  int64_t B, H, T, Dk, Dv, C, NC, Tp;
  bool dgd;
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_shaped(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* layout) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == shape, name, " has shape ", fmt(t.sizes()), ", expected ", fmt(shape), " (", layout, ")");
}

const at::Tensor& required(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() > 0, name, " is required when khat is given (rule dgd)");
  return t;
}

// The linear memory's inputs, fp32 on the CPU: q, k [B, H, T, Dk], v [B, H, T, Dv], khat [B, H, NC * C, Dk]
// (dgd when given), aqk / akk / tinv / aqw [B, H, NC, C, C], rows [B, H, NC, 7, C], ends [B, H, NC, 3],
// state W, S [B, H, Dv, Dk]; all contiguous float32 CPU tensors; chunk_size >= 1, NC = ceil(T / chunk_size).
Dims check_inputs(const TitanInputs& in) {
  const at::Tensor &q = in.q, &W0 = in.state[0], &S0 = in.state[1];
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, H, T, Dk], got ", fmt(q.dim()), "-D");
  TORCH_CHECK(in.chunk_size >= 1, "chunk_size must be >= 1, got ", fmt(in.chunk_size));
  Dims d{};
  d.B = q.size(0), d.H = q.size(1), d.T = q.size(2), d.Dk = q.size(3), d.C = in.chunk_size;
  TORCH_CHECK(d.T >= 1, "q must have at least one token, got T=", fmt(d.T));
  TORCH_CHECK(d.Dk >= 1, "q's head dim Dk must be >= 1, got ", fmt(d.Dk));
  check_shaped(in.k, "k", q.sizes(), "like q: [B, H, T, Dk]");
  check_cpu(in.v, "v");
  TORCH_CHECK(in.v.dim() == 4 && in.v.size(0) == d.B && in.v.size(1) == d.H && in.v.size(2) == d.T, "v has shape ",
              fmt(in.v.sizes()), ", expected [B, H, T, Dv] with q's B, H, T");
  d.Dv = in.v.size(3);
  TORCH_CHECK(d.Dv >= 1, "v's head dim Dv must be >= 1, got ", fmt(d.Dv));
  check_cpu(in.rows, "rows");
  TORCH_CHECK(in.rows.dim() == 5, "rows must be 5-D [B, H, NC, 7, C], got ", fmt(in.rows.dim()), "-D");
  d.NC = (d.T + d.C - 1) / d.C;
  d.Tp = d.NC * d.C;
  TORCH_CHECK(in.rows.size(2) == d.NC, "rows has ", fmt(in.rows.size(2)), " chunks, expected ceil(T / chunk_size) = ",
              fmt(d.NC));
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C;
  check_shaped(in.rows, "rows", {B, H, NC, kNRows, C}, "[B, H, NC, 7, C]");
  check_shaped(in.ends, "ends", {B, H, NC, 3}, "[B, H, NC, 3]");
  check_shaped(in.aqk, "aqk", {B, H, NC, C, C}, "[B, H, NC, C, C]");
  check_shaped(W0, "W", {B, H, d.Dv, d.Dk}, "[B, H, Dv, Dk]");
  check_shaped(S0, "S", {B, H, d.Dv, d.Dk}, "[B, H, Dv, Dk]");
  d.dgd = in.dgd();
  if (d.dgd) {
    check_shaped(in.khat, "khat", {B, H, d.Tp, d.Dk}, "[B, H, NC * C, Dk]");
    check_shaped(required(in.akk, "akk"), "akk", {B, H, NC, C, C}, "[B, H, NC, C, C]");
    check_shaped(required(in.tinv, "tinv"), "tinv", {B, H, NC, C, C}, "[B, H, NC, C, C]");
    check_shaped(required(in.aqw, "aqw"), "aqw", {B, H, NC, C, C}, "[B, H, NC, C, C]");
  }
  return d;
}

struct Ptrs {
  const float *q, *k, *kh, *v, *aqk, *akk, *tinv, *aqw, *vec, *end, *W0, *S0;
};

Ptrs pointers(const TitanInputs& in, bool dgd) {
  auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  return {f(in.q), f(in.k), dgd ? f(in.khat) : nullptr, f(in.v), f(in.aqk), dgd ? f(in.akk) : nullptr,
          dgd ? f(in.tinv) : nullptr, dgd ? f(in.aqw) : nullptr, f(in.rows), f(in.ends), f(in.state[0]),
          f(in.state[1])};
}

// Forward state pass of one (b, h) (triton.py _linear_fwd_kernel): out (when given), the final state, and the
// chunk-start states (when given, [NC, 2, Dv, Dk]).
void fwd_one(const Dims& d, const Ptrs& p, int64_t bh, float* out, float* WT, float* ST, float* states) {
  const int64_t Dk = d.Dk, Dv = d.Dv, C = d.C, T = d.T, NC = d.NC, DD = Dv * Dk;
  std::vector<float> W(p.W0 + bh * DD, p.W0 + (bh + 1) * DD), S(p.S0 + bh * DD, p.S0 + (bh + 1) * DD);
  std::vector<float> Wt(DD), St(DD), E(C * Dv), O(C * Dv), X(C * Dv), R(C * Dv), w(C * Dv), Wn(DD);
  for (int64_t ic = 0; ic < NC; ++ic) {
    const int64_t t0 = ic * C, L = std::min(C, T - t0);
    if (states) {
      float* st = states + (bh * NC + ic) * 2 * DD;
      std::memcpy(st, W.data(), DD * sizeof(float));
      std::memcpy(st + DD, S.data(), DD * sizeof(float));
    }
    const float* K = p.k + (bh * T + t0) * Dk;
    const float* Vv = p.v + (bh * T + t0) * Dv;
    const float* vc = p.vec + (bh * NC + ic) * kNVec * C;
    const float* en = p.end + (bh * NC + ic) * 3;
    const int64_t mo = (bh * NC + ic) * C * C;
    const float BL = en[0], cL = en[1], AL = en[2];
    transpose(W.data(), Dv, Dk, Dk, Wt.data());
    transpose(S.data(), Dv, Dk, Dk, St.data());
    // E = K W^T - V
    for (int64_t i = 0; i < L * Dv; ++i) E[i] = -Vv[i];
    mul_nt(L, Dk, Dv, 1.f, K, Wt.data(), E.data());
    if (out) {
      // O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E
      const float* Q = p.q + (bh * T + t0) * Dk;
      zero(O, L * Dv);
      zero(X, L * Dv);
      mul_nt(L, Dk, Dv, 1.f, Q, Wt.data(), O.data());
      mul_nt(L, Dk, Dv, 1.f, Q, St.data(), X.data());
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) O[t * Dv + j] = vc[t] * O[t * Dv + j] + vc[C + t] * X[t * Dv + j];
      gemm_acc(L, Dv, L, -1.f, p.aqk + mo, C, 1, E.data(), Dv, O.data(), Dv);
    }
    // W' = B_L W + c_L S - E^T diag(wg) K;  S' = A_L S - E^T diag(wp) K
    for (int64_t i = 0; i < DD; ++i) Wn[i] = BL * W[i] + cL * S[i];
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = E[t * Dv + j] * vc[4 * C + t];
    gemm_acc(Dv, Dk, L, -1.f, X.data(), 1, Dv, K, Dk, Wn.data(), Dk);
    if (d.dgd) {
      // R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E;  w = Tinv R;  O -= Aqw w;  W' -= w^T diag(wb) K^
      const float* Kh = p.kh + (bh * d.Tp + t0) * Dk;
      zero(R, L * Dv);
      zero(X, L * Dv);
      mul_nt(L, Dk, Dv, 1.f, Kh, Wt.data(), R.data());
      mul_nt(L, Dk, Dv, 1.f, Kh, St.data(), X.data());
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) R[t * Dv + j] = vc[2 * C + t] * R[t * Dv + j] + vc[3 * C + t] * X[t * Dv + j];
      gemm_acc(L, Dv, L, -1.f, p.akk + mo, C, 1, E.data(), Dv, R.data(), Dv);
      zero(w, L * Dv);
      gemm_acc(L, Dv, L, 1.f, p.tinv + mo, C, 1, R.data(), Dv, w.data(), Dv);
      if (out) gemm_acc(L, Dv, L, -1.f, p.aqw + mo, C, 1, w.data(), Dv, O.data(), Dv);
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = w[t * Dv + j] * vc[6 * C + t];
      gemm_acc(Dv, Dk, L, -1.f, X.data(), 1, Dv, Kh, Dk, Wn.data(), Dk);
    }
    if (out) std::memcpy(out + (bh * T + t0) * Dv, O.data(), L * Dv * sizeof(float));
    for (int64_t i = 0; i < DD; ++i) S[i] *= AL;
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = E[t * Dv + j] * vc[5 * C + t];
    gemm_acc(Dv, Dk, L, -1.f, X.data(), 1, Dv, K, Dk, S.data(), Dk);
    W.swap(Wn);
  }
  std::memcpy(WT + bh * DD, W.data(), DD * sizeof(float));
  std::memcpy(ST + bh * DD, S.data(), DD * sizeof(float));
}

struct Grads {
  float *dq, *dk, *dkh, *dv, *daqk, *dakk, *dtinv, *daqw, *dvec, *dend, *dW0, *dS0;
};

// Backward state pass of one (b, h) (triton.py _linear_bwd_kernel): reverse chunk walk with the gradient of the
// state after the chunk; states [NC, 2, Dv, Dk] are the chunk-start states of the forward.
void bwd_one(const Dims& d, const Ptrs& p, const float* states, const float* gout, const float* gWT,
             const float* gST, const Grads& g, int64_t bh) {
  const int64_t Dk = d.Dk, Dv = d.Dv, C = d.C, T = d.T, NC = d.NC, DD = Dv * Dk;
  std::vector<float> dW(gWT + bh * DD, gWT + (bh + 1) * DD), dS(gST + bh * DD, gST + (bh + 1) * DD);
  std::vector<float> Wt(DD), St(DD), dWt(DD), dSt(DD), dWn(DD), dSn(DD);
  std::vector<float> E(C * Dv), Et(Dv * C), QW(C * Dv), QS(C * Dv), kdW(C * Dv), kdS(C * Dv), dE(C * Dv),
      X(C * Dv), XK(C * Dk);
  std::vector<float> KhW, KhS, R, Rt, w, wt, khdW, dw, dR;
  if (d.dgd) {
    for (auto* x : {&KhW, &KhS, &R, &Rt, &w, &wt, &khdW, &dw, &dR}) x->resize(C * Dv);
  }
  for (int64_t ir = 0; ir < NC; ++ir) {
    const int64_t ic = NC - 1 - ir, t0 = ic * C, L = std::min(C, T - t0);
    const float* W = states + (bh * NC + ic) * 2 * DD;
    const float* S = W + DD;
    const float* Q = p.q + (bh * T + t0) * Dk;
    const float* K = p.k + (bh * T + t0) * Dk;
    const float* Vv = p.v + (bh * T + t0) * Dv;
    const float* dO = gout + (bh * T + t0) * Dv;
    const float* vc = p.vec + (bh * NC + ic) * kNVec * C;
    const float* en = p.end + (bh * NC + ic) * 3;
    const int64_t mo = (bh * NC + ic) * C * C;
    const float BL = en[0], cL = en[1], AL = en[2];
    const float *Bc = vc, *cc = vc + C, *Bp = vc + 2 * C, *cp = vc + 3 * C, *wg = vc + 4 * C, *wp = vc + 5 * C,
                *wb = vc + 6 * C;
    float* dvec = g.dvec + (bh * NC + ic) * kNVec * C;
    float* dend = g.dend + (bh * NC + ic) * 3;
    float* dq = g.dq + (bh * T + t0) * Dk;
    float* dk = g.dk + (bh * T + t0) * Dk;
    float* dv = g.dv + (bh * T + t0) * Dv;
    float* daqk = g.daqk + mo;
    transpose(W, Dv, Dk, Dk, Wt.data());
    transpose(S, Dv, Dk, Dk, St.data());
    transpose(dW.data(), Dv, Dk, Dk, dWt.data());
    transpose(dS.data(), Dv, Dk, Dk, dSt.data());
    const int64_t LV = L * Dv;
    for (int64_t i = 0; i < LV; ++i) E[i] = -Vv[i];
    mul_nt(L, Dk, Dv, 1.f, K, Wt.data(), E.data());
    for (auto* x : {&QW, &QS, &kdW, &kdS, &dE}) zero(*x, LV);
    mul_nt(L, Dk, Dv, 1.f, Q, Wt.data(), QW.data());
    mul_nt(L, Dk, Dv, 1.f, Q, St.data(), QS.data());
    mul_nt(L, Dk, Dv, 1.f, K, dWt.data(), kdW.data());
    mul_nt(L, Dk, Dv, 1.f, K, dSt.data(), kdS.data());
    transpose(E.data(), L, Dv, Dv, Et.data());  // [Dv, L]
    // dE = -Aqk^T dO - diag(wg) K dW^T - diag(wp) K dS^T
    gemm_acc(L, Dv, L, -1.f, p.aqk + mo, 1, C, dO, Dv, dE.data(), Dv);
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t j = 0; j < Dv; ++j) dE[t * Dv + j] -= wg[t] * kdW[t * Dv + j] + wp[t] * kdS[t * Dv + j];
      dvec[t] = dot(dO + t * Dv, QW.data() + t * Dv, Dv);
      dvec[C + t] = dot(dO + t * Dv, QS.data() + t * Dv, Dv);
      dvec[4 * C + t] = -dot(E.data() + t * Dv, kdW.data() + t * Dv, Dv);
      dvec[5 * C + t] = -dot(E.data() + t * Dv, kdS.data() + t * Dv, Dv);
    }
    // dAqk = -dO E^T
    for (int64_t t = 0; t < L; ++t) std::fill(daqk + t * C, daqk + t * C + L, 0.f);
    gemm_acc(L, L, Dv, -1.f, dO, Dv, 1, Et.data(), L, daqk, C);
    dend[0] = dot(dW.data(), W, DD);
    dend[1] = dot(dW.data(), S, DD);
    dend[2] = dot(dS.data(), S, DD);
    // dq = diag(Bc) dO W + diag(c) dO S
    std::fill(dq, dq + L * Dk, 0.f);
    std::fill(XK.begin(), XK.begin() + L * Dk, 0.f);
    gemm_acc(L, Dk, Dv, 1.f, dO, Dv, 1, W, Dk, dq, Dk);
    gemm_acc(L, Dk, Dv, 1.f, dO, Dv, 1, S, Dk, XK.data(), Dk);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dk; ++j) dq[t * Dk + j] = Bc[t] * dq[t * Dk + j] + cc[t] * XK[t * Dk + j];
    // dk = -diag(wg) E dW - diag(wp) E dS (+ dE W below)
    std::fill(dk, dk + L * Dk, 0.f);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = E[t * Dv + j] * wg[t];
    gemm_acc(L, Dk, Dv, -1.f, X.data(), Dv, 1, dW.data(), Dk, dk, Dk);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = E[t * Dv + j] * wp[t];
    gemm_acc(L, Dk, Dv, -1.f, X.data(), Dv, 1, dS.data(), Dk, dk, Dk);
    // dW0 = (diag(Bc) dO)^T Q + B_L dW;  dS0 = (diag(c) dO)^T Q + c_L dW + A_L dS
    for (int64_t i = 0; i < DD; ++i) {
      dWn[i] = BL * dW[i];
      dSn[i] = cL * dW[i] + AL * dS[i];
    }
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = dO[t * Dv + j] * Bc[t];
    gemm_acc(Dv, Dk, L, 1.f, X.data(), 1, Dv, Q, Dk, dWn.data(), Dk);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = dO[t * Dv + j] * cc[t];
    gemm_acc(Dv, Dk, L, 1.f, X.data(), 1, Dv, Q, Dk, dSn.data(), Dk);
    if (d.dgd) {
      const float* Kh = p.kh + (bh * d.Tp + t0) * Dk;
      const float* akk = p.akk + mo;
      const float* tinv = p.tinv + mo;
      const float* aqw = p.aqw + mo;
      float* dkh = g.dkh + (bh * d.Tp + t0) * Dk;
      float *dakk = g.dakk + mo, *dtinv = g.dtinv + mo, *daqw = g.daqw + mo;
      for (auto* x : {&KhW, &KhS, &R, &w, &khdW, &dw, &dR}) zero(*x, LV);
      mul_nt(L, Dk, Dv, 1.f, Kh, Wt.data(), KhW.data());
      mul_nt(L, Dk, Dv, 1.f, Kh, St.data(), KhS.data());
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < Dv; ++j) R[i * Dv + j] = Bp[i] * KhW[i * Dv + j] + cp[i] * KhS[i * Dv + j];
      gemm_acc(L, Dv, L, -1.f, akk, C, 1, E.data(), Dv, R.data(), Dv);
      gemm_acc(L, Dv, L, 1.f, tinv, C, 1, R.data(), Dv, w.data(), Dv);
      mul_nt(L, Dk, Dv, 1.f, Kh, dWt.data(), khdW.data());
      // dw = -Aqw^T dO - diag(wb) K^ dW^T;  dAqw = -dO w^T;  dwb = -rowsum(w * K^ dW^T)
      gemm_acc(L, Dv, L, -1.f, aqw, 1, C, dO, Dv, dw.data(), Dv);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t j = 0; j < Dv; ++j) dw[t * Dv + j] -= wb[t] * khdW[t * Dv + j];
        dvec[6 * C + t] = -dot(w.data() + t * Dv, khdW.data() + t * Dv, Dv);
      }
      transpose(w.data(), L, Dv, Dv, wt.data());
      for (int64_t t = 0; t < L; ++t) {
        std::fill(daqw + t * C, daqw + t * C + L, 0.f);
        std::fill(dtinv + t * C, dtinv + t * C + L, 0.f);
        std::fill(dakk + t * C, dakk + t * C + L, 0.f);
      }
      gemm_acc(L, L, Dv, -1.f, dO, Dv, 1, wt.data(), L, daqw, C);
      // dkh = -diag(wb) w dW
      std::fill(dkh, dkh + L * Dk, 0.f);
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = w[t * Dv + j] * wb[t];
      gemm_acc(L, Dk, Dv, -1.f, X.data(), Dv, 1, dW.data(), Dk, dkh, Dk);
      // w = Tinv R: dR = Tinv^T dw, dTinv = dw R^T
      gemm_acc(L, Dv, L, 1.f, tinv, 1, C, dw.data(), Dv, dR.data(), Dv);
      transpose(R.data(), L, Dv, Dv, Rt.data());
      gemm_acc(L, L, Dv, 1.f, dw.data(), Dv, 1, Rt.data(), L, dtinv, C);
      // R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E
      for (int64_t t = 0; t < L; ++t) {
        dvec[2 * C + t] = dot(dR.data() + t * Dv, KhW.data() + t * Dv, Dv);
        dvec[3 * C + t] = dot(dR.data() + t * Dv, KhS.data() + t * Dv, Dv);
      }
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = dR[t * Dv + j] * Bp[t];
      gemm_acc(L, Dk, Dv, 1.f, X.data(), Dv, 1, W, Dk, dkh, Dk);
      gemm_acc(Dv, Dk, L, 1.f, X.data(), 1, Dv, Kh, Dk, dWn.data(), Dk);
      for (int64_t t = 0; t < L; ++t)
        for (int64_t j = 0; j < Dv; ++j) X[t * Dv + j] = dR[t * Dv + j] * cp[t];
      gemm_acc(L, Dk, Dv, 1.f, X.data(), Dv, 1, S, Dk, dkh, Dk);
      gemm_acc(Dv, Dk, L, 1.f, X.data(), 1, Dv, Kh, Dk, dSn.data(), Dk);
      gemm_acc(L, L, Dv, -1.f, dR.data(), Dv, 1, Et.data(), L, dakk, C);
      gemm_acc(L, Dv, L, -1.f, akk, 1, C, dR.data(), Dv, dE.data(), Dv);
    }
    // E = K W^T - V: dk += dE W, dW0 += dE^T K, dv = -dE
    gemm_acc(L, Dk, Dv, 1.f, dE.data(), Dv, 1, W, Dk, dk, Dk);
    gemm_acc(Dv, Dk, L, 1.f, dE.data(), 1, Dv, K, Dk, dWn.data(), Dk);
    for (int64_t i = 0; i < LV; ++i) dv[i] = -dE[i];
    dW.swap(dWn);
    dS.swap(dSn);
  }
  std::memcpy(g.dW0 + bh * DD, dW.data(), DD * sizeof(float));
  std::memcpy(g.dS0 + bh * DD, dS.data(), DD * sizeof(float));
}

std::vector<at::Tensor> run_fwd(const Dims& d, const Ptrs& p, bool write_out, bool store_states) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = write_out ? at::empty({d.B, d.H, d.T, d.Dv}, f32) : at::empty({0}, f32);
  at::Tensor WT = at::empty({d.B, d.H, d.Dv, d.Dk}, f32);
  at::Tensor ST = at::empty({d.B, d.H, d.Dv, d.Dk}, f32);
  at::Tensor states = store_states ? at::empty({d.B, d.H, d.NC, 2, d.Dv, d.Dk}, f32) : at::empty({0}, f32);
  float* p_out = write_out ? out.data_ptr<float>() : nullptr;
  float* p_st = store_states ? states.data_ptr<float>() : nullptr;
  float *p_WT = WT.data_ptr<float>(), *p_ST = ST.data_ptr<float>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) fwd_one(d, p, bh, p_out, p_WT, p_ST, p_st);
  });
  return {out, WT, ST, states};
}

}  // namespace

// [out [B, H, T, Dv], W_T, S_T [B, H, Dv, Dk], chunk-start states [B, H, NC, 2, Dv, Dk] (empty unless
// store_states)]; all fp32. dgd when khat is given.
std::vector<at::Tensor> titan_linear_fwd_cpu(const TitanInputs& in, bool store_states) {
  const Dims d = check_inputs(in);
  return run_fwd(d, pointers(in, d.dgd), /*write_out=*/true, store_states);
}

// The gradients of q, k, v, every term and W, S (TitanInputs' names); fp32; khat / akk / tinv / aqw / gth are empty
// (and the rows Bp, cp, wb zero) for titans; entries of padded tokens are zero.
TitanInputs titan_linear_bwd_cpu(const TitanInputs& in, const TitanGradsIn& grads) {
  const Dims d = check_inputs(in);
  check_shaped(grads.out, "d out", in.v.sizes(), "like v: [B, H, T, Dv]");
  check_shaped(grads.state[0], "d W", in.state[0].sizes(), "[B, H, Dv, Dk]");
  check_shaped(grads.state[1], "d S", in.state[0].sizes(), "[B, H, Dv, Dk]");
  const Ptrs p = pointers(in, d.dgd);
  at::Tensor states = run_fwd(d, p, /*write_out=*/false, /*store_states=*/true)[3];
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t B = d.B, H = d.H, NC = d.NC, C = d.C;
  auto none = [&] { return at::empty({0}, f32); };
  // padded tokens keep their zeros (the valid rows are all written)
  TitanInputs g;
  g.q = at::empty({B, H, d.T, d.Dk}, f32);
  g.k = at::empty({B, H, d.T, d.Dk}, f32);
  g.v = at::empty({B, H, d.T, d.Dv}, f32);
  g.khat = d.dgd ? at::zeros({B, H, d.Tp, d.Dk}, f32) : none();
  g.aqk = at::zeros({B, H, NC, C, C}, f32);
  g.gth = none();
  g.akk = d.dgd ? at::zeros({B, H, NC, C, C}, f32) : none();
  g.tinv = d.dgd ? at::zeros({B, H, NC, C, C}, f32) : none();
  g.aqw = d.dgd ? at::zeros({B, H, NC, C, C}, f32) : none();
  g.rows = at::zeros({B, H, NC, kNRows, C}, f32);
  g.ends = at::empty({B, H, NC, 3}, f32);
  g.state = {at::empty({B, H, d.Dv, d.Dk}, f32), at::empty({B, H, d.Dv, d.Dk}, f32)};
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  const Grads gp{ptr(g.q), ptr(g.k), ptr(g.khat), ptr(g.v), ptr(g.aqk), ptr(g.akk), ptr(g.tinv), ptr(g.aqw),
                 ptr(g.rows), ptr(g.ends), ptr(g.state[0]), ptr(g.state[1])};
  const float* p_states = states.data_ptr<float>();
  const float *p_do = grads.out.data_ptr<float>(), *p_dWT = grads.state[0].data_ptr<float>(),
              *p_dST = grads.state[1].data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) bwd_one(d, p, p_states, p_do, p_dWT, p_dST, gp, bh);
  });
  return g;
}

}  // namespace hope
