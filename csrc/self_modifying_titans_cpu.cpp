// C++ CPU kernels of self_modifying_titans (hope_kernels/self_modifying_titans): the self-modifying Titans layer's
// generator recurrence over every chunk of a segment and the M_mem pass, forward and backward, fp32, one
// at::parallel_for task per (b, h) carrying its memories' states through the chunks in a task-local copy.
//
// The math (chunk-start gradients, dual form of a chunk's update with the decay terms formed from the gates inside
// the kernel, dgd's UT transform by forward substitution, the update bound, and every backward formula) is written
// out in docs/kernels/self_modifying_titans.md; the variable names follow it. Layouts: every tensor row-major
// fp32; a memory is W1, S1 [D, E] and W2, S2 [E, D]; token tiles [L, D] / [L, E]; [L, L] decay and score terms.
// Registered as the operators hope_cpu::self_modifying_titans_fwd / _bwd (TORCH_LIBRARY_FRAGMENT below; the
// Python custom ops of chunk.py call them): inputs and outputs are tensor lists whose roles are the enums In, Out,
// Grad, mirrored once in chunk.py.
//
// This file is compiled twice: as itself (namespace portable: the compiler's baseline ISA) and, with GCC on x86-64,
// through self_modifying_titans_cpu_avx2.cpp as namespace avx2 with AVX2 + FMA code generation for every function
// (not only an entry point: the small products inline into the chunk functions). The operators run the AVX2 build
// on CPUs that have it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

#ifndef HOPE_SMT_ISA
#define HOPE_SMT_ISA portable
#endif

namespace hope {
namespace smt {
// An uninitialised fp32 CPU tensor whose memory comes from, and once freed returns to, the cache of the operators'
// large buffers (the checkpoints and the chunk store; defined once, in the baseline build, after the kernels).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
}  // namespace smt
}  // namespace hope

namespace hope {
namespace smt {
namespace HOPE_SMT_ISA {
namespace {

constexpr int kG = 5;  // most generators: k, v, eta, alpha, q (q only when adaptive; Dims::G)
constexpr int kGk = 0, kGv = 1, kGeta = 2, kGalpha = 3, kGq = 4;
constexpr float kNormEps = 1e-6f;

// roles of the forward's input list (chunk.py: INPUT_ROLES)
enum In { XQ, XK, XV, GW1, GW2, GS1, GS2, MW1, MW2, MS1, MS2, READOUT, BIAS, MOM, N_IN };
// roles of the forward's output list (chunk.py: OUTPUT_ROLES)
enum Out { Y, GW1T, GW2T, GS1T, GS2T, MW1T, MW2T, MS1T, MS2T, KVQ, GATES, GEN_SCALE, MEM_SCALE, GEN_CKPT, MEM_CKPT, STORE, N_OUT };
// the backward's gradient list has the roles of In (d of each input), in that order

#define HOPE_SIMD _Pragma("omp simd")
#define HOPE_SIMD_SUM _Pragma("omp simd reduction(+ : acc)")

// ------------------------------------------------------------------------------------------------ small products
// Register-tiled: up to 4 rows of C by 16 columns held in 8-float vectors across the whole K loop (GCC vector
// extensions: 256-bit registers in the AVX2 build, pairs of 128-bit ones in the baseline), one load of B per k.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // v8 by value between internal functions: no ABI is exposed
#endif
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat8(float a) { return v8{a, a, a, a, a, a, a, a}; }
// c = alpha acc (+ beta c unless beta is 0: then C is not read)
inline void finish8(float* c, v8 acc, float alpha, float beta) {
  const v8 v = splat8(alpha) * acc;
  store8(c, beta == 0.f ? v : splat8(beta) * load8(c) + v);
}

// ------------------------------------------------------------------------------------------------ gelu
// The exact (erf) GELU on 8 lanes, branch-free so its loops vectorise (libm's erff / expf are scalar calls).
typedef int v8i __attribute__((vector_size(32)));

// exp(y) for y <= 0 (below -87 taken as -87, where it is under 2^-125): 2^n e^r with |r| <= ln2 / 2 (ln2 in two
// parts, Cody-Waite) and e^r by its degree-6 Taylor polynomial (relative error under 2e-7)
inline v8 exp8_nonpos(v8 y) {
  const v8 lo = splat8(-87.f), magic = splat8(12582912.f);  // 1.5 * 2^23: x + magic - magic rounds x to an integer
  y = y < lo ? lo : y;
  const v8 n = (y * splat8(1.44269504088896341f) + magic) - magic;
  const v8 r = (y - n * splat8(0.693359375f)) - n * splat8(-2.12194440e-4f);
  v8 p = splat8(1.f / 720.f);
  for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = p * r + splat8(c);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;  // 2^n
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// gelu(h), gelu'(h), gelu''(h). Phi(h) = (1 + erf(h / sqrt 2)) / 2 with erf by Abramowitz-Stegun 7.1.26 (absolute
// error under 1.5e-7): 1 - erf(z) = t P(t) exp(-z^2), t = 1 / (1 + p z) for z >= 0, whose exp(-h^2 / 2) is also the
// normal pdf's; for h < 0, Phi(h) = t P(t) exp(-z^2) / 2 directly (no cancellation in the left tail).
inline void gelu8(v8 h, v8& a, v8& gp, v8& gpp) {
  const v8 zero = splat8(0.f), one = splat8(1.f), half = splat8(0.5f);
  const v8 az = h < zero ? -h : h;
  const v8 t = one / (one + splat8(0.3275911f * kInvSqrt2) * az);
  v8 poly = splat8(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) poly = poly * t + splat8(c);
  const v8 e = exp8_nonpos(-half * h * h);
  const v8 tail = half * (poly * t) * e;  // Phi(-|h|)
  const v8 cdf = h < zero ? tail : one - tail;
  const v8 pdf = e * splat8(kInvSqrt2Pi);
  a = h * cdf;
  gp = cdf + h * pdf;
  gpp = pdf * (splat8(2.f) - h * h);
}

// a = gelu(h), gp = gelu'(h), gpp = gelu''(h) over n floats (any output may be null)
inline void gelu_rows(int64_t n, const float* h, float* a, float* gp, float* gpp) {
  float* outs[3] = {a, gp, gpp};
  for (int64_t i = 0; i < n; i += 8) {
    const int m = static_cast<int>(std::min<int64_t>(8, n - i));
    float hb[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, ob[8];
    std::memcpy(hb, h + i, sizeof(float) * m);
    v8 vals[3];
    gelu8(load8(hb), vals[0], vals[1], vals[2]);
    for (int k = 0; k < 3; ++k) {
      if (outs[k] == nullptr) continue;
      if (m == 8) {
        store8(outs[k] + i, vals[k]);
      } else {
        store8(ob, vals[k]);
        std::memcpy(outs[k] + i, ob, sizeof(float) * m);
      }
    }
  }
}

// rows i < MR of C[M, N] = beta C + alpha op(A) B, with op(A)[i, k] = A[i * a_row + k * a_k], B [K, N] (ldb)
template <int MR>
inline void gemm_rows(int N, int K, float alpha, const float* A, int64_t a_row, int64_t a_k, const float* B,
                      int64_t ldb, float beta, float* C, int64_t ldc) {
  int j = 0;
  for (; j + 16 <= N; j += 16) {
    v8 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = v8{};
    for (int k = 0; k < K; ++k) {
      const float* b = B + k * ldb + j;
      const v8 b0 = load8(b), b1 = load8(b + 8);
      for (int r = 0; r < MR; ++r) {
        const v8 a = splat8(A[r * a_row + k * a_k]);
        acc0[r] += a * b0;
        acc1[r] += a * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      finish8(C + r * ldc + j, acc0[r], alpha, beta);
      finish8(C + r * ldc + j + 8, acc1[r], alpha, beta);
    }
  }
  for (; j + 8 <= N; j += 8) {
    v8 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = v8{};
    for (int k = 0; k < K; ++k) {
      const v8 b0 = load8(B + k * ldb + j);
      for (int r = 0; r < MR; ++r) acc[r] += splat8(A[r * a_row + k * a_k]) * b0;
    }
    for (int r = 0; r < MR; ++r) finish8(C + r * ldc + j, acc[r], alpha, beta);
  }
  for (; j < N; ++j)
    for (int r = 0; r < MR; ++r) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += A[r * a_row + k * a_k] * B[k * ldb + j];
      float& c = C[r * ldc + j];
      c = beta == 0.f ? alpha * acc : beta * c + alpha * acc;
    }
}

// C[M, N] = beta C + alpha op(A) B, B [K, N] (ldb), with op(A)[i, k] = A[i * a_row + k * a_k]; beta 0 overwrites
inline void gemm_strided(int M, int N, int K, float alpha, const float* A, int64_t a_row, int64_t a_k, const float* B,
                         int ldb, float beta, float* C, int ldc) {
  int i = 0;
  for (; i + 4 <= M; i += 4) gemm_rows<4>(N, K, alpha, A + i * a_row, a_row, a_k, B, ldb, beta, C + i * ldc, ldc);
  const float* Ai = A + i * a_row;
  float* Ci = C + static_cast<int64_t>(i) * ldc;
  switch (M - i) {
    case 3: gemm_rows<3>(N, K, alpha, Ai, a_row, a_k, B, ldb, beta, Ci, ldc); break;
    case 2: gemm_rows<2>(N, K, alpha, Ai, a_row, a_k, B, ldb, beta, Ci, ldc); break;
    case 1: gemm_rows<1>(N, K, alpha, Ai, a_row, a_k, B, ldb, beta, Ci, ldc); break;
    default: break;
  }
}

// C[M, N] = beta C + alpha A B with A [M, K] (lda)
inline void gemm_nn(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                    float* C, int ldc) {
  gemm_strided(M, N, K, alpha, A, lda, 1, B, ldb, beta, C, ldc);
}

// C[M, N] = beta C + alpha A^T B with A [K, M] (lda)
inline void gemm_tn(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                    float* C, int ldc) {
  gemm_strided(M, N, K, alpha, A, 1, lda, B, ldb, beta, C, ldc);
}

inline float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
  HOPE_SIMD_SUM for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// the 8 x 8 block in rows r[0..7] transposed in place (three rounds of two-input shuffles)
inline void transpose8(v8* r) {
  typedef int m8 __attribute__((vector_size(32)));
  const m8 lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
  const m8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const m8 lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {  // pairs of rows interleaved
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo1);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi1);
  }
  for (int k = 0; k < 8; k += 4)  // then pairs of pairs
    for (int h = 0; h < 2; ++h) {
      u[k + 2 * h] = __builtin_shuffle(t[k + h], t[k + h + 2], lo2);
      u[k + 2 * h + 1] = __builtin_shuffle(t[k + h], t[k + h + 2], hi2);
    }
  for (int k = 0; k < 4; ++k) {  // then the two halves: column k and column k + 4
    r[k] = __builtin_shuffle(u[k], u[k + 4], lo4);
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], hi4);
  }
}

// At [N, M] (row stride ldt) = A^T for A [M, N] (row stride lda), in 8 x 8 register blocks
inline void transpose(int M, int N, const float* A, int64_t lda, float* At, int64_t ldt) {
  int i = 0;
  for (; i + 8 <= M; i += 8) {
    int j = 0;
    for (; j + 8 <= N; j += 8) {
      v8 r[8];
      for (int k = 0; k < 8; ++k) r[k] = load8(A + (i + k) * lda + j);
      transpose8(r);
      for (int k = 0; k < 8; ++k) store8(At + (j + k) * ldt + i, r[k]);
    }
    for (; j < N; ++j)
      for (int k = 0; k < 8; ++k) At[j * ldt + i + k] = A[(i + k) * lda + j];
  }
  for (; i < M; ++i)
    for (int j = 0; j < N; ++j) At[j * ldt + i] = A[i * lda + j];
}
inline void transpose(int M, int N, const float* A, float* At) { transpose(M, N, A, N, At, M); }

// C[M, N] = beta C + alpha A B^T with A [M, K], B [N, K] (the [L, L] terms): B^T copied to a task-local [K, N] tile
inline void gemm_nt(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                    float* C, int ldc) {
  thread_local std::vector<float> bt;
  if (bt.size() < static_cast<size_t>(K) * N) bt.resize(static_cast<size_t>(K) * N);
  transpose(N, K, B, ldb, bt.data(), N);
  gemm_strided(M, N, K, alpha, A, lda, 1, bt.data(), N, beta, C, ldc);
}


inline float sum_prod(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  HOPE_SIMD_SUM for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// ------------------------------------------------------------------------------------------------ sizes, scratch
struct Dims {
  int64_t B, H, T, D, E, Cg, Cm, K;  // K: generator chunks per checkpoint
  int64_t NCg, NCm, NK, Lmax;
  int64_t G;           // generators: 5 (adaptive q) or 4 (q = l2n(xq))
  bool dgd, normalize_v, readout_before;
  bool q_only = false;  // backward: only d xq is wanted (every other input is a constant; G = 4)
  bool store = false;   // every chunk's intermediates stored by the forward for the backward (K == 1)
  float gclip, mclip;
  int64_t DE() const { return D * E; }
};

// A memory's state: W1, S1 [D, E], W2, S2 [E, D] (four pointers, each D * E floats)
struct Mem {
  float *W1, *W2, *S1, *S2;
};
struct CMem {
  const float *W1, *W2, *S1, *S2;
};
inline CMem cmem(const Mem& m) { return {m.W1, m.W2, m.S1, m.S2}; }
inline Mem mem_at(float* base, int64_t DE) { return {base, base + DE, base + 2 * DE, base + 3 * DE}; }

// A zeroed scratch of n floats, one per thread and Tag, reused by the thread's next task: a task's scratch is
// hundreds of KB, which a fresh allocation would map and fault in page by page on every call.
template <int Tag>
float* thread_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  std::fill(buf.begin(), buf.begin() + n, 0.f);
  return buf.data();
}

// A named slice of a task's scratch: where its pointer goes and how many floats it takes.
struct Slot {
  float** p;
  int64_t n;
};

// Lays the slots out one after the other in the thread's zeroed scratch Tag.
template <int Tag>
void carve(std::initializer_list<Slot> slots) {
  int64_t total = 0;
  for (const Slot& s : slots) total += s.n;
  float* o = thread_scratch<Tag>(total);
  for (const Slot& s : slots) {
    *s.p = o;
    o += s.n;
  }
}

// Named scratch of one task: everything one chunk of one memory needs, forward and backward (L <= Lmax). One Work
// per thread at a time (it lives in the thread's scratch).
struct Work {
  // decay terms [L, L] / [L] and their gradients
  float *P, *Br, *Gd, *A, *Bk, *c, *gP, *gBr, *gG, *gA, *gBk, *gc, *a, *b, *ga, *gb, *gth;
  // chunk core [L, E] / [L, D] and transposed chunk-start weights
  float *Hk, *Ak, *Gp, *Gpp, *Err, *U, *Gr, *W1t, *W2t, *S1t, *S2t;  // Gp, Gpp: gelu', gelu'' of Hk
  // dgd
  float *Kh, *kn, *KhKh, *M, *KhK, *Akk, *Bp, *cp, *KhW2, *KhS2, *R, *w;
  // read-out
  // read-out; Bq, cq, gq: the coefficients of W0, S0 and of theta_i u_i in the state it reads (after token t, or
  // before it: row t - 1 of the decay terms)
  float *QK, *Aqk, *QW2, *QS2, *Hq, *Aq, *Z, *AqW1, *AqS1, *QKh, *Aqw, *Bq, *cq, *gq, *dBq, *dcq;
  // end-of-chunk state (before the bound) and row weights
  float *nW1, *nW2, *nS1, *nS2, *wg, *wp, *wb;
  // backward
  float *dErr, *dAk, *dGr, *dK, *dV, *dQ, *dKh, *dw, *dR, *dM, *dHq, *dAq, *dU, *dHk, *Fm, *dZ, *dLL, *dLL2;
  float *tDE, *tDE2, *dsW1, *dsW2, *dsS1, *dsS2, *dold, *LD, *LD2, *LE, *LE2;

