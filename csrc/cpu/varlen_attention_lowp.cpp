// bfloat16 variable-length attention, forward and backward, with every product on the bf16 dot-product unit
// (AVX512-BF16 `vdpbf16ps`: 32 bf16 products summed pairwise into 16 float32 lanes per instruction).
//
// Roofline (one (sample, head), Lq queries, Lk keys, head dims Dh/Dv): forward 2*Lq*Lk*(Dh+Dv) FLOPs against
// 2*(Lq*(Dh+Dv) + Lk*(Dh+Dv)) bytes; backward 2.5x the FLOPs (five GEMMs to two). For the models' shapes (Lk 49..577,
// Dh 8..64) that is 10..100 FLOP/byte with everything but Q streaming from L1/L2, so the bound is the dot unit (2x the
// float32 FMA rate on Zen 4/5 and Sapphire Rapids) plus the float32 softmax (exp2 per score) that small head dims
// cannot hide. Measured on the A4 shape (2683 tokens, 12 heads, Dh 64, 1 thread, Zen 5, CPU time on a shared
// machine, indicative): forward ~8 ms, backward ~16 ms, backward/forward 1.9-2.1 (2.3-2.7 when the backward wrote
// transposed copies of P and dS with scalar stores). Of the backward, the five GEMMs take ~60% (about the rate of the
// forward's), the exp2/dS pass ~20%, and first-touch memory the rest: K, V, O, dO and Q read once per (sample, head)
// as slices of rows H heads long, dq/dk/dv written into fresh pages.
//
// Precision contract (bf16 stored, float32 everywhere else): Q·Kᵀ, P·V, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q and dS·K multiply bf16
// operands exactly and accumulate in float32; softmax max/sum/lse, delta = rowsum(dO*O), dS = P*(dP - delta) and the
// output/gradient accumulators are float32; P and dS are rounded to bf16 once as GEMM operands (as FlashAttention and
// torch's CPU flash attention do); outputs and gradients are rounded to bf16 once at the end.
// NaN in q/k/v/dout propagates to the affected rows (exp2 keeps NaN); a masked (-inf) score weighs exactly 0.
//
// Layout: operands of C += A·B are A = bf16 rows read as uint32 pairs along the reduction, B = "VNNI" pairs:
// B32[p][j] = (B[2p][j], B[2p+1][j]) with columns padded to 16 (zero), C float32 with 16-padded rows. K and V of one
// (sample, kv-head) are packed once per work item in the layouts their three products need. The backward computes
// dVᵀ += dOᵀ·P and dKᵀ += Qᵀ·dS into transposed float32 accumulators, so P and dS are B operands (VNNI pairs of query
// rows, written by the elementwise pass from its registers) and dO, Q are A operands read from their VNNI packing with
// a pair stride: nothing is transposed per tile; dK and dV leave through 16x16 register transposes once per item.
#include "cpu/varlen_attention_lowp.h"

#include "cpu/cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/varlen_attention.h"
#include "cpu/transpose16.h"
#include "cpu/vector_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 intrinsics pass an "undefined" vector to their masked builtins and then warn that it may be used
// uninitialized at every inlined call (GCC bug 105593, fixed in 13); the warning is about the header's own code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define LF_HAVE_DOT_KERNEL 1
#define LF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#else
#define LF_HAVE_DOT_KERNEL 0
#endif

namespace lookfast {
namespace varlen_lowp {

bool use_dot_kernel(at::ScalarType dtype, int64_t head_dim) {
  if (dtype != at::kBFloat16 || head_dim < kMinDotHeadDim) return false;
  const char* isa = std::getenv("LOOKFAST_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
#if LF_HAVE_DOT_KERNEL
  return cpu_has_avx512bf16();
#else
  return false;
#endif
}

#if LF_HAVE_DOT_KERNEL
namespace {

using cpu_vec::Vec;
typedef Vec<float>::type VF;  // 16 float32 lanes (GCC vector extension, same layout as __m512)

constexpr float kLog2e = 1.4426950408889634f;  // scores are scaled into the log2 domain: p = exp2(s2 - max2)
constexpr int kTileQ = 32;      // queries per tile (rows of the score block)
constexpr int kKeyBlock = 256;  // keys per score block: S and P of one tile stay in L1/L2 (32 KiB float32)

inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct Buf {
  T* data;
  explicit Buf(int64_t n) : data(static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 16), std::align_val_t(64)))) {}
  ~Buf() { ::operator delete[](data, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void zero(int64_t n) { std::memset(data, 0, sizeof(T) * n); }
};

// ------------------------------------------------------------------------------------------------ GEMM
// C[R x 16*NV] (+)= A[R x 2*K2] · B: R x NV float32 accumulators in registers, one broadcast pair of A per row and
// one 32-pair vector of B per column block each step. A's pair p of row r is a[r * lda + p * lap]: lap 1 for A stored
// by rows, lap = its row length for A stored as a VNNI B operand (the backward's Qᵀ and dOᵀ, read with no transpose).
template <int R, int NV>
LF_BF16_TARGET inline __attribute__((always_inline)) void dot_block(int64_t K2, const uint32_t* a, int64_t lda,
                                                                    int64_t lap, const uint32_t* b, int64_t ldb,
                                                                    float* c, int64_t ldc, bool accumulate) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) acc[r][t] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * t) : _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) bv[t] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * t);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + p * lap]));
