// Every lookfast op schema, in one place. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register
// themselves with TORCH_LIBRARY_IMPL(lookfast, CPU|CUDA, m); fake (meta) kernels and autograd are registered from
// Python (lookfast/ops/<op>.py), as in PyTorch's extension-cpp template.
#include <torch/library.h>

TORCH_LIBRARY(lookfast, m) {
  // ---------------------------------------------------------------- topk_patch_gather (lookfast/ops/topk_patch_gather.py)
  // (schemas of the top-k patch gather op family go here)

  // ---------------------------------------------------------------- varlen_attention (lookfast/ops/varlen_attention.py)
  // (schemas of the variable-length attention op family go here)

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

  // ---------------------------------------------------------------- end of schemas
}
