// bf16/fp16 variable-length attention, forward and backward, with every product on oneDNN's brgemm micro-kernel, via
// torch's at::native::cpublas::brgemm: AMX tiles (TDPBF16PS / TDPFP16PS) on CPUs with AMX, vdpbf16ps on AVX512-BF16
// ones. The same call runs on both; oneDNN picks the instructions when it JIT-compiles each shape (once per thread).
//
// Roofline (one (sample, head), Lq queries, Lk keys, head dims Dh/Dv): 2*Lq*Lk*(Dh+Dv) FLOPs against
// 2*(Lq*(Dh+Dv) + Lk*(Dh+Dv)) bytes of bf16 in and out: 10..100 FLOP/byte for the models' shapes (Lk 49..577,
// Dh 32..64), K/V packed once per (sample, kv head, query chunk) and L2-resident, so the products are compute-bound
// on the matrix engine (AMX: ~16x the float32 FMA rate per core; AVX512-BF16: 2x) and what is left is the float32
// softmax (one exp2 per score, ~Lq*Lk*10 vector ops), which AMX does not speed up: with AMX the softmax, not the
// products, is the expected bound for Dh <= 64. Backward: 2.5x the forward's FLOPs (five products), same bound.
//
// Precision contract (as the hand-written kernel, cpu/varlen_attention_lowp.cpp): Q·Kᵀ and P·V multiply bf16/fp16
// operands exactly and accumulate in float32; scale, softmax max/sum and lse in float32 (log2 domain); P is rounded
// to the input dtype once as the P·V operand (as FlashAttention and torch's CPU flash attention do); the float32
// accumulator is divided by the sum and rounded once into out. A query that sees no key gets zeros and lse -inf;
// NaN in q/k/v reaches the rows whose scores or values it touches (exp2 keeps NaN).
//
// Layout: oneDNN's brgemm wants B in VNNI-2 (pairs along the reduction: element (k, n) at ((k/2)*ldb + n)*2 + k%2).
// Kᵀ is packed in one slab per key block of kKeyBlock keys (so ldb is the same constant for every sample), V as
// pairs of key rows padded to 16 columns; the query tile is copied into a zero-padded (rows up to 8, head dim up to
// even) buffer. Every brgemm shape is then (M in {8,16,24,32}) x (N a multiple of 16) x (K fixed per problem) with
// constant leading dimensions (the backward's dKᵀ/dVᵀ products: M the 16-padded head dim, N the block's 16-padded
// key count, K the tile's padded query count): a bounded set of JIT-compiled kernels per thread, whatever the ragged
// lengths.
#include "cpu/varlen_attention_brgemm.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "common/varlen_attention.h"
#include "cpu/brgemm_layout.h"
#include "cpu/transpose16.h"
#include "cpu/vector_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LF_HAVE_BRGEMM_KERNEL 1
// The vector code around the products (softmax, conversions): AVX-512 with bf16 conversions. available() requires
// these features before anything here runs.
#define LF_BRGEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define LF_HAVE_BRGEMM_KERNEL 0
#endif