#pragma GCC unroll 4
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], av, bv[t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) _mm512_storeu_ps(c + r * ldc + 16 * t, acc[r][t]);
}

template <int R>
LF_BF16_TARGET inline __attribute__((always_inline)) void dot_rows(int64_t N, int64_t K2, const uint32_t* a,
                                                                   int64_t lda, int64_t lap, const uint32_t* b,
                                                                   int64_t ldb, float* c, int64_t ldc,
                                                                   bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) dot_block<R, 4>(K2, a, lda, lap, b + j, ldb, c + j, ldc, accumulate);
  switch ((N - j) / 16) {
    case 3: dot_block<R, 3>(K2, a, lda, lap, b + j, ldb, c + j, ldc, accumulate); break;
    case 2: dot_block<R, 2>(K2, a, lda, lap, b + j, ldb, c + j, ldc, accumulate); break;
    case 1: dot_block<R, 1>(K2, a, lda, lap, b + j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

// C[M x N] (+)= A[M x 2*K2] · B for N a multiple of 16 (B and C padded to it); A's pair p of row r at a[r*lda + p*lap].
LF_BF16_TARGET void dot_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t lda, int64_t lap,
                             const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dot_rows<4>(N, K2, a + i * lda, lda, lap, b, ldb, c + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: dot_rows<3>(N, K2, a + i * lda, lda, lap, b, ldb, c + i * ldc, ldc, accumulate); break;
    case 2: dot_rows<2>(N, K2, a + i * lda, lda, lap, b, ldb, c + i * ldc, ldc, accumulate); break;
    case 1: dot_rows<1>(N, K2, a + i * lda, lda, lap, b, ldb, c + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------------ vector helpers
// Masks of the first n of 16 / 32 lanes (n clamped to [0, 16] / [0, 32]).
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// n <= 16 bf16 widened to float32 (lanes past n are 0).
LF_BF16_TARGET inline __attribute__((always_inline)) __m512 load_bf16(const void* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask16(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bf16 bits, rounded to nearest even with NaN -> 0x7FC0: exactly c10::BFloat16(float), which the outputs
// have always used (vcvtneps2bf16 flushes subnormals, so it only rounds GEMM operands).
LF_BF16_TARGET inline __attribute__((always_inline)) __m256i round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
// The first n <= 16 lanes of x stored as bf16 (c10 rounding).
LF_BF16_TARGET inline __attribute__((always_inline)) void store_out(c10::BFloat16* dst, __m512 x, int64_t n) {
  _mm256_mask_storeu_epi16(dst, mask16(n), round_bf16(x));
}

// Two float32 rows (16 columns each) as 16 VNNI pairs (bf16(lo[j]), bf16(hi[j])): the B operand layout, written
// straight from the registers that computed them (no transposed copy).
// interleave_rows takes the two rows as the 16 + 16 bf16 of one _mm512_cvtne2ps_pbh(hi, lo).
LF_BF16_TARGET inline __attribute__((always_inline)) __m512i interleave_rows(__m512i lo_hi) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, lo_hi);
}
LF_BF16_TARGET inline __attribute__((always_inline)) __m512i vnni_pairs(__m512 lo, __m512 hi) {
  return interleave_rows((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Prefetch n rows of `cols` bf16 (row stride `stride`): hint _MM_HINT_T0 (L1) or _MM_HINT_T1 (L2).
template <int Hint>
inline void prefetch_rows(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t cols) {
  for (int64_t r = 0; r < n; ++r) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(src + r * stride) & ~uintptr_t(63);
    const uintptr_t e = reinterpret_cast<uintptr_t>(src + r * stride + cols);
    for (uintptr_t l = a; l < e; l += 64) _mm_prefetch(reinterpret_cast<const char*>(l), static_cast<_mm_hint>(Hint));
  }
}

// ------------------------------------------------------------------------------------------------ packing
inline int64_t pairs(int64_t n) { return (n + 1) / 2; }

// A operand: rows of `cols` bf16 (stride `stride` in the input) into rows of ld16 = 2*ceil(cols/2) bf16 (zero pad).
void pack_a(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst) {
  const int64_t ld = up(cols, 2);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld, src + r * stride, sizeof(uint16_t) * cols);
    if (ld != cols) dst[r * ld + cols] = 0;
  }
}

// B operand of X·Yᵀ for Y (n rows of `cols`): B32[p][j] = (Y[j][2p], Y[j][2p+1]), p < ceil(cols/2), j < ldb (0 past
// n): the transpose of Y read as 32-bit pairs, done 16 rows x 16 pairs at a time in registers.
LF_BF16_TARGET void pack_bt(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t cols, int64_t ldb,
                            uint32_t* dst) {
  const int64_t c2 = pairs(cols), n16 = up(n, 16);
  if (ldb > n16)
    for (int64_t p = 0; p < c2; ++p) std::memset(dst + p * ldb + n16, 0, sizeof(uint32_t) * (ldb - n16));
  for (int64_t j0 = 0; j0 < n16; j0 += 16) {
    for (int64_t p0 = 0; p0 < c2; p0 += 16) {
      const __mmask32 m = mask32(cols - 2 * p0);  // an odd last column gets a 0 partner
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_epi16(m, src + (j0 + i) * stride + 2 * p0) : _mm512_setzero_si512();
      transpose16x16_32(r);
      const int64_t np = std::min<int64_t>(16, c2 - p0);
      for (int64_t i = 0; i < np; ++i) _mm512_storeu_si512(dst + (p0 + i) * ldb + j0, r[i]);
    }
  }
}

// B operand of X·Y for Y (n rows of `cols`): B32[p][c] = (Y[2p][c], Y[2p+1][c]) for p < rows2 (rows >= n are 0),
// c < ldb (0 past cols).
LF_BF16_TARGET void pack_bn(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t cols, int64_t rows2,
                            int64_t ldb, uint32_t* dst) {
  for (int64_t p = 0; p < rows2; ++p) {
    uint32_t* d = dst + p * ldb;
    const int64_t r0 = 2 * p, r1 = 2 * p + 1;
    for (int64_t c = 0; c < ldb; c += 16) {
      const __mmask16 m = mask16(cols - c);
      const __m256i y0 = r0 < n ? _mm256_maskz_loadu_epi16(m, src + r0 * stride + c) : _mm256_setzero_si256();
      const __m256i y1 = r1 < n ? _mm256_maskz_loadu_epi16(m, src + r1 * stride + c) : _mm256_setzero_si256();
      const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(y0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(y1), 16));
      _mm512_mask_storeu_epi32(d + c, mask16(ldb - c), w);
    }
  }
}

// exp2 that keeps NaN (cpu_vec::vexp2 flushes everything below -125, NaN included, to 0).
LF_BF16_TARGET inline __attribute__((always_inline)) VF exp2_keep_nan(VF x) {
  const VF p = cpu_vec::vexp2(x);
  return x == x ? p : x;
}
LF_BF16_TARGET inline __attribute__((always_inline)) VF lane_index() {
  return VF{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}
LF_BF16_TARGET inline __attribute__((always_inline)) void store_bf16(uint16_t* dst, VF x) {
  const __m256bh h = _mm512_cvtneps_pbh((__m512)x);
  std::memcpy(dst, &h, 32);
}
LF_BF16_TARGET inline __attribute__((always_inline)) float hmax(VF x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
LF_BF16_TARGET inline __attribute__((always_inline)) float hsum(VF x) {
  return _mm512_reduce_add_ps((__m512)x);
}

// ------------------------------------------------------------------------------------------------ forward

LF_BF16_TARGET void forward_items(const Shape& s, const FwdItem* items, int64_t count, const c10::BFloat16* q,
                                  const c10::BFloat16* k, const c10::BFloat16* v, c10::BFloat16* out, float* lse,
                                  int64_t total_q) {
  const int64_t H = s.heads, Hk = s.kv_heads, Dh = s.head_dim, Dv = s.v_dim, group = H / Hk;
  const int64_t dh2 = up(Dh, 2) / 2, ldv = up(Dv, 16);
  int64_t max_lk = 0;
  for (int64_t i = 0; i < count; ++i) max_lk = std::max<int64_t>(max_lk, s.cu_k[items[i].b + 1] - s.cu_k[items[i].b]);
  const int64_t ldkt = up(std::max<int64_t>(max_lk, 1), 16);
  Buf<uint32_t> kt(dh2 * ldkt), vn((ldkt / 2) * ldv), qa(kTileQ * dh2), pa(kTileQ * kKeyBlock / 2);
  Buf<float> sc(kTileQ * kKeyBlock), acc(kTileQ * ldv);
  const float qs = static_cast<float>(s.scale) * kLog2e;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int64_t packed_b = -1, packed_kvh = -1, packed_ld = 0;
  for (int64_t it = 0; it < count; ++it) {
    const FwdItem w = items[it];
    const int64_t q0 = s.cu_q[w.b], k0 = s.cu_k[w.b];
    const int64_t len_q = s.cu_q[w.b + 1] - q0, len_k = s.cu_k[w.b + 1] - k0, kvh = w.h / group;
    const int64_t ld_k = up(std::max<int64_t>(len_k, 1), 16);  // this sample's padded key count
    if (w.b != packed_b || kvh != packed_kvh) {
      pack_bt(k + k0 * Hk * Dh + kvh * Dh, Hk * Dh, len_k, Dh, ld_k, kt.data);
      pack_bn(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ld_k / 2, ldv, vn.data);
      packed_b = w.b;
      packed_kvh = kvh;
      packed_ld = ld_k;
    }
    const FwdItem* next = it + 1 < count ? &items[it + 1] : nullptr;
    if (next != nullptr && (next->b != w.b || next->h / group != kvh)) {
      // The next item's K and V, to L2 while this item computes: slices of rows Hk heads long, missed by the
      // hardware prefetchers (as the backward's; their first touch was ~20% of the forward on the A3 shape).
      const int64_t nk0 = s.cu_k[next->b], nlen_k = s.cu_k[next->b + 1] - nk0, nkvh = next->h / group;
      prefetch_rows<_MM_HINT_T1>(k + nk0 * Hk * Dh + nkvh * Dh, Hk * Dh, nlen_k, Dh);
      prefetch_rows<_MM_HINT_T1>(v + nk0 * Hk * Dv + nkvh * Dv, Hk * Dv, nlen_k, Dv);
    }
    for (int64_t i0 = w.q_begin; i0 < w.q_end; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, w.q_end - i0);
      if (i0 + kTileQ < w.q_end) {  // the next tile's Q rows (this item's, or the next item's first)
        const int64_t nn = std::min<int64_t>(kTileQ, w.q_end - i0 - kTileQ);
        prefetch_rows<_MM_HINT_T1>(q + ((q0 + i0 + kTileQ) * H + w.h) * Dh, H * Dh, nn, Dh);
      } else if (next != nullptr && next->q_end > next->q_begin) {
        const int64_t nn = std::min<int64_t>(kTileQ, next->q_end - next->q_begin);
        prefetch_rows<_MM_HINT_T1>(q + ((s.cu_q[next->b] + next->q_begin) * H + next->h) * Dh, H * Dh, nn, Dh);
      }
      pack_a(q + ((q0 + i0) * H + w.h) * Dh, H * Dh, n, Dh, reinterpret_cast<uint16_t*>(qa.data));
      int key_end[kTileQ];
      float m[kTileQ], l[kTileQ];
      int k_hi = 0;
      for (int64_t r = 0; r < n; ++r) {
        key_end[r] = static_cast<int>(varlen::causal_key_end(static_cast<int>(i0 + r), static_cast<int>(len_q),
                                                             static_cast<int>(len_k), s.causal));
        k_hi = std::max(k_hi, key_end[r]);
        m[r] = neg_inf;
        l[r] = 0.f;
      }
      std::memset(acc.data, 0, sizeof(float) * n * ldv);
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0), nbp = up(nb, 16);
        dot_gemm(n, nbp, dh2, qa.data, dh2, 1, kt.data + j0, packed_ld, sc.data, kKeyBlock, false);
        for (int64_t r = 0; r < n; ++r) {
          float* srow = sc.data + r * kKeyBlock;
          uint16_t* prow = reinterpret_cast<uint16_t*>(pa.data) + r * kKeyBlock;
          const float lim = static_cast<float>(std::clamp<int64_t>(key_end[r] - j0, 0, nbp));
          VF mx = cpu_vec::vbroadcast(neg_inf);
          for (int64_t c = 0; c < nbp; c += 16) {
            VF x = cpu_vec::vload(srow + c) * qs;
            x = (lane_index() + static_cast<float>(c)) < lim ? x : cpu_vec::vbroadcast(neg_inf);
            cpu_vec::vstore(srow + c, x);
            mx = cpu_vec::vmax(mx, x);
          }
          const float bm = hmax(mx);
          const float m_new = bm > m[r] ? bm : m[r];
          const float ms = m_new == neg_inf ? 0.f : m_new;  // a row with no key yet subtracts 0: exp2(-inf) stays 0
          VF sum = {};
          for (int64_t c = 0; c < nbp; c += 16) {
            const VF p = exp2_keep_nan(cpu_vec::vload(srow + c) - ms);
            sum += p;
            store_bf16(prow + c, p);
          }
          if (j0 > 0) {
            const float alpha = m[r] == neg_inf ? 0.f : std::exp2(m[r] - ms);
            l[r] *= alpha;
            float* arow = acc.data + r * ldv;
            for (int64_t c = 0; c < ldv; c += 16) cpu_vec::vstore(arow + c, cpu_vec::vload(arow + c) * alpha);
          }
          l[r] += hsum(sum);
          m[r] = m_new;
        }
        dot_gemm(n, ldv, nbp / 2, pa.data, kKeyBlock / 2, 1, vn.data + (j0 / 2) * ldv, ldv, acc.data, ldv, true);
      }
      for (int64_t r = 0; r < n; ++r) {
        // A query that sees no key: exact zeros (whatever v holds) and lse -inf. One that sees keys whose scores are
        // all -inf (overflow): out NaN, as softmax, and lse -inf, as logsumexp (l is 0 only then). l NaN (a NaN or
        // +inf score): NaN, kept by the multiply.
        const float* arow = acc.data + r * ldv;
        c10::BFloat16* orow = out + ((q0 + i0 + r) * H + w.h) * Dv;
        float* lse_r = lse + w.h * total_q + q0 + i0 + r;
        if (key_end[r] == 0) {
          for (int64_t c = 0; c < Dv; ++c) orow[c] = c10::BFloat16(0.f);
          *lse_r = neg_inf;
          continue;
        }
        const float inv = l[r] == 0.f ? std::numeric_limits<float>::quiet_NaN() : 1.f / l[r];
        for (int64_t c = 0; c < Dv; c += 16)
          store_out(orow + c, _mm512_mul_ps(_mm512_loadu_ps(arow + c), _mm512_set1_ps(inv)), Dv - c);
        *lse_r = l[r] == 0.f ? neg_inf : (m[r] + std::log2(l[r])) * 0.6931471805599453f;  // log2 -> natural log
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ backward
// dst rows j < nj (row stride ldd) = scale * columns j of src (D rows of stride lds, rows up to up(D, 16) readable),
// as bf16: the dK/dV accumulators are kept transposed (head dim x keys) and leave through 16x16 register transposes.
LF_BF16_TARGET void store_transposed(const float* src, int64_t lds, int64_t D, int64_t nj, float scale,
                                     c10::BFloat16* dst, int64_t ldd) {
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512i r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (d0 + i) * lds);
    transpose16x16_32(r);
    for (int64_t j = 0; j < nj; ++j)
      store_out(dst + j * ldd + d0, _mm512_mul_ps(_mm512_castsi512_ps(r[j]), _mm512_set1_ps(scale)), D - d0);
  }
}

// One (sample, kv head): every query head of the group, query tiles of kTileQ, key blocks of kKeyBlock. Per block:
// S = Q·Kᵀ and dP = dO·Vᵀ; P = exp2(S*scale*log2e - lse*log2e), dS = P*(dP - delta); then dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS
// and dQ += dS·K. The two transposed products keep their accumulators transposed (head dim x keys), so their B
// operands are P and dS in VNNI pairs of query rows, written by the elementwise pass straight from its registers, and
// their A operands are the tile's dO and Q in the VNNI layout (pairs of query rows), read with a pair stride: no
// transposed copy of anything. The sums are those of the untransposed products, in the same order.
LF_BF16_TARGET void backward_item(const Shape& s, int64_t b, int64_t kvh, const c10::BFloat16* dout,
                                  const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                                  const c10::BFloat16* out, const float* lse, int64_t total_q, c10::BFloat16* dq,
                                  c10::BFloat16* dk, c10::BFloat16* dv, int64_t next_b, int64_t next_kvh) {
  const int64_t H = s.heads, Hk = s.kv_heads, Dh = s.head_dim, Dv = s.v_dim, group = H / Hk;
  const int64_t q0 = s.cu_q[b], k0 = s.cu_k[b];
  const int64_t len_q = s.cu_q[b + 1] - q0, len_k = s.cu_k[b + 1] - k0;
  const int64_t dh2 = pairs(Dh), dv2 = pairs(Dv), ldh = up(Dh, 16), ldv = up(Dv, 16);
  const int64_t ldk = up(std::max<int64_t>(len_k, 1), 16);
  const float qs = static_cast<float>(s.scale) * kLog2e;
  const float scale = static_cast<float>(s.scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  Buf<uint32_t> kt(dh2 * ldk), vt(dv2 * ldk), kn((ldk / 2) * ldh);
  Buf<float> dkt(ldh * ldk), dvt(ldv * ldk);  // dKᵀ, dVᵀ: rows past Dh / Dv stay 0 (read by the final transposes)
  dkt.zero(ldh * ldk);
  dvt.zero(ldv * ldk);
  const c10::BFloat16* kbase = k + k0 * Hk * Dh + kvh * Dh;
  pack_bt(kbase, Hk * Dh, len_k, Dh, ldk, kt.data);
  pack_bt(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ldk, vt.data);
  pack_bn(kbase, Hk * Dh, len_k, Dh, ldk / 2, ldh, kn.data);

  Buf<uint32_t> qa(kTileQ * dh2), doa(kTileQ * dv2), qn((kTileQ / 2) * ldh), don((kTileQ / 2) * ldv);
  Buf<uint32_t> pv((kTileQ / 2) * kKeyBlock), dsv((kTileQ / 2) * kKeyBlock), dsa(kTileQ * kKeyBlock / 2);
  Buf<float> sc(kTileQ * kKeyBlock), dp(kTileQ * kKeyBlock), dqacc(kTileQ * ldh);
  uint16_t* dsa16 = reinterpret_cast<uint16_t*>(dsa.data);
  const __m512 zero = _mm512_setzero_ps();

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < len_q; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, len_q - i0), n2 = pairs(n);
      const c10::BFloat16* qrow = q + ((q0 + i0) * H + h) * Dh;
      const c10::BFloat16* dorow = dout + ((q0 + i0) * H + h) * Dv;
      const c10::BFloat16* orow = out + ((q0 + i0) * H + h) * Dv;
      {  // Prefetch (to L2: the tile's 64 KiB of S and dP would evict L1) the next tile's Q, dO and O rows, one
         // head's slice of rows H heads long that the hardware prefetchers miss, and in the item's last tile the next
         // item's K and V. Their first-touch misses were ~8% of the backward (A4 shape).
        int64_t nq0 = q0, nlen = len_q, ni = i0 + kTileQ, nh = h;
        if (ni >= len_q) {
          ni = 0;
          nh = h + 1;
          if (nh == (kvh + 1) * group && next_b >= 0) {
            const int64_t nk0 = s.cu_k[next_b], nlen_k = s.cu_k[next_b + 1] - nk0;
            prefetch_rows<_MM_HINT_T1>(k + nk0 * Hk * Dh + next_kvh * Dh, Hk * Dh, nlen_k, Dh);
            prefetch_rows<_MM_HINT_T1>(v + nk0 * Hk * Dv + next_kvh * Dv, Hk * Dv, nlen_k, Dv);
            nq0 = s.cu_q[next_b];
            nlen = s.cu_q[next_b + 1] - nq0;
            nh = next_kvh * group;
          } else if (nh == (kvh + 1) * group) {
            nlen = 0;
          }
        }
        const int64_t nn = std::min<int64_t>(kTileQ, nlen - ni), row = (nq0 + ni) * H + nh;
        if (nn > 0) {
          prefetch_rows<_MM_HINT_T1>(q + row * Dh, H * Dh, nn, Dh);
          prefetch_rows<_MM_HINT_T1>(dout + row * Dv, H * Dv, nn, Dv);
          prefetch_rows<_MM_HINT_T1>(out + row * Dv, H * Dv, nn, Dv);
        }
      }
      pack_a(qrow, H * Dh, n, Dh, reinterpret_cast<uint16_t*>(qa.data));
      pack_a(dorow, H * Dv, n, Dv, reinterpret_cast<uint16_t*>(doa.data));
      pack_bn(qrow, H * Dh, n, Dh, n2, ldh, qn.data);
      pack_bn(dorow, H * Dv, n, Dv, n2, ldv, don.data);
      int key_end[kTileQ + 1];
      float shift[kTileQ + 1], delta[kTileQ + 1];
      int k_hi = 0;
      for (int64_t r = 0; r < n; ++r) {
        key_end[r] = static_cast<int>(varlen::causal_key_end(static_cast<int>(i0 + r), static_cast<int>(len_q),
                                                             static_cast<int>(len_k), s.causal));
        k_hi = std::max(k_hi, key_end[r]);
        const float lv = lse[h * total_q + q0 + i0 + r];
        shift[r] = lv == neg_inf ? std::numeric_limits<float>::infinity() : lv * kLog2e;  // no key: P = exp2(-inf) = 0
      }
      const bool one_block = k_hi <= kKeyBlock;  // then delta is rowsum(P * dP), summed below
      for (int64_t r = 0; !one_block && r < n; ++r) {
        __m512 d = zero;  // delta = rowsum(dO * O) in float32 from the stored bf16 values
        const c10::BFloat16* o = orow + r * H * Dv;
        const c10::BFloat16* g = dorow + r * H * Dv;
        for (int64_t c = 0; c < Dv; c += 16) d = _mm512_fmadd_ps(load_bf16(o + c, Dv - c), load_bf16(g + c, Dv - c), d);
        delta[r] = _mm512_reduce_add_ps(d);
      }
      key_end[n] = 0;  // an odd tile's last pair: the partner row has no key, its P and dS are exactly 0
      shift[n] = std::numeric_limits<float>::infinity();
      delta[n] = 0.f;
      std::memset(dqacc.data, 0, sizeof(float) * n * ldh);
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0), nbp = up(nb, 16);
        dot_gemm(n, nbp, dh2, qa.data, dh2, 1, kt.data + j0, ldk, sc.data, kKeyBlock, false);   // S = Q Kᵀ
        dot_gemm(n, nbp, dv2, doa.data, dv2, 1, vt.data + j0, ldk, dp.data, kKeyBlock, false);  // dP = dO Vᵀ
        if (one_block) {
          // Every key of the tile is in this block: P is stored over S (float32) and delta = rowsum(P * dP) in
          // float32, which equals rowsum(dO * O) in exact arithmetic but carries no rounding of O. With delta from
          // the rounded O, a row with few keys (dS = P (dP - delta) is a small difference there) got dQ/dK errors
          // 3-4x torch's own bf16 error: a rare failure of the edge-case flash-rule test.
          for (int64_t r = 0; r < n; ++r) {
            float* srow = sc.data + r * kKeyBlock;
            const float* dprow = dp.data + r * kKeyBlock;
            const float lim = static_cast<float>(std::clamp<int64_t>(key_end[r] - j0, 0, nbp));
            VF acc{};
            for (int64_t c = 0; c < nbp; c += 16) {
              VF x = cpu_vec::vload(srow + c) * qs;
              x = (lane_index() + static_cast<float>(c)) < lim ? x : cpu_vec::vbroadcast(neg_inf);
              const VF pr = exp2_keep_nan(x - shift[r]);
              cpu_vec::vstore(srow + c, pr);
              acc += pr * cpu_vec::vload(dprow + c);
            }
            delta[r] = _mm512_reduce_add_ps((__m512)acc);
          }
        }
        for (int64_t r = 0; r < n; r += 2) {
          const bool two = r + 1 < n;  // else row r+1 is the zero partner (its S/dP rows are never read)
          const float* srow[2] = {sc.data + r * kKeyBlock, sc.data + (two ? r + 1 : r) * kKeyBlock};
          const float* dprow[2] = {dp.data + r * kKeyBlock, dp.data + (two ? r + 1 : r) * kKeyBlock};
          float lim[2], sh[2], de[2];
          for (int t = 0; t < 2; ++t) {
            lim[t] = static_cast<float>(std::clamp<int64_t>(key_end[r + t] - j0, 0, nbp));
            sh[t] = shift[r + t];
            de[t] = delta[r + t];
          }
          uint32_t* pvrow = pv.data + (r / 2) * kKeyBlock;
          uint32_t* dsvrow = dsv.data + (r / 2) * kKeyBlock;
          uint16_t* dsrow = dsa16 + r * kKeyBlock;
          for (int64_t c = 0; c < nbp; c += 16) {
            VF p[2], ds[2];
#pragma GCC unroll 2
            for (int t = 0; t < 2; ++t) {
              if (one_block) {
                p[t] = cpu_vec::vload(srow[t] + c);  // P, stored by the delta pass above
              } else {
                VF x = cpu_vec::vload(srow[t] + c) * qs;
                x = (lane_index() + static_cast<float>(c)) < lim[t] ? x : cpu_vec::vbroadcast(neg_inf);
                p[t] = exp2_keep_nan(x - sh[t]);
              }
              ds[t] = p[t] * (cpu_vec::vload(dprow[t] + c) - de[t]);
            }
            if (!two) p[1] = ds[1] = VF{};  // keeps a NaN of the real row out of the padding pair
            _mm512_storeu_si512(pvrow + c, vnni_pairs((__m512)p[0], (__m512)p[1]));
            const __m512i ds2 = (__m512i)_mm512_cvtne2ps_pbh((__m512)ds[1], (__m512)ds[0]);  // rows r | r+1
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsrow + c), _mm512_castsi512_si256(ds2));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsrow + kKeyBlock + c), _mm512_extracti64x4_epi64(ds2, 1));
            _mm512_storeu_si512(dsvrow + c, interleave_rows(ds2));
          }
        }
        dot_gemm(Dv, nbp, n2, don.data, 1, ldv, pv.data, kKeyBlock, dvt.data + j0, ldk, true);   // dVᵀ += dOᵀ P
        dot_gemm(Dh, nbp, n2, qn.data, 1, ldh, dsv.data, kKeyBlock, dkt.data + j0, ldk, true);   // dKᵀ += Qᵀ dS
        dot_gemm(n, ldh, nbp / 2, dsa.data, kKeyBlock / 2, 1, kn.data + (j0 / 2) * ldh, ldh, dqacc.data, ldh,
                 true);  // dQ += dS K
      }
      const __m512 vscale = _mm512_set1_ps(scale);
      for (int64_t r = 0; r < n; ++r) {
        c10::BFloat16* g = dq + ((q0 + i0 + r) * H + h) * Dh;
        const float* a = dqacc.data + r * ldh;
        for (int64_t d = 0; d < Dh; d += 16) store_out(g + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), vscale), Dh - d);
      }
    }
  }
  for (int64_t j0 = 0; j0 < len_k; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, len_k - j0);
    store_transposed(dkt.data + j0, ldk, Dh, nj, scale, dk + ((k0 + j0) * Hk + kvh) * Dh, Hk * Dh);
    store_transposed(dvt.data + j0, ldk, Dv, nj, 1.f, dv + ((k0 + j0) * Hk + kvh) * Dv, Hk * Dv);
  }
}

