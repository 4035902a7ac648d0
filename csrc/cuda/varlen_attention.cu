// Variable-length (packed) attention, CUDA forward and backward: lookfast::varlen_attention_fwd / _bwd.
//
// Design: a group of TPQ threads owns one query (forward, dq) or one key (dk/dv); the group splits the head dim,
// each thread holding DPT interleaved elements (d = e * TPQ + lane) in registers, and dot products are reduced with
// warp shuffles. The other side (keys and values, or queries and output gradients) is staged tile by tile in shared
// memory, converted to the accumulation type once, and read as warp broadcasts. Small key sets (Dyn-Perceiver z->x:
// 16..256 keys of width 8..98) fit in one tile: K/V are loaded once per block and the queries stream past them.
// Softmax is online (running max and sum in registers, cuda/online_softmax.cuh; the masking rule and conventions are
// shared with the CPU kernel through common/varlen_attention.h).
//
// Backward (race-free, deterministic, no atomics): (1) the dq kernel, per query, recomputes the softmax statistics
// (row max m and sum l, in the accumulation type) in a first pass over the keys, then accumulates dq with
// p = exp(s - m) / l, and stores m, 1/l and delta = rowsum(P * dP) (= rowsum(dout * out) without out's rounding) in an
// fp32/fp64 scratch (3, H, total_q);
// (2) the dk/dv kernel, per key, loops over the H/Hk query heads that share its kv head and over the query tiles that
// can see it, with the same p. Every output element has exactly one writer. The forward's float32 lse is not used:
// exp(s - lse) inherits lse's float32 rounding (~ulp(|lse|) relative error in every p), which capped float64
// gradients at ~1e-7 and made float32 dk/dv up to ~3.5x less accurate than torch's own float32 attention (found by
// the CPU emulator of tests/cuda_emulator); the CPU kernel normalises the same way.
//
// bf16/fp16 forwards and backwards with head dims <= 128 on sm_80+ run on the tensor cores instead
// (varlen_attention_mma.cu and varlen_attention_mma_bwd.cu: wmma fragments, fp32 accumulation and softmax statistics,
// rooflines there; the backward is compiled, never run on a GPU); LOOKFAST_CUDA_MMA=0 selects this file's SIMT kernels,
// which stay the path for fp32/fp64, wider heads and GPUs before sm_80 (fp32 accumulation for bf16/fp16).
//
// Roofline on an H100 SXM (3.35 TB/s HBM; ~67 TFLOP/s fp32 FMA, which these kernels use: no tensor cores):
//   fwd FLOPs = 2 * sum_b Lq_b * Lk_b * (Dh + Dv) * H; bytes ~ q + out + lse, plus K/V once per block.
//   A2 (B 16, 3136 queries x 64 keys, width 8, fp32): 0.10 GFLOP + 3.2M exps, 3.4 MB (q/out) -> 1.0 us of HBM,
//      1.5 us of FMA, 0.8 us of MUFU exp: compute bound at ~2-3 us; K/V (4 KB per sample) stay in shared memory.
//   A1 (B 64, 128 queries x 49 keys, width 32, fp32): 0.05 GFLOP, 2.8 MB -> ~0.8 us each way: launch bound.
//   A3 (B 16, ~165 tokens, 12 heads, Dh 64): 1.58 GFLOP -> ~24 us FMA bound in any dtype (16-32 MB -> 5-10 us of
//      HBM). The Triton kernel, on tensor cores, is the faster GPU path for wide fp16/bf16 heads; this kernel is
//      for the narrow cross-attention shapes and fp32/fp64.
//   Backward does ~2.5x the forward FLOPs and moves ~2x the bytes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/varlen_attention.h"
#include "cuda/online_softmax.cuh"
#include "cuda/varlen_attention_mma.h"

