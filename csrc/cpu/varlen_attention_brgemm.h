#pragma once
// bf16/fp16 variable-length attention, forward and backward, with Q·Kᵀ and P·V on oneDNN's brgemm micro-kernel through torch's
// at::native::cpublas::brgemm (AMX tiles on CPUs with AMX, vdpbf16ps on AVX512-BF16 ones): kernel in
// varlen_attention_brgemm.cpp, chosen by cpu/varlen_attention_isa.h.
#include <ATen/core/Tensor.h>

#include "cpu/varlen_attention_work.h"

namespace lookfast {
namespace varlen_brgemm {

// True when torch's brgemm multiplies `dtype` (bf16 or fp16) operands correctly on this CPU in a layout this kernel
// packs (VNNI-2, or row-major for fp16 on AVX512-FP16 without AMX-FP16; probed once per dtype by
// cpu/brgemm_layout.h) and this kernel's vector code runs here (AVX512-BF16); false for every other dtype and on every
// other CPU.
bool available(at::ScalarType dtype);

// out (total_q, H, Dv) and lse (H, total_q) float32 are written in full. q, k, v contiguous, bf16 or fp16 (and
// available(dtype) true).
void forward(const VarlenProblem& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse);

// dq, dk, dv (q's, k's, v's shapes and dtype) are written in full; dout and out contiguous, lse (H, total_q) float32.
void backward(const VarlenProblem& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv);

}  // namespace varlen_brgemm
}  // namespace lookfast
