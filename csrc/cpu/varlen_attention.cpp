// Variable-length (packed) attention on the CPU: forward and backward, float32/float64/float16/bfloat16.
//
// Layout ("queries as vector lanes"): a tile of VL queries (16 floats, 8 doubles) is transposed into Qt (Dh x VL), so
// a score tile S^T (keys x VL), the running max and sum, the exp2 and the causal mask are all lane-wise vector ops,
// with no horizontal reductions; keys and values of one (sample, kv-head) are packed once into float rows and stay in
// cache while the query tiles stream past them. That is what the models' shapes need: thousands of pixel queries
// against 16..256 latents of width 8 (Dyn-Perceiver z->x), a few hundred latents against 49 tokens (x->z), and ragged
// self-attention over a few hundred tokens with Dh 64 (LookWhere). Long key ranges are split in blocks of kKeyBlock
// with the online-softmax rescale (log2 domain, conventions in common/varlen_attention.h).
//
// Vector code uses GCC/Clang vector extensions and is compiled three times (AVX-512, AVX2+FMA, baseline) with
// target_clones, so a portable build still runs 512-bit code where the CPU has it.
//
// Backward: one work item per (sample, kv-head) owns dk/dv rows of that sample (no races) and, looping over its query
// heads and query tiles, recomputes P = exp2(s2 - lse*log2e) per key block and finishes dq of each tile in place.
// Scratch is per tile; no (queries x keys) tensor is ever materialised beyond one key block.
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
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/varlen_attention.h"
#include "cpu/varlen_attention_brgemm.h"
#include "cpu/varlen_attention_isa.h"
#include "cpu/varlen_attention_lowp.h"
#include "cpu/lowp_convert.h"
#include "cpu/varlen_attention_work.h"
#include "cpu/vector_math.h"

namespace lookfast {
namespace {

using namespace cpu_vec;

constexpr int kKeyBlock = 128;   // keys per score block (S^T block = kKeyBlock x VL accumulators, fits L1)
constexpr int kQueryChunk = 256; // queries per forward work item (K/V packing amortised over them)
constexpr int kFlushTiles = 4;   // backward: query tiles summed apart before joining the dK/dV totals

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

using Problem = VarlenProblem;  // cpu/varlen_attention_work.h

// ------------------------------------------------------------------------------------------------ micro-kernels
// S^T[j] (VL lanes) = sum_d Qt[d] * K[j][d] for keys j in [0, n); K rows have stride ldk. Returns the lane-wise max
// of the scores. DIM > 0 fixes the head dim at compile time (the d loop unrolls and Qt stays in registers).
template <typename acc_t, int DIM>
LF_INLINE typename Vec<acc_t>::type scores_t(const acc_t* qt, const acc_t* k, int64_t ldk, int64_t dim_rt, int64_t n,
                                             acc_t* st) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  V mx = vbroadcast(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const acc_t* kr = k + j * ldk;
    V s0 = {}, s1 = {}, s2 = {}, s3 = {}, s4 = {}, s5 = {}, s6 = {}, s7 = {};
    for (int64_t d = 0; d < dim; ++d) {
      const V qd = vload(qt + d * VL);
      s0 += qd * kr[d];
      s1 += qd * kr[ldk + d];
      s2 += qd * kr[2 * ldk + d];
      s3 += qd * kr[3 * ldk + d];
      s4 += qd * kr[4 * ldk + d];
      s5 += qd * kr[5 * ldk + d];
      s6 += qd * kr[6 * ldk + d];
      s7 += qd * kr[7 * ldk + d];
    }
    acc_t* o = st + j * VL;
    vstore(o, s0);
    vstore(o + VL, s1);
    vstore(o + 2 * VL, s2);
    vstore(o + 3 * VL, s3);
    vstore(o + 4 * VL, s4);
    vstore(o + 5 * VL, s5);
    vstore(o + 6 * VL, s6);
    vstore(o + 7 * VL, s7);
    mx = vmax(vmax(vmax(mx, vmax(s0, s1)), vmax(s2, s3)), vmax(vmax(s4, s5), vmax(s6, s7)));
  }
  for (; j + 2 <= n; j += 2) {
    const acc_t* kr = k + j * ldk;
    V s0 = {}, s1 = {};
    for (int64_t d = 0; d < dim; ++d) {
      const V qd = vload(qt + d * VL);
      s0 += qd * kr[d];
      s1 += qd * kr[ldk + d];
    }
    vstore(st + j * VL, s0);
    vstore(st + (j + 1) * VL, s1);
    mx = vmax(mx, vmax(s0, s1));
  }
  for (; j < n; ++j) {
    const acc_t* k0 = k + j * ldk;
    V s0 = {};
    for (int64_t d = 0; d < dim; ++d) s0 += vload(qt + d * VL) * k0[d];
    vstore(st + j * VL, s0);
    mx = vmax(mx, s0);
  }
  return mx;
}

// acc_t[c] (VL lanes) += sum_j P^T[j] * V[j][c] for c in [0, cols) (cols a multiple of 8, rows of V padded to it).
template <typename acc_t>
LF_INLINE void accumulate_pv(const acc_t* pt, const acc_t* v, int64_t ldv, int64_t cols, int64_t n, acc_t* acc) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    V a0 = vload(acc + (c0 + 0) * VL), a1 = vload(acc + (c0 + 1) * VL), a2 = vload(acc + (c0 + 2) * VL),
      a3 = vload(acc + (c0 + 3) * VL), a4 = vload(acc + (c0 + 4) * VL), a5 = vload(acc + (c0 + 5) * VL),
      a6 = vload(acc + (c0 + 6) * VL), a7 = vload(acc + (c0 + 7) * VL);
    const acc_t* vr = v + c0;
    for (int64_t j = 0; j < n; ++j, vr += ldv) {
      const V p = vload(pt + j * VL);
      a0 += p * vr[0];
      a1 += p * vr[1];
      a2 += p * vr[2];
      a3 += p * vr[3];
      a4 += p * vr[4];
      a5 += p * vr[5];
      a6 += p * vr[6];
      a7 += p * vr[7];
    }
    vstore(acc + (c0 + 0) * VL, a0);
    vstore(acc + (c0 + 1) * VL, a1);
    vstore(acc + (c0 + 2) * VL, a2);
    vstore(acc + (c0 + 3) * VL, a3);
    vstore(acc + (c0 + 4) * VL, a4);
    vstore(acc + (c0 + 5) * VL, a5);
    vstore(acc + (c0 + 6) * VL, a6);
    vstore(acc + (c0 + 7) * VL, a7);
  }
}

