#pragma once
// The online softmax of the CUDA varlen attention kernel, per query in the natural-log domain. (The CPU kernel runs
// the same steps lane-wise over vectors of queries, in the log2 domain; what both share is in
// common/varlen_attention.h.)
//
// A query keeps a running maximum m and a running sum l of exp(s - m) over the keys seen so far. When a new block of
// scores raises the maximum to m_new, the old sum and the output accumulator are multiplied by rescale(m, m_new).
// A query that has seen no key keeps m = -inf and l = 0: its output is 0 and its log-sum-exp -inf, never NaN; one whose
// visible scores are all -inf ends the same way but outputs NaN (softmax's 0 / 0), with log-sum-exp -inf.
#include <cmath>
#include <limits>

#include "common/macros.h"

namespace lookfast {
namespace online_softmax {

template <typename T>
LOOKFAST_HOST_DEVICE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

LOOKFAST_HOST_DEVICE float exp_(float x) { return ::expf(x); }
LOOKFAST_HOST_DEVICE double exp_(double x) { return ::exp(x); }
LOOKFAST_HOST_DEVICE float log_(float x) { return ::logf(x); }
LOOKFAST_HOST_DEVICE double log_(double x) { return ::log(x); }

// max(a, b) that keeps a NaN from either side (a NaN score must make the row's max, sum and lse NaN; a plain
// comparison drops it as soon as a masked -inf or a finite score follows).
template <typename T>
LOOKFAST_HOST_DEVICE T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Factor that moves a sum taken relative to m_old onto m_new >= m_old; 0 when nothing was accumulated yet.
template <typename T>
LOOKFAST_HOST_DEVICE T rescale(T m_old, T m_new) {
  return m_old == neg_inf<T>() ? T(0) : exp_(m_old - m_new);
}

// Unnormalised probability of score s under running max m (masked scores are -inf and weigh 0).
template <typename T>
LOOKFAST_HOST_DEVICE T weight(T s, T m) {
  return s == neg_inf<T>() ? T(0) : exp_(s - m);
}

// Final normalisation: multiply the accumulator by this. A query that sees no key gets 0 (its output is 0); one that
// sees keys whose scores are all -inf gets NaN, as softmax's 0 / 0 (its sum is 0 too).
template <typename T>
LOOKFAST_HOST_DEVICE T inv_sum(T l, bool sees_keys) {
  return l > T(0) ? T(1) / l : (sees_keys ? std::numeric_limits<T>::quiet_NaN() : T(0));
}

// Natural log-sum-exp of the scores from the running max and sum; -inf for a query that saw no key (or only -inf
// scores), NaN when a NaN or +inf score made the sum NaN (as torch.logsumexp).
template <typename T>
LOOKFAST_HOST_DEVICE T log_sum_exp(T m, T l) {
  return l == T(0) ? neg_inf<T>() : m + log_(l);
}

}  // namespace online_softmax
}  // namespace lookfast
