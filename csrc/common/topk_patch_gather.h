#pragma once
// Math of the top-k patch gather shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda), so the CPU
// tests exercise exactly the ordering and addressing the GPU runs.
#include <cstdint>

#include "common/macros.h"

namespace lookfast {
namespace topk_patch_gather {

// NaN test that survives -ffast-math style flags and needs no <cmath> on the device.
template <typename T>
LOOKFAST_HOST_DEVICE bool is_nan(T x) {
  return !(x == x);
}

// The selection order (docs/ops.md section 1): score a (at index ia) comes before score b (at index ib) when it is
// larger; equal scores go to the lower index; NaN ranks below every number, and NaNs among themselves by index.
// This is a strict total order over (score, index) pairs, so ranks under it are a permutation of 0..N-1.
template <typename T>
LOOKFAST_HOST_DEVICE bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool a_nan = is_nan(a);
  const bool b_nan = is_nan(b);
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return ia < ib;
    return b_nan;  // exactly one is NaN: the number comes first
  }
  if (a > b) return true;
  if (a < b) return false;
  return ia < ib;
}

// Where one selected patch lives: patch `index` of a grid with `grid_w` columns starts at pixel (row0, col0).
struct PatchOrigin {
  int64_t row0;
  int64_t col0;
};

LOOKFAST_HOST_DEVICE PatchOrigin patch_origin(int64_t index, int64_t grid_w, int64_t patch) {
  return PatchOrigin{(index / grid_w) * patch, (index % grid_w) * patch};
}

// Element offset (in elements, for arbitrary strides) of pixel e of a flattened (C, p, p) patch, relative to the
// image's base pointer. `e` runs over 0..C*p*p-1 in the (c, i, j) order of conv2d's weight.reshape(D, -1).
LOOKFAST_HOST_DEVICE int64_t patch_pixel_offset(int64_t e, PatchOrigin o, int64_t patch, int64_t stride_c,
                                                 int64_t stride_h, int64_t stride_w) {
  const int64_t pp = patch * patch;
  const int64_t c = e / pp;
  const int64_t rem = e - c * pp;
  const int64_t i = rem / patch;
  const int64_t j = rem - i * patch;
  return c * stride_c + (o.row0 + i) * stride_h + (o.col0 + j) * stride_w;
}

// Image that packed row `row` belongs to, given cu_seqlens (num_images + 1 cumulative counts starting at 0):
// the b with cu[b] <= row < cu[b + 1]. Binary search, so it works for any batch size on CPU and GPU alike.
LOOKFAST_HOST_DEVICE int64_t image_of_row(const int32_t* cu_seqlens, int64_t num_images, int64_t row) {
  int64_t lo = 0, hi = num_images;  // invariant: cu[lo] <= row < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_seqlens[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace topk_patch_gather
}  // namespace lookfast
