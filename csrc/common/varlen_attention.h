#pragma once
// Scalar math shared by the CPU and CUDA variable-length attention kernels, so the CPU tests cover the conventions the
// GPU kernels follow:
//   - scores live in the log2 domain: s2 = (q . k) * softmax_scale * log2(e), probabilities are exp2(s2 - m2);
//   - causal masking is bottom-right aligned (FlashAttention): query i of a sample with len_q queries and len_k keys
//     sees keys j < i + len_k - len_q + 1;
//   - a query that sees no key (zero-key sample, or masked out by causality) outputs zeros and lse = -inf;
//   - the saved lse is natural-log (what FlashAttention returns); the backward recomputes p = exp2(s2 - lse * log2e).
#include <math.h>

#include "common/macros.h"

namespace lookfast {
namespace varlen {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Number of keys (a prefix 0..end-1) that query `q_index` of a sample may attend to.
LOOKFAST_HOST_DEVICE int causal_key_end(int q_index, int len_q, int len_k, bool causal) {
  if (!causal) return len_k;
  const int end = q_index + len_k - len_q + 1;
  return end < 0 ? 0 : (end > len_k ? len_k : end);
}

// The running max to subtract: a row that has seen only masked scores keeps max -inf; subtracting 0 instead keeps
// exp2(-inf - m) == 0 rather than NaN.
template <typename T>
LOOKFAST_HOST_DEVICE T safe_max(T m) {
  return m == -INFINITY ? T(0) : m;
}

// Factor rescaling the running sum and accumulator when the running max grows from m_old to m_new (log2 domain).
LOOKFAST_HOST_DEVICE float rescale_factor(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
}

// Natural-log log-sum-exp of a finished row from its log2-domain max and its sum of exp2(s2 - max); -inf when empty.
template <typename T>
LOOKFAST_HOST_DEVICE float row_lse(T m2, T sum) {
  return sum > T(0) ? static_cast<float>((m2 + log2(sum)) * T(kLn2)) : -INFINITY;
}

// What the backward subtracts from s2 to recompute probabilities; +inf for an empty row so exp2 gives exactly 0.
LOOKFAST_HOST_DEVICE float lse_to_log2_shift(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

}  // namespace varlen
}  // namespace lookfast
