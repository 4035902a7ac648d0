#pragma once
// Which layout of B oneDNN's brgemm micro-kernel (torch's at::native::cpublas::brgemm with is_vnni = true) takes for
// 16-bit operands on this CPU. It depends on the CPU, not only on the dtype: bf16 on AVX512-BF16 and AMX, and fp16 on
// AMX-FP16, take B in VNNI-2 (the (k, k+1) pairs of a column side by side, the operand order of vdpbf16ps and AMX
// tiles); fp16 on AVX512-FP16 without AMX-FP16 (Sapphire Rapids) takes B row-major, as is, and multiplies with
// fp32 accumulation. A kernel that packs VNNI-2 without asking gets wrong products there, so every user of the
// micro-kernel asks this first.
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace lookfast {

enum class BrgemmLayout { kNone, kVnni2, kRowMajor };

namespace brgemm_detail {

// C (2 x 16) = A (2 x 4) · B (4 x 16), B stored in `layout`, with small integers whose products and sums are exact
// in float32 and whose result changes with the layout. False when torch raises (no micro-kernel) or C is wrong.
template <typename T>
bool multiplies_in(BrgemmLayout layout) {
  constexpr int M = 2, N = 16, K = 4;
  T a[M * K], b[K * N];
  float c[M * N], want[M * N], bf[K][N];
  for (int i = 0; i < M * K; ++i) a[i] = T(static_cast<float>(i + 1));
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) {
      bf[k][n] = static_cast<float>((k * 5 + n * 3) % 7 - 3);
      b[layout == BrgemmLayout::kVnni2 ? ((k / 2) * N + n) * 2 + k % 2 : k * N + n] = T(bf[k][n]);
    }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += static_cast<float>(a[m * K + k]) * bf[k][n];
      want[m * N + n] = s;
      c[m * N + n] = -1234.f;
    }
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, /*is_vnni=*/true);
    at::native::cpublas::brgemm_release(true);
  } catch (const c10::Error&) {
    return false;
  }
  return std::memcmp(c, want, sizeof(c)) == 0;
}

}  // namespace brgemm_detail

// The layout B must have for cpublas::brgemm(..., is_vnni = true) with T (at::BFloat16 or at::Half) operands on this
// CPU, probed once per type; kNone where there is no micro-kernel for T (torch raises) or neither layout gives the
// right product.
template <typename T>
BrgemmLayout brgemm_b_layout() {
  static const BrgemmLayout layout = [] {
    if (brgemm_detail::multiplies_in<T>(BrgemmLayout::kVnni2)) return BrgemmLayout::kVnni2;
    if (brgemm_detail::multiplies_in<T>(BrgemmLayout::kRowMajor)) return BrgemmLayout::kRowMajor;
    return BrgemmLayout::kNone;
  }();
  return layout;
}

// brgemm_b_layout, or kNone when the user switched oneDNN off (torch.backends.mkldnn.enabled = False): the kernels
// built on the micro-kernel then take their portable paths, as torch's own oneDNN users do.
template <typename T>
BrgemmLayout enabled_brgemm_b_layout() {
  return at::globalContext().userEnabledMkldnn() ? brgemm_b_layout<T>() : BrgemmLayout::kNone;
}

}  // namespace lookfast
