#pragma once
// The weight side of oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm) for 16-bit GEMMs C = A . W^T with W
// (D, K) row-major: W packed once per call (topk_patch_gather's embedding) or once per model (packed_linear) into
// column slabs of kBlockN in the layout brgemm_layout.h names, and the block shape the callers tile C with.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/transpose16.h"

namespace lookfast {
namespace brgemm_pack {

// Rows of A (16-bit) per micro-kernel call padded to a multiple of this depth: 64 bytes, the AMX tile's bf16 depth.
constexpr int64_t kDepthMultiple = 32;
inline int64_t padded_depth(int64_t k) { return (k + kDepthMultiple - 1) / kDepthMultiple * kDepthMultiple; }

constexpr int64_t kBlockM = 64, kBlockN = 64;  // one micro-kernel call: a 64 x 64 fp32 block of C, all of K

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LF_HAVE_TRANSPOSE16 1
// words[q * ldw + j] = pair q of row j (the 32-bit word at rows + j * k + 2q) for j < 16 and q in whole tiles of 16
// below `pairs`: 16 x 16 word tiles transposed in registers (a scalar per-word copy took as long as a small GEMM).
// Returns the number of pairs done (a multiple of 16); the caller copies the rest. Call only on a CPU with AVX-512F.
__attribute__((target("avx512f"))) inline int64_t transpose_pair_tiles(const uint16_t* rows, int64_t k, int64_t pairs,
                                                                uint32_t* words, int64_t ldw) {
  int64_t q0 = 0;
  for (; q0 + 16 <= pairs; q0 += 16) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(rows + j * k + 2 * q0);
    transpose16x16_32(r);
    for (int q = 0; q < 16; ++q) _mm512_storeu_si512(words + (q0 + q) * ldw, r[q]);
  }
  return q0;
}
#else
#define LF_HAVE_TRANSPOSE16 0
inline int64_t transpose_pair_tiles(const uint16_t*, int64_t, int64_t, uint32_t*, int64_t) { return 0; }
#endif

// weight (D, K) -> B = weight^T (K_pad, D) as the micro-kernel reads it, in one contiguous slab per block of
// kBlockN output columns (the slab of columns n0..n0+w-1 at offset n0 * K_pad, leading dimension w): element
// (k, j) of a slab at ((k / 2) * w + j) * 2 + k % 2 in VNNI-2 (the operand order of vdpbf16ps and AMX tiles), at
// k * w + j row-major; rows K..K_pad-1 are zeros. Slabs rather than one (K, D) matrix, whose D-wide rows put each
// AMX tile row of B in another 3 KB row: with unpadded K (588) the slabs alone made the micro-kernel calls ~3x
// faster (Sapphire Rapids, G1's shape, best of 60 alternating calls); with K padded (embed_row_stride) the two
// layouts measured within noise, and the slabs stay. Built in 16 x 16 tiles of 32-bit pairs (a per-element loop
// scattered every write to its own cache line and cost as much as the GEMM), transposed in registers on AVX-512
// (a whole call on a one-patch input, i.e. mostly this repack of a 768 x 588 weight: 370 -> 283 us, medians of 500
// alternating calls in one process). topk_patch_gather repacks per call (a few percent of G1's time, about as much
// as the GEMM at LookWhere's 274 rows; a cache keyed on the weight's address and version would go stale when the
// weight is edited through `.data`, which bumps no version); packed_linear packs once, when the model asks.
inline at::Tensor pack_b_slabs(const at::Tensor& weight2d, int64_t k_pad, bool vnni) {
  const int64_t d = weight2d.size(0), k = weight2d.size(1);
  const at::Tensor w = weight2d.contiguous();
  at::Tensor out = at::empty({d * k_pad}, w.options());
  const uint16_t* src = static_cast<const uint16_t*>(w.const_data_ptr());
  uint16_t* dst = static_cast<uint16_t*>(out.mutable_data_ptr());
  const int64_t slabs = (d + kBlockN - 1) / kBlockN;
#if LF_HAVE_TRANSPOSE16
  static const bool avx512 = __builtin_cpu_supports("avx512f");
#else
  constexpr bool avx512 = false;
#endif
  at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slab = s0; slab < s1; ++slab) {
      const int64_t n0 = slab * kBlockN, width = std::min(kBlockN, d - n0);
      uint16_t* base = dst + n0 * k_pad;
      constexpr int64_t kTile = 16;
      if (vnni) {
        uint32_t* words = reinterpret_cast<uint32_t*>(base);  // (K_pad / 2, width) pairs
        const int64_t full = k / 2, pairs = k_pad / 2;      // pairs of two weights; then (w[K-1], 0) if K is odd
        for (int64_t j0 = 0; j0 < width; j0 += kTile) {
          const int64_t j1 = std::min(width, j0 + kTile);
          int64_t q_done = 0;  // full 16 x 16 tiles of pairs: register transposes where the CPU has AVX-512
          if (j1 - j0 == kTile && avx512) q_done = transpose_pair_tiles(src + (n0 + j0) * k, k, full, words + j0, width);
          for (int64_t q0 = q_done; q0 < full; q0 += kTile) {
            const int64_t q1 = std::min(full, q0 + kTile);
            for (int64_t j = j0; j < j1; ++j) {
              const uint16_t* row = src + (n0 + j) * k;
              for (int64_t q = q0; q < q1; ++q) std::memcpy(words + q * width + j, row + 2 * q, 4);
            }
          }
          for (int64_t j = j0; j < j1; ++j) {
            for (int64_t q = full; q < pairs; ++q)
              words[q * width + j] = (q == full && k % 2) ? uint32_t(src[(n0 + j) * k + k - 1]) : 0u;
          }
        }
      } else {
        for (int64_t j0 = 0; j0 < width; j0 += kTile) {
          for (int64_t q0 = 0; q0 < k_pad; q0 += kTile) {
            for (int64_t j = j0; j < std::min(width, j0 + kTile); ++j) {
              const uint16_t* row = src + (n0 + j) * k;
              for (int64_t q = q0; q < std::min(k_pad, q0 + kTile); ++q) base[q * width + j] = q < k ? row[q] : 0;
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace brgemm_pack
}  // namespace lookfast