// P^T[j] = exp2(S^T[j] - ms) (written over S^T) fused with the first 8 columns of acc += P^T V; returns the lane-wise
// sum of P. The remaining columns reuse the stored P.
template <typename acc_t>
LF_INLINE typename Vec<acc_t>::type softmax_pv(acc_t* st, typename Vec<acc_t>::type ms, const acc_t* v, int64_t ldv,
                                               int64_t cols, int64_t n, acc_t* acc) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  V sum = {};
  if (cols == 0) {  // value width 0: only the sum (for lse); V has no column to read
    for (int64_t j = 0; j < n; ++j) {
      const V p = vexp2(vload(st + j * VL) - ms);
      vstore(st + j * VL, p);
      sum += p;
    }
    return sum;
  }
  V a0 = vload(acc), a1 = vload(acc + VL), a2 = vload(acc + 2 * VL), a3 = vload(acc + 3 * VL),
    a4 = vload(acc + 4 * VL), a5 = vload(acc + 5 * VL), a6 = vload(acc + 6 * VL), a7 = vload(acc + 7 * VL);
  const acc_t* vr = v;
  for (int64_t j = 0; j < n; ++j, vr += ldv) {
    const V p = vexp2(vload(st + j * VL) - ms);
    vstore(st + j * VL, p);
    sum += p;
    a0 += p * vr[0];
    a1 += p * vr[1];
    a2 += p * vr[2];
    a3 += p * vr[3];
    a4 += p * vr[4];
    a5 += p * vr[5];
    a6 += p * vr[6];
    a7 += p * vr[7];
  }
  vstore(acc, a0);
  vstore(acc + VL, a1);
  vstore(acc + 2 * VL, a2);
  vstore(acc + 3 * VL, a3);
  vstore(acc + 4 * VL, a4);
  vstore(acc + 5 * VL, a5);
  vstore(acc + 6 * VL, a6);
  vstore(acc + 7 * VL, a7);
  if (cols > 8) accumulate_pv(st, v + 8, ldv, cols - 8, n, acc + 8 * VL);
  return sum;
}

// R[j][c..c+NV*VL) += sum_lane W^T[j][lane] * X[lane][c..] for NJ keys j: NJ x NV accumulators stay in registers.
template <typename acc_t, int NJ, int NV>
LF_INLINE void rows_kernel(const acc_t* wt, const acc_t* x, int64_t ldx, acc_t* r, int64_t ldr) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  V a[NJ][NV];
#pragma GCC unroll 4
  for (int jj = 0; jj < NJ; ++jj)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) a[jj][t] = vload(r + jj * ldr + t * VL);
  for (int lane = 0; lane < VL; ++lane) {
    V xv[NV];
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) xv[t] = vload(x + lane * ldx + t * VL);
#pragma GCC unroll 4
    for (int jj = 0; jj < NJ; ++jj) {
      const acc_t w = wt[jj * VL + lane];
#pragma GCC unroll 4
      for (int t = 0; t < NV; ++t) a[jj][t] += xv[t] * w;
    }
  }
#pragma GCC unroll 4
  for (int jj = 0; jj < NJ; ++jj)
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) vstore(r + jj * ldr + t * VL, a[jj][t]);
}

template <typename acc_t, int NJ>
LF_INLINE void rows_group(const acc_t* wt, const acc_t* x, int64_t ldx, int64_t cols, acc_t* r, int64_t ldr) {
  constexpr int VL = Vec<acc_t>::size;
  int64_t c = 0;
  for (; c + 4 * VL <= cols; c += 4 * VL) rows_kernel<acc_t, NJ, 4>(wt, x + c, ldx, r + c, ldr);
  switch ((cols - c) / VL) {
    case 3: rows_kernel<acc_t, NJ, 3>(wt, x + c, ldx, r + c, ldr); break;
    case 2: rows_kernel<acc_t, NJ, 2>(wt, x + c, ldx, r + c, ldr); break;
    case 1: rows_kernel<acc_t, NJ, 1>(wt, x + c, ldx, r + c, ldr); break;
    default: break;
  }
}