  Work(int64_t L, int64_t D, int64_t E) {
    const int64_t LL = L * L, LD_ = L * D, LE_ = L * E, DE = D * E;
    carve<0>({
        {&P, LL}, {&Br, LL}, {&Gd, LL}, {&A, L}, {&Bk, L}, {&c, L}, {&gP, LL}, {&gBr, LL}, {&gG, LL}, {&gA, L},
        {&gBk, L}, {&gc, L}, {&a, L}, {&b, L}, {&ga, L}, {&gb, L}, {&gth, LL},
        {&Hk, LE_}, {&Ak, LE_}, {&Gp, LE_}, {&Gpp, LE_}, {&Err, LD_}, {&U, LE_}, {&Gr, LE_}, {&W1t, DE}, {&W2t, DE},
        {&S1t, DE}, {&S2t, DE},
        {&Kh, LD_}, {&kn, L}, {&KhKh, LL}, {&M, LL}, {&KhK, LL}, {&Akk, LL}, {&Bp, L}, {&cp, L}, {&KhW2, LE_},
        {&KhS2, LE_}, {&R, LE_}, {&w, LE_},
        {&QK, LL}, {&Aqk, LL}, {&QW2, LE_}, {&QS2, LE_}, {&Hq, LE_}, {&Aq, LE_}, {&Z, LL}, {&AqW1, LD_},
        {&AqS1, LD_}, {&QKh, LL}, {&Aqw, LL}, {&Bq, L}, {&cq, L}, {&gq, LL}, {&dBq, L}, {&dcq, L},
        {&nW1, DE}, {&nW2, DE}, {&nS1, DE}, {&nS2, DE}, {&wg, L}, {&wp, L}, {&wb, L},
        {&dErr, LD_}, {&dAk, LE_}, {&dGr, LE_}, {&dK, LD_}, {&dV, LD_}, {&dQ, LD_}, {&dKh, LD_}, {&dw, LE_},
        {&dR, LE_}, {&dM, LL}, {&dHq, LE_}, {&dAq, LE_}, {&dU, LE_}, {&dHk, LE_}, {&Fm, LL}, {&dZ, LL}, {&dLL, LL},
        {&dLL2, LL}, {&tDE, DE}, {&tDE2, DE}, {&dsW1, DE}, {&dsW2, DE}, {&dsS1, DE}, {&dsS2, DE}, {&dold, 4 * DE}, {&LD, LD_},
        {&LD2, LD_}, {&LE, LE_}, {&LE2, LE_},
    });
  }
};

// A slice of a task's scratch by member and its used size (a chunk of L tokens): what the chunk store moves.
template <typename S>
struct Field {
  float* S::*m;
  int64_t n;
};

// Copies fields between a scratch and the store at s (save: scratch -> store; load: the reverse); s null counts
// only. Returns the floats the fields take.
template <typename S>
int64_t move_fields(S* obj, float* s, bool save, std::initializer_list<Field<S>> fields) {
  int64_t n = 0;
  for (const Field<S>& f : fields) {
    if (s != nullptr) {
      float* field = obj->*f.m;
      if (save)
        std::memcpy(s + n, field, sizeof(float) * f.n);
      else
        std::memcpy(field, s + n, sizeof(float) * f.n);
    }
    n += f.n;
  }
  return n;
}

// What chunk_bwd (and bound_bwd) read of one chunk_fwd of L tokens: the forward stores it, the backward loads it
// back instead of running chunk_fwd again (docs: "memory"). read_out: a chunk with queries (M_mem); bound: the
// chunk's update is bounded (its unbounded end state is read). w null: only counts.
int64_t move_chunk(const Dims& d, int L, bool read_out, bool bound, Work* w, float* s, bool save) {
  using F = Field<Work>;
  const int64_t LL = static_cast<int64_t>(L) * L, LD = static_cast<int64_t>(L) * d.D,
                LE = static_cast<int64_t>(L) * d.E, DE = d.DE();
  if (w == nullptr) s = nullptr;
  int64_t n = move_fields<Work>(w, s, save, {F{&Work::P, LL}, F{&Work::Br, LL}, F{&Work::Gd, LL}, F{&Work::A, L},
                                             F{&Work::Bk, L}, F{&Work::c, L}, F{&Work::wg, L}, F{&Work::wp, L},
                                             F{&Work::wb, L}, F{&Work::Ak, LE}, F{&Work::Gp, LE}, F{&Work::Gpp, LE},
                                             F{&Work::U, LE}, F{&Work::Gr, LE}, F{&Work::Err, LD}});
  auto at = [&](int64_t k) { return s != nullptr ? s + k : nullptr; };
  if (d.dgd)
    n += move_fields<Work>(w, at(n), save, {F{&Work::Kh, LD}, F{&Work::kn, L}, F{&Work::KhKh, LL}, F{&Work::M, LL},
                                            F{&Work::KhK, LL}, F{&Work::Akk, LL}, F{&Work::Bp, L}, F{&Work::cp, L},
                                            F{&Work::KhW2, LE}, F{&Work::KhS2, LE}, F{&Work::w, LE}});
  if (read_out) {
    n += move_fields<Work>(w, at(n), save, {F{&Work::QK, LL}, F{&Work::Aqk, LL}, F{&Work::QW2, LE},
                                            F{&Work::QS2, LE}, F{&Work::Hq, LE}, F{&Work::Aq, LE}, F{&Work::Z, LL},
                                            F{&Work::AqW1, LD}, F{&Work::AqS1, LD}, F{&Work::Bq, L}, F{&Work::cq, L},
                                            F{&Work::gq, LL}});
    if (d.dgd) n += move_fields<Work>(w, at(n), save, {F{&Work::QKh, LL}, F{&Work::Aqw, LL}});
  }
  if (bound)
    n += move_fields<Work>(w, at(n), save, {F{&Work::nW1, DE}, F{&Work::nW2, DE}, F{&Work::nS1, DE},
                                            F{&Work::nS2, DE}});
  return n;
}

// ------------------------------------------------------------------------------------------------ decay terms
// P[t, i] = prod_{i<j<=t} a_j, Br likewise with b, G[t, i] = b_t G[t-1, i] + P[t, i], A_t = prod a, Bk_t = prod b,
// c_t = b_t c_{t-1} + A_t (docs: "decay terms")
void terms_fwd(int L, Work& w) {
  const float *a = w.a, *b = w.b;
  std::fill(w.P, w.P + L * L, 0.f);
  std::fill(w.Br, w.Br + L * L, 0.f);
  std::fill(w.Gd, w.Gd + L * L, 0.f);
  for (int t = 0; t < L; ++t) {
    float *P = w.P + t * L, *Br = w.Br + t * L, *G = w.Gd + t * L;
    P[t] = 1.f;
    Br[t] = 1.f;
    if (t == 0) {
      G[0] = 1.f;
      w.A[0] = a[0];
      w.Bk[0] = b[0];
      w.c[0] = a[0];
      continue;
    }
    const float *Pp = P - L, *Brp = Br - L, *Gp = G - L;
    for (int i = 0; i < t; ++i) {
      P[i] = a[t] * Pp[i];
      Br[i] = b[t] * Brp[i];
    }
    for (int i = 0; i <= t; ++i) G[i] = b[t] * Gp[i] + P[i];
    w.A[t] = a[t] * w.A[t - 1];
    w.Bk[t] = b[t] * w.Bk[t - 1];
    w.c[t] = b[t] * w.c[t - 1] + w.A[t];
  }
}

// reverse of terms_fwd: adds the gradients of a and b to w.ga, w.gb (consumes w.gP .. w.gc)
void terms_bwd(int L, Work& w) {
  const float *a = w.a, *b = w.b;
  for (int t = L - 1; t > 0; --t) {
    float *gG = w.gG + t * L, *gGp = gG - L, *gP = w.gP + t * L, *gPp = gP - L, *gBr = w.gBr + t * L,
          *gBrp = gBr - L;
    const float *Gp = w.Gd + (t - 1) * L, *Pp = w.P + (t - 1) * L, *Brp = w.Br + (t - 1) * L;
    float gbt = 0.f, gat = 0.f;
    for (int i = 0; i <= t; ++i) {
      gbt += gG[i] * Gp[i];
      gGp[i] += b[t] * gG[i];
      gP[i] += gG[i];
    }
    gbt += w.gc[t] * w.c[t - 1];
    w.gc[t - 1] += b[t] * w.gc[t];
    w.gA[t] += w.gc[t];
    gbt += w.gBk[t] * w.Bk[t - 1];
    w.gBk[t - 1] += b[t] * w.gBk[t];
    gat += w.gA[t] * w.A[t - 1];
    w.gA[t - 1] += a[t] * w.gA[t];
    for (int i = 0; i < t; ++i) {
      gat += gP[i] * Pp[i];
      gPp[i] += a[t] * gP[i];
      gbt += gBr[i] * Brp[i];
      gBrp[i] += b[t] * gBr[i];
    }
    w.ga[t] += gat;
    w.gb[t] += gbt;
  }
  w.gA[0] += w.gc[0];
  w.ga[0] += w.gA[0];
  w.gb[0] += w.gBk[0];
}

// ------------------------------------------------------------------------------------------------ one memory chunk
// Forward of one chunk of one memory (the spec: docs "one chunk"): keys K, values V [L, D], queries Q [L, D] or
// null (no read-out), lr th [L], gates w.a (momentum) and w.b (keep = 1 - decay) filled by the caller. Leaves every
// intermediate in w, the end-of-chunk state (before the bound) in w.nW1 .. w.nS2, and the read-out in O (if Q).
void chunk_fwd(const Dims& d, int L, const CMem& st, const float* K, const float* V, const float* Q,
               const float* th, Work& w, float* O) {
  const int D = d.D, E = d.E;
  terms_fwd(L, w);
  transpose(E, D, st.W2, w.W2t);  // [D, E]
  transpose(D, E, st.W1, w.W1t);  // [E, D]
  gemm_nn(L, E, D, 1.f, K, D, w.W2t, E, 0.f, w.Hk, E);
  gelu_rows(static_cast<int64_t>(L) * E, w.Hk, w.Ak, w.Gp, w.Gpp);
  std::memcpy(w.Err, K, sizeof(float) * L * D);
  gemm_nn(L, D, E, 1.f, w.Ak, E, w.W1t, D, 1.f, w.Err, D);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * D; ++i) w.Err[i] -= V[i];
  gemm_nn(L, E, D, 1.f, w.Err, D, st.W1, E, 0.f, w.U, E);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) w.Gr[i] = w.U[i] * w.Gp[i];
  for (int t = 0; t < L; ++t)
    for (int i = 0; i < L; ++i) w.gth[t * L + i] = i <= t ? w.Gd[t * L + i] * th[i] : 0.f;
  const bool need_s2t = d.dgd || Q != nullptr;
  if (need_s2t) transpose(E, D, st.S2, w.S2t);
  if (d.dgd) {
    for (int t = 0; t < L; ++t) {
      const float n = std::sqrt(dot(K + t * D, K + t * D, D));
      w.kn[t] = n;
      const float inv = 1.f / std::max(n, kNormEps);
      HOPE_SIMD for (int j = 0; j < D; ++j) w.Kh[t * D + j] = K[t * D + j] * inv;
    }
    gemm_nt(L, L, D, 1.f, w.Kh, D, w.Kh, D, 0.f, w.KhKh, L);
    gemm_nt(L, L, D, 1.f, w.Kh, D, K, D, 0.f, w.KhK, L);
    for (int t = 0; t < L; ++t) {
      w.Bp[t] = t ? w.Bk[t - 1] : 1.f;
      w.cp[t] = t ? w.c[t - 1] : 0.f;
      for (int j = 0; j < L; ++j) {
        const bool low = j < t;
        w.M[t * L + j] = low ? w.Br[(t - 1) * L + j] * th[j] * w.KhKh[t * L + j] : 0.f;
        w.Akk[t * L + j] = low ? w.Gd[(t - 1) * L + j] * th[j] * w.KhK[t * L + j] : 0.f;
      }
    }
    gemm_nn(L, E, D, 1.f, w.Kh, D, w.W2t, E, 0.f, w.KhW2, E);
    gemm_nn(L, E, D, 1.f, w.Kh, D, w.S2t, E, 0.f, w.KhS2, E);
    for (int t = 0; t < L; ++t)
      HOPE_SIMD for (int e = 0; e < E; ++e) w.R[t * E + e] = w.Bp[t] * w.KhW2[t * E + e] + w.cp[t] * w.KhS2[t * E + e];
    gemm_nn(L, E, L, -1.f, w.Akk, L, w.Gr, E, 1.f, w.R, E);
    // w = (I + M)^-1 R by forward substitution
    for (int t = 0; t < L; ++t) {
      float* wt = w.w + t * E;
      std::memcpy(wt, w.R + t * E, sizeof(float) * E);
      for (int j = 0; j < t; ++j) {
        const float m = w.M[t * L + j];
        const float* wj = w.w + j * E;
        HOPE_SIMD for (int e = 0; e < E; ++e) wt[e] -= m * wj[e];
      }
    }
  }
  if (Q != nullptr) {
    // the state read at token t: after it (row r = t of the decay terms) or before it (r = t - 1; r = -1 is the
    // chunk-start state: Bq 1, cq 0, nothing of the chunk's updates)
    const int shift = d.readout_before ? 1 : 0;
    for (int t = 0; t < L; ++t) {
      const int r = t - shift;
      w.Bq[t] = r >= 0 ? w.Bk[r] : 1.f;
      w.cq[t] = r >= 0 ? w.c[r] : 0.f;
      for (int i = 0; i < L; ++i) w.gq[t * L + i] = (r >= 0 && i <= r) ? w.Gd[r * L + i] * th[i] : 0.f;
    }
    transpose(D, E, st.S1, w.S1t);
    gemm_nt(L, L, D, 1.f, Q, D, K, D, 0.f, w.QK, L);
    HOPE_SIMD for (int i = 0; i < L * L; ++i) w.Aqk[i] = w.gq[i] * w.QK[i];
    gemm_nn(L, E, D, 1.f, Q, D, w.W2t, E, 0.f, w.QW2, E);
    gemm_nn(L, E, D, 1.f, Q, D, w.S2t, E, 0.f, w.QS2, E);
    for (int t = 0; t < L; ++t)
      HOPE_SIMD for (int e = 0; e < E; ++e) w.Hq[t * E + e] = w.Bq[t] * w.QW2[t * E + e] + w.cq[t] * w.QS2[t * E + e];
    gemm_nn(L, E, L, -1.f, w.Aqk, L, w.Gr, E, 1.f, w.Hq, E);
    if (d.dgd) {
      gemm_nt(L, L, D, 1.f, Q, D, w.Kh, D, 0.f, w.QKh, L);
      for (int t = 0; t < L; ++t) {
        const int r = t - shift;
        for (int j = 0; j < L; ++j) w.Aqw[t * L + j] = j <= r ? w.Br[r * L + j] * th[j] * w.QKh[t * L + j] : 0.f;
      }
      gemm_nn(L, E, L, -1.f, w.Aqw, L, w.w, E, 1.f, w.Hq, E);
    }
    gelu_rows(static_cast<int64_t>(L) * E, w.Hq, w.Aq, nullptr, nullptr);
    gemm_nt(L, L, E, 1.f, w.Aq, E, w.Ak, E, 0.f, w.Z, L);
    gemm_nn(L, D, E, 1.f, w.Aq, E, w.W1t, D, 0.f, w.AqW1, D);
    gemm_nn(L, D, E, 1.f, w.Aq, E, w.S1t, D, 0.f, w.AqS1, D);
    for (int t = 0; t < L; ++t)
      HOPE_SIMD for (int j = 0; j < D; ++j)
        O[t * D + j] = Q[t * D + j] + w.Bq[t] * w.AqW1[t * D + j] + w.cq[t] * w.AqS1[t * D + j];
    HOPE_SIMD for (int i = 0; i < L * L; ++i) w.dLL[i] = w.gq[i] * w.Z[i];
    gemm_nn(L, D, L, -1.f, w.dLL, L, w.Err, D, 1.f, O, D);
  }
  // end of chunk
  const int l = L - 1;
  const float BL = w.Bk[l], cL = w.c[l], AL = w.A[l];
  for (int i = 0; i < L; ++i) {
    w.wg[i] = w.gth[l * L + i];
    w.wp[i] = w.P[l * L + i] * th[i];
    w.wb[i] = w.Br[l * L + i] * th[i];
  }
  const int64_t DE = d.DE();
  HOPE_SIMD for (int64_t i = 0; i < DE; ++i) {
    w.nW1[i] = BL * st.W1[i] + cL * st.S1[i];
    w.nS1[i] = AL * st.S1[i];
    w.nW2[i] = BL * st.W2[i] + cL * st.S2[i];
    w.nS2[i] = AL * st.S2[i];
  }
  // rows scaled by wg / wp: -Err^T diag(wg) Ak, -Gr^T diag(wg) K, ...
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int e = 0; e < E; ++e) {
      w.LE[t * E + e] = w.wg[t] * w.Ak[t * E + e];
      w.LE2[t * E + e] = w.wp[t] * w.Ak[t * E + e];
    }
  gemm_tn(D, E, L, -1.f, w.Err, D, w.LE, E, 1.f, w.nW1, E);
  gemm_tn(D, E, L, -1.f, w.Err, D, w.LE2, E, 1.f, w.nS1, E);
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int j = 0; j < D; ++j) {
      w.LD[t * D + j] = w.wg[t] * K[t * D + j];
      w.LD2[t * D + j] = w.wp[t] * K[t * D + j];
    }
  gemm_tn(E, D, L, -1.f, w.Gr, E, w.LD, D, 1.f, w.nW2, D);
  gemm_tn(E, D, L, -1.f, w.Gr, E, w.LD2, D, 1.f, w.nS2, D);
  if (d.dgd) {
    for (int t = 0; t < L; ++t)
      HOPE_SIMD for (int j = 0; j < D; ++j) w.LD[t * D + j] = w.wb[t] * w.Kh[t * D + j];
    gemm_tn(E, D, L, -1.f, w.w, E, w.LD, D, 1.f, w.nW2, D);
  }
}

