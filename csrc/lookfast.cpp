// Every lookfast op schema, in one place. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register
// themselves with TORCH_LIBRARY_IMPL(lookfast, CPU|CUDA, m); fake (meta) kernels and autograd are registered from
// Python (lookfast/ops/<op>.py), as in PyTorch's extension-cpp template.
#include <torch/library.h>

TORCH_LIBRARY(lookfast, m) {
  // ---------------------------------------------------------------- topk_patch_gather (lookfast/ops/topk_patch_gather.py)
  // Selection: the k best patch indices per row of scores (B, N), best first; ties to the lower index, NaN last.
  m.def("topk_indices(Tensor scores, int k) -> Tensor");
  // Gather (+ embed): packed rows r = 0..total-1 of `indices` (total,) int64 name a patch of image b, where
  // cu_seqlens[b] <= r < cu_seqlens[b + 1] (cu_seqlens (B + 1,) int32). Returns (total, C*p*p) raw (C, p, p) patches
  // when weight is None, else (total, D) = patches @ weight.view(D, -1).T + bias + pos_embed[indices] (pos_embed (G, D)).
  m.def(
      "patch_gather_embed(Tensor images, Tensor indices, Tensor cu_seqlens, int patch_size, Tensor? weight, "
      "Tensor? bias, Tensor? pos_embed) -> Tensor");
  // Gradients of patch_gather_embed for (images, weight, bias, pos_embed); output_mask says which to compute; an
  // unrequested one (or one whose input was None) comes back as an empty (0,) tensor.
  m.def(
      "patch_gather_embed_backward(Tensor grad_tokens, Tensor images, Tensor indices, Tensor cu_seqlens, "
      "int patch_size, Tensor? weight, Tensor? pos_embed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

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
  // Confidence of each row of logits (criterion 0 max softmax, 1 entropy, 2 margin) tested against a 0-d threshold;
  // keep / exited are the row positions that stay / leave, each in increasing order (sizes depend on the data).
  m.def("exit_confidence_mask(Tensor logits, Tensor threshold, int criterion) -> (Tensor keep, Tensor exited)");
  // Every state's rows gathered in `keep` order, all states in one pass: out[i][j] = states[i][keep[j]].
  m.def("compact_rows(Tensor[] states, Tensor keep) -> Tensor[]");
  // Adjoint of compact_rows: each grad (m, ...) added into zeros (rows, ...) at the rows `keep` names.
  m.def("compact_rows_backward(Tensor[] grads, Tensor keep, SymInt rows) -> Tensor[]");
  // In place: out[batch_index[j]] = values[j].
  m.def("exit_scatter(Tensor(a!) out, Tensor batch_index, Tensor values) -> ()");

  // ---------------------------------------------------------------- nearest_patch_fill (lookfast/ops/nearest_patch_fill.py)
  // Every cell of a grid x grid map: the inverse-distance-weighted mean of the values of its `neighbours` nearest kept
  // patches (keep (B, k) int64 ids in row-major grid order, values (B, k, C); lengths (B,) int64 valid counts or None).
  // Returns (B, C, grid, grid) in values' dtype, accumulated in fp32 (fp64 for fp64). Ties go to the earlier slot.
  m.def("nearest_patch_fill(Tensor keep, Tensor values, int grid, Tensor? lengths, int neighbours) -> Tensor");

  // ---------------------------------------------------------------- layer_norm_rows (lookfast/ops/layer_norm_rows.py)
  // (x[r] - mean) / sqrt(var + eps) per row of x (N, C), no affine, biased variance, statistics in fp32 (fp64 for
  // fp64), rounded once to x's dtype. Returns a contiguous (N, C) tensor.
  m.def("layer_norm_rows(Tensor x, float eps) -> Tensor");

  // ---------------------------------------------------------------- packed_linear (lookfast/models/packed_linear.py)
  // A bf16/fp16 linear layer's weight (N, K) packed once for the CPU's matrix-engine micro-kernel: (N * K_pad,),
  // K_pad = K rounded up to 32. Refused where the CPU has no micro-kernel for the dtype.
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  // out (M, N) = round(residual + scale * (x @ W^T + bias)) on the packed weight, fp32 accumulation, one rounding;
  // bias/scale (N,) and residual (M, N) optional (absent: that step is skipped). x (M, K), all in one dtype.
  m.def("packed_linear(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, Tensor? scale, "
        "Tensor? residual) -> Tensor");

  // ---------------------------------------------------------------- group_conv3x3 (lookfast/models/dyn_perceiver/layers.py)
  // act(conv2d(x, weight, bias, stride, padding 1, groups C / 16)): x (B, C, H, W) bf16 (any layout; read
  // channels-last), weight (C, 16, 3, 3) bf16, bias (C,) fp32, stride 1 or 2, act ReLU when relu. Returns a
  // channels-last bf16 tensor, fp32 accumulation, rounded once. CPUs with AVX512-BF16 only (refused elsewhere).
  m.def("group_conv3x3(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");

  // ---------------------------------------------------------------- end of schemas
}
