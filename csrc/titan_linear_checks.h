// Input checks of the CUDA titan_linear entry points (csrc/titan_linear.cu), called from bindings_cuda.cpp before
// any .cu function runs; integers in messages go through fmt() (common.h says why). Every failure names the
// argument. The kernels then assume these contracts (those of the Triton launchers).
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include "common.h"
#include "titan_inputs.h"

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

inline const at::Tensor& required(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() > 0, name, " is required when khat is given (rule dgd)");
  return t;
}

inline void smem_fits(const at::Tensor& q, int64_t chunk_size, bool dgd, bool backward) {
  const int64_t bytes = titan_linear_smem_bytes(chunk_size, q.size(3), dgd, backward);
  const int64_t limit = static_cast<int64_t>(at::cuda::getDeviceProperties(q.device().index())->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "chunk_size ", fmt(chunk_size), " and Dk ", fmt(q.size(3)), " need ", fmt(bytes),
              " bytes of shared memory per block in the titan_linear ", backward ? "backward" : "forward",
              " kernel; this device allows ", fmt(limit));
}

}  // namespace titan_checks

// Checks of the linear memory's inputs (titan_inputs.h): q, k [B, H, T, Dk] and v [B, H, T, Dv] in one of fp32 /
// bf16 / fp16; khat [B, H, NC * C, Dk] (dgd when given), aqk / akk / tinv / aqw [B, H, NC, C, C], rows
// [B, H, NC, 7, C], ends [B, H, NC, 3], state W / S [B, H, Dv, Dk], all fp32; all contiguous and on q's CUDA device;
// 1 <= chunk_size <= 64, NC = ceil(T / chunk_size), 1 <= Dk, Dv <= 128.
inline void check_titan_linear_inputs(const TitanInputs& in, bool backward) {
  using namespace titan_checks;
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const int64_t chunk_size = in.chunk_size;
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
  on_device(in.rows, "rows", dev);
  TORCH_CHECK(in.rows.dim() == 5, "rows must be 5-D [B, H, NC, 7, C], got ", fmt(in.rows.dim()), "-D");
  const int64_t NC = in.rows.size(2);
  TORCH_CHECK(NC == (T + C - 1) / C, "rows has ", fmt(NC), " chunks, expected ceil(T / chunk_size) = ",
              fmt((T + C - 1) / C));
  f32_shaped(in.rows, "rows", dev, {B, H, NC, kNRows, C}, "[B, H, NC, 7, C]");
  f32_shaped(in.ends, "ends", dev, {B, H, NC, 3}, "[B, H, NC, 3]");
  f32_shaped(in.aqk, "aqk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  f32_shaped(in.state[0], "W", dev, {B, H, Dv, Dk}, "[B, H, Dv, Dk]");
  f32_shaped(in.state[1], "S", dev, {B, H, Dv, Dk}, "[B, H, Dv, Dk]");
  const bool dgd = in.dgd();
  if (dgd) {
    f32_shaped(in.khat, "khat", dev, {B, H, NC * C, Dk}, "[B, H, NC * C, Dk]");
    f32_shaped(required(in.akk, "akk"), "akk", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(in.tinv, "tinv"), "tinv", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
    f32_shaped(required(in.aqw, "aqw"), "aqw", dev, {B, H, NC, C, C}, "[B, H, NC, C, C]");
  }
  smem_fits(q, chunk_size, dgd, /*backward=*/false);
  if (backward) smem_fits(q, chunk_size, dgd, /*backward=*/true);
}

// The incoming gradients of the backward: d out like v in q's dtype, d W / d S fp32 like W.
inline void check_titan_linear_grads(const TitanInputs& in, const TitanGradsIn& grads) {
  using namespace titan_checks;
  const at::Device dev = in.q.device();
  on_device(grads.out, "d out", dev);
  TORCH_CHECK(grads.out.scalar_type() == in.q.scalar_type(), "d out must have q's dtype ", in.q.scalar_type(),
              ", got ", grads.out.scalar_type());
  TORCH_CHECK(grads.out.sizes() == in.v.sizes(), "d out has shape ", fmt(grads.out.sizes()), ", expected v's ",
              fmt(in.v.sizes()));
  f32_shaped(grads.state[0], "d W", dev, in.state[0].sizes(), "[B, H, Dv, Dk]");
  f32_shaped(grads.state[1], "d S", dev, in.state[0].sizes(), "[B, H, Dv, Dk]");
}

}  // namespace hope