// Backward of chunk_fwd (after it ran with the same arguments, its intermediates in w): the end-of-chunk state's
// gradient dn (four [D, E] / [E, D] tiles) and dO [L, D] (if Q) give the chunk-start state's gradient through the
// chunk (ds: written), w.dK, w.dV, w.dQ [L, D] (written), and adds to dth [L], w.ga, w.gb [L].
void chunk_bwd(const Dims& d, int L, const CMem& st, const float* K, const float* Q, const float* th,
               const CMem& dn, const float* dO, Work& w, const Mem& ds, float* dth) {
  const int D = d.D, E = d.E;
  const int64_t DE = d.DE();
  const int l = L - 1;
  std::fill(w.gP, w.gP + L * L, 0.f);
  std::fill(w.gBr, w.gBr + L * L, 0.f);
  std::fill(w.gG, w.gG + L * L, 0.f);
  std::fill(w.gA, w.gA + L, 0.f);
  std::fill(w.gBk, w.gBk + L, 0.f);
  std::fill(w.gc, w.gc + L, 0.f);
  std::fill(w.dLL2, w.dLL2 + L * L, 0.f);  // dgth
  // end of chunk
  const float BL = w.Bk[l], cL = w.c[l], AL = w.A[l];
  HOPE_SIMD for (int64_t i = 0; i < DE; ++i) {
    ds.W1[i] = BL * dn.W1[i];
    ds.W2[i] = BL * dn.W2[i];
    ds.S1[i] = cL * dn.W1[i] + AL * dn.S1[i];
    ds.S2[i] = cL * dn.W2[i] + AL * dn.S2[i];
  }
  w.gBk[l] += sum_prod(dn.W1, st.W1, DE) + sum_prod(dn.W2, st.W2, DE);
  w.gc[l] += sum_prod(dn.W1, st.S1, DE) + sum_prod(dn.W2, st.S2, DE);
  w.gA[l] += sum_prod(dn.S1, st.S1, DE) + sum_prod(dn.S2, st.S2, DE);
  // AdW1 = Ak dW1'^T, AdS1 = Ak dS1'^T [L, D]: dW1'^T is [E, D]
  transpose(D, E, dn.W1, w.tDE);
  transpose(D, E, dn.S1, w.tDE2);
  gemm_nn(L, D, E, 1.f, w.Ak, E, w.tDE, D, 0.f, w.LD, D);   // AdW1
  gemm_nn(L, D, E, 1.f, w.Ak, E, w.tDE2, D, 0.f, w.LD2, D);  // AdS1
  // KdW2 = K dW2'^T, KdS2 = K dS2'^T [L, E]
  transpose(E, D, dn.W2, w.tDE);
  transpose(E, D, dn.S2, w.tDE2);
  gemm_nn(L, E, D, 1.f, K, D, w.tDE, E, 0.f, w.LE, E);    // KdW2
  gemm_nn(L, E, D, 1.f, K, D, w.tDE2, E, 0.f, w.LE2, E);  // KdS2
  for (int t = 0; t < L; ++t) {
    const float dwg = -dot(w.Err + t * D, w.LD + t * D, D) - dot(w.Gr + t * E, w.LE + t * E, E);
    const float dwp = -dot(w.Err + t * D, w.LD2 + t * D, D) - dot(w.Gr + t * E, w.LE2 + t * E, E);
    w.gG[l * L + t] += dwg * th[t];
    dth[t] += dwg * w.Gd[l * L + t] + dwp * w.P[l * L + t];
    w.gP[l * L + t] += dwp * th[t];
    HOPE_SIMD for (int j = 0; j < D; ++j) w.dErr[t * D + j] = -(w.wg[t] * w.LD[t * D + j] + w.wp[t] * w.LD2[t * D + j]);
    HOPE_SIMD for (int e = 0; e < E; ++e) w.dGr[t * E + e] = -(w.wg[t] * w.LE[t * E + e] + w.wp[t] * w.LE2[t * E + e]);
  }
  // dAk = -diag(wg) Err dW1' - diag(wp) Err dS1';  dK = -diag(wg) Gr dW2' - diag(wp) Gr dS2'
  gemm_nn(L, E, D, 1.f, w.Err, D, dn.W1, E, 0.f, w.LE, E);
  gemm_nn(L, E, D, 1.f, w.Err, D, dn.S1, E, 0.f, w.LE2, E);
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int e = 0; e < E; ++e) w.dAk[t * E + e] = -(w.wg[t] * w.LE[t * E + e] + w.wp[t] * w.LE2[t * E + e]);
  gemm_nn(L, D, E, 1.f, w.Gr, E, dn.W2, D, 0.f, w.LD, D);
  gemm_nn(L, D, E, 1.f, w.Gr, E, dn.S2, D, 0.f, w.LD2, D);
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int j = 0; j < D; ++j) w.dK[t * D + j] = -(w.wg[t] * w.LD[t * D + j] + w.wp[t] * w.LD2[t * D + j]);
  if (d.dgd) {
    // -w^T diag(wb) Kh:  dw = -diag(wb) Kh dW2'^T, dKh = -diag(wb) w dW2', dwb = -rowsum(w * Kh dW2'^T)
    gemm_nn(L, E, D, 1.f, w.Kh, D, w.tDE, E, 0.f, w.LE, E);  // Kh dW2'^T (tDE still holds dW2'^T)
    gemm_nn(L, D, E, 1.f, w.w, E, dn.W2, D, 0.f, w.LD, D);
    for (int t = 0; t < L; ++t) {
      const float dwb = -dot(w.w + t * E, w.LE + t * E, E);
      w.gBr[l * L + t] += dwb * th[t];
      dth[t] += dwb * w.Br[l * L + t];
      HOPE_SIMD for (int e = 0; e < E; ++e) w.dw[t * E + e] = -w.wb[t] * w.LE[t * E + e];
      HOPE_SIMD for (int j = 0; j < D; ++j) w.dKh[t * D + j] = -w.wb[t] * w.LD[t * D + j];
    }
  }
  const int shift = d.readout_before ? 1 : 0;
  if (Q != nullptr) {
    std::memcpy(w.dQ, dO, sizeof(float) * L * D);
    // gradients of Bq, cq land on row t - shift of Bk, c (none for the chunk-start state)
    // dAq = diag(Bk) dO W1 + diag(c) dO S1 + dZ Ak
    gemm_nn(L, E, D, 1.f, dO, D, st.W1, E, 0.f, w.LE, E);   // dO W1
    gemm_nn(L, E, D, 1.f, dO, D, st.S1, E, 0.f, w.LE2, E);  // dO S1
    float *dBq = w.dBq, *dcq = w.dcq;
    for (int t = 0; t < L; ++t) {
      HOPE_SIMD for (int e = 0; e < E; ++e) w.dAq[t * E + e] = w.Bq[t] * w.LE[t * E + e] + w.cq[t] * w.LE2[t * E + e];
      dBq[t] = dot(dO + t * D, w.AqW1 + t * D, D);
      dcq[t] = dot(dO + t * D, w.AqS1 + t * D, D);
      HOPE_SIMD for (int j = 0; j < D; ++j) {
        w.LD[t * D + j] = w.Bq[t] * dO[t * D + j];
        w.LD2[t * D + j] = w.cq[t] * dO[t * D + j];
      }
    }
    gemm_tn(D, E, L, 1.f, w.LD, D, w.Aq, E, 1.f, ds.W1, E);
    gemm_tn(D, E, L, 1.f, w.LD2, D, w.Aq, E, 1.f, ds.S1, E);
    // O -= (gth * Z) Err:  Fm = dO Err^T, dgth -= Fm * Z, dZ = -gth * Fm, dErr -= (gth * Z)^T dO
    gemm_nt(L, L, D, 1.f, dO, D, w.Err, D, 0.f, w.Fm, L);
    HOPE_SIMD for (int i = 0; i < L * L; ++i) {
      w.dLL2[i] -= w.Fm[i] * w.Z[i];
      w.dZ[i] = -w.gq[i] * w.Fm[i];
      w.dLL[i] = w.gq[i] * w.Z[i];
    }
    gemm_tn(L, D, L, -1.f, w.dLL, L, dO, D, 1.f, w.dErr, D);
    gemm_nn(L, E, L, 1.f, w.dZ, L, w.Ak, E, 1.f, w.dAq, E);
    gemm_tn(L, E, L, 1.f, w.dZ, L, w.Aq, E, 1.f, w.dAk, E);
    gelu_rows(static_cast<int64_t>(L) * E, w.Hq, nullptr, w.dHq, nullptr);
    HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) w.dHq[i] *= w.dAq[i];
    // Hq = diag(Bk) Q W2^T + diag(c) Q S2^T - Aqk Gr [- Aqw w]
    for (int t = 0; t < L; ++t) {
      dBq[t] += dot(w.dHq + t * E, w.QW2 + t * E, E);
      dcq[t] += dot(w.dHq + t * E, w.QS2 + t * E, E);
      HOPE_SIMD for (int e = 0; e < E; ++e) {
        w.LE[t * E + e] = w.Bq[t] * w.dHq[t * E + e];
        w.LE2[t * E + e] = w.cq[t] * w.dHq[t * E + e];
      }
      if (t - shift >= 0) {
        w.gBk[t - shift] += dBq[t];
        w.gc[t - shift] += dcq[t];
      }
    }
    gemm_nn(L, D, E, 1.f, w.LE, E, st.W2, D, 1.f, w.dQ, D);
    gemm_nn(L, D, E, 1.f, w.LE2, E, st.S2, D, 1.f, w.dQ, D);
    gemm_tn(E, D, L, 1.f, w.LE, E, Q, D, 1.f, ds.W2, D);
    gemm_tn(E, D, L, 1.f, w.LE2, E, Q, D, 1.f, ds.S2, D);
    // dAqk = -dHq Gr^T (lower), dGr -= Aqk^T dHq, dgth += dAqk * QK, dQK = dAqk * gth
    gemm_nt(L, L, E, -1.f, w.dHq, E, w.Gr, E, 0.f, w.dM, L);
    gemm_tn(L, E, L, -1.f, w.Aqk, L, w.dHq, E, 1.f, w.dGr, E);
    for (int t = 0; t < L; ++t)
      for (int i = 0; i < L; ++i) {
        const bool low = i <= t;
        w.dLL2[t * L + i] += low ? w.dM[t * L + i] * w.QK[t * L + i] : 0.f;
        w.dLL[t * L + i] = low ? w.dM[t * L + i] * w.gq[t * L + i] : 0.f;  // dQK
      }
    gemm_nn(L, D, L, 1.f, w.dLL, L, K, D, 1.f, w.dQ, D);
    gemm_tn(L, D, L, 1.f, w.dLL, L, Q, D, 1.f, w.dK, D);
    if (d.dgd) {
      // dAqw = -dHq w^T (lower incl. diagonal), dw -= Aqw^T dHq
      gemm_nt(L, L, E, -1.f, w.dHq, E, w.w, E, 0.f, w.dM, L);
      gemm_tn(L, E, L, -1.f, w.Aqw, L, w.dHq, E, 1.f, w.dw, E);
      for (int t = 0; t < L; ++t) {
        const int r = t - shift;
        for (int j = 0; j < L; ++j) {
          const float g = j <= r ? w.dM[t * L + j] : 0.f;
          if (j <= r) {
            w.gBr[r * L + j] += g * th[j] * w.QKh[t * L + j];
            dth[j] += g * w.Br[r * L + j] * w.QKh[t * L + j];
          }
          w.dLL[t * L + j] = j <= r ? g * w.Br[r * L + j] * th[j] : 0.f;  // dQKh
        }
      }
      gemm_nn(L, D, L, 1.f, w.dLL, L, w.Kh, D, 1.f, w.dQ, D);
      gemm_tn(L, D, L, 1.f, w.dLL, L, Q, D, 1.f, w.dKh, D);
    }
  }
  if (d.dgd) {
    // w = (I + M)^-1 R:  dR = (I + M)^-T dw (back substitution), dM = -dR w^T (strictly lower)
    for (int t = L - 1; t >= 0; --t) {
      float* dRt = w.dR + t * E;
      std::memcpy(dRt, w.dw + t * E, sizeof(float) * E);
      for (int s = t + 1; s < L; ++s) {
        const float m = w.M[s * L + t];
        const float* dRs = w.dR + s * E;
        HOPE_SIMD for (int e = 0; e < E; ++e) dRt[e] -= m * dRs[e];
      }
    }
    gemm_nt(L, L, E, -1.f, w.dR, E, w.w, E, 0.f, w.dM, L);
    // M = Br[t-1, j] th_j KhKh (j < t): dKK = dM * Br[t-1, j] th_j
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < L; ++j) {
        const bool low = j < t;
        const float g = low ? w.dM[t * L + j] : 0.f;
        if (low) {
          w.gBr[(t - 1) * L + j] += g * th[j] * w.KhKh[t * L + j];
          dth[j] += g * w.Br[(t - 1) * L + j] * w.KhKh[t * L + j];
        }
        w.dLL[t * L + j] = low ? g * w.Br[(t - 1) * L + j] * th[j] : 0.f;
      }
    gemm_nn(L, D, L, 1.f, w.dLL, L, w.Kh, D, 1.f, w.dKh, D);
    gemm_tn(L, D, L, 1.f, w.dLL, L, w.Kh, D, 1.f, w.dKh, D);
    // R = diag(Bp) Kh W2^T + diag(cp) Kh S2^T - Akk Gr
    for (int t = 0; t < L; ++t) {
      const float gBp = dot(w.dR + t * E, w.KhW2 + t * E, E);
      const float gcp = dot(w.dR + t * E, w.KhS2 + t * E, E);
      if (t > 0) {
        w.gBk[t - 1] += gBp;
        w.gc[t - 1] += gcp;
      }
      HOPE_SIMD for (int e = 0; e < E; ++e) {
        w.LE[t * E + e] = w.Bp[t] * w.dR[t * E + e];
        w.LE2[t * E + e] = w.cp[t] * w.dR[t * E + e];
      }
    }
    gemm_nn(L, D, E, 1.f, w.LE, E, st.W2, D, 1.f, w.dKh, D);
    gemm_nn(L, D, E, 1.f, w.LE2, E, st.S2, D, 1.f, w.dKh, D);
    gemm_tn(E, D, L, 1.f, w.LE, E, w.Kh, D, 1.f, ds.W2, D);
    gemm_tn(E, D, L, 1.f, w.LE2, E, w.Kh, D, 1.f, ds.S2, D);
    // dAkk = -dR Gr^T (strictly lower), dGr -= Akk^T dR; Akk = G[t-1, i] th_i KhK
    gemm_nt(L, L, E, -1.f, w.dR, E, w.Gr, E, 0.f, w.dM, L);
    gemm_tn(L, E, L, -1.f, w.Akk, L, w.dR, E, 1.f, w.dGr, E);
    for (int t = 0; t < L; ++t)
      for (int i = 0; i < L; ++i) {
        const bool low = i < t;
        const float g = low ? w.dM[t * L + i] : 0.f;
        if (low) {
          w.gG[(t - 1) * L + i] += g * th[i] * w.KhK[t * L + i];
          dth[i] += g * w.Gd[(t - 1) * L + i] * w.KhK[t * L + i];
        }
        w.dLL[t * L + i] = low ? g * w.Gd[(t - 1) * L + i] * th[i] : 0.f;  // dKhK
      }
    gemm_nn(L, D, L, 1.f, w.dLL, L, K, D, 1.f, w.dKh, D);
    gemm_tn(L, D, L, 1.f, w.dLL, L, w.Kh, D, 1.f, w.dK, D);
  }
  // gq = G[t - shift] th (read-out only)
  if (Q != nullptr)
    for (int t = shift; t < L; ++t) {
      const int r = t - shift;
      for (int i = 0; i <= r; ++i) {
        w.gG[r * L + i] += w.dLL2[t * L + i] * th[i];
        dth[i] += w.dLL2[t * L + i] * w.Gd[r * L + i];
      }
    }
  // core: Gr = U gelu'(Hk), U = Err W1, Err = K + Ak W1^T - V, Ak = gelu(Hk), Hk = K W2^T
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) {
    const float gp = w.Gp[i];
    w.dU[i] = w.dGr[i] * gp;
    w.dHk[i] = w.dGr[i] * w.U[i] * w.Gpp[i];
  }
  gemm_nn(L, D, E, 1.f, w.dU, E, w.W1t, D, 1.f, w.dErr, D);
  gemm_tn(D, E, L, 1.f, w.Err, D, w.dU, E, 1.f, ds.W1, E);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * D; ++i) {
    w.dK[i] += w.dErr[i];
    w.dV[i] = -w.dErr[i];
  }
  gemm_nn(L, E, D, 1.f, w.dErr, D, st.W1, E, 1.f, w.dAk, E);
  gemm_tn(D, E, L, 1.f, w.dErr, D, w.Ak, E, 1.f, ds.W1, E);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) w.dHk[i] += w.dAk[i] * w.Gp[i];
  gemm_nn(L, D, E, 1.f, w.dHk, E, st.W2, D, 1.f, w.dK, D);
  gemm_tn(E, D, L, 1.f, w.dHk, E, K, D, 1.f, ds.W2, D);
  if (d.dgd) {
    // Kh = K / max(||K||, eps)
    for (int t = 0; t < L; ++t) {
      const float n = w.kn[t];
      const float* kh = w.Kh + t * D;
      const float* g = w.dKh + t * D;
      float* dk = w.dK + t * D;
      if (n > kNormEps) {
        const float p = dot(kh, g, D);
        HOPE_SIMD for (int j = 0; j < D; ++j) dk[j] += (g[j] - kh[j] * p) / n;
      } else {
        HOPE_SIMD for (int j = 0; j < D; ++j) dk[j] += g[j] / kNormEps;
      }
    }
  }
  terms_bwd(L, w);
}

