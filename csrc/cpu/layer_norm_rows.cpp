// CPU kernel of layer_norm_rows (lookfast/ops/layer_norm_rows.py): y[r, :] = (x[r, :] - mean) / sqrt(var + eps) over
// each row of a (N, C) matrix, no affine (the fused models fold it into the next projection), each output rounded
// once to x's dtype: float64 math for float64 and float32 rows (statistics and outputs), float32 for bf16/fp16 rows
// (their per-row mean, variance and 1/sqrt in float64, rounded once).
//
// Roofline (Dyn-Perceiver reg800m z->x, bf16, 16 images at 56x56: N 50176 rows of C 64): 6.4 MB read, 6.4 MB
// written, ~5 flops per element: memory-bound. Each row is read three times (sum, centred sum of squares, output)
// straight from the input, the second and third from L1. torch's LayerNorm on the same bf16 rows took ~3.5x a copy
// of them (per-row set-up around rows this short), this kernel ~1.8x (bf16 (50176, 64): 2.6 ms against 5.4, a
// copy 1.5; Intel Xeon with AMX, 1 thread, medians of alternating calls in one process).
//
// Two passes for the statistics (mean, then the centred sum of squares) rather than one-pass sums: the same cost
// here (the row is in L1) and no cancellation when |mean| >> std. fp16 rows are widened once into a float block
// first (no vector fp16 conversion in the portable clone).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/lowp_convert.h"
#include "cpu/vector_math.h"

namespace lookfast {
namespace layer_norm_rows {
namespace {

using at::Tensor;
using namespace cpu_vec;

// Sum of the lanes as a tree (log2(VL) shuffle + add steps): a lane-by-lane chain would be VL dependent adds, the
// largest cost of a 64-element row.
template <typename acc_t>
LF_INLINE acc_t hsum(typename Vec<acc_t>::type v) {
  if constexpr (Vec<acc_t>::size == 16) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
  } else {
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0);
  }
  return v[0];
}

// sum over the row of (x - shift), or of its square.
template <typename scalar_t, typename acc_t>
LF_INLINE acc_t row_sum(const scalar_t* x, int64_t c, acc_t shift, bool square) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  const V m = vbroadcast(shift);
  V s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + 2 * VL <= c; j += 2 * VL) {
    const V a = load_lanes<scalar_t, acc_t>(x + j) - m, b = load_lanes<scalar_t, acc_t>(x + j + VL) - m;
    s0 += square ? a * a : a;
    s1 += square ? b * b : b;
  }
  for (; j + VL <= c; j += VL) {
    const V a = load_lanes<scalar_t, acc_t>(x + j) - m;
    s0 += square ? a * a : a;
  }
  acc_t total = hsum<acc_t>(s0 + s1);
  for (; j < c; ++j) {
    const acc_t a = widen<scalar_t, acc_t>(x[j]) - shift;
    total += square ? a * a : a;
  }
  return total;
}

// Rows are normalised kRowBlock at a time: first the statistics of every row of the block, then the outputs. Per row
// the chain sum -> mean -> centred sum -> 1/sqrt is a few dozen cycles of latency against a few dozen instructions
// of work (C 64); a row-at-a-time loop waited on it (half the kernel's time in the scalar add, divide and square
// root), while rows of a block are independent and overlap, and their square roots run as one vector op.
constexpr int64_t kRowBlock = 16;

// Rows [0, n) (n <= kRowBlock) of x, stored as src_t (scalar_t, or float for fp16 rows widened first), into y.
template <typename src_t, typename scalar_t, typename acc_t>
LF_INLINE void normalize_block(const src_t* x, int64_t ldx, scalar_t* y, int64_t n, int64_t c, double eps) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  // The per-row statistics in float64 for float32 rows (stat_t: the sums too): in float32 the mean of a short row
  // far from zero (C 3, |mean| >> std) carried a rounding that the variance and every output inherited, up to 2-4x
  // torch's own float32 error against a float64 truth on ~7% of random (7, 3) inputs. For every dtype the per-row
  // mean, variance and 1/sqrt are float64 scalars, each rounded once (in float32, sum * (1/c), sqrt and a division
  // rounded two or three times); a few scalar double ops per row cost nothing here.
  using stat_t = std::conditional_t<std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>, double, acc_t>;
  double mean[kRowBlock], rstd[kRowBlock];
  const double count = static_cast<double>(c);
  for (int64_t i = 0; i < n; ++i) {
    mean[i] = static_cast<double>(row_sum<src_t, stat_t>(x + i * ldx, c, stat_t(0), false)) / count;
    const double var = static_cast<double>(row_sum<src_t, stat_t>(x + i * ldx, c, static_cast<stat_t>(mean[i]), true));
    rstd[i] = 1.0 / std::sqrt(var / count + eps);
  }
  constexpr bool kVectorStore = std::is_same_v<src_t, scalar_t>;  // fp16 output: scalar rounding below
  for (int64_t i = 0; i < n; ++i) {
    const src_t* xr = x + i * ldx;
    scalar_t* yr = y + i * c;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<src_t, float>) {
      // float32 rows: (x - mean) * rstd in double, rounded once. In float32 its two roundings left wide rows
      // (C 1000) at up to 2.1x torch's own error against a float64 truth (torch's x * rstd - mean * rstd rounds
      // once but cancels badly when |mean| >> std); x - mean is exact in double. The loop vectorises (8 doubles).
      for (; j < c; ++j) yr[j] = static_cast<float>((static_cast<double>(xr[j]) - mean[i]) * rstd[i]);
      continue;
    }
    const acc_t m = static_cast<acc_t>(mean[i]), s = static_cast<acc_t>(rstd[i]);
    if constexpr (kVectorStore) {
      const V mv = vbroadcast(m), sv = vbroadcast(s);
      for (; j + VL <= c; j += VL) store_lanes<scalar_t, acc_t>(yr + j, (load_lanes<src_t, acc_t>(xr + j) - mv) * sv);
    }
    for (; j < c; ++j) yr[j] = narrow<scalar_t, acc_t>((widen<src_t, acc_t>(xr[j]) - m) * s);
  }
}