// Rows R[j][:] (cols, a multiple of VL) += sum_lane W^T[j][lane] * X[lane][:] for j in [0, n): the rank-VL update
// behind dV += P^T dO and dK += dS^T Q.
template <typename acc_t>
LF_INLINE void accumulate_rows(const acc_t* wt, const acc_t* x, int64_t ldx, int64_t cols, int64_t n, acc_t* r,
                               int64_t ldr) {
  constexpr int VL = Vec<acc_t>::size;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) rows_group<acc_t, 4>(wt + j * VL, x, ldx, cols, r + j * ldr, ldr);
  for (; j < n; ++j) rows_group<acc_t, 1>(wt + j * VL, x, ldx, cols, r + j * ldr, ldr);
}

// Lanes whose query sees fewer than j+1 keys get -inf at key j (causal masking of one score block).
template <typename acc_t>
LF_INLINE void mask_causal(acc_t* st, int64_t j_begin, int64_t n, const int* key_end) {
  constexpr int VL = Vec<acc_t>::size;
  for (int64_t j = 0; j < n; ++j)
    for (int lane = 0; lane < VL; ++lane)
      if (j_begin + j >= key_end[lane]) st[j * VL + lane] = -std::numeric_limits<acc_t>::infinity();
}

// ------------------------------------------------------------------------------------------------ packing
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols, int64_t ld, acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * src_stride;
    acc_t* d = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]);
    for (int64_t c = cols; c < ld; ++c) d[c] = acc_t(0);
  }
}

// In-register transpose of a VL x VL block (log2(VL) butterfly stages of two-source shuffles).
template <typename V, int S, int L, int... K>
LF_INLINE V shuffle_lo(V a, V b, std::integer_sequence<int, K...>) {
  return __builtin_shufflevector(a, b, ((K & S) ? L + K - S : K)...);
}
template <typename V, int S, int L, int... K>
LF_INLINE V shuffle_hi(V a, V b, std::integer_sequence<int, K...>) {
  return __builtin_shufflevector(a, b, ((K & S) ? L + K : K + S)...);
}
template <typename acc_t, int S>
LF_INLINE void transpose_stage(typename Vec<acc_t>::type* r) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
#pragma GCC unroll 16
  for (int i = 0; i < VL; ++i) {
    if (i & S) continue;
    const V a = r[i], b = r[i + S];
    r[i] = shuffle_lo<V, S, VL>(a, b, std::make_integer_sequence<int, VL>{});
    r[i + S] = shuffle_hi<V, S, VL>(a, b, std::make_integer_sequence<int, VL>{});
  }
}
template <typename acc_t>
LF_INLINE void transpose_block(typename Vec<acc_t>::type* r) {
  transpose_stage<acc_t, 1>(r);
  transpose_stage<acc_t, 2>(r);
  transpose_stage<acc_t, 4>(r);
  if constexpr (Vec<acc_t>::size == 16) transpose_stage<acc_t, 8>(r);
}

// dst[c * VL + lane] = scale * src[lane * stride + c] for lane < n (0 for the other lanes), c < cols.
template <typename scalar_t, typename acc_t>
LF_INLINE void pack_transposed(const scalar_t* src, int64_t src_stride, int64_t n, int64_t cols, acc_t scale,
                               acc_t* dst) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  // Same type, or bf16 widened 16 (8) lanes at a time (lowp_convert.h): element-wise conversion cost as much as the
  // attention itself on narrow heads (A2, width 8).
  if constexpr (std::is_same<scalar_t, acc_t>::value || (std::is_same_v<acc_t, float> && kVectorWidens<scalar_t>)) {
    if (cols >= VL || cols == VL / 2) {
      // Blocks of VL columns; a ragged last block overlaps the previous one (same values written twice).
      V r[VL];
      const bool half = cols < VL;
      for (int64_t c0 = 0; c0 < cols; c0 += VL) {
        const int64_t c = half ? 0 : std::min<int64_t>(c0, cols - VL);
#pragma GCC unroll 16
        for (int lane = 0; lane < VL; ++lane) {
          V x = {};
          if (lane < n) x = half ? load_lanes<scalar_t, acc_t, VL / 2>(src + lane * src_stride)
                                 : load_lanes<scalar_t, acc_t, VL>(src + lane * src_stride + c);
          r[lane] = x * scale;
        }
        transpose_block<acc_t>(r);
        const int width = half ? VL / 2 : VL;
        for (int t = 0; t < width; ++t) vstore(dst + (c + t) * VL, r[t]);
      }
      return;
    }
  }
  for (int lane = 0; lane < VL; ++lane) {
    if (lane < n) {
      const scalar_t* s = src + lane * src_stride;
      for (int64_t c = 0; c < cols; ++c) dst[c * VL + lane] = static_cast<acc_t>(s[c]) * scale;
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c * VL + lane] = acc_t(0);
    }
  }
}

// dst[lane * stride + c] = mul * src[c * VL + lane] for lane < n, c < cols. src must hold max(cols, VL) rows.
template <typename scalar_t, typename acc_t>
LF_INLINE void store_transposed(const acc_t* src, int64_t n, int64_t cols, acc_t mul, scalar_t* dst, int64_t stride) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  if constexpr (std::is_same<scalar_t, acc_t>::value || (std::is_same_v<acc_t, float> && kVectorWidens<scalar_t>)) {
    if (cols >= VL || cols == VL / 2) {
      V r[VL];
      const bool half = cols < VL;
      for (int64_t c0 = 0; c0 < cols; c0 += VL) {
        const int64_t c = half ? 0 : std::min<int64_t>(c0, cols - VL);
#pragma GCC unroll 16
        for (int t = 0; t < VL; ++t) r[t] = vload(src + (c + t) * VL) * mul;
        transpose_block<acc_t>(r);
#pragma GCC unroll 16
        for (int lane = 0; lane < VL; ++lane) {
          if (lane >= n) break;
          if (half)
            store_lanes<scalar_t, acc_t, VL / 2>(dst + lane * stride, r[lane]);
          else
            store_lanes<scalar_t, acc_t, VL>(dst + lane * stride + c, r[lane]);
        }
      }
      return;
    }
  }
  for (int64_t lane = 0; lane < n; ++lane)
    for (int64_t c = 0; c < cols; ++c) dst[lane * stride + c] = static_cast<scalar_t>(src[c * VL + lane] * mul);
}