// xq-only backward of one M_mem chunk (after chunk_fwd with queries): w.dQ [L, D] (written) from the read-out's
// gradient dO alone. The state never reads Q, so nothing flows to it, to K, V, the gates or other chunks: this is
// chunk_bwd's read-out part without the terms that leave towards them.
void chunk_bwd_q(const Dims& d, int L, const CMem& st, const float* K, const float* th, const float* dO, Work& w) {
  const int D = d.D, E = d.E;
  const int shift = d.readout_before ? 1 : 0;
  std::memcpy(w.dQ, dO, sizeof(float) * L * D);
  // dAq = diag(Bq) dO W1 + diag(cq) dO S1 + dZ Ak, dZ = -gq * (dO Err^T)
  gemm_nn(L, E, D, 1.f, dO, D, st.W1, E, 0.f, w.LE, E);
  gemm_nn(L, E, D, 1.f, dO, D, st.S1, E, 0.f, w.LE2, E);
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int e = 0; e < E; ++e) w.dAq[t * E + e] = w.Bq[t] * w.LE[t * E + e] + w.cq[t] * w.LE2[t * E + e];
  gemm_nt(L, L, D, 1.f, dO, D, w.Err, D, 0.f, w.Fm, L);
  HOPE_SIMD for (int i = 0; i < L * L; ++i) w.dZ[i] = -w.gq[i] * w.Fm[i];
  gemm_nn(L, E, L, 1.f, w.dZ, L, w.Ak, E, 1.f, w.dAq, E);
  gelu_rows(static_cast<int64_t>(L) * E, w.Hq, nullptr, w.dHq, nullptr);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) w.dHq[i] *= w.dAq[i];
  // Hq = diag(Bq) Q W2^T + diag(cq) Q S2^T - (gq * Q K^T) Gr [- (Br th * Q Kh^T) w]
  for (int t = 0; t < L; ++t)
    HOPE_SIMD for (int e = 0; e < E; ++e) {
      w.LE[t * E + e] = w.Bq[t] * w.dHq[t * E + e];
      w.LE2[t * E + e] = w.cq[t] * w.dHq[t * E + e];
    }
  gemm_nn(L, D, E, 1.f, w.LE, E, st.W2, D, 1.f, w.dQ, D);
  gemm_nn(L, D, E, 1.f, w.LE2, E, st.S2, D, 1.f, w.dQ, D);
  gemm_nt(L, L, E, -1.f, w.dHq, E, w.Gr, E, 0.f, w.dM, L);
  for (int t = 0; t < L; ++t)
    for (int i = 0; i < L; ++i) w.dLL[t * L + i] = i <= t ? w.dM[t * L + i] * w.gq[t * L + i] : 0.f;  // dQK
  gemm_nn(L, D, L, 1.f, w.dLL, L, K, D, 1.f, w.dQ, D);
  if (d.dgd) {
    gemm_nt(L, L, E, -1.f, w.dHq, E, w.w, E, 0.f, w.dM, L);
    for (int t = 0; t < L; ++t) {
      const int r = t - shift;
      for (int j = 0; j < L; ++j) w.dLL[t * L + j] = j <= r ? w.dM[t * L + j] * w.Br[r * L + j] * th[j] : 0.f;
    }
    gemm_nn(L, D, L, 1.f, w.dLL, L, w.Kh, D, 1.f, w.dQ, D);  // dQKh Kh
  }
}

// The backward's chunk_fwd: its intermediates loaded from the forward's store when it kept them (and W1^T, which
// chunk_bwd reads and the store leaves out, transposed again from the chunk-start W1), else recomputed.
// O: the recompute's read-out (Q only; its values are not used).
void chunk_again(const Dims& d, int L, const CMem& st, const float* K, const float* V, const float* Q,
                 const float* th, Work& w, bool bound, const float* store, float* O = nullptr) {
  if (store == nullptr) {
    chunk_fwd(d, L, st, K, V, Q, th, w, O);
    return;
  }
  move_chunk(d, L, Q != nullptr, bound, &w, const_cast<float*>(store), false);
  transpose(static_cast<int>(d.D), static_cast<int>(d.E), st.W1, w.W1t);
}

// ------------------------------------------------------------------------------------------------ update bound
struct Bound {
  float d2, w2, raw, s;
};

// ||new - old|| <= ratio ||old|| over (W1, W2): the scale s (1 when ratio <= 0). The three reductions of the bound
// (here and ds in bound_bwd) are summed in double: the backward's ds cancels, and every gradient of the chunk
// scales with it.
Bound bound_fwd(const CMem& old, const Work& w, float ratio, int64_t DE) {
  Bound b{0.f, 0.f, 1.f, 1.f};
  if (ratio <= 0.f) return b;
  double d2 = 0.0, w2 = 0.0;
  for (int64_t i = 0; i < DE; ++i) {
    const double a = w.nW1[i] - old.W1[i], c = w.nW2[i] - old.W2[i];
    d2 += a * a + c * c;
    w2 += static_cast<double>(old.W1[i]) * old.W1[i] + static_cast<double>(old.W2[i]) * old.W2[i];
  }
  b.d2 = static_cast<float>(d2);
  b.w2 = static_cast<float>(w2);
  b.raw = ratio * std::sqrt(std::max(b.w2, 1e-12f)) / std::sqrt(std::max(b.d2, 1e-24f));
  b.s = std::min(b.raw, 1.f);
  return b;
}

