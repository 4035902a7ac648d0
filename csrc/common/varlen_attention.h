#pragma once
// What the CPU and CUDA variable-length attention kernels share (host and device), so the CPU tests pin down the
// conventions the GPU kernel follows:
//   - causal masking is bottom-right aligned (FlashAttention): query i of a sample with len_q queries and len_k keys
//     sees keys j < i + len_k - len_q + 1 (`causal_key_end`, the one masking rule of both kernels);
//   - a query that sees no key (zero-key sample, or masked out by causality) outputs zeros and lse = -inf, never NaN;
//   - the saved lse is natural-log (what FlashAttention returns), and the backward recomputes the probabilities from it.
// How each kernel runs the online softmax differs with its hardware: the CPU kernel vectorises it over 16 queries in
// the log2 domain (exp2, lanes = queries; cpu/varlen_attention.cpp), the CUDA kernel runs it per query in the natural
// domain (cuda/online_softmax.cuh).
#include <stdint.h>

#include "common/macros.h"

namespace lookfast {
namespace varlen {

constexpr float kLn2 = 0.6931471805599453f;  // log2-domain max -> natural-log lse

// Number of keys (a prefix 0..end-1) that query `q_index` of a sample may attend to.
LOOKFAST_HOST_DEVICE int64_t causal_key_end(int64_t q_index, int64_t len_q, int64_t len_k, bool causal) {
  if (!causal) return len_k;
  const int64_t end = q_index + len_k - len_q + 1;
  return end < 0 ? 0 : (end > len_k ? len_k : end);
}

}  // namespace varlen
}  // namespace lookfast