namespace lookfast {
namespace varlen_brgemm {

#if LF_HAVE_BRGEMM_KERNEL
namespace {

using cpu_vec::Vec;
typedef Vec<float>::type VF;  // 16 float32 lanes

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kTileQ = 32;         // queries per tile: rows of the score block (M of both products, up to 32)
// Keys per score block (S: 32 x 320 float32 = 40 KiB, L1/L2). 320, not 256: a LookWhere 1036 px sequence (274 + 5
// tokens, up to 305 with k_max 300) is then one block, not a full one and a 23-key one with its own products and
// rescale; its 12-head self-attention forward took ~2.1 ms against ~2.4 (medians, AMX, alternating processes).
constexpr int kKeyBlock = 320;
constexpr int32_t kQueryChunk = 256;  // queries per work item: K/V packing amortised over them

inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct Buf {
  T* data;
  explicit Buf(int64_t n)
      : data(static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 16), std::align_val_t(64)))) {}
  ~Buf() { ::operator delete[](data, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

template <typename T>
inline uint16_t bits(T x) {
  return x.x;
}
inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// ------------------------------------------------------------------------------------------------ packing
// Every B operand is packed by the two functions below, in the layout oneDNN's micro-kernel takes for T on this CPU
// (brgemm_layout.h): VNNI-2 pairs (bf16 everywhere, fp16 with AMX-FP16) or row-major (fp16 on AVX512-FP16 without
// AMX-FP16). Both layouts fill the same 16-bit elements of the same buffers (a pair at uint32 index i is the two
// elements at 16-bit index 2i), so the offsets the products pass are the same in both.

// Kᵀ of one (sample, kv head), one slab per block of kKeyBlock keys. VNNI-2: the pair (K[j][2p], K[j][2p+1]) of key
// j = kb*kKeyBlock + jj at kt[(kb*dh2 + p)*kKeyBlock + jj]; row-major: K[j][d] at 16-bit element
// (kb*2*dh2 + d)*kKeyBlock + jj. Zero for the odd head dim's pad and for the keys from len_k up to the next multiple
// of 16 (what the last block's N covers).
template <typename T>
LF_BRGEMM_TARGET void pack_kt(const T* src, int64_t stride, int64_t len_k, int64_t Dh, int64_t dh2, uint32_t* kt,
                              bool row_major) {
  if (!row_major) {
    // VNNI-2: Kᵀ's pairs are the 32-bit words of K's rows, so 16 keys x 16 words at a time is a 16x16 transpose of
    // 32-bit words (masked loads: the odd head dim's last word gets a zero high half, keys past len_k are zero).
    for (int64_t j = 0; j < up(len_k, 16); j += 16) {
      uint32_t* slab = kt + (j / kKeyBlock) * dh2 * kKeyBlock + j % kKeyBlock;
      for (int64_t p0 = 0; p0 < dh2; p0 += 16) {
        const int64_t e = std::min<int64_t>(32, Dh - 2 * p0);  // 16-bit elements of this word block
        const __mmask32 em = e >= 32 ? ~__mmask32(0) : (__mmask32(1) << e) - 1;
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = j + i < len_k ? _mm512_maskz_loadu_epi16(em, src + (j + i) * stride + 2 * p0)
                               : _mm512_setzero_si512();
        transpose16x16_32(r);
        for (int64_t p = 0; p < std::min<int64_t>(16, dh2 - p0); ++p)
          _mm512_storeu_si512(slab + (p0 + p) * kKeyBlock, r[p]);
      }
    }
    return;
  }
  uint16_t* kt16 = reinterpret_cast<uint16_t*>(kt);
  for (int64_t j = 0; j < up(len_k, 16); ++j) {
    const int64_t slab = (j / kKeyBlock) * dh2 * kKeyBlock, jj = j % kKeyBlock;
    const T* y = j < len_k ? src + j * stride : nullptr;
    uint16_t* d = kt16 + 2 * slab + jj;
    for (int64_t e = 0; e < 2 * dh2; ++e) d[e * kKeyBlock] = y != nullptr && e < Dh ? bits(y[e]) : uint16_t(0);
  }
}

// V of one (sample, kv head), rows up to the next multiple of 16 keys (zero past len_k), columns up to ldv (zero
// from Dv). VNNI-2: vn[p*ldv + c] = (V[2p][c], V[2p+1][c]); row-major: V[j][c] at 16-bit element j*ldv + c.
template <typename T>
void pack_v(const T* src, int64_t stride, int64_t len_k, int64_t Dv, int64_t ldv, uint32_t* vn, bool row_major) {
  const int64_t rows2 = up(len_k, 16) / 2;
  if (row_major) {
    uint16_t* d = reinterpret_cast<uint16_t*>(vn);
    for (int64_t j = 0; j < 2 * rows2; ++j, d += ldv) {
      if (j < len_k) std::memcpy(d, src + j * stride, sizeof(uint16_t) * Dv);
      std::memset(d + (j < len_k ? Dv : 0), 0, sizeof(uint16_t) * (j < len_k ? ldv - Dv : ldv));
    }
    return;
  }
  for (int64_t p = 0; p < rows2; ++p) {
    uint32_t* d = vn + p * ldv;
    const T* y0 = 2 * p < len_k ? src + 2 * p * stride : nullptr;
    const T* y1 = 2 * p + 1 < len_k ? src + (2 * p + 1) * stride : nullptr;
    for (int64_t c = 0; c < Dv; ++c) d[c] = pair(y0 ? bits(y0[c]) : uint16_t(0), y1 ? bits(y1[c]) : uint16_t(0));
    for (int64_t c = Dv; c < ldv; ++c) d[c] = 0;
  }
}

// Whether this CPU's micro-kernel takes T's B operands row-major (fp16 on AVX512-FP16 without AMX-FP16).
template <typename T>
bool row_major_b() {
  if constexpr (std::is_same<T, c10::Half>::value) return brgemm_b_layout<c10::Half>() == BrgemmLayout::kRowMajor;
  return false;
}

// ------------------------------------------------------------------------------------------------ vector helpers
template <typename T>
LF_BRGEMM_TARGET inline __attribute__((always_inline)) void store_lowp(uint16_t* dst, VF x) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __m256bh h = _mm512_cvtneps_pbh((__m512)x);  // round to nearest even, NaN stays NaN
    std::memcpy(dst, &h, 32);
  } else {
    const __m256i h = _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(dst, &h, 32);
  }
}
// The lanes of x selected by m, rounded to T, stored at dst (the other 16-bit elements untouched).
template <typename T>
LF_BRGEMM_TARGET inline __attribute__((always_inline)) void store_lowp_masked(uint16_t* dst, VF x, __mmask16 m) {
  alignas(64) uint16_t t[16];
  store_lowp<T>(t, x);
  _mm256_mask_storeu_epi16(dst, m, _mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
}
// dst[c] = T(src[c] * mul) for c < n: 16 lanes at a time, the tail masked (rounded as T's constructor rounds).
template <typename T>
LF_BRGEMM_TARGET inline void store_row(T* dst, const float* src, int64_t n, float mul) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) store_lowp<T>(d + c, cpu_vec::vload(src + c) * mul);
  if (c < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - c)) - 1);
    store_lowp_masked<T>(d + c, (VF)_mm512_maskz_loadu_ps(m, src + c) * mul, m);
  }
}
// Prefetch rows first..first+rows-1 of `base` (`bytes` bytes each, `stride` elements apart): the next query tile's
// rows, strided by the heads, so beyond the hardware prefetchers' reach. Addresses are formed only for those rows.
template <typename T>
LF_BRGEMM_TARGET inline void prefetch_rows(const T* base, int64_t first, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = first; r < first + rows; ++r)
    for (int64_t o = 0; o < bytes; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + r * stride) + o, _MM_HINT_T0);
}
// 16 values of T widened to float32 exactly (lanes past n read as 0).
template <typename T>
LF_BRGEMM_TARGET inline __attribute__((always_inline)) VF load_wide(const T* src, int64_t n) {
  const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, src);
  if constexpr (std::is_same<T, c10::BFloat16>::value)
    return (VF)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else
    return (VF)_mm512_cvtph_ps(h);
}
LF_BRGEMM_TARGET inline __attribute__((always_inline)) VF lane_index() {
  return VF{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}
LF_BRGEMM_TARGET inline __attribute__((always_inline)) float hmax(VF x) { return _mm512_reduce_max_ps((__m512)x); }
LF_BRGEMM_TARGET inline __attribute__((always_inline)) float hsum(VF x) { return _mm512_reduce_add_ps((__m512)x); }

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
LF_BRGEMM_TARGET void forward_items(const VarlenProblem& s, const FwdItem* items, int64_t count, const T* q,
                                    const T* k, const T* v, T* out, float* lse, int64_t total_q) {
  const int64_t H = s.heads, Hk = s.kv_heads, Dh = s.head_dim, Dv = s.v_dim, group = H / Hk;
  const int64_t dh2 = up(Dh, 2) / 2, dhe = 2 * dh2, ldv = up(Dv, 16);
  int64_t max_lk = 0;
  for (int64_t i = 0; i < count; ++i) max_lk = std::max<int64_t>(max_lk, s.cu_k[items[i].b + 1] - s.cu_k[items[i].b]);
  const int64_t kblocks = std::max<int64_t>(up(max_lk, kKeyBlock) / kKeyBlock, 1);
  Buf<uint32_t> kt(kblocks * dh2 * kKeyBlock), vn((kblocks * kKeyBlock / 2) * ldv);
  Buf<uint16_t> qa(kTileQ * std::max<int64_t>(dhe, 2)), pa(kTileQ * kKeyBlock);
  Buf<float> sc(kTileQ * kKeyBlock), acc(kTileQ * std::max<int64_t>(ldv, 16));
  std::memset(qa.data, 0, sizeof(uint16_t) * kTileQ * std::max<int64_t>(dhe, 2));
  std::memset(pa.data, 0, sizeof(uint16_t) * kTileQ * kKeyBlock);  // rows past a tile's queries: finite, unused
  const T* qa_t = reinterpret_cast<const T*>(qa.data);
  const T* pa_t = reinterpret_cast<const T*>(pa.data);
  const float qs = static_cast<float>(s.scale) * kLog2e;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const bool row_major = row_major_b<T>();
  int64_t packed_b = -1, packed_kvh = -1;
  for (int64_t it = 0; it < count; ++it) {
    const FwdItem w = items[it];
    const int64_t q0 = s.cu_q[w.b], k0 = s.cu_k[w.b];
    const int64_t len_q = s.cu_q[w.b + 1] - q0, len_k = s.cu_k[w.b + 1] - k0, kvh = w.h / group;
    if (w.b != packed_b || kvh != packed_kvh) {
      pack_kt(k + k0 * Hk * Dh + kvh * Dh, Hk * Dh, len_k, Dh, dh2, kt.data, row_major);
      pack_v(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ldv, vn.data, row_major);
      packed_b = w.b;
      packed_kvh = kvh;
    }
    for (int64_t i0 = w.q_begin; i0 < w.q_end; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, w.q_end - i0), mp = up(n, 8);
      prefetch_rows(q + w.h * Dh, q0 + i0 + kTileQ, std::min<int64_t>(kTileQ, w.q_end - i0 - kTileQ), H * Dh,
                    static_cast<int64_t>(sizeof(T)) * Dh);
      // Query rows n..mp-1 of qa stay as the previous tile left them (finite values or the initial zeros): their
      // score and output rows are computed and ignored.
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(qa.data + r * dhe, q + ((q0 + i0 + r) * H + w.h) * Dh, sizeof(uint16_t) * Dh);
      if (dhe != Dh)
        for (int64_t r = 0; r < n; ++r) qa.data[r * dhe + Dh] = 0;
      int key_end[kTileQ];
      float m[kTileQ], l[kTileQ];
      int k_hi = 0;
      for (int64_t r = 0; r < n; ++r) {
        key_end[r] = static_cast<int>(varlen::causal_key_end(i0 + r, len_q, len_k, s.causal));
        k_hi = std::max(k_hi, key_end[r]);
        m[r] = neg_inf;
        l[r] = 0.f;
      }
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0), nbp = up(nb, 16);
        if (dhe > 0) {
          at::native::cpublas::brgemm(mp, nbp, dhe, dhe, kKeyBlock, kKeyBlock, false, qa_t,
                                      reinterpret_cast<const T*>(kt.data + (j0 / kKeyBlock) * dh2 * kKeyBlock),
                                      sc.data, /*is_vnni=*/true);
        } else {  // head dim 0: every score is 0
          std::memset(sc.data, 0, sizeof(float) * kTileQ * kKeyBlock);
        }
        // Scale, mask and block maximum of every row first, then the exponentials: the rows' reduction chains
        // (maximum, then sum) are independent and overlap, where one row at a time waited on each (A1, 49 keys:
        // ~9% less time; A3 shapes ~4%, alternating calls in one process).
        float block_max[kTileQ];
        for (int64_t r = 0; r < n; ++r) {
          float* srow = sc.data + r * kKeyBlock;
          const float lim = static_cast<float>(std::clamp<int64_t>(key_end[r] - j0, 0, nbp));
          VF mx = cpu_vec::vbroadcast(neg_inf);
          for (int64_t c = 0; c < nbp; c += 16) {
            VF x = cpu_vec::vload(srow + c) * qs;
            x = (lane_index() + static_cast<float>(c)) < lim ? x : cpu_vec::vbroadcast(neg_inf);
            cpu_vec::vstore(srow + c, x);
            mx = cpu_vec::vmax(mx, x);
          }
          block_max[r] = hmax(mx);
        }
        for (int64_t r = 0; r < n; ++r) {
          const float* srow = sc.data + r * kKeyBlock;
          uint16_t* prow = pa.data + r * kKeyBlock;
          const float bm = block_max[r];
          const float m_new = bm > m[r] ? bm : m[r];
          const float ms = m_new == neg_inf ? 0.f : m_new;  // no key seen yet: subtract 0, exp2(-inf) stays 0
          VF sum = {};
          for (int64_t c = 0; c < nbp; c += 16) {
            const VF p = cpu_vec::vexp2(cpu_vec::vload(srow + c) - ms);  // NaN stays NaN
            sum += p;
            store_lowp<T>(prow + c, p);
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
        if (ldv > 0)
          at::native::cpublas::brgemm(mp, ldv, nbp, kKeyBlock, ldv, ldv, /*add_C=*/j0 > 0, pa_t,
                                      reinterpret_cast<const T*>(vn.data + (j0 / 2) * ldv), acc.data,
                                      /*is_vnni=*/true);
      }
      for (int64_t r = 0; r < n; ++r) {
        // No key seen: exact zeros (whatever v holds) and lse -inf. Keys seen but every score -inf (overflow):
        // out 0/0 = NaN, as softmax, and lse -inf, as logsumexp (l is 0 only then). A NaN sum (NaN or +inf score)
        // stays NaN through the multiply.
        T* orow = out + ((q0 + i0 + r) * H + w.h) * Dv;
        float* lse_r = lse + w.h * total_q + q0 + i0 + r;
        if (key_end[r] == 0) {
          for (int64_t c = 0; c < Dv; ++c) orow[c] = T(0.f);
          *lse_r = neg_inf;
          continue;
        }
        const float inv = l[r] == 0.f ? nan : 1.f / l[r];
        store_row(orow, acc.data + r * ldv, Dv, inv);
        *lse_r = l[r] == 0.f ? neg_inf : (m[r] + std::log2(l[r])) * varlen::kLn2;  // log2 domain -> natural log
      }
    }
  }
}