template <typename T>
struct AlignedBuffer {
  T* data = nullptr;
  explicit AlignedBuffer(int64_t n) {
    data = static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 1), std::align_val_t(64)));
  }
  ~AlignedBuffer() { ::operator delete[](data, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// ------------------------------------------------------------------------------------------------ forward
// One query tile (n <= VL queries starting at sample-local index q_local) of one head against packed K/V; leaves the
// unnormalised accumulator in acc (ldv x VL) and returns the per-lane log2-domain max and sum.
template <typename acc_t, int DIM>
LF_INLINE void forward_tile(const Problem& pb, const acc_t* qt, const acc_t* kp, int64_t ldk, const acc_t* vp,
                            int64_t ldv, int64_t len_q, int64_t len_k, int64_t q_local, int64_t n, acc_t* st,
                            acc_t* acc, typename Vec<acc_t>::type& m_out, typename Vec<acc_t>::type& l_out) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  int key_end[VL];
  int k_lo = static_cast<int>(len_k), k_hi = 0;
  for (int lane = 0; lane < VL; ++lane) {
    const int e = lane < n ? varlen::causal_key_end(q_local + lane, len_q, len_k, pb.causal) : 0;
    key_end[lane] = e;
    if (lane < n) k_lo = std::min(k_lo, e);
    k_hi = std::max(k_hi, e);
  }
  V m = vbroadcast(neg_inf), l = {};
  for (int64_t c = 0; c < ldv; ++c) vstore(acc + c * VL, V{});
  for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
    const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0);
    V mx = scores_t<acc_t, DIM>(qt, kp + j0 * ldk, ldk, pb.head_dim, nb, st);
    if (j0 + nb > k_lo) {
      mask_causal(st, j0, nb, key_end);
      mx = vbroadcast(neg_inf);
      for (int64_t j = 0; j < nb; ++j) mx = vmax(mx, vload(st + j * VL));
    }
    mx = vmax(mx, m);
    const V ms = mx == neg_inf ? V{} : mx;  // a fully masked lane subtracts 0: exp2(-inf) stays 0, never NaN
    if (j0 > 0) {
      const V alpha = vexp2(m - ms);  // 0 where m was -inf (exp2 flushes), 1 where the max did not move
      l = l * alpha;
      for (int64_t c = 0; c < ldv; ++c) vstore(acc + c * VL, vload(acc + c * VL) * alpha);
    }
    m = mx;
    l += softmax_pv(st, ms, vp + j0 * ldv, ldv, ldv, nb, acc);
  }
  m_out = m;
  l_out = l;
}

