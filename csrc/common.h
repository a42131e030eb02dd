// Shared input checks: every failure names the argument (TORCH_CHECK -> c10::Error -> RuntimeError in Python).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>

#define HOPE_CHECK_FLOAT3(name, t)                                                                     \
  TORCH_CHECK((t).dim() == 3, #name " must be 3-D, got ", ::hope::fmt((t).dim()), "-D");               \
  TORCH_CHECK((t).scalar_type() == at::kFloat, #name " must be float32, got ", (t).scalar_type());   \
  TORCH_CHECK((t).is_contiguous(), #name " must be contiguous")

#define HOPE_CHECK_SHAPE(name, t, ...)                                                                 \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #name " has shape ", ::hope::fmt((t).sizes()), \
              ", expected ", ::hope::fmt(at::IntArrayRef({__VA_ARGS__})))

// The titan kernels' token inputs (q, k, v, do) in fp32 / bf16 / fp16, read as fp32; every other input fp32.
#define HOPE_DISPATCH_FLOAT_HALF(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace hope {
// Check messages format integers and sizes with std::to_string, never by streaming them: on the H100 image
// (torch 2.11+cu130) streaming an integer into std::ostream inside _C_cuda.so crashed the process (SIGSEGV in
// integer formatting) where a message of strings, devices and dtypes raised RuntimeError normally.
inline std::string fmt(int64_t v) { return std::to_string(v); }
inline std::string fmt(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

constexpr float kRmsEps = 1e-6f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Checks shared by the CPU and CUDA cms_update entry points; returns nothing, throws on bad input.
inline void check_cms_inputs(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                             const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta) {
  HOPE_CHECK_FLOAT3(x, x);
  HOPE_CHECK_FLOAT3(delta, delta);
  HOPE_CHECK_FLOAT3(w1, w1);
  HOPE_CHECK_FLOAT3(w2, w2);
  HOPE_CHECK_FLOAT3(m1, m1);
  HOPE_CHECK_FLOAT3(m2, m2);
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), E = w1.size(1);
  HOPE_CHECK_SHAPE(delta, delta, B, C, D);
  HOPE_CHECK_SHAPE(w1, w1, B, E, D);
  HOPE_CHECK_SHAPE(w2, w2, B, D, E);
  HOPE_CHECK_SHAPE(m1, m1, B, E, D);
  HOPE_CHECK_SHAPE(m2, m2, B, D, E);
  for (const at::Tensor* t : {&delta, &w1, &w2, &m1, &m2})
    TORCH_CHECK(t->device() == x.device(), "all tensors must be on x's device ", x.device(), ", got ", t->device());
}
}  // namespace hope
