// bfloat16 variable-length attention, forward and backward, with every product on the bf16 dot-product unit
// (AVX512-BF16 `vdpbf16ps`: 32 bf16 products summed pairwise into 16 float32 lanes per instruction).
//
// Roofline (one (sample, head), Lq queries, Lk keys, head dims Dh/Dv): forward 2*Lq*Lk*(Dh+Dv) FLOPs against
// 2*(Lq*(Dh+Dv) + Lk*(Dh+Dv)) bytes; backward 2.5x the FLOPs. For the models' shapes (Lk 49..577, Dh 8..64) that is
// 10..100 FLOP/byte with everything but Q streaming from L1/L2, so the bound is the dot unit (2x the float32 FMA rate
// on Zen 4/5 and Sapphire Rapids) plus the float32 softmax (exp2 per score) that small head dims cannot hide.
//
// Precision contract (bf16 stored, float32 everywhere else): Q·Kᵀ, P·V, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q and dS·K multiply bf16
// operands exactly and accumulate in float32; softmax max/sum/lse, delta = rowsum(dO*O), dS = P*(dP - delta) and the
// output/gradient accumulators are float32; P and dS are rounded to bf16 once as GEMM operands (as FlashAttention and
// torch's CPU flash attention do); outputs and gradients are rounded to bf16 once at the end.
// NaN in q/k/v/dout propagates to the affected rows (exp2 keeps NaN); a masked (-inf) score weighs exactly 0.
//
// Layout: operands of C += A·B are A = bf16 rows read as uint32 pairs along the reduction, B = "VNNI" pairs:
// B32[p][j] = (B[2p][j], B[2p+1][j]) with columns padded to 16 (zero), C float32 with 16-padded rows. K and V of one
// (sample, kv-head) are packed once per work item in the layouts their three products need.
#include "cpu/varlen_attention_lowp.h"

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
#include "cpu/vector_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
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
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
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
// one 32-pair vector of B per column block each step.
template <int R, int NV>
LF_BF16_TARGET inline __attribute__((always_inline)) void dot_block(int64_t K2, const uint32_t* a, int64_t lda,
                                                                    const uint32_t* b, int64_t ldb, float* c,
                                                                    int64_t ldc, bool accumulate) {
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
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + p]));
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
                                                                   int64_t lda, const uint32_t* b, int64_t ldb,
                                                                   float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) dot_block<R, 4>(K2, a, lda, b + j, ldb, c + j, ldc, accumulate);
  switch ((N - j) / 16) {
    case 3: dot_block<R, 3>(K2, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    case 2: dot_block<R, 2>(K2, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    case 1: dot_block<R, 1>(K2, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

// C[M x N] (+)= A[M x 2*K2] · B for N a multiple of 16 (B and C padded to it).
LF_BF16_TARGET void dot_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t lda, const uint32_t* b,
                             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dot_rows<4>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: dot_rows<3>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate); break;
    case 2: dot_rows<2>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate); break;
    case 1: dot_rows<1>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------------ packing
inline uint16_t bits(c10::BFloat16 x) { return x.x; }
inline float widen(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// A operand: rows of `cols` bf16 (stride `stride` in the input) into rows of ld16 = 2*ceil(cols/2) bf16 (zero pad).
void pack_a(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst) {
  const int64_t ld = up(cols, 2);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld, src + r * stride, sizeof(uint16_t) * cols);
    if (ld != cols) dst[r * ld + cols] = 0;
  }
}

// B operand of X·Yᵀ for Y (n rows of `cols`): B32[p][j] = (Y[j][2p], Y[j][2p+1]), p < ceil(cols/2), j < ldb (0 past n).
void pack_bt(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t cols, int64_t ldb, uint32_t* dst) {
  const int64_t c2 = up(cols, 2) / 2;
  for (int64_t p = 0; p < c2; ++p) std::memset(dst + p * ldb + n, 0, sizeof(uint32_t) * (ldb - n));
  for (int64_t j = 0; j < n; ++j) {
    const c10::BFloat16* y = src + j * stride;
    for (int64_t p = 0; p < c2; ++p) {
      const uint16_t lo = bits(y[2 * p]);
      const uint16_t hi = 2 * p + 1 < cols ? bits(y[2 * p + 1]) : uint16_t(0);
      dst[p * ldb + j] = pair(lo, hi);
    }
  }
}

// B operand of X·Y for Y (n rows of `cols`): B32[p][c] = (Y[2p][c], Y[2p+1][c]) for p < rows2 (rows >= n are 0),
// c < ldb (0 past cols).
void pack_bn(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t cols, int64_t rows2, int64_t ldb,
             uint32_t* dst) {
  for (int64_t p = 0; p < rows2; ++p) {
    uint32_t* d = dst + p * ldb;
    const int64_t r0 = 2 * p, r1 = 2 * p + 1;
    const c10::BFloat16* y0 = r0 < n ? src + r0 * stride : nullptr;
    const c10::BFloat16* y1 = r1 < n ? src + r1 * stride : nullptr;
    for (int64_t c = 0; c < cols; ++c) d[c] = pair(y0 ? bits(y0[c]) : uint16_t(0), y1 ? bits(y1[c]) : uint16_t(0));
    for (int64_t c = cols; c < ldb; ++c) d[c] = 0;
  }
}

// ------------------------------------------------------------------------------------------------ vector helpers
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
    for (int64_t i0 = w.q_begin; i0 < w.q_end; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, w.q_end - i0);
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
        dot_gemm(n, nbp, dh2, qa.data, dh2, kt.data + j0, packed_ld, sc.data, kKeyBlock, false);
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
        dot_gemm(n, ldv, nbp / 2, pa.data, kKeyBlock / 2, vn.data + (j0 / 2) * ldv, ldv, acc.data, ldv, true);
      }
      for (int64_t r = 0; r < n; ++r) {
        // A query that sees no key: exact zeros (whatever v holds) and lse -inf. One that sees keys whose scores are
        // all -inf (overflow): NaN, as softmax. l NaN (a NaN or +inf score): NaN, kept by the multiply.
        const float* arow = acc.data + r * ldv;
        c10::BFloat16* orow = out + ((q0 + i0 + r) * H + w.h) * Dv;
        float* lse_r = lse + w.h * total_q + q0 + i0 + r;
        if (key_end[r] == 0) {
          for (int64_t c = 0; c < Dv; ++c) orow[c] = c10::BFloat16(0.f);
          *lse_r = neg_inf;
          continue;
        }
        const float inv = l[r] == 0.f ? std::numeric_limits<float>::quiet_NaN() : 1.f / l[r];
        for (int64_t c = 0; c < Dv; ++c) orow[c] = c10::BFloat16(arow[c] * inv);
        *lse_r = l[r] == 0.f ? std::numeric_limits<float>::quiet_NaN()
                             : (m[r] + std::log2(l[r])) * 0.6931471805599453f;  // log2 domain -> natural log
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ backward
LF_BF16_TARGET void backward_item(const Shape& s, int64_t b, int64_t kvh, const c10::BFloat16* dout,
                                  const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                                  const c10::BFloat16* out, const float* lse, int64_t total_q, c10::BFloat16* dq,
                                  c10::BFloat16* dk, c10::BFloat16* dv) {
  const int64_t H = s.heads, Hk = s.kv_heads, Dh = s.head_dim, Dv = s.v_dim, group = H / Hk;
  const int64_t q0 = s.cu_q[b], k0 = s.cu_k[b];
  const int64_t len_q = s.cu_q[b + 1] - q0, len_k = s.cu_k[b + 1] - k0;
  const int64_t dh2 = up(Dh, 2) / 2, dv2 = up(Dv, 2) / 2, ldh = up(Dh, 16), ldv = up(Dv, 16);
  const int64_t ldk = up(std::max<int64_t>(len_k, 1), 16);
  const float qs = static_cast<float>(s.scale) * kLog2e;
  const float scale = static_cast<float>(s.scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  Buf<uint32_t> kt(dh2 * ldk), vt(dv2 * ldk), kn((ldk / 2) * ldh);
  Buf<float> dkacc(ldk * ldh), dvacc(ldk * ldv);
  dkacc.zero(ldk * ldh);
  dvacc.zero(ldk * ldv);
  const c10::BFloat16* kbase = k + k0 * Hk * Dh + kvh * Dh;
  pack_bt(kbase, Hk * Dh, len_k, Dh, ldk, kt.data);
  pack_bt(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ldk, vt.data);
  pack_bn(kbase, Hk * Dh, len_k, Dh, ldk / 2, ldh, kn.data);

  Buf<uint32_t> qa(kTileQ * dh2), doa(kTileQ * dv2), qn((kTileQ / 2) * ldh), don((kTileQ / 2) * ldv);
  Buf<uint32_t> pt(kKeyBlock * kTileQ / 2), dst(kKeyBlock * kTileQ / 2), dsa(kTileQ * kKeyBlock / 2);
  Buf<float> sc(kTileQ * kKeyBlock), dp(kTileQ * kKeyBlock), dqacc(kTileQ * ldh);
  uint16_t* pt16 = reinterpret_cast<uint16_t*>(pt.data);
  uint16_t* dst16 = reinterpret_cast<uint16_t*>(dst.data);

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < len_q; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, len_q - i0), n2 = up(n, 2) / 2;
      const c10::BFloat16* qrow = q + ((q0 + i0) * H + h) * Dh;
      const c10::BFloat16* dorow = dout + ((q0 + i0) * H + h) * Dv;
      const c10::BFloat16* orow = out + ((q0 + i0) * H + h) * Dv;
      pack_a(qrow, H * Dh, n, Dh, reinterpret_cast<uint16_t*>(qa.data));
      pack_a(dorow, H * Dv, n, Dv, reinterpret_cast<uint16_t*>(doa.data));
      pack_bn(qrow, H * Dh, n, Dh, n2, ldh, qn.data);
      pack_bn(dorow, H * Dv, n, Dv, n2, ldv, don.data);
      int key_end[kTileQ];
      float shift[kTileQ], delta[kTileQ];
      int k_hi = 0;
      for (int64_t r = 0; r < n; ++r) {
        key_end[r] = static_cast<int>(varlen::causal_key_end(static_cast<int>(i0 + r), static_cast<int>(len_q),
                                                             static_cast<int>(len_k), s.causal));
        k_hi = std::max(k_hi, key_end[r]);
        const float lv = lse[h * total_q + q0 + i0 + r];
        shift[r] = lv == neg_inf ? std::numeric_limits<float>::infinity() : lv * kLog2e;  // no key: P = exp2(-inf) = 0
        float d = 0.f;  // delta = rowsum(dO * O) in float32 from the stored bf16 values
        const c10::BFloat16* o = orow + r * H * Dv;
        const c10::BFloat16* g = dorow + r * H * Dv;
        for (int64_t c = 0; c < Dv; ++c) d += static_cast<float>(o[c]) * static_cast<float>(g[c]);
        delta[r] = d;
      }
      std::memset(dqacc.data, 0, sizeof(float) * n * ldh);
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0), nbp = up(nb, 16);
        dot_gemm(n, nbp, dh2, qa.data, dh2, kt.data + j0, ldk, sc.data, kKeyBlock, false);   // S = Q Kᵀ
        dot_gemm(n, nbp, dv2, doa.data, dv2, vt.data + j0, ldk, dp.data, kKeyBlock, false);  // dP = dO Vᵀ
        for (int64_t r = 0; r < n; ++r) {
          const float* srow = sc.data + r * kKeyBlock;
          const float* dprow = dp.data + r * kKeyBlock;
          uint16_t* dsrow = reinterpret_cast<uint16_t*>(dsa.data) + r * kKeyBlock;
          const float lim = static_cast<float>(std::clamp<int64_t>(key_end[r] - j0, 0, nbp));
          for (int64_t c = 0; c < nbp; c += 16) {
            VF x = cpu_vec::vload(srow + c) * qs;
            x = (lane_index() + static_cast<float>(c)) < lim ? x : cpu_vec::vbroadcast(neg_inf);
            const VF p = exp2_keep_nan(x - shift[r]);
            const VF ds = p * (cpu_vec::vload(dprow + c) - delta[r]);
            store_bf16(dsrow + c, ds);
            alignas(64) uint16_t pb[16], db[16];
            store_bf16(pb, p);
            store_bf16(db, ds);
            for (int t = 0; t < 16; ++t) {  // transposed copies: keys as rows, query pairs along the reduction
              pt16[(c + t) * kTileQ + r] = pb[t];
              dst16[(c + t) * kTileQ + r] = db[t];
            }
          }
        }
        if (n & 1)
          for (int64_t c = 0; c < nbp; ++c) pt16[c * kTileQ + n] = dst16[c * kTileQ + n] = 0;
        dot_gemm(nbp, ldv, n2, pt.data, kTileQ / 2, don.data, ldv, dvacc.data + j0 * ldv, ldv, true);   // dV += Pᵀ dO
        dot_gemm(nbp, ldh, n2, dst.data, kTileQ / 2, qn.data, ldh, dkacc.data + j0 * ldh, ldh, true);  // dK += dSᵀ Q
        dot_gemm(n, ldh, nbp / 2, dsa.data, kKeyBlock / 2, kn.data + (j0 / 2) * ldh, ldh, dqacc.data, ldh,
                 true);  // dQ += dS K
      }
      for (int64_t r = 0; r < n; ++r) {
        c10::BFloat16* g = dq + ((q0 + i0 + r) * H + h) * Dh;
        const float* a = dqacc.data + r * ldh;
        for (int64_t d = 0; d < Dh; ++d) g[d] = c10::BFloat16(a[d] * scale);
      }
    }
  }
  for (int64_t j = 0; j < len_k; ++j) {
    c10::BFloat16* gk = dk + ((k0 + j) * Hk + kvh) * Dh;
    c10::BFloat16* gv = dv + ((k0 + j) * Hk + kvh) * Dv;
    for (int64_t d = 0; d < Dh; ++d) gk[d] = c10::BFloat16(dkacc.data[j * ldh + d] * scale);
    for (int64_t c = 0; c < Dv; ++c) gv[c] = c10::BFloat16(dvacc.data[j * ldv + c]);
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
    for (int64_t w = begin; w < end; ++w)
      backward_item(s, w / s.kv_heads, w % s.kv_heads, dop, qp, kp, vp, op, lp, total_q, dqp, dkp, dvp);
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