namespace lookfast {
namespace {

namespace osm = ::lookfast::online_softmax;

// The kernel family the latest forward ([0]) and backward ([1]) call ran: "mma" (tensor cores), "simt", or "none"
// (nothing to compute); "" before the first call. Read by the lookfast_cuda diagnostic at the end of this file, with
// which the GPU tests check that bf16/fp16 really ran on the tensor cores.
std::atomic<const char*> g_last_kernel[2] = {"", ""};

constexpr int kThreads = 128;
constexpr int kChunk = 8;                    // keys scored before one online-softmax rescale
constexpr int kSumChunk = 32;                // backward sums in two levels: chunks of 32 terms, then the chunks
constexpr int kSmemBudget = 48 * 1024;       // static limit, no opt-in needed on any arch

template <int TPQ, typename T>
__device__ __forceinline__ T group_sum(T x) {
#pragma unroll
  for (int off = TPQ / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

struct Bounds {
  int64_t q0, lq, k0, lk;
};

__device__ __forceinline__ Bounds sample_bounds(const int* cu_q, const int* cu_k, int b) {
  Bounds s;
  s.q0 = cu_q[b];
  s.lq = cu_q[b + 1] - s.q0;
  s.k0 = cu_k[b];
  s.lk = cu_k[b + 1] - s.k0;
  return s;
}

// rows [row0, row0 + count) of a (tokens, heads, dim) tensor at head `head`, zero-padded to DP columns, into smem
template <int DP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_rows(acc_t* dst, const scalar_t* __restrict__ src, int64_t row0, int count,
                                           int64_t stride_t, int64_t head_offset, int dim) {
  for (int idx = threadIdx.x; idx < count * DP; idx += blockDim.x) {
    const int r = idx / DP, d = idx % DP;
    dst[idx] = d < dim ? static_cast<acc_t>(src[(row0 + r) * stride_t + head_offset + d]) : acc_t(0);
  }
}

// Key tile n0 (cnt rows) of this sample's K and V at heads offsets sk_head / sv_head into shared memory. When the
// sample is resident (all of its keys fit one tile) the first call stages every key and later calls do nothing.
// Block-uniform: all threads call it with the same arguments (it synchronises the block).
template <int DP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_kv_tile(acc_t* ks, acc_t* vs, const scalar_t* __restrict__ k,
                                              const scalar_t* __restrict__ v, const Bounds& s, int64_t n0, int cnt,
                                              bool resident, bool& staged, int64_t sk_t, int64_t sk_head,
                                              int64_t sv_t, int64_t sv_head, int dk, int dv) {
  if (resident && staged) return;
  const int rows = resident ? static_cast<int>(s.lk) : cnt;
  __syncthreads();  // the previous tile is no longer read
  stage_rows<DP>(ks, k, s.k0 + n0, rows, sk_t, sk_head, dk);
  stage_rows<DP>(vs, v, s.k0 + n0, rows, sv_t, sv_head, dv);
  __syncthreads();
  staged = resident;
}

template <int DPT, int TPQ, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(acc_t (&dst)[DPT], const scalar_t* __restrict__ row, bool valid, int dim,
                                         int lane) {
#pragma unroll
  for (int e = 0; e < DPT; ++e) {
    const int d = e * TPQ + lane;
    dst[e] = (valid && d < dim) ? static_cast<acc_t>(row[d]) : acc_t(0);
  }
}

// The lane's DPT elements of a row, times `factor`, to the first `dim` columns of a global row (the inverse of load_row).
template <int DPT, int TPQ, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ row, const acc_t (&src)[DPT], acc_t factor, int dim,
                                          int lane) {
#pragma unroll
  for (int e = 0; e < DPT; ++e) {
    const int d = e * TPQ + lane;
    if (d < dim) row[d] = static_cast<scalar_t>(src[e] * factor);
  }
}

template <int DPT, int TPQ, typename acc_t>
__device__ __forceinline__ acc_t dot_smem(const acc_t (&x)[DPT], const acc_t* row, int lane) {
  acc_t s = 0;
#pragma unroll
  for (int e = 0; e < DPT; ++e) s += x[e] * row[e * TPQ + lane];
  return group_sum<TPQ>(s);
}

// ------------------------------------------------------------------------------------------------------ forward
template <typename scalar_t, typename acc_t, int DPT, int TPQ>
__global__ void __launch_bounds__(kThreads, 1) varlen_fwd_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    scalar_t* __restrict__ out, float* __restrict__ lse, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    int64_t sq_t, int64_t sq_h, int64_t sk_t, int64_t sk_h, int64_t sv_t, int64_t sv_h, int64_t so_t, int64_t so_h,
    int64_t total_q, int group, int dk, int dv, acc_t scale, bool causal, int tile_n) {
  constexpr int DP = DPT * TPQ;
  constexpr int QPB = kThreads / TPQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + tile_n * DP;

  const int h = blockIdx.z, kvh = h / group;
  const Bounds s = sample_bounds(cu_q, cu_k, blockIdx.y);
  const int lane = threadIdx.x % TPQ;
  const int slot = threadIdx.x / TPQ;
  // All of this sample's K/V fit in one tile (Dyn-Perceiver z->x: 16..256 latents): stage them once and stream every
  // query tile of this block past them. Block-uniform, like `staged`.
  const bool resident = s.lk <= tile_n;
  bool staged = false;

  // block-uniform loop (grid-stride over query tiles: a too-small max_seqlen_q only costs speed)
  for (int64_t m0 = int64_t(blockIdx.x) * QPB; m0 < s.lq; m0 += int64_t(gridDim.x) * QPB) {
    const int64_t i = m0 + slot;
    const bool valid = i < s.lq;
    acc_t qr[DPT], acc[DPT];
    load_row<DPT, TPQ>(qr, q + (s.q0 + i) * sq_t + h * sq_h, valid, dk, lane);
#pragma unroll
    for (int e = 0; e < DPT; ++e) {
      qr[e] *= scale;
      acc[e] = 0;
    }
    acc_t m = osm::neg_inf<acc_t>(), l = 0;
    const int64_t n_vis = valid ? varlen::causal_key_end(i, s.lq, s.lk, causal) : 0;
    const int64_t last_q = (m0 + QPB < s.lq ? m0 + QPB : s.lq) - 1;
    const int64_t n_end = varlen::causal_key_end(last_q, s.lq, s.lk, causal);

    for (int64_t n0 = 0; n0 < n_end; n0 += tile_n) {
      const int cnt = static_cast<int>(n_end - n0 < tile_n ? n_end - n0 : tile_n);
      stage_kv_tile<DP>(ks, vs, k, v, s, n0, cnt, resident, staged, sk_t, kvh * sk_h, sv_t, kvh * sv_h, dk, dv);
      for (int j0 = 0; j0 < cnt; j0 += kChunk) {
        acc_t sc[kChunk];
        acc_t cmax = osm::neg_inf<acc_t>();
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          const int j = j0 + c;
          sc[c] = osm::neg_inf<acc_t>();
          if (j < cnt) {  // block-uniform: every lane reaches the shuffles
            const acc_t dot = dot_smem<DPT, TPQ>(qr, ks + j * DP, lane);
            if (n0 + j < n_vis) sc[c] = dot;
          }
          cmax = osm::nan_max(cmax, sc[c]);
        }
        const acc_t m_new = osm::nan_max(m, cmax);
        if (m_new != osm::neg_inf<acc_t>()) {  // else nothing is visible yet to this query
          const acc_t alpha = osm::rescale(m, m_new);
          l *= alpha;
#pragma unroll
          for (int e = 0; e < DPT; ++e) acc[e] *= alpha;
#pragma unroll
          for (int c = 0; c < kChunk; ++c) {
            if (j0 + c < cnt) {
              const acc_t p = osm::weight(sc[c], m_new);
              l += p;
              const acc_t* vrow = vs + (j0 + c) * DP;
#pragma unroll
              for (int e = 0; e < DPT; ++e) acc[e] += p * vrow[e * TPQ + lane];
            }
          }
          m = m_new;
        }
      }
    }
    if (valid) {
      const acc_t inv = osm::inv_sum(l, n_vis > 0);
      store_row<DPT, TPQ>(out + (s.q0 + i) * so_t + h * so_h, acc, inv, dv, lane);
      if (lane == 0) lse[h * total_q + s.q0 + i] = static_cast<float>(osm::log_sum_exp(m, l));
    }
  }
}

// ------------------------------------------------------------------------------------------------------ backward
// dq (and the row statistics) per query: dq = scale * sum_j p_ij (dp_ij - delta_i) k_j, p_ij = exp(s_ij - m_i) / l_i
// with s_ij = scale q_i.k_j, m_i its max over the visible keys and l_i = sum_j exp(s_ij - m_i). `stats` (3, H,
// total_q): m, 1 / l and delta per query, for the dk/dv kernel.
template <typename scalar_t, typename acc_t, int DPT, int TPQ>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dq_kernel(
    const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ out, scalar_t* __restrict__ dq,
    acc_t* __restrict__ stats, const int* __restrict__ cu_q,
    const int* __restrict__ cu_k, int64_t sq_t, int64_t sq_h, int64_t sk_t, int64_t sk_h, int64_t sv_t, int64_t sv_h,
    int64_t so_t, int64_t so_h, int64_t total_q, int group, int dk, int dv, acc_t scale, bool causal, int tile_n) {
  constexpr int DP = DPT * TPQ;
  constexpr int QPB = kThreads / TPQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + tile_n * DP;

  const int h = blockIdx.z, kvh = h / group;
  const Bounds s = sample_bounds(cu_q, cu_k, blockIdx.y);
  const int lane = threadIdx.x % TPQ;
  const int slot = threadIdx.x / TPQ;
  // All of this sample's K/V fit in one tile (Dyn-Perceiver z->x: 16..256 latents): stage them once and stream every
  // query tile of this block past them. Block-uniform, like `staged`.
  const bool resident = s.lk <= tile_n;
  bool staged = false;

  for (int64_t m0 = int64_t(blockIdx.x) * QPB; m0 < s.lq; m0 += int64_t(gridDim.x) * QPB) {
    const int64_t i = m0 + slot;
    const bool valid = i < s.lq;
    acc_t qr[DPT], dor[DPT], gq[DPT];
    load_row<DPT, TPQ>(qr, q + (s.q0 + i) * sq_t + h * sq_h, valid, dk, lane);
    load_row<DPT, TPQ>(dor, dout + (s.q0 + i) * so_t + h * so_h, valid, dv, lane);
    {
      acc_t orow[DPT];
      load_row<DPT, TPQ>(orow, out + (s.q0 + i) * so_t + h * so_h, valid, dv, lane);
      acc_t part = 0;
#pragma unroll
      for (int e = 0; e < DPT; ++e) part += orow[e] * dor[e];
      const acc_t delta_from_out = group_sum<TPQ>(part);
#pragma unroll
      for (int e = 0; e < DPT; ++e) gq[e] = 0;
      const int64_t n_vis = valid ? varlen::causal_key_end(i, s.lq, s.lk, causal) : 0;
      const int64_t last_q = (m0 + QPB < s.lq ? m0 + QPB : s.lq) - 1;
      const int64_t n_end = varlen::causal_key_end(last_q, s.lq, s.lk, causal);
      // pass 1 (online, in acc_t): the row's max m and sum l, and t = sum_j exp(s_j - m) dp_j, so that
      // delta = t / l = rowsum(P * dP): equal to rowsum(dO * O) in exact arithmetic but free of O's rounding to the
      // stored dtype, which dS = P (dP - delta), a small difference for rows with few keys, would amplify
      acc_t m = osm::neg_inf<acc_t>(), l = 0, t = 0;
      for (int64_t n0 = 0; n0 < n_end; n0 += tile_n) {
        const int cnt = static_cast<int>(n_end - n0 < tile_n ? n_end - n0 : tile_n);
        stage_kv_tile<DP>(ks, vs, k, v, s, n0, cnt, resident, staged, sk_t, kvh * sk_h, sv_t, kvh * sv_h, dk,
                          dv);
        for (int j = 0; j < cnt; ++j) {
          const acc_t sc = dot_smem<DPT, TPQ>(qr, ks + j * DP, lane) * scale;
          const acc_t dp = dot_smem<DPT, TPQ>(dor, vs + j * DP, lane);
          if (n0 + j < n_vis) {
            const acc_t m_new = osm::nan_max(m, sc);
            const acc_t alpha = osm::rescale(m, m_new), w = osm::weight(sc, m_new);
            l = l * alpha + w;
            t = t * alpha + w * dp;
            m = m_new;
          }
        }
      }
      const acc_t inv_l = osm::inv_sum(l, n_vis > 0);
      const acc_t delta = l > acc_t(0) ? t * inv_l : delta_from_out;  // (no key, or NaN: the plain rowsum)
      if (valid && lane == 0) {
        const int64_t at = h * total_q + s.q0 + i, plane = int64_t(gridDim.z) * total_q;  // grid z: the H heads
        stats[at] = m;
        stats[plane + at] = inv_l;
        stats[2 * plane + at] = delta;
      }
      // pass 2: dq
      for (int64_t n0 = 0; n0 < n_end; n0 += tile_n) {
        const int cnt = static_cast<int>(n_end - n0 < tile_n ? n_end - n0 : tile_n);
        stage_kv_tile<DP>(ks, vs, k, v, s, n0, cnt, resident, staged, sk_t, kvh * sk_h, sv_t, kvh * sv_h, dk,
                          dv);
        for (int j0 = 0; j0 < cnt; j0 += kSumChunk) {
          acc_t part_q[DPT];
#pragma unroll
          for (int e = 0; e < DPT; ++e) part_q[e] = 0;
          const int j1 = j0 + kSumChunk < cnt ? j0 + kSumChunk : cnt;
          for (int j = j0; j < j1; ++j) {
            const acc_t sc = dot_smem<DPT, TPQ>(qr, ks + j * DP, lane) * scale;
            const acc_t dp = dot_smem<DPT, TPQ>(dor, vs + j * DP, lane);
            // visible keys have a finite max; others weigh 0 (no exp of +inf is ever taken)
            const acc_t p = n0 + j < n_vis ? osm::exp_(sc - m) * inv_l : acc_t(0);
            const acc_t ds = p * (dp - delta);
            const acc_t* krow = ks + j * DP;
#pragma unroll
            for (int e = 0; e < DPT; ++e) part_q[e] += ds * krow[e * TPQ + lane];
          }
#pragma unroll
          for (int e = 0; e < DPT; ++e) gq[e] += part_q[e];
        }
      }
    }
    if (valid) {
      store_row<DPT, TPQ>(dq + (s.q0 + i) * sq_t + h * sq_h, gq, scale, dk, lane);
    }
  }
}

// dk, dv per key, over the grouped query heads: dv_j = sum_i p_ij do_i, dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i
template <typename scalar_t, typename acc_t, int DPT, int TPQ>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dkdv_kernel(
    const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const acc_t* __restrict__ stats, scalar_t* __restrict__ dk_out,
    scalar_t* __restrict__ dv_out, const int* __restrict__ cu_q,
    const int* __restrict__ cu_k, int64_t sq_t, int64_t sq_h, int64_t sk_t, int64_t sk_h, int64_t sv_t, int64_t sv_h,
    int64_t so_t, int64_t so_h, int64_t total_q, int group, int dk, int dv, acc_t scale, bool causal, int tile_m) {
  constexpr int DP = DPT * TPQ;
  constexpr int KPB = kThreads / TPQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* dos = qs + tile_m * DP;
  acc_t* maxes = dos + tile_m * DP;  // the query tile's m, 1 / l and delta (from the dq kernel)
  acc_t* inv_sums = maxes + tile_m;
  acc_t* deltas = inv_sums + tile_m;

  const int kvh = blockIdx.z;
  const Bounds s = sample_bounds(cu_q, cu_k, blockIdx.y);
  const int lane = threadIdx.x % TPQ;
  const int slot = threadIdx.x / TPQ;
  const int64_t shift = s.lk - s.lq;  // key j is visible to query i when i >= j - shift

  for (int64_t n0 = int64_t(blockIdx.x) * KPB; n0 < s.lk; n0 += int64_t(gridDim.x) * KPB) {
    const int64_t j = n0 + slot;
    const bool valid = j < s.lk;
    acc_t kr[DPT], vr[DPT], gk[DPT], gv[DPT];
    load_row<DPT, TPQ>(kr, k + (s.k0 + j) * sk_t + kvh * sk_h, valid, dk, lane);
    load_row<DPT, TPQ>(vr, v + (s.k0 + j) * sv_t + kvh * sv_h, valid, dv, lane);
#pragma unroll
    for (int e = 0; e < DPT; ++e) gk[e] = gv[e] = 0;
    const int64_t first_q = causal ? (n0 - shift > 0 ? n0 - shift : 0) : 0;  // first query seeing key n0
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int64_t m0 = first_q; m0 < s.lq; m0 += tile_m) {
        const int cnt = static_cast<int>(s.lq - m0 < tile_m ? s.lq - m0 : tile_m);
        __syncthreads();
        stage_rows<DP>(qs, q, s.q0 + m0, cnt, sq_t, h * sq_h, dk);
        stage_rows<DP>(dos, dout, s.q0 + m0, cnt, so_t, h * so_h, dv);
        for (int r = threadIdx.x; r < cnt; r += blockDim.x) {
          const int64_t at = h * total_q + s.q0 + m0 + r, plane = int64_t(group) * gridDim.z * total_q;  // H * total_q
          maxes[r] = stats[at];
          inv_sums[r] = stats[plane + at];
          deltas[r] = stats[2 * plane + at];
        }
        __syncthreads();
        // two-level sums (chunks of kSumChunk queries): thousands of (query, head) terms per key are no one chain.
        // float64 sums in one level (its rounding is far below the rule's; the extra registers spilled at DPT 16).
        constexpr bool kTwoLevel = !std::is_same<acc_t, double>::value;
        for (int r0 = 0; r0 < cnt; r0 += kSumChunk) {
          acc_t chunk_k[kTwoLevel ? DPT : 1], chunk_v[kTwoLevel ? DPT : 1];
          acc_t* part_k = kTwoLevel ? chunk_k : gk;
          acc_t* part_v = kTwoLevel ? chunk_v : gv;
          if constexpr (kTwoLevel) {
#pragma unroll
            for (int e = 0; e < DPT; ++e) part_k[e] = part_v[e] = 0;
          }
          const int r1 = r0 + kSumChunk < cnt ? r0 + kSumChunk : cnt;
          for (int r = r0; r < r1; ++r) {
            const acc_t* qrow = qs + r * DP;
            const acc_t* dorow = dos + r * DP;
            const acc_t sc = dot_smem<DPT, TPQ>(kr, qrow, lane) * scale;
            const acc_t dp = dot_smem<DPT, TPQ>(vr, dorow, lane);
            const bool seen = valid && (!causal || m0 + r >= j - shift);
            const acc_t p = seen ? osm::exp_(sc - maxes[r]) * inv_sums[r] : acc_t(0);
            const acc_t ds = p * (dp - deltas[r]);
#pragma unroll
            for (int e = 0; e < DPT; ++e) {
              part_v[e] += p * dorow[e * TPQ + lane];
              part_k[e] += ds * qrow[e * TPQ + lane];
            }
          }
          if constexpr (kTwoLevel) {
#pragma unroll
            for (int e = 0; e < DPT; ++e) {
              gv[e] += part_v[e];
              gk[e] += part_k[e];
            }
          }
        }
      }
    }
    if (valid) {
      store_row<DPT, TPQ>(dk_out + (s.k0 + j) * sk_t + kvh * sk_h, gk, scale, dk, lane);
      store_row<DPT, TPQ>(dv_out + (s.k0 + j) * sv_t + kvh * sv_h, gv, acc_t(1), dv, lane);
    }
  }
}

