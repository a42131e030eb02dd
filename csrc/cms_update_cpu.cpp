// C++ CPU cms_update (NL eq. 70-71, nl_l2_precond NL eq. 27-29): batched GEMMs through ATen,
// rmsnorm and the GELU / GELU' pass fused in one at::parallel_for loop (one read of h instead of four).
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "ops.h"

namespace hope {

// Returns {w1_new, w2_new, m1_new, m2_new}; inputs are left untouched (the Python side copies for inplace).
std::vector<at::Tensor> cms_update_cpu(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                       const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                       double lr, double beta, bool precond) {
  check_cms_inputs(w1, w2, m1, m2, x, delta);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), E = w1.size(1);
  // rmsnorm over D, one row per (b, c)
  at::Tensor n = at::empty_like(x);
  {
    const float* p_x = x.data_ptr<float>();
    float* p_n = n.data_ptr<float>();
    at::parallel_for(0, B * C, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const float* b_x = p_x + r * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) ss += b_x[d] * b_x[d];
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + kRmsEps);
        for (int64_t d = 0; d < D; ++d) p_n[r * D + d] = b_x[d] * inv;
      }
    });
  }
  at::Tensor h = at::bmm(n, w1.transpose(1, 2));              // [B, C, E]
  at::Tensor back = at::bmm(delta, w2);                        // [B, C, E] = W2^T delta
  at::Tensor a = at::empty_like(h);
  at::Tensor dh = at::empty_like(h);
  {
    const float* p_h = h.data_ptr<float>();
    const float* p_back = back.data_ptr<float>();
    float* p_a = a.data_ptr<float>();
    float* p_dh = dh.data_ptr<float>();
    at::parallel_for(0, h.numel(), 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float v = p_h[i];
        const float cdf = 0.5f * (1.f + std::erf(v * kInvSqrt2));
        const float pdf = std::exp(-0.5f * v * v) * kInvSqrt2Pi;
        p_a[i] = v * cdf;                          // exact (erf) GELU
        p_dh[i] = p_back[i] * (cdf + v * pdf);     // (W2^T delta) * GELU'(h)
      }
    });
  }
  at::Tensor g2 = at::bmm(delta.transpose(1, 2), a);  // dW2 [B, D, E]
  at::Tensor g1 = at::bmm(dh.transpose(1, 2), n);     // dW1 [B, E, D]
  at::Tensor m1_new = at::add(g1, m1, beta);
  at::Tensor m2_new = at::add(g2, m2, beta);
  at::Tensor w1_new;
  if (precond) {
    at::Tensor xbar = n.mean(1);                                    // [B, D]
    at::Tensor w1x = at::bmm(w1, xbar.unsqueeze(2));                // [B, E, 1]
    w1_new = w1 - lr * at::bmm(w1x, xbar.unsqueeze(1)) - lr * m1_new;
  } else {
    w1_new = at::add(w1, m1_new, -lr);
  }
  at::Tensor w2_new = at::add(w2, m2_new, -lr);
  return {w1_new, w2_new, m1_new, m2_new};
}

}  // namespace hope
