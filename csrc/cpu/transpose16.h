// In-register transpose of a 16x16 matrix of 32-bit elements for the AVX-512 kernels (varlen_attention's
// hand-written bf16 kernel and its brgemm kernel): r[i] holds row i; afterwards r[i] holds column i. Unpacks within
// 128-bit lanes, then lane shuffles: 64 shuffles per 256 elements. Callers compile with AVX-512 (a superset of this
// function's target), and only run where the CPU has it.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace lookfast {

__attribute__((target("avx512f"))) inline __attribute__((always_inline)) void transpose16x16_32(
    __m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs, per 128-bit lane
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {  // u[4g + c], lane L: column 4L + c of rows 4g..4g+3
    r[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    t[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace lookfast

#endif
