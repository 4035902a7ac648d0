#pragma once
// Confidence of one row of logits, shared by the CPU and CUDA kernels of exit_compact (so the CPU tests cover the
// math the GPU runs).
//
// RowStats is an online (one-pass, mergeable) summary of a row x_1..x_C:
//   m1 = max x, m2 = second largest x (counting ties: two equal maxima give m2 == m1),
//   s  = sum_j exp(x_j - m1),   t = sum_j exp(x_j - m1) * (x_j - m1)
// from which every criterion follows without a second pass:
//   max softmax probability  p1      = 1 / s
//   entropy of softmax       H       = log(s) - t / s
//   margin                   p1 - p2 = (1 - exp(m2 - m1)) / s      (one class: p2 = 0, margin = 1)
// A NaN logit (or +inf, as softmax gives NaN there) makes s NaN, hence the confidence NaN, and NaN never exits
// because every comparison with NaN is false. A -inf logit is a class of probability 0 and adds nothing (also to
// the entropy, where 0 * log 0 is taken as 0). A row of only -inf has no softmax: its confidence is NaN.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace lookfast {

enum ExitCriterion : int64_t { kMaxSoftmax = 0, kEntropy = 1, kMargin = 2 };

template <typename acc_t>
struct RowStats {
  acc_t m1, m2, s, t;

  LOOKFAST_HOST_DEVICE static RowStats empty() {
    RowStats r;
    r.m1 = -INFINITY;
    r.m2 = -INFINITY;
    r.s = 0;
    r.t = 0;
    return r;
  }

  // Rescale (s, t) from reference max `from` to a larger `to`: exp(x - to) = a * exp(x - from) with
  // a = exp(from - to), and (x - to) = (x - from) + (from - to).
  LOOKFAST_HOST_DEVICE void rebase(acc_t to) {
    if (s > 0) {
      const acc_t d = m1 - to;
      const acc_t a = std::exp(d);
      t = a * (t + d * s);
      s = a * s;
    }
    m1 = to;
  }

  LOOKFAST_HOST_DEVICE void push(acc_t x) {
    if (x > m1) {
      m2 = m1;
      rebase(x);
    } else if (x > m2) {
      m2 = x;
    }
    if (x == -INFINITY) return;  // a class of probability 0 adds nothing (and -inf - m1 may be NaN)
    const acc_t d = x - m1;
    const acc_t e = std::exp(d);  // NaN for a NaN x, or for x == m1 == +inf: poisons s, as softmax would
    s += e;
    t += e * d;
  }

  // Combine with the summary of another part of the same row (the CUDA kernels reduce per-thread parts).
  LOOKFAST_HOST_DEVICE void merge(const RowStats& o) {
    const acc_t hi = m1 > o.m1 ? m1 : o.m1;
    const acc_t lo = m1 > o.m1 ? o.m1 : m1;  // equal maxima: lo == hi, a tie, so m2 == m1
    acc_t second = m2 > o.m2 ? m2 : o.m2;
    second = lo > second ? lo : second;
    RowStats b = o;
    rebase(hi);
    b.rebase(hi);
    s += b.s;  // a NaN part stays NaN (rebase leaves a NaN s alone)
    t += b.t;
    m2 = second;
  }

  LOOKFAST_HOST_DEVICE acc_t confidence(int64_t criterion) const {
    if (!(m1 > -INFINITY)) return NAN;  // empty row or only -inf (or a NaN max)
    switch (criterion) {
      case kEntropy:
        return std::log(s) - t / s;
      case kMargin:
        return (acc_t(1) - std::exp(m2 - m1)) / s;
      default:
        return acc_t(1) / s;
    }
  }
};

// Whether a sample with confidence `conf` leaves at this exit. NaN never does (every comparison is false).
template <typename acc_t>
LOOKFAST_HOST_DEVICE bool exit_passes(acc_t conf, acc_t threshold, int64_t criterion) {
  return criterion == kEntropy ? conf <= threshold : conf >= threshold;
}

// Confidence of a row given by a pointer and an element stride (the CPU path; the CUDA path merges per-thread
// RowStats instead).
template <typename scalar_t, typename acc_t>
LOOKFAST_HOST_DEVICE acc_t row_confidence(const scalar_t* row, int64_t stride, int64_t classes, int64_t criterion) {
  RowStats<acc_t> st = RowStats<acc_t>::empty();
  for (int64_t j = 0; j < classes; ++j) st.push(static_cast<acc_t>(row[j * stride]));
  return st.confidence(criterion);
}

}  // namespace lookfast