// state = old + s (new - old), into out (may alias old); without a bound (ratio 0) the new state itself
void bound_apply(const CMem& old, const Work& w, const Bound& b, float ratio, const Mem& out, int64_t DE) {
  const float s = b.s;
  const float* n[4] = {w.nW1, w.nW2, w.nS1, w.nS2};
  const float* o[4] = {old.W1, old.W2, old.S1, old.S2};
  float* r[4] = {out.W1, out.W2, out.S1, out.S2};
  for (int m = 0; m < 4; ++m) {
    if (ratio <= 0.f) {
      std::memcpy(r[m], n[m], sizeof(float) * DE);
      continue;
    }
    HOPE_SIMD for (int64_t i = 0; i < DE; ++i) r[m][i] = o[m][i] + s * (n[m][i] - o[m][i]);
  }
}

// backward of the bound: from the bounded state's gradient dout, the gradient of the unbounded end state (into
// w.dsW1 .. w.dsS2) and the old state's direct part (added to dold)
void bound_bwd(const CMem& old, Work& w, const Bound& b, float ratio, const CMem& dout, const Mem& dold,
               int64_t DE) {
  const float s = b.s;
  const float* n[4] = {w.nW1, w.nW2, w.nS1, w.nS2};
  const float* o[4] = {old.W1, old.W2, old.S1, old.S2};
  const float* g[4] = {dout.W1, dout.W2, dout.S1, dout.S2};
  float* dn[4] = {w.dsW1, w.dsW2, w.dsS1, w.dsS2};
  float* dd[4] = {dold.W1, dold.W2, dold.S1, dold.S2};
  if (ratio <= 0.f || b.raw > 1.f) {  // s = 1 and no gradient through it: the bound is the identity here
    for (int m = 0; m < 4; ++m) std::memcpy(dn[m], g[m], sizeof(float) * DE);
    return;
  }
  double ds_acc = 0.0;
  for (int m = 0; m < 4; ++m)
    HOPE_SIMD for (int64_t i = 0; i < DE; ++i) {
      dn[m][i] = s * g[m][i];
      dd[m][i] += (1.f - s) * g[m][i];
      ds_acc += static_cast<double>(g[m][i]) * (n[m][i] - o[m][i]);
    }
  const float ds = static_cast<float>(ds_acc);
  if (ratio <= 0.f || !(b.raw <= 1.f)) return;
  const float dw2 = b.w2 >= 1e-12f ? ds * b.raw / (2.f * b.w2) : 0.f;
  const float dd2 = b.d2 >= 1e-24f ? -ds * b.raw / (2.f * b.d2) : 0.f;
  for (int m = 0; m < 2; ++m)
    HOPE_SIMD for (int64_t i = 0; i < DE; ++i) {
      const float diff = 2.f * dd2 * (n[m][i] - o[m][i]);
      dd[m][i] += 2.f * dw2 * o[m][i] - diff;
      dn[m][i] += diff;
    }
}

// ------------------------------------------------------------------------------------------------ generators
// The generator chunk's front: reads of the five generators, k, v, q, the gates, and the targets v^_g = M_g(v).
struct Front {  // one per thread at a time, like Work
  float *X[kG];                  // input of each generator (pointers into xq / xk / xv; not owned)
  float *O, *Hx, *Ax;            // [G, L, D] / [G, L, E]
  float *k, *v, *q, *kn, *vn, *qn, *eta, *alpha, *Vh, *Hv, *Av;  // [L, D] / [L] / [G, L, D] / [G, L, E]
  float *Px, *Pv;  // gelu' of Hx, Hv [G, L, E] (the backward's recompute only)
  float* Wt;       // each generator's transposed chunk-start W1, W2 [G, 2, D E], shared by its two reads
  float *dO, *dk, *dv, *dq, *deta, *dalpha, *dth, *LE, *LD;
  Front(int64_t L, int64_t D, int64_t E) {
    const int64_t LD_ = L * D, LE_ = L * E;
    carve<1>({{&O, kG * LD_}, {&Hx, kG * LE_}, {&Ax, kG * LE_}, {&k, LD_}, {&v, LD_}, {&q, LD_}, {&kn, L}, {&vn, L},
              {&qn, L}, {&eta, L}, {&alpha, L}, {&Vh, kG * LD_}, {&Hv, kG * LE_}, {&Av, kG * LE_}, {&dO, kG * LD_},
              {&dk, LD_}, {&dv, LD_}, {&dq, LD_}, {&deta, L}, {&dalpha, L}, {&dth, L}, {&LE, LE_}, {&LD, LD_},
              {&Px, kG * LE_}, {&Pv, kG * LE_}, {&Wt, 2 * kG * D * E}});
    for (int g = 0; g < kG; ++g) X[g] = nullptr;
  }
};

// What gen_chunk_bwd reads of one front_fwd (with derivs) of L tokens, moved like move_chunk's fields (f null:
// only counts); the inputs' pointers f.X are set by the caller.
int64_t move_front(const Dims& d, int L, Front* f, float* s, bool save) {
  using F = Field<Front>;
  const int64_t GLD = d.G * L * d.D, GLE = d.G * L * d.E, LD = static_cast<int64_t>(L) * d.D;
  return move_fields<Front>(f, f != nullptr ? s : nullptr, save,
                            {F{&Front::O, GLD}, F{&Front::Ax, GLE}, F{&Front::Px, GLE}, F{&Front::Av, GLE},
                             F{&Front::Pv, GLE}, F{&Front::k, LD}, F{&Front::v, LD}, F{&Front::q, LD},
                             F{&Front::kn, L}, F{&Front::vn, L}, F{&Front::qn, L}, F{&Front::eta, L},
                             F{&Front::alpha, L}});
}

// M(X) = X + W1 gelu(X W2^T)^T..: O = X + gelu(X W2^T) W1^T from the transposed weights W1t [E, D], W2t [D, E],
// with H, A kept and, when P is given, gelu'(H) (for mem_read_bwd)
void mem_read(const Dims& d, int L, const float* W1t, const float* W2t, const float* X, float* O, float* Hx, float* Ax,
              float* P) {
  const int D = d.D, E = d.E;
  gemm_nn(L, E, D, 1.f, X, D, W2t, E, 0.f, Hx, E);
  gelu_rows(static_cast<int64_t>(L) * E, Hx, Ax, P, nullptr);
  std::memcpy(O, X, sizeof(float) * L * D);
  gemm_nn(L, D, E, 1.f, Ax, E, W1t, D, 1.f, O, D);
}

// backward of mem_read: dX (written), adds to dW1, dW2
void mem_read_bwd(const Dims& d, int L, const CMem& st, const float* X, const float* Px, const float* Ax,
                  const float* dO, float* dX, float* dW1, float* dW2, float* LE) {
  const int D = d.D, E = d.E;
  gemm_nn(L, E, D, 1.f, dO, D, st.W1, E, 0.f, LE, E);  // dA = dO W1
  gemm_tn(D, E, L, 1.f, dO, D, Ax, E, 1.f, dW1, E);
  HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * E; ++i) LE[i] *= Px[i];  // dH
  std::memcpy(dX, dO, sizeof(float) * L * D);
  gemm_nn(L, D, E, 1.f, LE, E, st.W2, D, 1.f, dX, D);
  gemm_tn(E, D, L, 1.f, LE, E, X, D, 1.f, dW2, D);
}

inline void l2n_row(const float* x, float* y, float* n_out, int D) {
  const float n = std::sqrt(dot(x, x, D));
  *n_out = n;
  const float inv = 1.f / std::max(n, kNormEps);
  HOPE_SIMD for (int j = 0; j < D; ++j) y[j] = x[j] * inv;
}

inline void l2n_row_bwd(const float* y, float n, const float* dy, float* dx, int D) {
  if (n > kNormEps) {
    const float p = dot(y, dy, D);
    HOPE_SIMD for (int j = 0; j < D; ++j) dx[j] = (dy[j] - y[j] * p) / n;
  } else {
    HOPE_SIMD for (int j = 0; j < D; ++j) dx[j] = dy[j] / kNormEps;
  }
}

inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// per-(b, h) pointers of the layer's parameters
struct HeadParams {
  const float *r_eta, *r_alpha;  // [D]
  float b_eta, b_alpha, m_gen, m_mem;
};

// the generators' inputs: generator g reads f.X[g]
void front_inputs(const Dims& d, Front& f, const float* xq, const float* xk, const float* xv) {
  const float* X[kG] = {xk, xv, xk, xk, xq};
  for (int g = 0; g < d.G; ++g) f.X[g] = const_cast<float*>(X[g]);
}

// derivs: also gelu' of the reads' pre-activations (for the backward)
void front_fwd(const Dims& d, int L, const Mem* gen, const float* xq, const float* xk, const float* xv,
               const HeadParams& hp, Front& f, bool derivs) {
  const int D = d.D, E = d.E;
  const int64_t DE = d.DE();
  front_inputs(d, f, xq, xk, xv);
  for (int g = 0; g < d.G; ++g) {
    float *W1t = f.Wt + 2 * g * DE, *W2t = W1t + DE;
    transpose(D, E, gen[g].W1, W1t);
    transpose(E, D, gen[g].W2, W2t);
    mem_read(d, L, W1t, W2t, f.X[g], f.O + g * L * D, f.Hx + g * L * E, f.Ax + g * L * E,
             derivs ? f.Px + g * L * E : nullptr);
  }
  for (int t = 0; t < L; ++t) {
    l2n_row(f.O + kGk * L * D + t * D, f.k + t * D, f.kn + t, D);
    if (d.normalize_v)
      l2n_row(f.O + kGv * L * D + t * D, f.v + t * D, f.vn + t, D);
    else
      std::memcpy(f.v + t * D, f.O + kGv * L * D + t * D, sizeof(float) * D);
    l2n_row(d.G > kGq ? f.O + kGq * L * D + t * D : xq + t * D, f.q + t * D, f.qn + t, D);
    f.eta[t] = sigmoid(dot(f.O + kGeta * L * D + t * D, hp.r_eta, D) + hp.b_eta);
    f.alpha[t] = sigmoid(dot(f.O + kGalpha * L * D + t * D, hp.r_alpha, D) + hp.b_alpha);
  }
  for (int g = 0; g < d.G; ++g)
    mem_read(d, L, f.Wt + 2 * g * DE, f.Wt + (2 * g + 1) * DE, f.v, f.Vh + g * L * D, f.Hv + g * L * E,
             f.Av + g * L * E, derivs ? f.Pv + g * L * E : nullptr);
}

void fill_gates(int L, const float* alpha, float momentum, Work& w) {
  for (int t = 0; t < L; ++t) {
    w.a[t] = momentum;
    w.b[t] = 1.f - alpha[t];
  }
}

// the chunk store of (b, h) (d.store): per generator chunk its front and each generator's chunk, then per M_mem
// chunk its chunk, at fixed strides (a short last chunk uses the start of its slot)
int64_t gen_chunk_stride(const Dims& d) {
  return move_chunk(d, static_cast<int>(d.Cg), false, d.gclip > 0, nullptr, nullptr, true);
}
int64_t front_stride(const Dims& d) { return move_front(d, static_cast<int>(d.Cg), nullptr, nullptr, true); }
int64_t gen_store_stride(const Dims& d) { return front_stride(d) + d.G * gen_chunk_stride(d); }
int64_t mem_store_stride(const Dims& d) {
  return move_chunk(d, static_cast<int>(d.Cm), true, d.mclip > 0, nullptr, nullptr, true);
}
int64_t store_floats(const Dims& d) {
  return d.store ? d.NCg * gen_store_stride(d) + d.NCm * mem_store_stride(d) : 0;
}
// M_mem chunk c's slot in the store of (b, h)
float* mem_store(const Dims& d, float* store, int64_t c) {
  return store + d.NCg * gen_store_stride(d) + c * mem_store_stride(d);
}

// one generator chunk forward: updates gen in place; the bound's scale of each generator into scale (or null); each
// generator's chunk intermediates into store (or null: none kept)
void gen_chunk_fwd(const Dims& d, int L, const Mem* gen, const HeadParams& hp, Front& f, Work& w, float* scale,
                   float* store) {
  const int64_t DE = d.DE();
  fill_gates(L, f.alpha, hp.m_gen, w);
  for (int g = 0; g < d.G; ++g) {
    chunk_fwd(d, L, cmem(gen[g]), f.k, f.Vh + g * L * d.D, nullptr, f.eta, w, nullptr);
    if (store != nullptr) move_chunk(d, L, false, d.gclip > 0, &w, store + g * gen_chunk_stride(d), true);
    const Bound b = bound_fwd(cmem(gen[g]), w, d.gclip, DE);
    bound_apply(cmem(gen[g]), w, b, d.gclip, gen[g], DE);
    if (scale != nullptr) scale[g] = b.s;
  }
}

