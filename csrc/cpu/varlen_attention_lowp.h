#pragma once
// bfloat16 variable-length attention on the CPU's bf16 dot-product unit (AVX512-BF16 `vdpbf16ps`): the entry points
// varlen_attention.cpp calls for bf16 inputs when cpu/varlen_attention_isa.cpp picks this kernel (the default on CPUs
// with AVX512-BF16 and no AMX; with AMX the oneDNN brgemm kernel). The portable kernel in varlen_attention.cpp widens
// bf16/fp16 to float32 and multiplies with float32 FMAs.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu/varlen_attention_work.h"

namespace lookfast {
namespace varlen_lowp {

// One packed batch of samples, the float kernels' definition (cpu/varlen_attention_work.h).
using Shape = VarlenProblem;

// True when these inputs can run on the bf16 dot-product kernel here: bf16, head dim >= kMinDotHeadDim, a CPU with
// AVX512-BF16, and the environment variable LOOKFAST_CPU_ISA not set to "baseline" (the switch the tests use to run
// the portable kernel on any CPU). Narrow heads (Dyn-Perceiver z->x, width 8) stay on the portable kernel: there the
// softmax, not the products, is the work, and its queries-in-lanes layout is faster (measured 2.0 vs 3.1 ms on A2).
constexpr int64_t kMinDotHeadDim = 32;
bool use_dot_kernel(at::ScalarType dtype, int64_t head_dim);

// out (total_q, H, Dv) bf16 and lse (H, total_q) float32 are written in full.
void forward(const Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse);

// dq, dk, dv (q's, k's, v's shapes, bf16) are written in full.
void backward(const Shape& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace varlen_lowp
}  // namespace lookfast
