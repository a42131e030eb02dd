// Input checks of the titan_mlp entry points (titan_mlp_cpu.cpp; titan_mlp.cu through bindings_cuda.cpp), in
// g++-compiled code before any kernel runs; integers in messages go through fmt() (common.h says why). Every
// failure names the argument. The body (titan_mlp_body.h) then assumes these contracts.
#pragma once
#include "common.h"
#include "titan_inputs.h"

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

inline const at::Tensor& required(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() > 0, name, " is required when khat is given (rule dgd)");
  return t;
}

}  // namespace titan_mlp_checks

// Checks of the mlp memory's inputs: q, k, v [B, H, T, D] (CPU: float32; CUDA: float32 / bfloat16 / float16, one
// dtype); khat [B, H, NC * C, D] (dgd when given), aqk / gth / akk / tinv / aqw [B, H, NC, C, C], rows [B, H, NC, 7,
// C], ends [B, H, NC, 3], state W1 / S1 [B, H, D, E], W2 / S2 [B, H, E, D], all float32; all contiguous, on q's
// device (a CPU tensor for the CPU kernels, a CUDA one for the CUDA kernels); chunk_size >= 1 and
// NC = ceil(T / chunk_size); CUDA: chunk_size <= 64, D <= 128, E <= 512.
inline MlpDims check_titan_mlp_inputs(const TitanInputs& in, bool cuda) {
  using namespace titan_mlp_checks;
  const at::Tensor &q = in.q, &W1 = in.state[0], &W2 = in.state[1], &S1 = in.state[2], &S2 = in.state[3];
  const int64_t chunk_size = in.chunk_size;
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
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&in.k, "k"}, {&in.v, "v"}}) {
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
  placed(in.rows, "rows", dev);
  TORCH_CHECK(in.rows.dim() == 5, "rows must be 5-D [B, H, NC, 7, C], got ", fmt(in.rows.dim()), "-D");
  d.NC = (d.T + C - 1) / C;
  d.Tp = d.NC * C;
  const int64_t NC = d.NC;
  TORCH_CHECK(in.rows.size(2) == NC, "rows has ", fmt(in.rows.size(2)), " chunks, expected ceil(T / chunk_size) = ",
              fmt(NC));
  f32_shaped(in.rows, "rows", dev, {B, H, NC, kNRows, C}, "[B, H, NC, 7, C]");
  f32_shaped(in.ends, "ends", dev, {B, H, NC, 3}, "[B, H, NC, 3]");
  f32_shaped(in.aqk, "aqk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  f32_shaped(in.gth, "gth", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  d.dgd = in.dgd();
  if (d.dgd) {
    f32_shaped(in.khat, "khat", dev, {B, H, d.Tp, D}, "[B, H, NC * C, D]");
    f32_shaped(required(in.akk, "akk"), "akk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(in.tinv, "tinv"), "tinv", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(in.aqw, "aqw"), "aqw", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  }
  return d;
}

// The incoming gradients of the backward: d out like q (q's dtype), d W1 / d S1 like W1, d W2 / d S2 like W2 (fp32).
inline void check_titan_mlp_grads(const TitanInputs& in, const TitanGradsIn& grads) {
  using namespace titan_mlp_checks;
  const at::Tensor &q = in.q, &W1 = in.state[0], &W2 = in.state[1];
  const at::Device dev = q.device();
  placed(grads.out, "d out", dev);
  TORCH_CHECK(grads.out.scalar_type() == q.scalar_type(), "d out must have q's dtype ", q.scalar_type(), ", got ",
              grads.out.scalar_type());
  TORCH_CHECK(grads.out.sizes() == q.sizes(), "d out has shape ", fmt(grads.out.sizes()), ", expected q's ",
              fmt(q.sizes()));
  f32_shaped(grads.state[0], "d W1", dev, W1.sizes(), "like W1: [B, H, D, E]");
  f32_shaped(grads.state[1], "d W2", dev, W2.sizes(), "like W2: [B, H, E, D]");
  f32_shaped(grads.state[2], "d S1", dev, W1.sizes(), "like S1: [B, H, D, E]");
  f32_shaped(grads.state[3], "d S2", dev, W2.sizes(), "like S2: [B, H, E, D]");
}

}  // namespace hope
