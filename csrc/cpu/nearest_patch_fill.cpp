// CPU kernel of nearest_patch_fill (lookfast/ops/nearest_patch_fill.py): every cell of a G x G grid takes the
// inverse-distance-weighted mean of the values of its K nearest kept patches, written channels first.
//
// Roofline (LookWhere seg, 1036 px: G 74, k 274, C 150, K 5, per image): the neighbour search scans the kept patches
// of the grid rows near each cell (rows bucketed, outward until the row distance alone rules a row out: ~1/6 of the
// 274 here, ~0.25 M integer key updates instead of 5476 * 274 = 1.5 M, compute-bound on compares); the weighted
// sum reads K value rows of C per cell from a (k, C) table that stays in L1/L2 (k*C*2 = 82 KB in bf16) and does
// 5476 * 5 * 150 = 4.1 M FMAs into fp32; the output write is G*G*C elements (1.6 MB bf16). A few ms in all, against
// a ~300 ms segmentation forward; the Python formulation it replaces built a (G*G, k) key table, a top-k over it,
// a (G*G, K, C) gather and an einsum (tens of ms).
//
// Neighbour order (the official rule): smaller Euclidean distance first; equal distances go to the earlier slot of
// the keep list. Both are exact here: the key d^2 * k + slot is an integer, distinct per cell.
// Weights: w = 1 / (d + 1e-8) in float32, normalised in float32, as the official code computes them; the sum runs
// in float32 for float32/bf16/fp16 values (float64 for float64) and is rounded once to the values' dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lookfast {
namespace nearest_patch_fill {
namespace {

using at::Tensor;

constexpr int64_t kMaxNeighbours = 16;
constexpr float kEps = 1e-8f;

struct Neighbours {
  int64_t count = 0;               // valid entries
  int64_t key[kMaxNeighbours];     // d^2 * k + slot, ascending
};

// Keeps the `want` smallest keys seen, ascending (insertion into a tiny sorted array; most keys fail the first test).
inline void offer(Neighbours& nb, int64_t want, int64_t key) {
  if (nb.count == want && key >= nb.key[want - 1]) return;
  int64_t i = nb.count < want ? nb.count++ : want - 1;
  while (i > 0 && nb.key[i - 1] > key) {
    nb.key[i] = nb.key[i - 1];
    --i;
  }
  nb.key[i] = key;
}

template <typename scalar_t>
void fill_image(const int64_t* keep, const scalar_t* values, scalar_t* out, int64_t n, int64_t k, int64_t c,
                int64_t grid, int64_t neighbours, int64_t row0, int64_t row1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cells = grid * grid;
  const int64_t want = std::min(neighbours, k);  // slots past n (ragged) keep weight 0, as in the Python fill
  const int64_t found = std::min(want, n);
  // The kept patches bucketed by grid row (column, slot), so a cell scans rows outward from its own and stops once
  // the row distance alone exceeds its current K-th best: ~(2r + 1) / G of the list instead of all of it.
  std::vector<int64_t> row_start(grid + 1, 0), row_col(n), row_slot(n);
  for (int64_t j = 0; j < n; ++j) ++row_start[keep[j] / grid + 1];
  for (int64_t r = 0; r < grid; ++r) row_start[r + 1] += row_start[r];
  {
    std::vector<int64_t> fillp(row_start.begin(), row_start.end() - 1);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = fillp[keep[j] / grid]++;
      row_col[at] = keep[j] % grid;
      row_slot[at] = j;
    }
  }
  const auto scan_row = [&](Neighbours& nb, int64_t rr, int64_t dr, int64_t col) {
    for (int64_t t = row_start[rr]; t < row_start[rr + 1]; ++t) {
      const int64_t dc = col - row_col[t];
      offer(nb, found, (dr * dr + dc * dc) * k + row_slot[t]);
    }
  };
  std::vector<acc_t> line(grid * c);  // one grid row of cells, (cell, channel), written out channels first
  for (int64_t r = row0; r < row1; ++r) {
    for (int64_t col = 0; col < grid; ++col) {
      Neighbours nb;
      if (found > 0) {
        scan_row(nb, r, 0, col);
        for (int64_t dr = 1; dr < grid; ++dr) {
          // every candidate at row distance >= dr has key >= dr^2 * k: none can enter a full list whose worst is below
          if (nb.count == found && dr * dr * k > nb.key[found - 1]) break;
          if (r - dr >= 0) scan_row(nb, r - dr, dr, col);
          if (r + dr < grid) scan_row(nb, r + dr, dr, col);
        }
      }
      float w[kMaxNeighbours];
      // The normaliser is summed in the order torch's CPU sum uses for a short row (4 interleaved partial sums,
      // then left to right), so these weights equal the official formulation's bit for bit.
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < found; ++i) {
        w[i] = 1.f / (std::sqrt(static_cast<float>(nb.key[i] / k)) + kEps);
        part[i % 4] += w[i];
      }
      const float total = ((part[0] + part[1]) + part[2]) + part[3];
      acc_t* acc = line.data() + col * c;
      std::fill(acc, acc + c, acc_t(0));
      for (int64_t i = 0; i < found; ++i) {
        const acc_t wi = static_cast<acc_t>(w[i] / total);
        const scalar_t* v = values + (nb.key[i] % k) * c;
        for (int64_t ch = 0; ch < c; ++ch) acc[ch] += wi * static_cast<acc_t>(v[ch]);
      }
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      scalar_t* dst = out + ch * cells + r * grid;
      for (int64_t col = 0; col < grid; ++col) dst[col] = static_cast<scalar_t>(line[col * c + ch]);
    }
  }
}

