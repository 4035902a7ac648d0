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
  // (schemas of the exit-masked execution op family go here)

  // ---------------------------------------------------------------- end of schemas
}