// one generator chunk backward: gen holds the chunk-start state, dgen the gradient of its end state (replaced by the
// chunk-start state's); f.dk, f.dv, f.dq, f.deta, f.dalpha hold what the memory pass sent to this chunk's tokens.
// Writes dxq, dxk, dxv [L, D] (added), accumulates dr [2, D], dbias [2], dm_gen. store: the generators' chunk
// intermediates kept by the forward (null: recomputed). spare: a buffer like dgen[g] per generator, which a chunk whose
// bound is the identity writes its chunk-start gradient into (the two then swap: no copy of the end gradient).
void gen_chunk_bwd(const Dims& d, int L, const Mem* gen, Mem* dgen, Mem* spare, const HeadParams& hp, Front& f,
                   Work& w, const float* store, float* dxq, float* dxk, float* dxv, float* dr, float* dbias,
                   float* dm_gen) {
  const int D = d.D, E = d.E;
  const int64_t DE = d.DE();
  fill_gates(L, f.alpha, hp.m_gen, w);
  std::fill(f.dth, f.dth + L, 0.f);
  std::fill(w.ga, w.ga + L, 0.f);
  std::fill(w.gb, w.gb + L, 0.f);
  for (int g = 0; g < d.G; ++g) {
    const CMem st = cmem(gen[g]);
    chunk_again(d, L, st, f.k, f.Vh + g * L * D, nullptr, f.eta, w, d.gclip > 0,
                store != nullptr ? store + g * gen_chunk_stride(d) : nullptr);
    const Bound b = bound_fwd(st, w, d.gclip, DE);
    if (d.gclip <= 0.f || b.raw > 1.f) {  // the bound is the identity here (bound_bwd's test)
      chunk_bwd(d, L, st, f.k, nullptr, f.eta, cmem(dgen[g]), nullptr, w, spare[g], f.dth);
      std::swap(dgen[g], spare[g]);
    } else {
      // dgen[g] -> w.ds* (the unbounded end state's gradient) and dold (the chunk-start state's direct part)
      std::fill(w.dold, w.dold + 4 * DE, 0.f);
      bound_bwd(st, w, b, d.gclip, cmem(dgen[g]), mem_at(w.dold, DE), DE);
      const CMem dn{w.dsW1, w.dsW2, w.dsS1, w.dsS2};
      chunk_bwd(d, L, st, f.k, nullptr, f.eta, dn, nullptr, w, dgen[g], f.dth);
      float* out[4] = {dgen[g].W1, dgen[g].W2, dgen[g].S1, dgen[g].S2};
      for (int m = 0; m < 4; ++m)
        HOPE_SIMD for (int64_t i = 0; i < DE; ++i) out[m][i] += w.dold[m * DE + i];
    }
    HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * D; ++i) f.dk[i] += w.dK[i];
    // targets v^_g = M_g(v): dv += d through the read
    mem_read_bwd(d, L, st, f.v, f.Pv + g * L * E, f.Av + g * L * E, w.dV, f.LD, dgen[g].W1, dgen[g].W2, f.LE);
    HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * D; ++i) f.dv[i] += f.LD[i];
  }
  for (int t = 0; t < L; ++t) {
    f.deta[t] += f.dth[t];
    f.dalpha[t] -= w.gb[t];
    *dm_gen += w.ga[t];
  }
  // gates and normalisations back to the generators' reads
  std::fill(f.dO, f.dO + kG * L * D, 0.f);
  for (int t = 0; t < L; ++t) {
    const float dze = f.deta[t] * f.eta[t] * (1.f - f.eta[t]);
    const float dza = f.dalpha[t] * f.alpha[t] * (1.f - f.alpha[t]);
    float* dOe = f.dO + kGeta * L * D + t * D;
    float* dOa = f.dO + kGalpha * L * D + t * D;
    const float* Oe = f.O + kGeta * L * D + t * D;
    const float* Oa = f.O + kGalpha * L * D + t * D;
    HOPE_SIMD for (int j = 0; j < D; ++j) {
      dOe[j] = dze * hp.r_eta[j];
      dOa[j] = dza * hp.r_alpha[j];
      dr[j] += dze * Oe[j];
      dr[D + j] += dza * Oa[j];
    }
    dbias[0] += dze;
    dbias[1] += dza;
    l2n_row_bwd(f.k + t * D, f.kn[t], f.dk + t * D, f.dO + kGk * L * D + t * D, D);
    if (d.normalize_v)
      l2n_row_bwd(f.v + t * D, f.vn[t], f.dv + t * D, f.dO + kGv * L * D + t * D, D);
    else
      std::memcpy(f.dO + kGv * L * D + t * D, f.dv + t * D, sizeof(float) * D);
    if (d.G > kGq) {
      l2n_row_bwd(f.q + t * D, f.qn[t], f.dq + t * D, f.dO + kGq * L * D + t * D, D);
    } else {  // q = l2n(xq)
      l2n_row_bwd(f.q + t * D, f.qn[t], f.dq + t * D, f.LD, D);
      HOPE_SIMD for (int j = 0; j < D; ++j) dxq[t * D + j] += f.LD[j];
    }
  }
  float* dX[kG] = {dxk, dxv, dxk, dxk, dxq};
  for (int g = 0; g < d.G; ++g) {
    mem_read_bwd(d, L, cmem(gen[g]), f.X[g], f.Px + g * L * E, f.Ax + g * L * E, f.dO + g * L * D, f.LD,
                 dgen[g].W1, dgen[g].W2, f.LE);
    HOPE_SIMD for (int64_t i = 0; i < static_cast<int64_t>(L) * D; ++i) dX[g][i] += f.LD[i];
  }
}

// ------------------------------------------------------------------------------------------------ per (b, h)
struct Ptrs {
  // inputs
  const float *xq, *xk, *xv, *gW1, *gW2, *gS1, *gS2, *mW1, *mW2, *mS1, *mS2, *readout, *bias, *mom;
  // forward outputs
  float *y, *gW1T, *gW2T, *gS1T, *gS2T, *mW1T, *mW2T, *mS1T, *mS2T, *kvq, *gates, *gen_scale, *mem_scale, *gen_ckpt,
      *mem_ckpt, *store;
  // backward: incoming gradients and outputs
  const float *dy, *dgW1T, *dgW2T, *dgS1T, *dgS2T, *dmW1T, *dmW2T, *dmS1T, *dmS2T;
  float *dxq, *dxk, *dxv, *dgW1, *dgW2, *dgS1, *dgS2, *dmW1, *dmW2, *dmS1, *dmS2, *dreadout, *dbias, *dmom;
};

HeadParams head_params(const Dims& d, const Ptrs& p, int64_t h) {
  HeadParams hp;
  hp.r_eta = p.readout + h * d.D;
  hp.r_alpha = p.readout + (d.H + h) * d.D;
  hp.b_eta = p.bias[h];
  hp.b_alpha = p.bias[d.H + h];
  hp.m_gen = p.mom[h];
  hp.m_mem = p.mom[d.H + h];
  return hp;
}

// offset of generator g of (b, h) in the [B, G H, ...] state tensors
inline int64_t gen_off(const Dims& d, int64_t b, int64_t h, int g) { return ((b * d.G + g) * d.H + h) * d.DE(); }

// copies a memory between four separate tensors (at offset off) and a packed [4, D E] block
inline void pack(const float* W1, const float* W2, const float* S1, const float* S2, int64_t off, float* dst,
                 int64_t DE) {
  std::memcpy(dst, W1 + off, sizeof(float) * DE);
  std::memcpy(dst + DE, W2 + off, sizeof(float) * DE);
  std::memcpy(dst + 2 * DE, S1 + off, sizeof(float) * DE);
  std::memcpy(dst + 3 * DE, S2 + off, sizeof(float) * DE);
}
inline void unpack(const float* src, float* W1, float* W2, float* S1, float* S2, int64_t off, int64_t DE) {
  std::memcpy(W1 + off, src, sizeof(float) * DE);
  std::memcpy(W2 + off, src + DE, sizeof(float) * DE);
  std::memcpy(S1 + off, src + 2 * DE, sizeof(float) * DE);
  std::memcpy(S2 + off, src + 3 * DE, sizeof(float) * DE);
}

// the M_mem chunk of L tokens from t0: its tokens' k, v, q (from the kvq buffer [T, 3, D] into K, V, Q), lr th,
// and w.a (momentum m_mem), w.b (keep = 1 - decay) from the gates [T, 2]
inline void mem_chunk_inputs(const Dims& d, const float* kvq, const float* gates, float m_mem, int64_t t0, int L,
                             float* K, float* V, float* Q, float* th, Work& w) {
  const int64_t D = d.D;
  for (int t = 0; t < L; ++t) {
    const float* row = kvq + (t0 + t) * 3 * D;
    std::memcpy(K + t * D, row, sizeof(float) * D);
    std::memcpy(V + t * D, row + D, sizeof(float) * D);
    std::memcpy(Q + t * D, row + 2 * D, sizeof(float) * D);
    th[t] = gates[(t0 + t) * 2];
    w.a[t] = m_mem;
    w.b[t] = 1.f - gates[(t0 + t) * 2 + 1];
  }
}

// the generator pass of (b, h) from its chunk-start states at chunk c0 (in gen, updated in place) through chunk
// c1 - 1; stores k, v, q, eta, alpha and, when ckpt, the checkpoints of chunk-start states (and, when store, every
// chunk's intermediates); or, when chunk_states, every chunk-start state (the backward's recompute of one segment:
// it stops at the last chunk's start)
void gen_pass(const Dims& d, const Ptrs& p, int64_t bh, const HeadParams& hp, const Mem* gen, int64_t c0, int64_t c1,
              Front& f, Work& w, float* ckpt, float* chunk_states, float* kvq, float* gates, float* scale,
              float* store) {
  const int64_t D = d.D, DE = d.DE(), T = d.T;
  const float *xq = p.xq + bh * T * D, *xk = p.xk + bh * T * D, *xv = p.xv + bh * T * D;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t t0 = c * d.Cg;
    const int L = static_cast<int>(std::min(d.Cg, T - t0));
    if (ckpt != nullptr && c % d.K == 0)
      for (int g = 0; g < d.G; ++g) pack(gen[g].W1, gen[g].W2, gen[g].S1, gen[g].S2, 0, ckpt + ((c / d.K) * d.G + g) * 4 * DE, DE);
    if (chunk_states != nullptr) {
      for (int g = 0; g < d.G; ++g)
        pack(gen[g].W1, gen[g].W2, gen[g].S1, gen[g].S2, 0, chunk_states + ((c - c0) * d.G + g) * 4 * DE, DE);
      if (c == c1 - 1) break;  // the last chunk's end state is the next checkpoint: not needed
    }
    float* cs = store != nullptr ? store + c * gen_store_stride(d) : nullptr;
    front_fwd(d, L, gen, xq + t0 * D, xk + t0 * D, xv + t0 * D, hp, f, cs != nullptr);
    if (cs != nullptr) {
      move_front(d, L, &f, cs, true);
      cs += front_stride(d);  // then each generator's chunk
    }
    if (kvq != nullptr)
      for (int t = 0; t < L; ++t) {
        float* row = kvq + (t0 + t) * 3 * D;
        std::memcpy(row, f.k + t * D, sizeof(float) * D);
        std::memcpy(row + D, f.v + t * D, sizeof(float) * D);
        std::memcpy(row + 2 * D, f.q + t * D, sizeof(float) * D);
        gates[(t0 + t) * 2] = f.eta[t];
        gates[(t0 + t) * 2 + 1] = f.alpha[t];
      }
    gen_chunk_fwd(d, L, gen, hp, f, w, scale != nullptr ? scale + c * d.G : nullptr, cs);
  }
}

void fwd_one(const Dims& d, const Ptrs& p, int64_t bh) {
  const int64_t b = bh / d.H, h = bh % d.H, D = d.D, DE = d.DE(), T = d.T;
  const HeadParams hp = head_params(d, p, h);
  Work w(d.Lmax, D, d.E);
  Front f(d.Cg, D, d.E);
  std::vector<float> genbuf(static_cast<size_t>(d.G * 4 * DE));
  Mem gen[kG];
  for (int g = 0; g < d.G; ++g) {
    gen[g] = mem_at(genbuf.data() + g * 4 * DE, DE);
    pack(p.gW1, p.gW2, p.gS1, p.gS2, gen_off(d, b, h, g), genbuf.data() + g * 4 * DE, DE);
  }
  float* kvq = p.kvq + bh * T * 3 * D;
  float* gates = p.gates + bh * T * 2;
  float* ckpt = d.K > 0 ? p.gen_ckpt + bh * d.NK * d.G * 4 * DE : nullptr;  // none stored: no full backward
  float* store = d.store ? p.store + bh * store_floats(d) : nullptr;
  gen_pass(d, p, bh, hp, gen, 0, d.NCg, f, w, ckpt, nullptr, kvq, gates, p.gen_scale + bh * d.NCg * d.G, store);
  for (int g = 0; g < d.G; ++g)
    unpack(genbuf.data() + g * 4 * DE, p.gW1T, p.gW2T, p.gS1T, p.gS2T, gen_off(d, b, h, g), DE);
  // memory pass
  std::vector<float> membuf(static_cast<size_t>(4 * DE)), tok(static_cast<size_t>(3 * d.Cm * D)), th(d.Cm);
  Mem mem = mem_at(membuf.data(), DE);
  pack(p.mW1, p.mW2, p.mS1, p.mS2, bh * DE, membuf.data(), DE);
  float *K = tok.data(), *V = K + d.Cm * D, *Q = V + d.Cm * D;
  for (int64_t c = 0; c < d.NCm; ++c) {
    const int64_t t0 = c * d.Cm;
    const int L = static_cast<int>(std::min(d.Cm, T - t0));
    std::memcpy(p.mem_ckpt + (bh * d.NCm + c) * 4 * DE, membuf.data(), sizeof(float) * 4 * DE);
    mem_chunk_inputs(d, kvq, gates, hp.m_mem, t0, L, K, V, Q, th.data(), w);
    chunk_fwd(d, L, cmem(mem), K, V, Q, th.data(), w, p.y + (bh * T + t0) * D);
    if (store != nullptr) move_chunk(d, L, true, d.mclip > 0, &w, mem_store(d, store, c), true);
    const Bound bd = bound_fwd(cmem(mem), w, d.mclip, DE);
    bound_apply(cmem(mem), w, bd, d.mclip, mem, DE);
    p.mem_scale[bh * d.NCm + c] = bd.s;
  }
  unpack(membuf.data(), p.mW1T, p.mW2T, p.mS1T, p.mS2T, bh * DE, DE);
}