Tensor nearest_patch_fill_cpu(const Tensor& keep, const Tensor& values, int64_t grid,
                              const std::optional<Tensor>& lengths, int64_t neighbours) {
  TORCH_CHECK(keep.dim() == 2 && keep.scalar_type() == at::kLong, "nearest_patch_fill: keep must be (B, k) int64");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == keep.size(0) && values.size(1) == keep.size(1),
              "nearest_patch_fill: values must be (B, k, C) with keep's B and k");
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), "nearest_patch_fill: values must be floating point");
  TORCH_CHECK(grid > 0, "nearest_patch_fill: grid must be positive, got ", grid);
  TORCH_CHECK(neighbours >= 1 && neighbours <= kMaxNeighbours, "nearest_patch_fill: neighbours must be in 1..",
              kMaxNeighbours, ", got ", neighbours);
  const int64_t b = keep.size(0), k = keep.size(1), c = values.size(2), cells = grid * grid;
  TORCH_CHECK(k <= (int64_t(1) << 62) / (2 * grid * grid + 1), "nearest_patch_fill: keep too long for exact keys");
  const Tensor kp = keep.contiguous();
  const Tensor vals = values.contiguous();
  std::vector<int64_t> count(b, k);
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == b && lengths->scalar_type() == at::kLong,
                "nearest_patch_fill: lengths must be (B,) int64");
    const Tensor len = lengths->contiguous();
    for (int64_t i = 0; i < b; ++i) {
      count[i] = len.const_data_ptr<int64_t>()[i];
      TORCH_CHECK(count[i] >= 0 && count[i] <= k, "nearest_patch_fill: lengths must be in 0..", k);
    }
  }
  const int64_t* ids = kp.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < count[i]; ++j) {
      TORCH_CHECK(ids[i * k + j] >= 0 && ids[i * k + j] < cells, "nearest_patch_fill: keep id ", ids[i * k + j],
                  " out of range 0..", cells - 1);
    }
  }
  Tensor out = at::empty({b, c, grid, grid}, values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "nearest_patch_fill_cpu", [&] {
    const scalar_t* v = vals.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Work items: (image, grid row); a row is ~G * k key updates and G * K * C FMAs.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, grid * (k + c)));
    at::parallel_for(0, b * grid, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1;) {
        const int64_t img = i / grid, r0 = i % grid;
        const int64_t r1 = std::min(grid, r0 + (i1 - i));
        fill_image<scalar_t>(ids + img * k, v + img * k * c, o + img * c * cells, count[img], k, c, grid, neighbours,
                             r0, r1);
        i += r1 - r0;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) { m.impl("nearest_patch_fill", &nearest_patch_fill_cpu); }

}  // namespace nearest_patch_fill
}  // namespace lookfast