// ------------------------------------------------------------------------------------------------------ host side
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && cu_q.is_cuda() && cu_k.is_cuda(),
              "varlen_attention (CUDA): all tensors must be on a CUDA device");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen_attention (CUDA): q, k, v must be 3-D");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt,
              "varlen_attention (CUDA): cu_seqlens must be int32");
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, "varlen_attention (CUDA): cu_seqlens sizes differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "varlen_attention (CUDA): H must be a multiple of Hk");
  TORCH_CHECK(q.size(2) == k.size(2) && k.size(0) == v.size(0) && k.size(1) == v.size(1),
              "varlen_attention (CUDA): mismatched q/k/v shapes");
  TORCH_CHECK(q.size(2) <= 512 && v.size(2) <= 512, "varlen_attention (CUDA): head dims up to 512 are supported, got Dh=",
              q.size(2), ", Dv=", v.size(2));
  TORCH_CHECK(cu_q.numel() - 1 <= 65535 && q.size(1) <= 65535,
              "varlen_attention (CUDA): at most 65535 samples and heads");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "varlen_attention (CUDA): q, k, v must share a dtype");
}

// Calls fn(DPT, TPQ) (as std::integral_constant) for the smallest register split covering max(Dh, Dv). Forward threads
// hold 2 rows (q, acc) of DPT elements, backward threads 4 (q, do, dq / k, v, dk, dv): backward splits finer.
template <bool Backward, typename Fn>
void dispatch_width(int64_t width, Fn&& fn) {
  if (width <= 8) return fn(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
  if (width <= 16) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 1>{});
  if constexpr (!Backward) {
    if (width <= 32) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 1>{});
    if (width <= 64) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 2>{});
    if (width <= 128) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{});
    if (width <= 256) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
    return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 16>{});  // Dyn-Perceiver x->z: 320, 384
  } else {
    if (width <= 32) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 2>{});
    if (width <= 64) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 4>{});
    if (width <= 128) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 8>{});
    if (width <= 256) return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{});
    return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 32>{});
  }
}

