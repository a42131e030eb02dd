// Input checks of the titan_mlp entry points (titan_mlp_cpu.cpp; titan_mlp.cu through bindings_cuda.cpp), in
// g++-compiled code before any kernel runs; integers in messages go through fmt() (common.h says why). Every
// failure names the argument. The body (titan_mlp_body.h) then assumes these contracts (state_pass.py's mlp ops).
#pragma once
#include <optional>

#include "common.h"

namespace hope {

// Sizes the CUDA kernels take (they bound the per-(b, h) global scratch, titan_mlp_body.h MlpLayout); the CPU
// kernels take any size.
constexpr int64_t kTitanMlpMaxChunk = 64;
constexpr int64_t kTitanMlpMaxDim = 128;
constexpr int64_t kTitanMlpMaxHidden = 512;

struct MlpDims {
  int64_t B, H, T, D, E, C, NC, Tp;
  bool dgd;
};

namespace titan_mlp_checks {

inline void placed(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.device() == dev, name, " must be on q's device ", dev, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void f32_shaped(const at::Tensor& t, const char* name, const at::Device& dev, at::IntArrayRef shape,
                       const char* layout) {
  placed(t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " has shape ", fmt(t.sizes()), ", expected ", fmt(shape), " (", layout, ")");
}

inline const at::Tensor& required(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required when kh is given (rule dgd)");
  return *t;
}

}  // namespace titan_mlp_checks

// Checks of titan_mlp_fwd / titan_mlp_bwd's inputs (state_pass.py's mlp contract): q, k, v [B, H, T, D] (CPU:
// float32; CUDA: float32 / bfloat16 / float16, one dtype); kh [B, H, NC * C, D] (dgd when given), aqk / gth / akk /
// tinv / aqw [B, H, NC, C, C], vec [B, H, NC, 7, C], end [B, H, NC, 3], W1 / S1 [B, H, D, E], W2 / S2 [B, H, E, D],
// all float32; all contiguous, on q's device (a CPU tensor for the CPU kernels, a CUDA one for the CUDA kernels);
// chunk_size >= 1 and NC = ceil(T / chunk_size); CUDA: chunk_size <= 64, D <= 128, E <= 512.
inline MlpDims check_titan_mlp_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                      const at::Tensor& v, const at::Tensor& aqk, const at::Tensor& gth,
                                      const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                      const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                      const at::Tensor& end, const at::Tensor& W1, const at::Tensor& W2,
                                      const at::Tensor& S1, const at::Tensor& S2, int64_t chunk_size, bool cuda) {
  using namespace titan_mlp_checks;
  TORCH_CHECK(q.defined(), "q must be a tensor");
  if (cuda) {
    TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  } else {
    TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor, got ", q.device());
  }
  const at::Device dev = q.device();
  placed(q, "q", dev);
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, H, T, D], got ", fmt(q.dim()), "-D");
  const at::ScalarType dt = q.scalar_type();
  if (cuda) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "q must be float32, bfloat16 or float16, got ", dt);
  } else {
    TORCH_CHECK(dt == at::kFloat, "q must be float32, got ", dt);
  }
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", fmt(chunk_size));
  if (cuda)
    TORCH_CHECK(chunk_size <= kTitanMlpMaxChunk, "chunk_size must be in [1, ", fmt(kTitanMlpMaxChunk),
                "] for the CUDA kernels, got ", fmt(chunk_size));
  MlpDims d{};
  d.B = q.size(0), d.H = q.size(1), d.T = q.size(2), d.D = q.size(3), d.C = chunk_size;
  TORCH_CHECK(d.T >= 1, "q must have at least one token, got T=", fmt(d.T));
  TORCH_CHECK(d.D >= 1, "q's head dim D must be >= 1, got ", fmt(d.D));
  if (cuda)
    TORCH_CHECK(d.D <= kTitanMlpMaxDim, "q's head dim D must be <= ", fmt(kTitanMlpMaxDim),
                " for the CUDA kernels, got ", fmt(d.D));
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&k, "k"}, {&v, "v"}}) {
    placed(*t, name, dev);
    TORCH_CHECK(t->scalar_type() == dt, name, " must have q's dtype ", dt, ", got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == q.sizes(), name, " has shape ", fmt(t->sizes()), ", expected q's ", fmt(q.sizes()),
                " [B, H, T, D]");
  }
  placed(W1, "W1", dev);
  TORCH_CHECK(W1.dim() == 4, "W1 must be 4-D [B, H, D, E], got ", fmt(W1.dim()), "-D");
  d.E = W1.size(3);
  TORCH_CHECK(d.E >= 1, "W1's hidden width E must be >= 1, got ", fmt(d.E));
  if (cuda)
    TORCH_CHECK(d.E <= kTitanMlpMaxHidden, "W1's hidden width E must be <= ", fmt(kTitanMlpMaxHidden),
                " for the CUDA kernels, got ", fmt(d.E));
  const int64_t B = d.B, H = d.H, D = d.D, E = d.E, C = d.C;
  f32_shaped(W1, "W1", dev, {B, H, D, E}, "[B, H, D, E]");
  f32_shaped(W2, "W2", dev, {B, H, E, D}, "[B, H, E, D]");
  f32_shaped(S1, "S1", dev, {B, H, D, E}, "[B, H, D, E]");
  f32_shaped(S2, "S2", dev, {B, H, E, D}, "[B, H, E, D]");
  placed(vec, "vec", dev);
  TORCH_CHECK(vec.dim() == 5, "vec must be 5-D [B, H, NC, 7, C], got ", fmt(vec.dim()), "-D");
  d.NC = (d.T + C - 1) / C;
  d.Tp = d.NC * C;
  const int64_t NC = d.NC;
  TORCH_CHECK(vec.size(2) == NC, "vec has ", fmt(vec.size(2)), " chunks, expected ceil(T / chunk_size) = ", fmt(NC));
  f32_shaped(vec, "vec", dev, {B, H, NC, 7, C}, "[B, H, NC, 7, C]");
  f32_shaped(end, "end", dev, {B, H, NC, 3}, "[B, H, NC, 3]");
  f32_shaped(aqk, "aqk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  f32_shaped(gth, "gth", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  d.dgd = kh.has_value() && kh->defined();
  if (d.dgd) {
    f32_shaped(*kh, "kh", dev, {B, H, d.Tp, D}, "[B, H, NC * C, D]");
    f32_shaped(required(akk, "akk"), "akk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(tinv, "tinv"), "tinv", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(aqw, "aqw"), "aqw", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  }
  return d;
}

// The incoming gradients of titan_mlp_bwd: do like q (q's dtype), dW1T / dS1T like W1, dW2T / dS2T like W2 (fp32).
inline void check_titan_mlp_grads(const at::Tensor& grad_out, const at::Tensor& dW1T, const at::Tensor& dW2T,
                                  const at::Tensor& dS1T, const at::Tensor& dS2T, const at::Tensor& q,
                                  const at::Tensor& W1, const at::Tensor& W2) {
  using namespace titan_mlp_checks;
  const at::Device dev = q.device();
  placed(grad_out, "do", dev);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "do must have q's dtype ", q.scalar_type(), ", got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "do has shape ", fmt(grad_out.sizes()), ", expected q's ",
              fmt(q.sizes()));
  f32_shaped(dW1T, "dW1T", dev, W1.sizes(), "like W1: [B, H, D, E]");
  f32_shaped(dW2T, "dW2T", dev, W2.sizes(), "like W2: [B, H, E, D]");
  f32_shaped(dS1T, "dS1T", dev, W1.sizes(), "like S1: [B, H, D, E]");
  f32_shaped(dS2T, "dS2T", dev, W2.sizes(), "like S2: [B, H, E, D]");
}

}  // namespace hope
