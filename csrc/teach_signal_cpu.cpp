// C++ CPU teach signal (NL F1): one fused pass per logits row computes the log-sum-exp, the CE term and
// G = (softmax - onehot) * valid / N_valid in place, so the [N, V] logits are read twice instead of ~6 times.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "ops.h"

namespace hope {

// Returns {loss (fp32 scalar), grad_logits G [N, V] fp32}; delta = G @ weight and the VJPs are taken in Python.
std::vector<at::Tensor> teach_signal_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D [N, D], got ", hidden.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, D], got ", weight.dim(), "-D");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat, "hidden must be float32, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight has D=", weight.size(1), ", expected hidden's D=", hidden.size(1));
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must have shape (", hidden.size(0), ",)");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "hidden, weight and targets must be CPU tensors");
  const int64_t N = hidden.size(0), V = weight.size(0);
  at::Tensor logits = at::mm(hidden, weight.t()).contiguous();  // [N, V]
  at::Tensor tgt = targets.contiguous();
  const int64_t* p_t = tgt.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) n_valid += p_t[r] != ignore_index;
  const float inv_n = 1.f / static_cast<float>(std::max<int64_t>(n_valid, 1));
  std::vector<double> row_loss(N, 0.0);
  float* p_g = logits.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* b_row = p_g + r * V;
      const int64_t t = p_t[r];
      if (t == ignore_index) {
        std::fill(b_row, b_row + V, 0.f);
        continue;
      }
      TORCH_CHECK(t >= 0 && t < V, "targets[", r, "] = ", t, " is outside [0, ", V, ")");
      float mx = -INFINITY;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, b_row[v]);
      float sum = 0.f;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(b_row[v] - mx);
      const float lse = mx + std::log(sum);
      row_loss[r] = static_cast<double>(lse - b_row[t]);
      for (int64_t v = 0; v < V; ++v) b_row[v] = std::exp(b_row[v] - lse) * inv_n;
      b_row[t] -= inv_n;
    }
  });
  double total = 0.0;
  for (double l : row_loss) total += l;
  at::Tensor loss = at::scalar_tensor(static_cast<float>(total * inv_n), hidden.options());
  return {loss, logits};
}

}  // namespace hope
