#pragma once
// Tensor-core (wmma / mma.sync) forward and backward of lookfast::varlen_attention for bf16/fp16 inputs, see
// varlen_attention_mma.cu and varlen_attention_mma_bwd.cu. The SIMT kernels of varlen_attention.cu stay the path for fp32/fp64, head dims over 128,
// GPUs before sm_80, and LOOKFAST_CUDA_MMA=0.
#include <ATen/core/Tensor.h>

namespace lookfast {

// Runs the tensor-core forward into `out` (total_q, H, Dv) and `lse` (H, total_q) float32 and returns true, or
// returns false without touching anything when the path does not apply (dtype, head dims, device, or disabled by
// LOOKFAST_CUDA_MMA=0). q, k, v must be contiguous and share a dtype; the caller validated shapes.
bool varlen_attention_fwd_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, at::Tensor& out, at::Tensor& lse, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, double softmax_scale, bool causal);

// Runs the tensor-core backward into dq (total_q, H, Dh), dk (total_k, Hk, Dh), dv (total_k, Hk, Dv) (same dtype as
// q) from dout and out (converted to q's dtype) and the forward's lse (H, total_q) float32, natural log, and returns
// true; or returns false having launched nothing when the path does not apply (same rule as the forward). Every
// element of dq and of the keys of every sample is written; the gradients of the keys of a sample with no queries,
// and of queries that see no key, are zeros. All tensors contiguous; the caller validated shapes.
bool varlen_attention_bwd_mma(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal);

}  // namespace lookfast