constexpr int32_t kQueryChunk = 256;  // queries per forward work item (K/V packing amortised over them)

}  // namespace

void forward(const Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse) {
  const std::vector<FwdItem> items = forward_work_items(s, kQueryChunk);
  if (items.empty()) return;
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* kp = k.data_ptr<c10::BFloat16>();
  const auto* vp = v.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  float* lp = lse.data_ptr<float>();
  const int64_t total_q = q.size(0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    forward_items(s, items.data() + begin, end - begin, qp, kp, vp, op, lp, total_q);
  });
}

void backward(const Shape& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const auto* dop = dout.data_ptr<c10::BFloat16>();
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* kp = k.data_ptr<c10::BFloat16>();
  const auto* vp = v.data_ptr<c10::BFloat16>();
  const auto* op = out.data_ptr<c10::BFloat16>();
  const float* lp = lse.data_ptr<float>();
  auto* dqp = dq.data_ptr<c10::BFloat16>();
  auto* dkp = dk.data_ptr<c10::BFloat16>();
  auto* dvp = dv.data_ptr<c10::BFloat16>();
  const int64_t total_q = q.size(0);
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)  // the next item's index, for prefetching its rows (-1: none)
      backward_item(s, w / s.kv_heads, w % s.kv_heads, dop, qp, kp, vp, op, lp, total_q, dqp, dkp, dvp,
                    w + 1 < end ? (w + 1) / s.kv_heads : -1, (w + 1) % s.kv_heads);
  });
}

#else  // no x86 vector target attributes: use_dot_kernel() is false, these are never called

void forward(const Shape&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "varlen_attention: the bf16 dot-product kernel is not built for this CPU");
}
void backward(const Shape&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "varlen_attention: the bf16 dot-product kernel is not built for this CPU");
}

#endif

}  // namespace varlen_lowp
}  // namespace lookfast