// The xq-only backward of (b, h) (d.q_only): q = l2n(xq) reaches the output through M_mem's reads alone (the
// generators never read it, the state never reads q), so each M_mem chunk gives its queries' gradient on its own.
void bwd_q_one(const Dims& d, const Ptrs& p, int64_t bh) {
  const int64_t D = d.D, DE = d.DE(), T = d.T;
  const HeadParams hp = head_params(d, p, bh % d.H);
  Work w(d.Lmax, D, d.E);
  const float* kvq = p.kvq + bh * T * 3 * D;
  const float* gates = p.gates + bh * T * 2;
  float* store = d.store ? p.store + bh * store_floats(d) : nullptr;
  const float* xq = p.xq + bh * T * D;
  float* dxq = p.dxq + bh * T * D;
  std::vector<float> tok(static_cast<size_t>(3 * d.Cm * D)), th(d.Cm), y(d.Cm * D);
  float *K = tok.data(), *V = K + d.Cm * D, *Q = V + d.Cm * D;
  for (int64_t c = 0; c < d.NCm; ++c) {
    const int64_t t0 = c * d.Cm;
    const int L = static_cast<int>(std::min(d.Cm, T - t0));
    const CMem st = cmem(mem_at(p.mem_ckpt + (bh * d.NCm + c) * 4 * DE, DE));
    mem_chunk_inputs(d, kvq, gates, hp.m_mem, t0, L, K, V, Q, th.data(), w);
    chunk_again(d, L, st, K, V, Q, th.data(), w, d.mclip > 0, store != nullptr ? mem_store(d, store, c) : nullptr,
                y.data());
    chunk_bwd_q(d, L, st, K, th.data(), p.dy + (bh * T + t0) * D, w);
    for (int t = 0; t < L; ++t) {
      const float* x = xq + (t0 + t) * D;
      const float n = std::sqrt(dot(x, x, static_cast<int>(D)));
      l2n_row_bwd(Q + t * D, n, w.dQ + t * D, dxq + (t0 + t) * D, static_cast<int>(D));
    }
  }
}

void bwd_one(const Dims& d, const Ptrs& p, int64_t bh, float* dreadout, float* dbias, float* dmom) {
  const int64_t b = bh / d.H, h = bh % d.H, D = d.D, DE = d.DE(), T = d.T;
  const HeadParams hp = head_params(d, p, h);
  Work w(d.Lmax, D, d.E);
  const float* kvq = p.kvq + bh * T * 3 * D;
  const float* gates = p.gates + bh * T * 2;
  float* store = d.store ? p.store + bh * store_floats(d) : nullptr;
  // gradients of k, v, q [T, 3, D] and eta, alpha [T, 2] from the memory pass
  std::vector<float> dkvq(static_cast<size_t>(T * 3 * D), 0.f), dgates(static_cast<size_t>(T * 2), 0.f);
  // memory pass, chunks in reverse
  std::vector<float> dmem(static_cast<size_t>(4 * DE)), dstart(static_cast<size_t>(4 * DE)),
      tok(static_cast<size_t>(3 * d.Cm * D)), th(d.Cm), dth(d.Cm), y(d.Cm * D);
  pack(p.dmW1T, p.dmW2T, p.dmS1T, p.dmS2T, bh * DE, dmem.data(), DE);
  float *K = tok.data(), *V = K + d.Cm * D, *Q = V + d.Cm * D;
  float dm_mem = 0.f;
  for (int64_t c = d.NCm - 1; c >= 0; --c) {
    const int64_t t0 = c * d.Cm;
    const int L = static_cast<int>(std::min(d.Cm, T - t0));
    const CMem st = cmem(mem_at(p.mem_ckpt + (bh * d.NCm + c) * 4 * DE, DE));
    mem_chunk_inputs(d, kvq, gates, hp.m_mem, t0, L, K, V, Q, th.data(), w);
    for (int t = 0; t < L; ++t) dth[t] = w.ga[t] = w.gb[t] = 0.f;
    chunk_again(d, L, st, K, V, Q, th.data(), w, d.mclip > 0, store != nullptr ? mem_store(d, store, c) : nullptr,
                y.data());
    const Bound bd = bound_fwd(st, w, d.mclip, DE);
    std::fill(dstart.begin(), dstart.end(), 0.f);
    const Mem ds = mem_at(dstart.data(), DE);
    bound_bwd(st, w, bd, d.mclip, cmem(mem_at(dmem.data(), DE)), ds, DE);
    const CMem dn{w.dsW1, w.dsW2, w.dsS1, w.dsS2};
    const Mem dchunk = mem_at(dmem.data(), DE);  // the chunk-start gradient through the update replaces dmem
    chunk_bwd(d, L, st, K, Q, th.data(), dn, p.dy + (bh * T + t0) * D, w, dchunk, dth.data());
    for (int64_t i = 0; i < 4 * DE; ++i) dmem[i] += dstart[i];
    for (int t = 0; t < L; ++t) {
      float* row = dkvq.data() + (t0 + t) * 3 * D;
      HOPE_SIMD for (int j = 0; j < D; ++j) {
        row[j] += w.dK[t * D + j];
        row[D + j] += w.dV[t * D + j];
        row[2 * D + j] += w.dQ[t * D + j];
      }
      dgates[(t0 + t) * 2] += dth[t];
      dgates[(t0 + t) * 2 + 1] -= w.gb[t];
      dm_mem += w.ga[t];
    }
  }
  unpack(dmem.data(), p.dmW1, p.dmW2, p.dmS1, p.dmS2, bh * DE, DE);
  const float *xq = p.xq + bh * T * D, *xk = p.xk + bh * T * D, *xv = p.xv + bh * T * D;
  float *dxq = p.dxq + bh * T * D, *dxk = p.dxk + bh * T * D, *dxv = p.dxv + bh * T * D;
  // generator pass, segments in reverse: recompute the segment's chunk-start states from its checkpoint (none to
  // recompute when every chunk is checkpointed), then walk its chunks in reverse, reading each chunk's start state
  // where it lies
  Front f(d.Cg, D, d.E);
  const int64_t GM = d.G * 4 * DE;  // one chunk's generator states
  std::vector<float> genbuf(static_cast<size_t>(GM)), dgenbuf(static_cast<size_t>(2 * GM)),
      states(static_cast<size_t>(d.K > 1 ? d.K * GM : 0));
  Mem gen[kG], dgen[kG], spare[kG];
  for (int g = 0; g < d.G; ++g) {
    dgen[g] = mem_at(dgenbuf.data() + g * 4 * DE, DE);
    spare[g] = mem_at(dgenbuf.data() + GM + g * 4 * DE, DE);
    pack(p.dgW1T, p.dgW2T, p.dgS1T, p.dgS2T, gen_off(d, b, h, g), dgen[g].W1, DE);
  }
  float dm_gen = 0.f;
  float* ckpt = p.gen_ckpt + bh * d.NK * GM;  // read only
  for (int64_t s = d.NK - 1; s >= 0; --s) {
    const int64_t c0 = s * d.K, c1 = std::min(d.NCg, c0 + d.K);
    if (d.K > 1) {
      std::memcpy(genbuf.data(), ckpt + s * GM, sizeof(float) * GM);
      for (int g = 0; g < d.G; ++g) gen[g] = mem_at(genbuf.data() + g * 4 * DE, DE);
      gen_pass(d, p, bh, hp, gen, c0, c1, f, w, nullptr, states.data(), nullptr, nullptr, nullptr, nullptr);
    }
    for (int64_t c = c1 - 1; c >= c0; --c) {
      const int64_t t0 = c * d.Cg;
      const int L = static_cast<int>(std::min(d.Cg, T - t0));
      float* start = d.K > 1 ? states.data() + (c - c0) * GM : ckpt + s * GM;
      for (int g = 0; g < d.G; ++g) gen[g] = mem_at(start + g * 4 * DE, DE);
      const float* cs = store != nullptr ? store + c * gen_store_stride(d) : nullptr;
      if (cs != nullptr) {  // the forward kept this chunk's front and generator chunks
        front_inputs(d, f, xq + t0 * D, xk + t0 * D, xv + t0 * D);
        move_front(d, L, &f, const_cast<float*>(cs), false);
        cs += front_stride(d);
      } else {
        front_fwd(d, L, gen, xq + t0 * D, xk + t0 * D, xv + t0 * D, hp, f, true);
      }
      for (int t = 0; t < L; ++t) {
        const float* row = dkvq.data() + (t0 + t) * 3 * D;
        std::memcpy(f.dk + t * D, row, sizeof(float) * D);
        std::memcpy(f.dv + t * D, row + D, sizeof(float) * D);
        std::memcpy(f.dq + t * D, row + 2 * D, sizeof(float) * D);
        f.deta[t] = dgates[(t0 + t) * 2];
        f.dalpha[t] = dgates[(t0 + t) * 2 + 1];
      }
      gen_chunk_bwd(d, L, gen, dgen, spare, hp, f, w, cs, dxq + t0 * D, dxk + t0 * D, dxv + t0 * D, dreadout,
                    dbias, &dm_gen);
    }
  }
  for (int g = 0; g < d.G; ++g) unpack(dgen[g].W1, p.dgW1, p.dgW2, p.dgS1, p.dgS2, gen_off(d, b, h, g), DE);
  dmom[0] += dm_gen;
  dmom[1] += dm_mem;
}

// ------------------------------------------------------------------------------------------------ host
// the sizes and settings that follow from the shapes (B, H, T, D, E, G set) and the op's arguments
void settle(Dims& d, int64_t gen_chunk, int64_t mem_chunk, double gclip, double mclip, bool dgd, bool normalize_v,
            bool readout_before, int64_t ckpt_every) {
  TORCH_CHECK(gen_chunk >= 1 && mem_chunk >= 1 && ckpt_every >= 0,
              "chunk sizes must be >= 1 and checkpoint_every >= 0 (0: no generator checkpoints)");
  d.Cg = gen_chunk;
  d.Cm = mem_chunk;
  d.K = ckpt_every;
  d.NCg = (d.T + d.Cg - 1) / d.Cg;
  d.NCm = (d.T + d.Cm - 1) / d.Cm;
  d.NK = d.K > 0 ? (d.NCg + d.K - 1) / d.K : 0;
  d.Lmax = std::max(std::min(d.Cg, d.T), std::min(d.Cm, d.T));
  d.Cg = std::min(d.Cg, d.T);
  d.Cm = std::min(d.Cm, d.T);
  d.dgd = dgd;
  d.normalize_v = normalize_v;
  d.readout_before = readout_before;
  d.gclip = static_cast<float>(gclip);
  d.mclip = static_cast<float>(mclip);
  // every chunk-start state checkpointed: the forward also keeps every chunk's intermediates, so the backward runs
  // no chunk twice (about as many floats again as the checkpoints)
  d.store = d.K == 1;
}

Dims dims_of(at::TensorList in, int64_t gen_chunk, int64_t mem_chunk, double gclip, double mclip,
             bool dgd, bool normalize_v, bool readout_before, int64_t ckpt_every) {
  TORCH_CHECK(in.size() == N_IN, "self_modifying_titans: expected ", fmt(N_IN), " input tensors, got ",
              fmt(static_cast<int64_t>(in.size())));
  for (const at::Tensor& t : in) {
    TORCH_CHECK(t.device().is_cpu(), "self_modifying_titans (cpp): every input must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kFloat, "self_modifying_titans (cpp): every input must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "self_modifying_titans (cpp): every input must be contiguous");
  }
  const at::Tensor& xq = in[XQ];
  TORCH_CHECK(xq.dim() == 4, "xq must be [B, H, T, D], got ", fmt(xq.sizes()));
  Dims d;
  d.B = xq.size(0);
  d.H = xq.size(1);
  d.T = xq.size(2);
  d.D = xq.size(3);
  d.E = in[GW1].size(-1);
  TORCH_CHECK(in[GW1].dim() == 4 && d.H > 0 && in[GW1].size(1) % d.H == 0 &&
                  (in[GW1].size(1) / d.H == 4 || in[GW1].size(1) / d.H == kG),
              "gen.W1 must be [B, G H, D, E] with G = 4 or 5 generators, got ", fmt(in[GW1].sizes()));
  d.G = in[GW1].size(1) / d.H;
  TORCH_CHECK(d.T >= 1, "xq must have T >= 1 tokens");
  settle(d, gen_chunk, mem_chunk, gclip, mclip, dgd, normalize_v, readout_before, ckpt_every);
  const int64_t B = d.B, H = d.H, T = d.T, D = d.D, E = d.E;
  HOPE_CHECK_SHAPE(xk, in[XK], B, H, T, D);
  HOPE_CHECK_SHAPE(xv, in[XV], B, H, T, D);
  HOPE_CHECK_SHAPE(gen.W1, in[GW1], B, d.G * H, D, E);
  HOPE_CHECK_SHAPE(gen.W2, in[GW2], B, d.G * H, E, D);
  HOPE_CHECK_SHAPE(gen.S1, in[GS1], B, d.G * H, D, E);
  HOPE_CHECK_SHAPE(gen.S2, in[GS2], B, d.G * H, E, D);
  HOPE_CHECK_SHAPE(mem.W1, in[MW1], B, H, D, E);
  HOPE_CHECK_SHAPE(mem.W2, in[MW2], B, H, E, D);
  HOPE_CHECK_SHAPE(mem.S1, in[MS1], B, H, D, E);
  HOPE_CHECK_SHAPE(mem.S2, in[MS2], B, H, E, D);
  HOPE_CHECK_SHAPE(gate_readout, in[READOUT], 2, H, D);
  HOPE_CHECK_SHAPE(gate_bias, in[BIAS], 2, H);
  HOPE_CHECK_SHAPE(momentum, in[MOM], 2, H);
  return d;
}

Ptrs inputs_of(at::TensorList in) {
  Ptrs p{};
  p.xq = in[XQ].data_ptr<float>();
  p.xk = in[XK].data_ptr<float>();
  p.xv = in[XV].data_ptr<float>();
  p.gW1 = in[GW1].data_ptr<float>();
  p.gW2 = in[GW2].data_ptr<float>();
  p.gS1 = in[GS1].data_ptr<float>();
  p.gS2 = in[GS2].data_ptr<float>();
  p.mW1 = in[MW1].data_ptr<float>();
  p.mW2 = in[MW2].data_ptr<float>();
  p.mS1 = in[MS1].data_ptr<float>();
  p.mS2 = in[MS2].data_ptr<float>();
  p.readout = in[READOUT].data_ptr<float>();
  p.bias = in[BIAS].data_ptr<float>();
  p.mom = in[MOM].data_ptr<float>();
  return p;
}

}  // namespace