template <typename T>
void forward_typed(const VarlenProblem& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::Tensor& out, at::Tensor& lse) {
  const std::vector<FwdItem> items = forward_work_items(s, kQueryChunk);
  if (items.empty()) return;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t total_q = q.size(0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    forward_items<T>(s, items.data() + begin, end - begin, qp, kp, vp, op, lp, total_q);
    at::native::cpublas::brgemm_release(true);  // AMX: hand the tile state back (a no-op elsewhere)
  });
}

// ------------------------------------------------------------------------------------------------ backward
// VNNI-2 pairs of consecutive rows of a row-major 16-bit (rows x cols) block, cols a multiple of 16: out[p*ld + c]
// = (src[2p][c], src[2p+1][c]) for p < pairs, rows from `rows` on read as zero. Two loads, two widenings and an OR
// per 16 pairs: what lets the backward's Pᵀ·dO and dSᵀ·Q run as (dO)ᵀ·P and Qᵀ·dS with P and dS as the B operand,
// instead of transposing P and dS element by element.
LF_BRGEMM_TARGET inline void pair_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t pairs, int64_t cols,
                                       uint32_t* out) {
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* r0 = 2 * p < rows ? src + 2 * p * ld : nullptr;
    const uint16_t* r1 = 2 * p + 1 < rows ? src + (2 * p + 1) * ld : nullptr;
    uint32_t* d = out + p * ld;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512i lo = r0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c)))
                            : _mm512_setzero_si512();
      const __m512i hi = r1 ? _mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c))),
                                  16)
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(d + c, _mm512_or_si512(lo, hi));
    }
  }
}