template <typename scalar_t, typename acc_t>
LF_INLINE void forward_items_impl(const Problem& pb, const FwdItem* items, int64_t count, const scalar_t* q,
                                  const scalar_t* k, const scalar_t* v, scalar_t* out, float* lse, int64_t total_q) {
  constexpr int VL = Vec<acc_t>::size;
  const int64_t H = pb.heads, Hk = pb.kv_heads, Dh = pb.head_dim, Dv = pb.v_dim;
  const int64_t group = H / Hk;
  const int64_t ldk = Dh, ldv = round_up(Dv, 8);
  int64_t max_lk = 0;
  for (int64_t i = 0; i < count; ++i)
    max_lk = std::max<int64_t>(max_lk, pb.cu_k[items[i].b + 1] - pb.cu_k[items[i].b]);
  typedef typename Vec<acc_t>::type V;
  AlignedBuffer<acc_t> kbuf(max_lk * ldk), vbuf(max_lk * ldv), qt(Dh * VL), st(kKeyBlock * VL),
      acc(std::max<int64_t>(ldv, VL) * VL);
  std::fill(acc.data, acc.data + std::max<int64_t>(ldv, VL) * VL, acc_t(0));
  int64_t packed_b = -1, packed_kvh = -1;
  const acc_t qscale = static_cast<acc_t>(pb.scale) * static_cast<acc_t>(1.4426950408889634);
  for (int64_t it = 0; it < count; ++it) {
    const FwdItem w = items[it];
    const int64_t q0 = pb.cu_q[w.b], k0 = pb.cu_k[w.b];
    const int64_t len_q = pb.cu_q[w.b + 1] - q0, len_k = pb.cu_k[w.b + 1] - k0;
    const int64_t kvh = w.h / group;
    if (w.b != packed_b || kvh != packed_kvh) {
      pack_rows(k + k0 * Hk * Dh + kvh * Dh, Hk * Dh, len_k, Dh, ldk, kbuf.data);
      pack_rows(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ldv, vbuf.data);
      packed_b = w.b;
      packed_kvh = kvh;
    }
    for (int64_t i0 = w.q_begin; i0 < w.q_end; i0 += VL) {
      const int64_t n = std::min<int64_t>(VL, w.q_end - i0);
      const scalar_t* qrow = q + ((q0 + i0) * H + w.h) * Dh;
      pack_transposed(qrow, H * Dh, n, Dh, qscale, qt.data);
      // The next tile's query rows are strided (H * Dh apart): fetch them while this tile computes.
      const int64_t n_next = std::min<int64_t>(VL, w.q_end - i0 - VL);
      for (int64_t r = 0; r < n_next; ++r)
        for (int64_t c = 0; c < Dh; c += 64 / static_cast<int64_t>(sizeof(scalar_t)))
          __builtin_prefetch(qrow + (VL + r) * H * Dh + c);
      V m, l;
#define LF_TILE(D)                                                                                                  \
  forward_tile<acc_t, D>(pb, qt.data, kbuf.data, ldk, vbuf.data, ldv, len_q, len_k, i0, n, st.data, acc.data, m, l)
      // float64 is the gradcheck path: one generic instantiation keeps the build lean.
      if constexpr (std::is_same<acc_t, double>::value) {
        LF_TILE(0);
      } else {
        switch (Dh) {
          case 8: LF_TILE(8); break;
          case 16: LF_TILE(16); break;
          case 32: LF_TILE(32); break;
          case 64: LF_TILE(64); break;
          default: LF_TILE(0); break;
        }
      }
#undef LF_TILE
      // NaN semantics (those of softmax): a lane that sees keys outputs acc / l, so a NaN/inf score (NaN p) or a NaN
      // value gives NaN, and all-(-inf) scores (l == 0: inf inputs, an overflowing softmax_scale) give 0/0 = NaN.
      // A lane that sees no key outputs exact zeros and lse = -inf, even where acc caught 0 * NaN from V.
      V seen = {};
      for (int lane = 0; lane < n; ++lane)
        seen[lane] = varlen::causal_key_end(static_cast<int>(i0 + lane), static_cast<int>(len_q),
                                            static_cast<int>(len_k), pb.causal) > 0
                         ? acc_t(1)
                         : acc_t(0);
      const V inv = acc_t(1) / l;
      const V lse_v = ((l > acc_t(0)) | (l != l)) & (seen > acc_t(0))
                          ? m * static_cast<acc_t>(varlen::kLn2) + vlog(l)
                          : vbroadcast(-std::numeric_limits<acc_t>::infinity());
      for (int64_t c = 0; c < Dv; ++c) {
        const V a = vload(acc.data + c * VL);
        vstore(acc.data + c * VL, seen > acc_t(0) ? a * inv : V{});
      }
      store_transposed(acc.data, n, Dv, acc_t(1), out + ((q0 + i0) * H + w.h) * Dv, H * Dv);
      float* lse_row = lse + w.h * total_q + q0 + i0;
      for (int64_t lane = 0; lane < n; ++lane) lse_row[lane] = static_cast<float>(lse_v[lane]);
    }
  }
}

#define LF_DEFINE_FORWARD(NAME, scalar_t, acc_t)                                                                    \
  LF_MULTIVERSION void NAME(const Problem& pb, const FwdItem* items, int64_t count, const scalar_t* q,               \
                            const scalar_t* k, const scalar_t* v, scalar_t* out, float* lse, int64_t total_q) {      \
    forward_items_impl<scalar_t, acc_t>(pb, items, count, q, k, v, out, lse, total_q);                               \
  }
LF_DEFINE_FORWARD(forward_items_f32, float, float)
LF_DEFINE_FORWARD(forward_items_f64, double, double)
LF_DEFINE_FORWARD(forward_items_f16, c10::Half, float)
LF_DEFINE_FORWARD(forward_items_bf16, c10::BFloat16, float)

// Overloads by element type over the per-type multiversioned entry points (target_clones functions stay non-template).
#define LF_FORWARD_OVERLOAD(NAME, scalar_t)                                                                         \
  inline void forward_items(const Problem& pb, const FwdItem* it, int64_t n, const scalar_t* q, const scalar_t* k,  \
                            const scalar_t* v, scalar_t* o, float* lse, int64_t tq) {                               \
    NAME(pb, it, n, q, k, v, o, lse, tq);                                                                            \
  }
LF_FORWARD_OVERLOAD(forward_items_f32, float)
LF_FORWARD_OVERLOAD(forward_items_f64, double)
LF_FORWARD_OVERLOAD(forward_items_f16, c10::Half)
LF_FORWARD_OVERLOAD(forward_items_bf16, c10::BFloat16)
#undef LF_FORWARD_OVERLOAD