std::vector<at::Tensor> fwd(at::TensorList in, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                            double mem_clip, bool dgd, bool normalize_v, bool readout_before,
                            int64_t checkpoint_every) {
  const Dims d = dims_of(in, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd, normalize_v, readout_before,
                         checkpoint_every);
  Ptrs p = inputs_of(in);
  const auto f32 = in[XQ].options();
  std::vector<at::Tensor> out(N_OUT);
  out[Y] = at::empty({d.B, d.H, d.T, d.D}, f32);
  for (int i = 0; i < 4; ++i) {
    out[GW1T + i] = at::empty_like(in[GW1 + i]);
    out[MW1T + i] = at::empty_like(in[MW1 + i]);
  }
  out[KVQ] = at::empty({d.B, d.H, d.T, 3, d.D}, f32);
  out[GATES] = at::empty({d.B, d.H, d.T, 2}, f32);
  out[GEN_SCALE] = at::empty({d.B, d.H, d.NCg, d.G}, f32);
  out[MEM_SCALE] = at::empty({d.B, d.H, d.NCm}, f32);
  out[GEN_CKPT] = cached_empty({d.B, d.H, d.NK, d.G, 4, d.DE()}, f32);
  out[MEM_CKPT] = cached_empty({d.B, d.H, d.NCm, 4, d.DE()}, f32);
  out[STORE] = cached_empty({d.B, d.H, store_floats(d)}, f32);
  p.y = out[Y].data_ptr<float>();
  p.gW1T = out[GW1T].data_ptr<float>();
  p.gW2T = out[GW2T].data_ptr<float>();
  p.gS1T = out[GS1T].data_ptr<float>();
  p.gS2T = out[GS2T].data_ptr<float>();
  p.mW1T = out[MW1T].data_ptr<float>();
  p.mW2T = out[MW2T].data_ptr<float>();
  p.mS1T = out[MS1T].data_ptr<float>();
  p.mS2T = out[MS2T].data_ptr<float>();
  p.kvq = out[KVQ].data_ptr<float>();
  p.gates = out[GATES].data_ptr<float>();
  p.gen_scale = out[GEN_SCALE].data_ptr<float>();
  p.mem_scale = out[MEM_SCALE].data_ptr<float>();
  p.gen_ckpt = out[GEN_CKPT].data_ptr<float>();
  p.mem_ckpt = out[MEM_CKPT].data_ptr<float>();
  p.store = out[STORE].data_ptr<float>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) fwd_one(d, p, bh);
  });
  return out;
}

// grads: [dy, dgen W1..S2 (end), dmem W1..S2 (end)]; saved: the forward's inputs and outputs (KVQ, GATES, GEN_CKPT,
// MEM_CKPT, STORE used; an empty STORE: the backward recomputes every chunk). Returns the gradient of every input, in
// the order of In.
std::vector<at::Tensor> bwd(at::TensorList grads, at::TensorList in,
                            const at::Tensor& kvq, const at::Tensor& gates, const at::Tensor& gen_ckpt,
                            const at::Tensor& mem_ckpt, const at::Tensor& store, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                            double mem_clip, bool dgd, bool normalize_v, bool readout_before,
                            int64_t checkpoint_every, bool q_only) {
  Dims d = dims_of(in, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd, normalize_v, readout_before, checkpoint_every);
  TORCH_CHECK(!q_only || d.G == 4, "self_modifying_titans backward: q_only takes 4 generators (q = l2n(xq)), got ",
              fmt(d.G));
  d.q_only = q_only;
  TORCH_CHECK(d.K > 0 || q_only, "self_modifying_titans backward: the forward stored no generator checkpoints "
              "(checkpoint_every=0), which only an xq-only backward (q_only) can run without");
  TORCH_CHECK(grads.size() == 9, "self_modifying_titans backward: expected 9 incoming gradients");
  for (const at::Tensor& t : grads)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                "self_modifying_titans backward: incoming gradients must be contiguous float32 CPU tensors");
  HOPE_CHECK_SHAPE(dy, grads[0], d.B, d.H, d.T, d.D);
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(grads[1 + i].sizes() == in[GW1 + i].sizes(), "gradient of the final generator state has a wrong shape");
    TORCH_CHECK(grads[5 + i].sizes() == in[MW1 + i].sizes(), "gradient of the final memory state has a wrong shape");
  }
  HOPE_CHECK_SHAPE(kvq, kvq, d.B, d.H, d.T, 3, d.D);
  HOPE_CHECK_SHAPE(gates, gates, d.B, d.H, d.T, 2);
  HOPE_CHECK_SHAPE(gen_ckpt, gen_ckpt, d.B, d.H, d.NK, d.G, 4, d.DE());
  HOPE_CHECK_SHAPE(mem_ckpt, mem_ckpt, d.B, d.H, d.NCm, 4, d.DE());
  d.store = d.store && store.numel() > 0;
  HOPE_CHECK_SHAPE(store, store, d.B, d.H, store_floats(d));
  Ptrs p = inputs_of(in);
  p.store = store.data_ptr<float>();
  p.kvq = kvq.data_ptr<float>();
  p.gates = gates.data_ptr<float>();
  p.gen_ckpt = gen_ckpt.data_ptr<float>();
  p.mem_ckpt = mem_ckpt.data_ptr<float>();
  p.dy = grads[0].data_ptr<float>();
  p.dgW1T = grads[1].data_ptr<float>();
  p.dgW2T = grads[2].data_ptr<float>();
  p.dgS1T = grads[3].data_ptr<float>();
  p.dgS2T = grads[4].data_ptr<float>();
  p.dmW1T = grads[5].data_ptr<float>();
  p.dmW2T = grads[6].data_ptr<float>();
  p.dmS1T = grads[7].data_ptr<float>();
  p.dmS2T = grads[8].data_ptr<float>();
  std::vector<at::Tensor> out(N_IN);
  for (int i = 0; i < N_IN; ++i) out[i] = at::zeros_like(in[i]);
  p.dxq = out[XQ].data_ptr<float>();
  p.dxk = out[XK].data_ptr<float>();
  p.dxv = out[XV].data_ptr<float>();
  p.dgW1 = out[GW1].data_ptr<float>();
  p.dgW2 = out[GW2].data_ptr<float>();
  p.dgS1 = out[GS1].data_ptr<float>();
  p.dgS2 = out[GS2].data_ptr<float>();
  p.dmW1 = out[MW1].data_ptr<float>();
  p.dmW2 = out[MW2].data_ptr<float>();
  p.dmS1 = out[MS1].data_ptr<float>();
  p.dmS2 = out[MS2].data_ptr<float>();
  // per-(b, h) partials of the shared parameters, summed over b afterwards: readout [B, 2, H, D] -> (r_eta, r_alpha)
  at::Tensor dreadout = at::zeros({d.B, d.H, 2, d.D}, in[XQ].options());
  at::Tensor dbias = at::zeros({d.B, d.H, 2}, in[XQ].options());
  at::Tensor dmom = at::zeros({d.B, d.H, 2}, in[XQ].options());
  float *pr = dreadout.data_ptr<float>(), *pb = dbias.data_ptr<float>(), *pm = dmom.data_ptr<float>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      if (d.q_only)
        bwd_q_one(d, p, bh);
      else
        bwd_one(d, p, bh, pr + bh * 2 * d.D, pb + bh * 2, pm + bh * 2);
    }
  });
  out[READOUT] = dreadout.sum(0).permute({1, 0, 2}).contiguous();  // [2, H, D]
  out[BIAS] = dbias.sum(0).t().contiguous();                        // [2, H]
  out[MOM] = dmom.sum(0).t().contiguous();
  return out;
}

// floats per (b, h) of the forward's chunk store (the STORE output's last dimension) for these sizes and arguments
int64_t store_size(int64_t T, int64_t D, int64_t E, int64_t G, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                   double mem_clip, bool dgd, int64_t checkpoint_every) {
  TORCH_CHECK(T >= 1 && D >= 1 && E >= 1 && (G == 4 || G == kG), "self_modifying_titans_store_size: T, D, E >= 1 "
              "and G = 4 or 5 expected");
  Dims d;
  d.B = 1;
  d.H = 1;
  d.T = T;
  d.D = D;
  d.E = E;
  d.G = G;
  settle(d, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd, false, false, checkpoint_every);
  return store_floats(d);
}

}  // namespace HOPE_SMT_ISA
}  // namespace smt
}  // namespace hope

#ifndef HOPE_SMT_VARIANT_BUILD
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOPE_SMT_HAS_AVX2 1
#else
#define HOPE_SMT_HAS_AVX2 0
#endif

namespace hope {
namespace smt {
#if HOPE_SMT_HAS_AVX2
namespace avx2 {  // self_modifying_titans_cpu_avx2.cpp
std::vector<at::Tensor> fwd(at::TensorList in, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                            double mem_clip, bool dgd, bool normalize_v, bool readout_before,
                            int64_t checkpoint_every);
std::vector<at::Tensor> bwd(at::TensorList grads, at::TensorList in, const at::Tensor& kvq, const at::Tensor& gates,
                            const at::Tensor& gen_ckpt, const at::Tensor& mem_ckpt, const at::Tensor& store,
                            int64_t gen_chunk, int64_t mem_chunk, double gen_clip, double mem_clip, bool dgd,
                            bool normalize_v, bool readout_before, int64_t checkpoint_every, bool q_only);
}  // namespace avx2
#endif
namespace portable {
int64_t store_size(int64_t T, int64_t D, int64_t E, int64_t G, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                   double mem_clip, bool dgd, int64_t checkpoint_every);
}  // namespace portable

namespace {
// the AVX2 build runs when the CPU has AVX2 and FMA, unless ATEN_CPU_CAPABILITY=default (PyTorch's own switch to its
// baseline kernels) asks for the baseline
bool cpu_has_avx2() {
#if HOPE_SMT_HAS_AVX2
  static const bool yes = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

std::string isa_op() { return cpu_has_avx2() ? "avx2" : "portable"; }

// The checkpoints and the chunk store are tens of MB to GB, written once by a forward and freed by its backward, and
// a training step asks for the same sizes every time. Fresh pages from the OS come zeroed and faulted in one by one
// (smoke: 6 of a layer forward's 46 ms), so freed blocks are kept by size, up to kCacheLimit bytes in all, for the
// next request of that size. New blocks are 2 MB aligned, with transparent huge pages asked for (Linux).
class BufferCache {
 public:
  static constexpr size_t kCacheLimit = size_t{2} << 30;
  static constexpr size_t kAlign = size_t{1} << 21;

  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may be freed after static destructors
    return *cache;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        held_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kAlign, bytes) == 0 && p != nullptr, "self_modifying_titans: could not allocate ",
                bytes, " bytes for its checkpoints");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, (bytes + kAlign - 1) & ~(kAlign - 1), MADV_HUGEPAGE);
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= kCacheLimit) {
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  // frees every kept block; returns the bytes released
  int64_t clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      held_ = 0;
    }
    int64_t n = 0;
    for (const auto& kv : blocks) {
      n += static_cast<int64_t>(kv.first);
      std::free(kv.second);
    }
    return n;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0;
};

int64_t empty_cache_op() { return BufferCache::instance().clear(); }
}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel == 0) return at::empty(sizes, options);
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  void* p = BufferCache::instance().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { BufferCache::instance().give(q, bytes); }, options);
}

namespace {

std::vector<at::Tensor> fwd_op(at::TensorList in, int64_t gen_chunk, int64_t mem_chunk, double gen_clip,
                               double mem_clip, bool dgd, bool normalize_v, bool readout_before,
                               int64_t checkpoint_every) {
#if HOPE_SMT_HAS_AVX2
  if (cpu_has_avx2())
    return avx2::fwd(in, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd, normalize_v, readout_before,
                     checkpoint_every);
#endif
  return portable::fwd(in, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd, normalize_v, readout_before,
                       checkpoint_every);
}

std::vector<at::Tensor> bwd_op(at::TensorList grads, at::TensorList in, const at::Tensor& kvq,
                               const at::Tensor& gates, const at::Tensor& gen_ckpt, const at::Tensor& mem_ckpt,
                               const at::Tensor& store, int64_t gen_chunk, int64_t mem_chunk, double gen_clip, double mem_clip, bool dgd,
                               bool normalize_v, bool readout_before, int64_t checkpoint_every, bool q_only) {
#if HOPE_SMT_HAS_AVX2
  if (cpu_has_avx2())
    return avx2::bwd(grads, in, kvq, gates, gen_ckpt, mem_ckpt, store, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd,
                     normalize_v, readout_before, checkpoint_every, q_only);
#endif
  return portable::bwd(grads, in, kvq, gates, gen_ckpt, mem_ckpt, store, gen_chunk, mem_chunk, gen_clip, mem_clip, dgd,
                       normalize_v, readout_before, checkpoint_every, q_only);
}
}  // namespace
}  // namespace smt
}  // namespace hope

TORCH_LIBRARY_FRAGMENT(hope_cpu, m) {
  m.def(
      "self_modifying_titans_fwd(Tensor[] inputs, int gen_chunk, int mem_chunk, float gen_clip, float mem_clip, "
      "bool dgd, bool normalize_v, bool readout_before, int checkpoint_every) -> Tensor[]");
  m.def(
      "self_modifying_titans_bwd(Tensor[] grads, Tensor[] inputs, Tensor kvq, Tensor gates, Tensor gen_ckpt, "
      "Tensor mem_ckpt, Tensor store, int gen_chunk, int mem_chunk, float gen_clip, float mem_clip, bool dgd, bool normalize_v, "
      "bool readout_before, int checkpoint_every, bool q_only=False) -> Tensor[]");
  m.def("self_modifying_titans_isa() -> str");  // which build the operators run: "avx2" or "portable"
  // frees the operators' cached checkpoint and store buffers; returns the bytes released
  m.def("self_modifying_titans_empty_cache() -> int");
  // the forward's chunk store: floats per (b, h) (the same in both builds)
  m.def(
      "self_modifying_titans_store_size(int T, int D, int E, int G, int gen_chunk, int mem_chunk, float gen_clip, "
      "float mem_clip, bool dgd, int checkpoint_every) -> int");
}

TORCH_LIBRARY_IMPL(hope_cpu, CPU, m) {
  m.impl("self_modifying_titans_fwd", &hope::smt::fwd_op);
  m.impl("self_modifying_titans_bwd", &hope::smt::bwd_op);
}

TORCH_LIBRARY_IMPL(hope_cpu, CompositeExplicitAutograd, m) {
  m.impl("self_modifying_titans_isa", &hope::smt::isa_op);
  m.impl("self_modifying_titans_empty_cache", &hope::smt::empty_cache_op);
  m.impl("self_modifying_titans_store_size", &hope::smt::portable::store_size);
}
#endif  // HOPE_SMT_VARIANT_BUILD