// dst[j * ld + c] = T(acc[c][j] * mul) for j < rows, c < cols, acc holding one (up(cols, 16) x kKeyBlock) float32
// slab per block of kKeyBlock rows (its pad columns finite): 16x16 blocks transposed in registers, rounded and
// written as 16-element row pieces.
template <typename T>
LF_BRGEMM_TARGET void write_transposed(const float* acc, int64_t rows, int64_t cols, int64_t ld, float mul, T* dst) {
  uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < rows; j += 16) {
    const int64_t m = std::min<int64_t>(16, rows - j);
    const float* a = acc + (j / kKeyBlock) * up(cols, 16) * kKeyBlock + j % kKeyBlock;
    for (int64_t c = 0; c < cols; c += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(a + (c + i) * kKeyBlock));
      transpose16x16_32(r);
      const int64_t w = std::min<int64_t>(16, cols - c);
      const __mmask16 wm = static_cast<__mmask16>(w == 16 ? 0xffff : (1u << w) - 1);
      for (int64_t i = 0; i < m; ++i)
        store_lowp_masked<T>(d16 + (j + i) * ld + c, (VF)_mm512_castsi512_ps(r[i]) * mul, wm);
    }
  }
}

// One (sample, kv head): owns dK/dV rows of that sample (no races); loops over its query heads and query tiles,
// recomputing S = Q·Kᵀ and dP = dO·Vᵀ per key block, P = exp2(S*scale*log2e - lse*log2e) from the saved float32 lse
// (as the hand-written kernel), dS = P * (dP - delta); dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS (transposed accumulators, one
// (head dim x kKeyBlock) float32 slab per key block, summed over all query tiles) and dQ += dS·K (finished per tile).
// Five brgemm calls per (tile, key block); P and dS rounded to the input dtype once as operands. Extra operand
// layouts: Vᵀ slabs (as Kᵀ), K in VNNI-2 pairs along its rows, the tile's Qᵀ and dOᵀ as plain (head dim x queries)
// rows (transposed once per tile), P and dS in VNNI-2 pairs along the queries (pair_rows, per key block).
template <typename T>
LF_BRGEMM_TARGET void backward_item(const VarlenProblem& s, int64_t b, int64_t kvh, const T* dout, const T* q,
                                    const T* k, const T* v, const float* lse, const T* out, int64_t total_q, T* dq,
                                    T* dk, T* dv) {
  const int64_t H = s.heads, Hk = s.kv_heads, Dh = s.head_dim, Dv = s.v_dim, group = H / Hk;
  const int64_t q0 = s.cu_q[b], k0 = s.cu_k[b];
  const int64_t len_q = s.cu_q[b + 1] - q0, len_k = s.cu_k[b + 1] - k0;
  const int64_t dh2 = up(Dh, 2) / 2, dhe = 2 * dh2, dv2 = up(Dv, 2) / 2, dve = 2 * dv2;
  const int64_t ldh = up(Dh, 16), ldv = up(Dv, 16);
  const int64_t kblocks = std::max<int64_t>(up(len_k, kKeyBlock) / kKeyBlock, 1), krows = kblocks * kKeyBlock;
  const float qs = static_cast<float>(s.scale) * kLog2e;
  const float scale = static_cast<float>(s.scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  Buf<uint32_t> kt(kblocks * dh2 * kKeyBlock), vt(kblocks * dv2 * kKeyBlock), kn((krows / 2) * ldh);
  Buf<float> dkacc(krows * ldh), dvacc(krows * ldv);  // transposed: slab kb holds (ldh x kKeyBlock) / (ldv x ...)
  std::memset(dkacc.data, 0, sizeof(float) * krows * ldh);
  std::memset(dvacc.data, 0, sizeof(float) * krows * ldv);
  const T* kbase = k + k0 * Hk * Dh + kvh * Dh;
  const bool row_major = row_major_b<T>();
  pack_kt(kbase, Hk * Dh, len_k, Dh, dh2, kt.data, row_major);
  pack_kt(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, dv2, vt.data, row_major);
  pack_v(kbase, Hk * Dh, len_k, Dh, ldh, kn.data, row_major);

  Buf<uint16_t> qa(kTileQ * std::max<int64_t>(dhe, 2)), doa(kTileQ * std::max<int64_t>(dve, 2));
  Buf<uint16_t> qtr(std::max<int64_t>(ldh, 16) * kTileQ), dotr(std::max<int64_t>(ldv, 16) * kTileQ);
  Buf<uint16_t> pa(kTileQ * kKeyBlock), dsa(kTileQ * kKeyBlock);
  Buf<uint32_t> pn((kTileQ / 2) * kKeyBlock), dsn((kTileQ / 2) * kKeyBlock);
  Buf<float> sc(kTileQ * kKeyBlock), dp(kTileQ * kKeyBlock), dqacc(kTileQ * std::max<int64_t>(ldh, 16));
  std::memset(qa.data, 0, sizeof(uint16_t) * kTileQ * std::max<int64_t>(dhe, 2));
  std::memset(doa.data, 0, sizeof(uint16_t) * kTileQ * std::max<int64_t>(dve, 2));
  std::memset(dsa.data, 0, sizeof(uint16_t) * kTileQ * kKeyBlock);
  const auto as_t = [](const void* p) { return reinterpret_cast<const T*>(p); };
  // In the row-major B layout (fp16 without AMX-FP16) P and dS are B operands as they are; in VNNI-2, paired.
  const uint16_t* p_b = row_major ? pa.data : reinterpret_cast<const uint16_t*>(pn.data);
  const uint16_t* ds_b = row_major ? dsa.data : reinterpret_cast<const uint16_t*>(dsn.data);

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < len_q; i0 += kTileQ) {
      const int64_t n = std::min<int64_t>(kTileQ, len_q - i0), mp = up(n, 8);
      const T* qrow = q + ((q0 + i0) * H + h) * Dh;
      const T* dorow = dout + ((q0 + i0) * H + h) * Dv;
      const T* orow = out + ((q0 + i0) * H + h) * Dv;
      // The next tile's Q and dO rows: measured ~10% of the A4 backward waiting in the row copies below without this.
      const int64_t next = std::min<int64_t>(kTileQ, len_q - i0 - kTileQ);
      prefetch_rows(qrow, kTileQ, next, H * Dh, static_cast<int64_t>(sizeof(T)) * Dh);
      prefetch_rows(dorow, kTileQ, next, H * Dv, static_cast<int64_t>(sizeof(T)) * Dv);
      // A operands (rows n..mp-1 zero: their products are computed and ignored; the transposed tiles' columns
      // n..mp-1 zero, as the pad rows of P and dS, so the pad queries weigh exactly 0 in dK and dV).
      std::memset(qa.data, 0, sizeof(uint16_t) * mp * dhe);
      std::memset(doa.data, 0, sizeof(uint16_t) * mp * dve);
      std::memset(qtr.data, 0, sizeof(uint16_t) * ldh * kTileQ);
      std::memset(dotr.data, 0, sizeof(uint16_t) * ldv * kTileQ);
      for (int64_t r = 0; r < n; ++r) {
        const uint16_t* qr = reinterpret_cast<const uint16_t*>(qrow + r * H * Dh);
        const uint16_t* gr = reinterpret_cast<const uint16_t*>(dorow + r * H * Dv);
        std::memcpy(qa.data + r * dhe, qr, sizeof(uint16_t) * Dh);
        std::memcpy(doa.data + r * dve, gr, sizeof(uint16_t) * Dv);
        for (int64_t d = 0; d < Dh; ++d) qtr.data[d * kTileQ + r] = qr[d];
        for (int64_t c = 0; c < Dv; ++c) dotr.data[c * kTileQ + r] = gr[c];
      }
      if (row_major) {  // pad query rows of P and dS: exact zeros (stale values could be inf/NaN)
        std::memset(pa.data + n * kKeyBlock, 0, sizeof(uint16_t) * (mp - n) * kKeyBlock);
        std::memset(dsa.data + n * kKeyBlock, 0, sizeof(uint16_t) * (mp - n) * kKeyBlock);
      }
      int key_end[kTileQ];
      float shift[kTileQ], delta[kTileQ] = {};
      int k_hi = 0;
      for (int64_t r = 0; r < n; ++r) {
        key_end[r] = static_cast<int>(varlen::causal_key_end(i0 + r, len_q, len_k, s.causal));
        k_hi = std::max(k_hi, key_end[r]);
        const float lv = lse[h * total_q + q0 + i0 + r];
        shift[r] = lv == neg_inf ? std::numeric_limits<float>::infinity() : lv * kLog2e;  // no key: P = 0
      }
      if (k_hi > kKeyBlock) {  // else delta comes from P and dP below
        for (int64_t r = 0; r < n; ++r) {
          VF d = {};  // delta = rowsum(dO * O) in float32 from the stored values
          const T* o = orow + r * H * Dv;
          const T* g = dorow + r * H * Dv;
          for (int64_t c = 0; c < Dv; c += 16) d += load_wide(o + c, Dv - c) * load_wide(g + c, Dv - c);
          delta[r] = hsum(d);
        }
      }
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0), nbp = up(nb, 16), slab = j0 / kKeyBlock;
        if (dhe > 0)
          at::native::cpublas::brgemm(mp, nbp, dhe, dhe, kKeyBlock, kKeyBlock, false, as_t(qa.data),
                                      as_t(kt.data + slab * dh2 * kKeyBlock), sc.data, true);  // S = Q Kᵀ
        else
          std::memset(sc.data, 0, sizeof(float) * kTileQ * kKeyBlock);
        if (dve > 0)
          at::native::cpublas::brgemm(mp, nbp, dve, dve, kKeyBlock, kKeyBlock, false, as_t(doa.data),
                                      as_t(vt.data + slab * dv2 * kKeyBlock), dp.data, true);  // dP = dO Vᵀ
        else
          std::memset(dp.data, 0, sizeof(float) * kTileQ * kKeyBlock);
        for (int64_t r = 0; r < n; ++r) {
          float* srow = sc.data + r * kKeyBlock;
          const float* dprow = dp.data + r * kKeyBlock;
          uint16_t* prow = pa.data + r * kKeyBlock;
          uint16_t* dsrow = dsa.data + r * kKeyBlock;
          const float lim = static_cast<float>(std::clamp<int64_t>(key_end[r] - j0, 0, nbp));
          for (int64_t c = 0; c < nbp; c += 16) {  // P over S, in place
            VF x = cpu_vec::vload(srow + c) * qs;
            x = (lane_index() + static_cast<float>(c)) < lim ? x : cpu_vec::vbroadcast(neg_inf);
            cpu_vec::vstore(srow + c, cpu_vec::vexp2(x - shift[r]));
          }
          float dlt = delta[r];
          if (k_hi <= kKeyBlock) {
            // All the row's keys in this block: delta = rowsum(P * dP) = dO . (P V), the unrounded output, in float32.
            // rowsum(dO * O) from the bf16-rounded O differs from it by O's rounding, which dS = P (dP - delta) then
            // carries into every key's gradient: with one or two keys per query (causal, few keys) that made dq/dk
            // 3-4x the error of torch's bf16 math.
            VF acc = {};
            for (int64_t c = 0; c < nbp; c += 16) acc += cpu_vec::vload(srow + c) * cpu_vec::vload(dprow + c);
            dlt = hsum(acc);
          }
          for (int64_t c = 0; c < nbp; c += 16) {
            const VF p = cpu_vec::vload(srow + c);
            store_lowp<T>(prow + c, p);
            store_lowp<T>(dsrow + c, p * (cpu_vec::vload(dprow + c) - dlt));
          }
        }
        if (!row_major) {
          pair_rows(pa.data, kKeyBlock, n, mp / 2, nbp, pn.data);
          pair_rows(dsa.data, kKeyBlock, n, mp / 2, nbp, dsn.data);
        }
        if (ldv > 0)  // dVᵀ += dOᵀ P
          at::native::cpublas::brgemm(ldv, nbp, mp, kTileQ, kKeyBlock, kKeyBlock, true, as_t(dotr.data), as_t(p_b),
                                      dvacc.data + slab * ldv * kKeyBlock, true);
        if (ldh > 0) {
          // dKᵀ += Qᵀ dS
          at::native::cpublas::brgemm(ldh, nbp, mp, kTileQ, kKeyBlock, kKeyBlock, true, as_t(qtr.data), as_t(ds_b),
                                      dkacc.data + slab * ldh * kKeyBlock, true);
          // dQ (+)= dS K
          at::native::cpublas::brgemm(mp, ldh, nbp, kKeyBlock, ldh, ldh, j0 > 0, as_t(dsa.data),
                                      as_t(kn.data + (j0 / 2) * ldh), dqacc.data, true);
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        T* g = dq + ((q0 + i0 + r) * H + h) * Dh;
        if (k_hi > 0)
          store_row(g, dqacc.data + r * ldh, Dh, scale);
        else
          std::memset(static_cast<void*>(g), 0, sizeof(T) * Dh);
      }
    }
  }
  write_transposed(dkacc.data, len_k, Dh, Hk * Dh, scale, dk + k0 * Hk * Dh + kvh * Dh);
  write_transposed(dvacc.data, len_k, Dv, Hk * Dv, 1.f, dv + k0 * Hk * Dv + kvh * Dv);
}