// ------------------------------------------------------------------------------------------------ backward
// Probabilities of one query tile for all the keys it sees, normalised as softmax does: P = exp2(s2 - max) / sum, with
// max and sum taken here in acc_t. Recomputing P as exp2(s2 - lse * log2e) from the saved float32 lse instead
// subtracts a number of magnitude |lse| (about log2 of the key count even for small scores) and inherits lse's float32
// rounding: P then carries ~ulp(|lse|) relative error, which made float32 dk/dv 3-6x less accurate than torch's own
// float32 attention math (near-uniform attention over 256 keys) and capped float64 gradients at ~1e-7. Q.K^T is still
// computed once per tile: the scores are kept (keys x VL) and overwritten by P. `live` is 0 for pad lanes.
template <typename acc_t, int DIM>
LF_INLINE void tile_probabilities(const acc_t* qt, const acc_t* kbuf, int64_t ldh, int64_t Dh, int k_lo, int k_hi,
                                  const int* key_end, typename Vec<acc_t>::type live, acc_t* p) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  V m = vbroadcast(neg_inf);
  for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
    const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0);
    V mx = scores_t<acc_t, DIM>(qt, kbuf + j0 * ldh, ldh, Dh, nb, p + j0 * VL);
    if (j0 + nb > k_lo) {
      mask_causal(p + j0 * VL, j0, nb, key_end);
      mx = vbroadcast(neg_inf);
      for (int64_t j = 0; j < nb; ++j) mx = vmax(mx, vload(p + (j0 + j) * VL));
    }
    m = vmax(m, mx);
  }
  const V ms = m == neg_inf ? V{} : m;  // a lane with no key subtracts 0: exp2(-inf) stays 0, never NaN
  V l = {};
  for (int64_t j = 0; j < k_hi; ++j) {
    const V e = vexp2(vload(p + j * VL) - ms);
    vstore(p + j * VL, e);
    l += e;
  }
  // A lane with no key (l == 0) or a pad lane weighs 0; a NaN sum stays NaN.
  V inv = l > acc_t(0) ? acc_t(1) / l : (l == acc_t(0) ? V{} : l);
  inv = live > acc_t(0) ? inv : V{};
  for (int64_t j = 0; j < k_hi; ++j) vstore(p + j * VL, vload(p + j * VL) * inv);
}