// Rows of a shared-memory tile: a multiple of kChunk within the 48 KB budget, or, for rows so wide that kChunk of them
// do not fit (float64 heads over 256: 8 KB a row), as many as fit (the loops guard every row against the tile's count).
int tile_rows(int64_t max_rows, int64_t bytes_per_row) {
  int64_t cap = kSmemBudget / bytes_per_row;
  if (cap >= kChunk) cap = cap / kChunk * kChunk;
  const int64_t want = (max_rows + kChunk - 1) / kChunk * kChunk;
  const int64_t rows = want < cap ? want : cap;
  return static_cast<int>(rows < 1 ? 1 : rows);
}

int64_t grid_x(int64_t max_rows, int rows_per_block) {
  const int64_t blocks = (max_rows + rows_per_block - 1) / rows_per_block;
  return blocks < 1 ? 1 : (blocks > 65535 * 32 ? 65535 * 32 : blocks);
}

// Query blocks per (sample, head) when K/V stay resident: enough blocks for ~8 per SM, each streaming the rest of the
// query tiles (grid-stride) past K/V staged once, instead of one block per tile re-staging the same K/V.
int64_t grid_x_resident(int64_t max_rows, int rows_per_block, int64_t planes) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t full = grid_x(max_rows, rows_per_block);
  const int64_t wanted = (int64_t(8) * sms + planes - 1) / (planes > 0 ? planes : 1);
  return wanted < 1 ? 1 : (wanted < full ? wanted : full);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, const at::Tensor& cu_q_in,
                                                             const at::Tensor& cu_k_in, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, double softmax_scale, bool causal) {
  check_inputs(q_in, k_in, v_in, cu_q_in, cu_k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
  const int64_t total_q = q.size(0), heads = q.size(1), dk = q.size(2), dv = v.size(2);
  const int64_t batch = cu_q.numel() - 1;
  at::Tensor out = at::empty({total_q, heads, dv}, q.options());
  at::Tensor lse = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  if (total_q == 0 || batch == 0 || heads == 0) {
    g_last_kernel[0] = "none";
    return {out, lse};
  }
  // bf16/fp16 on tensor cores when the head dims and the GPU allow it
  if (varlen_attention_fwd_mma(q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, max_seqlen_k, softmax_scale, causal)) {
    g_last_kernel[0] = "mma";
    return {out, lse};
  }
  g_last_kernel[0] = "simt";
  const int group = static_cast<int>(heads / k.size(1));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_width<false>(dk > dv ? dk : dv, [&](auto dpt, auto tpq) {
      constexpr int DPT = decltype(dpt)::value, TPQ = decltype(tpq)::value;
      constexpr int DP = DPT * TPQ;
      const int tile_n = tile_rows(max_seqlen_k, 2 * DP * sizeof(acc_t));
      const size_t smem = size_t(2) * tile_n * DP * sizeof(acc_t);
      const int64_t gx = max_seqlen_k <= tile_n ? grid_x_resident(max_seqlen_q, kThreads / TPQ, batch * heads)
                                                : grid_x(max_seqlen_q, kThreads / TPQ);
      const dim3 grid(gx, batch, heads);
      varlen_fwd_kernel<scalar_t, acc_t, DPT, TPQ><<<grid, kThreads, smem, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), cu_q.const_data_ptr<int>(),
          cu_k.const_data_ptr<int>(), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
          out.stride(0), out.stride(1), total_q, group, static_cast<int>(dk), static_cast<int>(dv),
          static_cast<acc_t>(softmax_scale), causal, tile_n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q_in, const at::Tensor& cu_k_in,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  check_inputs(q_in, k_in, v_in, cu_q_in, cu_k_in);
  TORCH_CHECK(dout_in.sizes() == out_in.sizes() && out_in.size(0) == q_in.size(0) && out_in.size(1) == q_in.size(1) &&
                  out_in.size(2) == v_in.size(2),
              "varlen_attention_bwd (CUDA): dout/out must be (total_q, H, Dv)");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 && lse_in.size(0) == q_in.size(1) &&
                  lse_in.size(1) == q_in.size(0),
              "varlen_attention_bwd (CUDA): lse must be float32 (H, total_q)");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous(), out = out_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous(), cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
  const int64_t total_q = q.size(0), heads = q.size(1), dk = q.size(2), dv = v.size(2);
  const int64_t batch = cu_q.numel() - 1;
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk_t = at::empty_like(k);
  at::Tensor dv_t = at::empty_like(v);
  if (batch == 0 || heads == 0 || total_q == 0) {
    // no query: every gradient is zero (keys of samples without queries are written as zeros by the kernel too)
    g_last_kernel[1] = "none";
    return {dq.zero_(), dk_t.zero_(), dv_t.zero_()};
  }
  // bf16/fp16 on tensor cores when the head dims and the GPU allow it (varlen_attention_mma_bwd.cu)
  if (varlen_attention_bwd_mma(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk_t, dv_t, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal)) {
    g_last_kernel[1] = "mma";
    return {dq, dk_t, dv_t};
  }
  g_last_kernel[1] = "simt";
  const int group = static_cast<int>(heads / k.size(1));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor stats = at::empty({3, heads, total_q}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dispatch_width<true>(dk > dv ? dk : dv, [&](auto dpt, auto tpq) {
      constexpr int DPT = decltype(dpt)::value, TPQ = decltype(tpq)::value;
      constexpr int DP = DPT * TPQ;
      const acc_t scale = static_cast<acc_t>(softmax_scale);
      {
        const int tile_n = tile_rows(max_seqlen_k, 2 * DP * sizeof(acc_t));
        const size_t smem = size_t(2) * tile_n * DP * sizeof(acc_t);
        const int64_t gx = max_seqlen_k <= tile_n ? grid_x_resident(max_seqlen_q, kThreads / TPQ, batch * heads)
                                                  : grid_x(max_seqlen_q, kThreads / TPQ);
        const dim3 grid(gx, batch, heads);
        varlen_bwd_dq_kernel<scalar_t, acc_t, DPT, TPQ><<<grid, kThreads, smem, stream>>>(
            dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(),
            stats.mutable_data_ptr<acc_t>(), cu_q.const_data_ptr<int>(),
            cu_k.const_data_ptr<int>(), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), total_q, group, static_cast<int>(dk), static_cast<int>(dv),
            scale, causal, tile_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (k.size(0) > 0) {
        const int tile_m = tile_rows(max_seqlen_q, (2 * DP + 3) * sizeof(acc_t));
        const size_t smem = size_t(tile_m) * (2 * DP + 3) * sizeof(acc_t);
        const dim3 grid(grid_x(max_seqlen_k, kThreads / TPQ), batch, k.size(1));
        varlen_bwd_dkdv_kernel<scalar_t, acc_t, DPT, TPQ><<<grid, kThreads, smem, stream>>>(
            dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), stats.const_data_ptr<acc_t>(), dk_t.mutable_data_ptr<scalar_t>(), dv_t.mutable_data_ptr<scalar_t>(), cu_q.const_data_ptr<int>(),
            cu_k.const_data_ptr<int>(), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), out.stride(0), out.stride(1), total_q, group, static_cast<int>(dk), static_cast<int>(dv),
            scale, causal, tile_m);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {dq, dk_t, dv_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
}

// A diagnostic, not an op on tensors (its own namespace, as the CPU's lookfast_cpu.varlen_attention_kernel): the
// kernel family ("mma", "simt", "none", or "" before any call) that the latest CUDA forward or backward of
// varlen_attention ran, in this process. Only CUDA builds define it.
static std::string last_kernel(bool backward) { return g_last_kernel[backward ? 1 : 0].load(); }

TORCH_LIBRARY(lookfast_cuda, m) {
  m.def("varlen_attention_last_kernel(bool backward=False) -> str", &last_kernel);
}

}  // namespace lookfast
