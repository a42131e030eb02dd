// Input checks of the CUDA titan_linear entry points (csrc/titan_linear.cu), called from bindings_cuda.cpp before
// any .cu function runs; integers in messages go through fmt() (common.h says why). Every failure names the
// argument. The kernels then assume these contracts (those of triton.py's launchers).
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <optional>

#include "common.h"

namespace hope {

// Shared memory in bytes per block of the forward / backward state-pass kernel (titan_linear.cu; never throws).
int64_t titan_linear_smem_bytes(int64_t chunk_size, int64_t Dk, bool dgd, bool backward);

constexpr int64_t kTitanMaxChunk = 64;  // chunk_size and head dims the kernels take (state tiles in shared memory)
constexpr int64_t kTitanMaxDim = 128;

namespace titan_checks {

inline void on_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, name, " must be on q's device ", dev, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void f32_shaped(const at::Tensor& t, const char* name, const at::Device& dev, at::IntArrayRef shape,
                       const char* layout) {
  on_device(t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " has shape ", fmt(t.sizes()), ", expected ", fmt(shape), " (", layout, ")");
}

inline const at::Tensor& required(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required when kh is given (rule dgd)");
  return *t;
}

inline void smem_fits(const at::Tensor& q, int64_t chunk_size, bool dgd, bool backward) {
  const int64_t bytes = titan_linear_smem_bytes(chunk_size, q.size(3), dgd, backward);
  const int64_t limit = static_cast<int64_t>(at::cuda::getDeviceProperties(q.device().index())->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "chunk_size ", fmt(chunk_size), " and Dk ", fmt(q.size(3)), " need ", fmt(bytes),
              " bytes of shared memory per block in the titan_linear ", backward ? "backward" : "forward",
              " kernel; this device allows ", fmt(limit));
}

}  // namespace titan_checks

// Checks of titan_linear_fwd / titan_linear_bwd's inputs (the Triton launchers' contract): q, k [B, H, T, Dk] and
// v [B, H, T, Dv] in one of fp32 / bf16 / fp16; kh [B, H, NC * C, Dk] (dgd when given), aqk / akk / tinv / aqw
// [B, H, NC, C, C], vec [B, H, NC, 7, C], end [B, H, NC, 3], W0 / S0 [B, H, Dv, Dk], all fp32; all contiguous and
// on q's CUDA device; 1 <= chunk_size <= 64, NC = ceil(T / chunk_size), 1 <= Dk, Dv <= 128.
inline void check_titan_linear_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kh,
                                      const at::Tensor& v, const at::Tensor& aqk,
                                      const std::optional<at::Tensor>& akk, const std::optional<at::Tensor>& tinv,
                                      const std::optional<at::Tensor>& aqw, const at::Tensor& vec,
                                      const at::Tensor& end, const at::Tensor& W0, const at::Tensor& S0,
                                      int64_t chunk_size, bool backward) {
  using namespace titan_checks;
  TORCH_CHECK(q.defined(), "q must be a tensor");
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const at::Device dev = q.device();
  on_device(q, "q", dev);
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, H, T, Dk], got ", fmt(q.dim()), "-D");
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(chunk_size >= 1 && chunk_size <= kTitanMaxChunk, "chunk_size must be in [1, ", fmt(kTitanMaxChunk),
              "], got ", fmt(chunk_size));
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dk = q.size(3), C = chunk_size;
  on_device(k, "k", dev);
  TORCH_CHECK(k.scalar_type() == dt, "k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(k.sizes() == q.sizes(), "k has shape ", fmt(k.sizes()), ", expected q's ", fmt(q.sizes()));
  on_device(v, "v", dev);
  TORCH_CHECK(v.scalar_type() == dt, "v must have q's dtype ", dt, ", got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == H && v.size(2) == T, "v has shape ", fmt(v.sizes()),
              ", expected [B, H, T, Dv] with q's B, H, T");
  const int64_t Dv = v.size(3);
  TORCH_CHECK(Dk >= 1 && Dk <= kTitanMaxDim, "q's head dim Dk must be in [1, ", fmt(kTitanMaxDim), "], got ", fmt(Dk));
  TORCH_CHECK(Dv >= 1 && Dv <= kTitanMaxDim, "v's head dim Dv must be in [1, ", fmt(kTitanMaxDim), "], got ", fmt(Dv));
  on_device(vec, "vec", dev);
  TORCH_CHECK(vec.dim() == 5, "vec must be 5-D [B, H, NC, 7, C], got ", fmt(vec.dim()), "-D");
  const int64_t NC = vec.size(2);
  TORCH_CHECK(NC == (T + C - 1) / C, "vec has ", fmt(NC), " chunks, expected ceil(T / chunk_size) = ", fmt((T + C - 1) / C));
  f32_shaped(vec, "vec", dev, {B, H, NC, 7, C}, "[B, H, NC, 7, C]");
  f32_shaped(end, "end", dev, {B, H, NC, 3}, "[B, H, NC, 3]");
  f32_shaped(aqk, "aqk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  f32_shaped(W0, "W0", dev, {B, H, Dv, Dk}, "[B, H, Dv, Dk]");
  f32_shaped(S0, "S0", dev, {B, H, Dv, Dk}, "[B, H, Dv, Dk]");
  const bool dgd = kh.has_value() && kh->defined();
  if (dgd) {
    f32_shaped(*kh, "kh", dev, {B, H, NC * C, Dk}, "[B, H, NC * C, Dk]");
    f32_shaped(required(akk, "akk"), "akk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(tinv, "tinv"), "tinv", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(aqw, "aqw"), "aqw", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  }
  smem_fits(q, chunk_size, dgd, /*backward=*/false);
  if (backward) smem_fits(q, chunk_size, dgd, /*backward=*/true);
}

// The incoming gradients of titan_linear_bwd: do like v in q's dtype, dWT / dST fp32 like W0.
inline void check_titan_linear_grads(const at::Tensor& grad_out, const at::Tensor& dWT, const at::Tensor& dST,
                                     const at::Tensor& q, const at::Tensor& v, const at::Tensor& W0) {
  using namespace titan_checks;
  const at::Device dev = q.device();
  on_device(grad_out, "do", dev);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "do must have q's dtype ", q.scalar_type(), ", got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "do has shape ", fmt(grad_out.sizes()), ", expected v's ", fmt(v.sizes()));
  f32_shaped(dWT, "dWT", dev, W0.sizes(), "[B, H, Dv, Dk]");
  f32_shaped(dST, "dST", dev, W0.sizes(), "[B, H, Dv, Dk]");
}

}  // namespace hope