template <typename scalar_t, typename acc_t, int DIM>
LF_INLINE void backward_item_impl(const Problem& pb, int64_t b, int64_t kvh, const scalar_t* dout, const scalar_t* q,
                                  const scalar_t* k, const scalar_t* v, const scalar_t* out, const float* lse,
                                  int64_t total_q, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  typedef typename Vec<acc_t>::type V;
  constexpr int VL = Vec<acc_t>::size;
  const int64_t H = pb.heads, Hk = pb.kv_heads, Dh = pb.head_dim, Dv = pb.v_dim;
  const int64_t group = H / Hk;
  const int64_t ldh = round_up(Dh, VL), ldv = round_up(Dv, VL);
  const int64_t q0 = pb.cu_q[b], k0 = pb.cu_k[b];
  const int64_t len_q = pb.cu_q[b + 1] - q0, len_k = pb.cu_k[b + 1] - k0;
  const acc_t log2e = static_cast<acc_t>(1.4426950408889634);
  const acc_t qscale = static_cast<acc_t>(pb.scale) * log2e;
  const acc_t scale = static_cast<acc_t>(pb.scale);

  AlignedBuffer<acc_t> kbuf(len_k * ldh), vbuf(len_k * ldv), dkacc(len_k * ldh), dvacc(len_k * ldv);
  AlignedBuffer<acc_t> qt(Dh * VL), qrows(VL * ldh), dot(Dv * VL), dorows(VL * ldv), pt(len_k * VL),
      dst(kKeyBlock * VL), dqt(std::max<int64_t>(ldh, ldv) * VL), dqblk(ldh * VL);
  pack_rows(k + k0 * Hk * Dh + kvh * Dh, Hk * Dh, len_k, Dh, ldh, kbuf.data);
  pack_rows(v + k0 * Hk * Dv + kvh * Dv, Hk * Dv, len_k, Dv, ldv, vbuf.data);
  std::fill(dkacc.data, dkacc.data + len_k * ldh, acc_t(0));
  std::fill(dvacc.data, dvacc.data + len_k * ldv, acc_t(0));
  // Two-level sums for dK and dV: each query tile adds a rank-VL update, and summing all of a sample's (query, head)
  // rows in one running sum makes a chain of thousands of additions per element (dk/dv 3-6x torch's float32 error for
  // MQA with 512 queries x 4 heads). Tiles add into dkblk/dvblk, flushed into dkacc/dvacc every kFlushTiles tiles.
  AlignedBuffer<acc_t> dkblk(len_k * ldh), dvblk(len_k * ldv);
  std::fill(dkblk.data, dkblk.data + len_k * ldh, acc_t(0));
  std::fill(dvblk.data, dvblk.data + len_k * ldv, acc_t(0));
  int64_t pending = 0;
  const auto flush = [&] {
    for (int64_t x = 0; x < len_k * ldh; ++x) dkacc.data[x] += dkblk.data[x], dkblk.data[x] = acc_t(0);
    for (int64_t x = 0; x < len_k * ldv; ++x) dvacc.data[x] += dvblk.data[x], dvblk.data[x] = acc_t(0);
    pending = 0;
  };

  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < len_q; i0 += VL) {
      const int64_t n = std::min<int64_t>(VL, len_q - i0);
      const scalar_t* qrow = q + ((q0 + i0) * H + h) * Dh;
      const scalar_t* dorow = dout + ((q0 + i0) * H + h) * Dv;
      const scalar_t* orow = out + ((q0 + i0) * H + h) * Dv;
      pack_transposed(qrow, H * Dh, n, Dh, qscale, qt.data);
      pack_transposed(dorow, H * Dv, n, Dv, acc_t(1), dot.data);
      // Row copies (zero rows past n) for the rank-VL updates of dk and dv.
      pack_rows(qrow, H * Dh, n, Dh, ldh, qrows.data);
      pack_rows(dorow, H * Dv, n, Dv, ldv, dorows.data);
      std::fill(qrows.data + n * ldh, qrows.data + VL * ldh, acc_t(0));
      std::fill(dorows.data + n * ldv, dorows.data + VL * ldv, acc_t(0));
      int key_end[VL];
      int k_lo = static_cast<int>(len_k), k_hi = 0;
      acc_t shift_l[VL];
      for (int lane = 0; lane < VL; ++lane) {
        if (lane < n) {
          const int e = varlen::causal_key_end(i0 + lane, len_q, len_k, pb.causal);
          key_end[lane] = e;
          k_lo = std::min(k_lo, e);
          k_hi = std::max(k_hi, e);
          const float lv = lse[h * total_q + q0 + i0 + lane];
          shift_l[lane] = lv == -INFINITY ? std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(lv) * log2e;
        } else {
          key_end[lane] = 0;
          shift_l[lane] = std::numeric_limits<acc_t>::infinity();
        }
      }
      // delta = rowsum(dO * O), lane-wise over the transposed tiles (O^T reuses the dQ^T buffer before it is zeroed);
      // replaced by rowsum(P * dP) below when the tile's keys fit one block.
      pack_transposed(orow, H * Dv, n, Dv, acc_t(1), dqt.data);
      V delta = {};
      for (int64_t c = 0; c < Dv; ++c) delta += vload(dot.data + c * VL) * vload(dqt.data + c * VL);
      const V live = vload(shift_l) == std::numeric_limits<acc_t>::infinity() ? V{} : vbroadcast(acc_t(1));
      tile_probabilities<acc_t, DIM>(qt.data, kbuf.data, ldh, Dh, k_lo, k_hi, key_end, live, pt.data);
      for (int64_t c = 0; c < ldh; ++c) vstore(dqt.data + c * VL, V{});
      for (int64_t j0 = 0; j0 < k_hi; j0 += kKeyBlock) {
        const int64_t nb = std::min<int64_t>(kKeyBlock, k_hi - j0);
        const acc_t* pb = pt.data + j0 * VL;
        scores_t<acc_t, DIM>(dot.data, vbuf.data + j0 * ldv, ldv, Dv, nb, dst.data);  // dP^T = dO V^T
        if (k_hi <= kKeyBlock) {
          // Every key in this block: delta = rowsum(P * dP), equal to rowsum(dO * O) in exact arithmetic but free
          // of O's rounding to the stored dtype. For bf16/fp16 and rows with few keys (where dS = P (dP - delta) is a
          // small difference), delta from the rounded O gave dQ/dK 3-4x torch's own error: a rare edge-test failure.
          V d2 = {};
          for (int64_t j = 0; j < nb; ++j) d2 += vload(pb + j * VL) * vload(dst.data + j * VL);
          delta = d2;
        }
        for (int64_t j = 0; j < nb; ++j)
          vstore(dst.data + j * VL, vload(pb + j * VL) * (vload(dst.data + j * VL) - delta));
        accumulate_rows(pb, dorows.data, ldv, ldv, nb, dvblk.data + j0 * ldv, ldv);        // dV += P^T dO
        accumulate_rows(dst.data, qrows.data, ldh, ldh, nb, dkblk.data + j0 * ldh, ldh);   // dK += dS^T Q
        if (k_hi <= kKeyBlock) {
          accumulate_pv(dst.data, kbuf.data + j0 * ldh, ldh, ldh, nb, dqt.data);           // dQ^T += K^T dS^T
        } else {  // per key block, then into the total (shorter summation chains, as for dK/dV below)
          for (int64_t c = 0; c < ldh; ++c) vstore(dqblk.data + c * VL, V{});
          accumulate_pv(dst.data, kbuf.data + j0 * ldh, ldh, ldh, nb, dqblk.data);
          for (int64_t c = 0; c < ldh; ++c) vstore(dqt.data + c * VL, vload(dqt.data + c * VL) + vload(dqblk.data + c * VL));
        }
      }
      store_transposed(dqt.data, n, Dh, scale, dq + ((q0 + i0) * H + h) * Dh, H * Dh);
      if (++pending == kFlushTiles) flush();
    }
  }
  if (pending > 0) flush();
  for (int64_t j = 0; j < len_k; ++j) {
    scalar_t* gk = dk + ((k0 + j) * Hk + kvh) * Dh;
    scalar_t* gv = dv + ((k0 + j) * Hk + kvh) * Dv;
    for (int64_t d = 0; d < Dh; ++d) gk[d] = static_cast<scalar_t>(dkacc.data[j * ldh + d] * scale);
    for (int64_t c = 0; c < Dv; ++c) gv[c] = static_cast<scalar_t>(dvacc.data[j * ldv + c]);
  }
}

#define LF_DEFINE_BACKWARD(NAME, scalar_t, acc_t)                                                                   \
  LF_MULTIVERSION void NAME(const Problem& pb, int64_t b, int64_t kvh, const scalar_t* dout, const scalar_t* q,      \
                            const scalar_t* k, const scalar_t* v, const scalar_t* out, const float* lse,            \
                            int64_t total_q, scalar_t* dq, scalar_t* dk, scalar_t* dv) {                              \
    /* DIM = 64 (Dh == Dv == 64, LookWhere's heads) unrolls both score products; float64 stays generic. */          \
    if constexpr (!std::is_same<acc_t, double>::value) {                                                            \
      if (pb.head_dim == 64 && pb.v_dim == 64) {                                                                    \
        backward_item_impl<scalar_t, acc_t, 64>(pb, b, kvh, dout, q, k, v, out, lse, total_q, dq, dk, dv);          \
        return;                                                                                                     \
      }                                                                                                             \
    }                                                                                                               \
    backward_item_impl<scalar_t, acc_t, 0>(pb, b, kvh, dout, q, k, v, out, lse, total_q, dq, dk, dv);               \
  }