template <typename scalar_t>
LF_INLINE void normalize_rows_impl(const scalar_t* __restrict__ x, int64_t ldx, scalar_t* __restrict__ y, int64_t r0,
                                   int64_t r1, int64_t c, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<float> rows(std::is_same_v<scalar_t, at::Half> ? kRowBlock * c : 0);
  for (int64_t r = r0; r < r1; r += kRowBlock) {
    const int64_t n = std::min(kRowBlock, r1 - r);
    if constexpr (std::is_same_v<scalar_t, at::Half>) {
      // fp16 rows widened once into a float block (no vector fp16 conversion in the portable clone)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < c; ++j) rows[i * c + j] = static_cast<float>(x[(r + i) * ldx + j]);
      normalize_block<float, scalar_t, acc_t>(rows.data(), c, y + r * c, n, c, eps);
    } else {
      normalize_block<scalar_t, scalar_t, acc_t>(x + r * ldx, ldx, y + r * c, n, c, eps);
    }
  }
}

// One target-clone set per dtype (GCC's target_clones does not apply to templates).
#define LF_DEFINE_ROWS(scalar_t, name)                                                                           \
  LF_MULTIVERSION void name(const scalar_t* x, int64_t ldx, scalar_t* y, int64_t r0, int64_t r1, int64_t c,     \
                            double eps) {                                                                        \
    normalize_rows_impl<scalar_t>(x, ldx, y, r0, r1, c, eps);                                                    \
  }
LF_DEFINE_ROWS(double, normalize_rows_f64)
LF_DEFINE_ROWS(float, normalize_rows_f32)
LF_DEFINE_ROWS(at::BFloat16, normalize_rows_bf16)
LF_DEFINE_ROWS(at::Half, normalize_rows_f16)
#undef LF_DEFINE_ROWS

void normalize_rows(const double* x, int64_t ldx, double* y, int64_t r0, int64_t r1, int64_t c, double eps) {
  normalize_rows_f64(x, ldx, y, r0, r1, c, eps);
}
void normalize_rows(const float* x, int64_t ldx, float* y, int64_t r0, int64_t r1, int64_t c, double eps) {
  normalize_rows_f32(x, ldx, y, r0, r1, c, eps);
}
void normalize_rows(const at::BFloat16* x, int64_t ldx, at::BFloat16* y, int64_t r0, int64_t r1, int64_t c,
                    double eps) {
  normalize_rows_bf16(x, ldx, y, r0, r1, c, eps);
}
void normalize_rows(const at::Half* x, int64_t ldx, at::Half* y, int64_t r0, int64_t r1, int64_t c, double eps) {
  normalize_rows_f16(x, ldx, y, r0, r1, c, eps);
}

Tensor layer_norm_rows_cpu(const Tensor& x, double eps) {
  TORCH_CHECK(x.dim() == 2, "layer_norm_rows: x must be (N, C), got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "layer_norm_rows: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm_rows: eps must be finite and >= 0, got ", eps);
  // Rows may be any distance apart (a channels-last pixel view has them C apart); elements within a row adjacent.
  const Tensor src = x.stride(1) == 1 || x.size(1) <= 1 ? x : x.contiguous();
  const int64_t n = src.size(0), c = src.size(1), ldx = n > 1 ? src.stride(0) : c;
  Tensor out = at::empty({n, c}, src.options());
  if (n == 0 || c == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "layer_norm_rows_cpu", [&] {
    const scalar_t* xp = src.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / c);
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) { normalize_rows(xp, ldx, yp, r0, r1, c, eps); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) { m.impl("layer_norm_rows", &layer_norm_rows_cpu); }

}  // namespace layer_norm_rows
}  // namespace lookfast
