// Every lookfast op schema, in one place. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register
// themselves with TORCH_LIBRARY_IMPL(lookfast, CPU|CUDA, m); fake (meta) kernels and autograd are registered from
// Python (lookfast/ops/<op>.py), as in PyTorch's extension-cpp template.
#include <torch/library.h>

TORCH_LIBRARY(lookfast, m) {
  // ---------------------------------------------------------------- topk_patch_gather (lookfast/ops/topk_patch_gather.py)
  // (schemas of the top-k patch gather op family go here)

  // ---------------------------------------------------------------- varlen_attention (lookfast/ops/varlen_attention.py)
  // Packed variable-length attention (FlashAttention's varlen layout). q (total_q, H, Dh), k (total_k, Hk, Dh),
  // v (total_k, Hk, Dv), H % Hk == 0, cu_seqlens int32 (B+1,). Returns out (total_q, H, Dv) in q's dtype and
  // lse (H, total_q) float32 (natural log; -inf for queries that see no key). Causal is bottom-right aligned.
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)");
  // Gradients dq, dk, dv (shapes and dtypes of q, k, v), recomputing probabilities from lse.
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) "
      "-> (Tensor, Tensor, Tensor)");

  // ---------------------------------------------------------------- exit_compact (lookfast/ops/exit.py)
  // (schemas of the exit-masked execution op family go here)

  // ---------------------------------------------------------------- end of schemas
}