LF_DEFINE_BACKWARD(backward_item_f32, float, float)
LF_DEFINE_BACKWARD(backward_item_f64, double, double)
LF_DEFINE_BACKWARD(backward_item_f16, c10::Half, float)
LF_DEFINE_BACKWARD(backward_item_bf16, c10::BFloat16, float)

#define LF_BACKWARD_OVERLOAD(NAME, scalar_t)                                                                        \
  inline void backward_item(const Problem& pb, int64_t b, int64_t kvh, const scalar_t* dout, const scalar_t* q,      \
                            const scalar_t* k, const scalar_t* v, const scalar_t* out, const float* lse,            \
                            int64_t total_q, scalar_t* dq, scalar_t* dk, scalar_t* dv) {                              \
    NAME(pb, b, kvh, dout, q, k, v, out, lse, total_q, dq, dk, dv);                                                  \
  }
LF_BACKWARD_OVERLOAD(backward_item_f32, float)
LF_BACKWARD_OVERLOAD(backward_item_f64, double)
LF_BACKWARD_OVERLOAD(backward_item_f16, c10::Half)
LF_BACKWARD_OVERLOAD(backward_item_bf16, c10::BFloat16)

// ------------------------------------------------------------------------------------------------ ops
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                     const at::Tensor& cu_k, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen_attention: q, k, v must be 3-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "varlen_attention: q, k, v must be contiguous");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt && cu_q.is_contiguous() &&
                  cu_k.is_contiguous() && cu_q.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1,
              "varlen_attention: cu_seqlens must be contiguous 1-D int32 of equal length");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && q.size(2) == k.size(2),
              "varlen_attention: k and v must agree in rows and heads, q and k in head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "varlen_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "varlen_attention: q, k, v must share a dtype");
  Problem pb;
  pb.batch = cu_q.numel() - 1;
  pb.heads = q.size(1);
  pb.kv_heads = k.size(1);
  pb.head_dim = q.size(2);
  pb.v_dim = v.size(2);
  pb.cu_q = cu_q.data_ptr<int32_t>();
  pb.cu_k = cu_k.data_ptr<int32_t>();
  pb.scale = scale;
  pb.causal = causal;
  // The Python layer validates cu_seqlens; this re-check keeps direct op calls from reading out of bounds.
  TORCH_CHECK(pb.cu_q[0] == 0 && pb.cu_k[0] == 0 && pb.cu_q[pb.batch] == q.size(0) && pb.cu_k[pb.batch] == k.size(0),
              "varlen_attention: cu_seqlens must start at 0 and end at the number of rows");
  for (int64_t b = 0; b < pb.batch; ++b)
    TORCH_CHECK(pb.cu_q[b + 1] >= pb.cu_q[b] && pb.cu_k[b + 1] >= pb.cu_k[b],
                "varlen_attention: cu_seqlens must be non-decreasing");
  return pb;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                                            double scale, bool causal) {
  const Problem pb = make_problem(q, k, v, cu_q, cu_k, scale, causal);
  const int64_t total_q = q.size(0);
  at::Tensor out = at::empty({total_q, pb.heads, pb.v_dim}, q.options());
  at::Tensor lse = at::empty({pb.heads, total_q}, q.options().dtype(at::kFloat));
  // bf16/fp16: the matrix-engine kernels where the CPU has them (cpu/varlen_attention_isa.cpp chooses).
  switch (varlen_isa::forward_kernel(q.scalar_type(), pb.head_dim)) {
    case varlen_isa::Kernel::kBrgemm: varlen_brgemm::forward(pb, q, k, v, out, lse); return {out, lse};
    case varlen_isa::Kernel::kDot: varlen_lowp::forward(pb, q, k, v, out, lse); return {out, lse};
    case varlen_isa::Kernel::kPortable: break;
  }
  const std::vector<FwdItem> items = forward_work_items(pb, kQueryChunk);
  if (items.empty()) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      forward_items(pb, items.data() + begin, end - begin, qp, kp, vp, op, lp, total_q);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
    bool causal) {
  const Problem pb = make_problem(q, k, v, cu_q, cu_k, scale, causal);
  const int64_t total_q = q.size(0);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.size(0) == total_q && out.size(1) == pb.heads &&
                  out.size(2) == pb.v_dim && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "varlen_attention_bwd: dout and out must be (total_q, H, Dv) in q's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == pb.heads && lse.size(1) == total_q,
              "varlen_attention_bwd: lse must be (H, total_q) float32");
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  switch (varlen_isa::backward_kernel(q.scalar_type(), pb.head_dim)) {
    case varlen_isa::Kernel::kBrgemm:
      varlen_brgemm::backward(pb, dout_c, q, k, v, out_c, lse_c, dq, dk, dv);
      return {dq, dk, dv};
    case varlen_isa::Kernel::kDot:
      varlen_lowp::backward(pb, dout_c, q, k, v, out_c, lse_c, dq, dk, dv);
      return {dq, dk, dv};
    case varlen_isa::Kernel::kPortable: break;
  }
  const int64_t work = pb.batch * pb.kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_bwd_cpu", [&] {
    const scalar_t* dop = dout_c.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* op = out_c.data_ptr<scalar_t>();
    const float* lp = lse_c.data_ptr<float>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w)
        backward_item(pb, w / pb.kv_heads, w % pb.kv_heads, dop, qp, kp, vp, op, lp, total_q, dqp, dkp, dvp);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace lookfast