template <typename T>
void backward_typed(const VarlenProblem& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                    at::Tensor& dv) {
  const T* dop = dout.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t total_q = q.size(0);
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      backward_item<T>(s, w / s.kv_heads, w % s.kv_heads, dop, qp, kp, vp, lp, op, total_q, dqp, dkp, dvp);
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

bool available(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  // torch routes brgemm to oneDNN only while mkldnn is enabled (torch.backends.mkldnn.flags can turn it off).
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool cpu = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!cpu) return false;
  // The packing follows the micro-kernel's layout (VNNI-2, or row-major for fp16 on AVX512-FP16 without AMX-FP16).
  if (dtype == at::kBFloat16) return brgemm_b_layout<c10::BFloat16>() == BrgemmLayout::kVnni2;
  return brgemm_b_layout<c10::Half>() != BrgemmLayout::kNone;
}

void forward(const VarlenProblem& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse) {
  TORCH_CHECK(available(q.scalar_type()), "varlen_attention: the brgemm kernel is not available for ",
              q.scalar_type(), " on this CPU");
  if (q.scalar_type() == at::kBFloat16)
    forward_typed<c10::BFloat16>(s, q, k, v, out, lse);
  else
    forward_typed<c10::Half>(s, q, k, v, out, lse);
}

void backward(const VarlenProblem& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  TORCH_CHECK(available(q.scalar_type()), "varlen_attention: the brgemm kernel is not available for ",
              q.scalar_type(), " on this CPU");
  if (q.scalar_type() == at::kBFloat16)
    backward_typed<c10::BFloat16>(s, dout, q, k, v, out, lse, dq, dk, dv);
  else
    backward_typed<c10::Half>(s, dout, q, k, v, out, lse, dq, dk, dv);
}

#else  // not x86 with GCC/Clang: available() is false, forward/backward are never called

bool available(at::ScalarType) { return false; }
void forward(const VarlenProblem&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
             at::Tensor&) {
  TORCH_CHECK(false, "varlen_attention: the brgemm kernel is not built for this CPU");
}
void backward(const VarlenProblem&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "varlen_attention: the brgemm kernel is not built for this CPU");
}

#endif

}  // namespace varlen_brgemm
}  // namespace lookfast
