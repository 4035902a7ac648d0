// varlen_attention backward on tensor cores for bf16/fp16 (sm_80+): nvcuda::wmma 16x16x16 fragments (mma.sync
// m16n8k16 in the SASS) with fp32 accumulators; probabilities and dS in fp32, rounded to the input dtype only as the
// operands of the next product (as FlashAttention-2 does); every gradient rounded once. Compiled, never run on a GPU.
//
// Design (FlashAttention-2 backward, simplified to wmma, no atomics: every output element has exactly one writer, so
// the result is deterministic), three launches:
//   1. delta = rowsum(dO * O) in fp32, one warp per (token, head): a (H, total_q) scratch (the SIMT backward computes
//      the same sum from the same 16-bit values).
//   2. dK/dV: a block of 4 warps owns 64 keys of one (sample, kv head), 16 per warp, and walks the query tiles (64
//      queries) that can see them, over every query head of its GQA group (dK/dV summed over the group's heads, as the
//      SIMT kernel does). Per tile the block stages Q and dO (zero-padded to DP columns), lse (times log2 e) and delta;
//      each warp computes S^T = K Q^T and dP^T = V dO^T for its 16 keys into fp32 scratches, then per element
//      P = exp2(S scale log2e - lse log2e) (0 where masked: causal, or past the sample's lengths) and
//      dS = P (dP - delta), both rounded to the input dtype, and accumulates dV += P^T dO and dK += dS^T Q in wmma
//      accumulator fragments held in registers for the whole walk. dK is scaled by the softmax scale once, at the end.
//   3. dQ: a block owns 64 queries of one (sample, head), 16 per warp, Q and dO fragments in registers, and walks the
//      visible key tiles (64 keys): S = Q K^T, dP = dO V^T, the same P and dS, and dQ += dS K in registers;
//      dQ = scale * that, rounded once. Recomputing S and dP here (instead of atomics into an fp32 dQ from kernel 2)
//      costs 3 more products of the 7, and keeps the result deterministic and race-free.
// The accumulator layout of wmma fragments is opaque, so the elementwise step goes through fp32 shared memory (a 16 x
// 64 strip per warp, 2 lanes per row as in the forward) and the epilogues store the fragments there before writing
// rows out. Shared-memory rows are padded (DP + 8 16-bit elements, 64 + 4 floats, 64 + 8 16-bit elements) against
// bank conflicts while keeping wmma's 32-byte fragment alignment.
//
// Roofline (H100 SXM: ~990 TFLOP/s dense bf16/fp16 mma, 3.35 TB/s HBM; A100: 312 TFLOP/s, 2.0 TB/s):
//   FLOPs = 7 products of 2 * sum_b Lq_b * Lk_b * D * H (dK/dV kernel: S, dP, dV, dK; dQ kernel: S, dP, dQ), with D
//   padded to DP and both lengths to tiles of 64: 3.5x the forward's 2 products.
//   bytes = 2 * (q + k + v + out + dout + dq + dk + dv) + 4 * 3 * (H * total_q) (lse twice, delta) + Q/dO re-read per
//   key tile and K/V per query tile (mostly from L2).
//   A3 (B 16, ~165 tokens -> 192 padded, 12 heads, Dh 64, bf16): 7 * 2 * 16 * 192^2 * 64 * 12 = 6.3 GFLOP -> 6.4 us
//      (H100) / 20 us (A100) of mma at peak; ~33 MB of HBM (8 tensors of 4 MB) -> 10 us / 17 us: balanced. wmma with
//      fp32 scratch round trips and no cp.async pipelining will not reach mma peak: expect ~20-40 us on an H100 (the
//      SIMT backward, fp32 FMA bound at 3.5x its ~24 us forward: ~80 us).
//   A2 (B 16, 3136 queries x 64 keys, 1 head, width 8 -> DP 16): 0.72 GFLOP padded, ~3.9 MB: ~1-2 us either way, but the
//      dK/dV kernel has only 16 blocks (one key tile per sample), each walking 49 query tiles serially: latency bound
//      (tens of us), like the SIMT backward's 16 blocks. Splitting the query walk over blocks (partial sums) would fix it.
//   A1 (B 64, 128 queries x 49 keys, 1 head, width 32): 0.23 GFLOP padded, ~3 MB: launch bound (3 launches, ~10 us).
//   Shared memory per block (DP 128 / 64 / 32 / 16): dK/dV kernel 4 tiles 64 x (DP + 8) 16-bit (Q, dO, K, V) +
//   2 * 64 x 68 fp32 (S, dP) + 2 * 64 x 72 16-bit (P, dS) + 512 bytes = 120.5 / 88.5 / 72.5 / 64.5 KB; dQ kernel 2
//   tiles (K, V) + max(Q and dO staging, S and dP scratch: they share memory) + dS = 77 / 61 / 53 / 49 KB. Both are
//   under the sm_80 opt-in (163 KB: static_assert below) and checked against the device's at run time. One dK/dV block
//   per SM at DP 128 (4 warps: latency, not mma, is the likely limit there; a cp.async double buffer of Q / dO would be
//   the next step), two on an H100 at DP <= 64.
//   Registers (ptxas, CUDA 13.0, bf16 / fp16): dK/dV kernel 255 / 248 (sm_80) and 254 / 248 (sm_90) at DP 128, <= 196
//   below; dQ kernel 254 / 210 and 254 / 218 at DP 128, <= 184 below: no spills and no stack anywhere, but DP 128 sits at
//   the 255 limit (2 * DP/16 accumulator fragments = 128 fp32 registers in the dK/dV kernel; Q and dO fragments plus
//   the dQ accumulators in the dQ kernel). `python -m lookfast.check_cuda_build` fails on any stack frame (spills).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "common/varlen_attention.h"
#include "cuda/varlen_attention_mma.h"
#include "cuda/varlen_attention_mma_common.cuh"

namespace lookfast {
namespace {

using mma_common::kLog2e;
using mma_common::to_f32;
using mma_common::to_low;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 16 * kWarps;  // rows a block owns (keys in dK/dV, queries in dQ) and the tile of the other side
constexpr size_t kSm80OptIn = 163 * 1024;

template <int DP>
struct BwdSmem {
  static constexpr int ld_in = DP + 8;     // Q, dO, K, V rows (16-bit elements)
  static constexpr int ld_s = kTile + 4;   // S, dP rows (fp32)
  static constexpr int ld_p = kTile + 8;   // P, dS rows (16-bit)
  static constexpr size_t in_tile = size_t(kTile) * ld_in * 2;
  static constexpr size_t f32_tile = size_t(kTile) * ld_s * 4;
  static constexpr size_t low_tile = size_t(kTile) * ld_p * 2;
  // dK/dV kernel
  struct KV {
    static constexpr size_t q = 0, dout = q + in_tile, k = dout + in_tile, v = k + in_tile, s = v + in_tile,
                            dp = s + f32_tile, p = dp + f32_tile, ds = p + low_tile, lse = ds + low_tile,
                            delta = lse + kTile * 4, bytes = delta + kTile * 4;
  };
  // dQ kernel: Q and dO are staged only to load the warps' register fragments, then the same memory holds S and dP
  struct Q {
    static constexpr size_t k = 0, v = k + in_tile, stage = v + in_tile, q = stage, dout = q + in_tile, s = stage,
                            dp = s + f32_tile,
                            ds = stage + (2 * in_tile > 2 * f32_tile ? 2 * in_tile : 2 * f32_tile),
                            bytes = ds + low_tile;
  };
  static_assert(in_tile % 32 == 0 && f32_tile % 32 == 0 && low_tile % 32 == 0, "wmma needs 32-byte bases");
  static_assert((16 * ld_in * 2) % 32 == 0 && (16 * ld_s * 4) % 32 == 0 && (16 * ld_p * 2) % 32 == 0,
                "16-row steps keep 32-byte alignment");
};
static_assert(BwdSmem<128>::KV::bytes <= kSm80OptIn && BwdSmem<128>::Q::bytes <= kSm80OptIn,
              "the widest tiles must fit sm_80's opt-in shared memory (sm_90: 227 KB)");

template <int DP, int ROWS>
__device__ __forceinline__ void stage_tile(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0,
                                           int64_t count, int64_t stride_t, int dim) {
  mma_common::stage_tile<DP, ROWS, BwdSmem<DP>::ld_in, kThreads>(dst, src, row0, count, stride_t, dim);
}

// Writes a warp's 16 x DP fp32 accumulator fragments, times `factor`, rounded once, to rows [0, rows) x [0, dim) of
// `dst` (row stride `stride`), through the warp's 16 x 64 fp32 scratch strip `scratch` (row stride ld_s), 64 columns
// at a time. Whole warp; rows outside [0, rows) are not written.
template <typename WT, int DP, typename Frag>
__device__ __forceinline__ void store_rows(WT* __restrict__ dst, int64_t stride, int64_t rows, int dim, float factor,
                                           Frag (&acc)[DP / 16], float* scratch, int lane) {
  namespace wmma = nvcuda::wmma;
  constexpr int LDS = BwdSmem<DP>::ld_s;
  constexpr int kFrags = DP / 16, kPer = kFrags < 4 ? kFrags : 4, kCols = 16 * kPer;
#pragma unroll
  for (int f0 = 0; f0 < kFrags; f0 += kPer) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) wmma::store_matrix_sync(scratch + u * 16, acc[f0 + u], LDS, wmma::mem_row_major);
    __syncwarp();
    for (int idx = lane; idx < 16 * kCols; idx += 32) {
      const int r = idx / kCols, c = idx % kCols, d = f0 * 16 + c;
      if (r < rows && d < dim) dst[r * stride + d] = to_low(scratch[r * LDS + c] * factor, static_cast<WT*>(nullptr));
    }
    __syncwarp();  // the strip is rewritten by the next group
  }
}

// ------------------------------------------------------------------------------------------------ 1. delta
constexpr int kFewKeys = 64;  // rows that see at most this many keys take delta = rowsum(P * dP)

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// delta[h, t] in fp32, one warp per (token, head) row (lanes over d: coalesced). Rows that see at most kFewKeys keys:
// rowsum(P * dP) = sum_j p_j (dout . v_j), with p_j = exp(scale q.k_j - lse), which equals rowsum(dout * out) in
// exact arithmetic but is free of out's rounding to the stored dtype: with few keys dS = P (dP - delta) is a small
// difference that the rounded out made up to ~10x torch's own error (bf16, 2 keys; found on the CPU emulator of
// tests/cuda_emulator, as on the CPU kernel before). Other rows: sum_d dout[t, h, d] * out[t, h, d] (FlashAttention's).
template <typename WT>
__global__ void __launch_bounds__(kThreads) varlen_bwd_delta_kernel(
    const WT* __restrict__ dout, const WT* __restrict__ out, const WT* __restrict__ q, const WT* __restrict__ k,
    const WT* __restrict__ v, const float* __restrict__ lse, const int* __restrict__ cu_q,
    const int* __restrict__ cu_k, float* __restrict__ delta, int64_t total_q, int batch, int heads, int kv_heads,
    int dk, int dv, float scale, bool causal) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = total_q * heads;
  const int group = heads / kv_heads;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + warp; row < rows; row += int64_t(gridDim.x) * kWarps) {
    const int64_t token = row / heads;
    const int h = static_cast<int>(row % heads);
    // the token's sample: the last b with cu_q[b] <= token (warp-uniform)
    int lo = 0, hi = batch;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      (cu_q[mid] <= token ? lo : hi) = mid;
    }
    const int64_t q0 = cu_q[lo], lq = cu_q[lo + 1] - q0, k0 = cu_k[lo], lk = cu_k[lo + 1] - k0;
    const int64_t n_vis = varlen::causal_key_end(token - q0, lq, lk, causal);
    const float row_lse = lse[h * total_q + token];
    const WT* a = dout + row * dv;
    float sum = 0.f;
    if (n_vis > 0 && n_vis <= kFewKeys && row_lse > -INFINITY && row_lse < INFINITY) {
      const WT* qr = q + row * dk;
      for (int64_t j = 0; j < n_vis; ++j) {
        const WT* kr = k + ((k0 + j) * kv_heads + h / group) * dk;
        const WT* vr = v + ((k0 + j) * kv_heads + h / group) * dv;
        float s = 0.f, dp = 0.f;
        for (int d = lane; d < dk; d += 32) s += to_f32(qr[d]) * to_f32(kr[d]);
        for (int d = lane; d < dv; d += 32) dp += to_f32(a[d]) * to_f32(vr[d]);
        sum += expf(warp_sum(s) * scale - row_lse) * warp_sum(dp);
      }
    } else {
      const WT* b = out + row * dv;
      for (int d = lane; d < dv; d += 32) sum += to_f32(a[d]) * to_f32(b[d]);
      sum = warp_sum(sum);
    }
    if (lane == 0) delta[h * total_q + token] = sum;
  }
}

// ------------------------------------------------------------------------------------------------ 2. dK / dV
template <typename WT, int DP>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dkdv_mma_kernel(
    const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
    const uint16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    WT* __restrict__ dk_out, WT* __restrict__ dv_out, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    int64_t total_q, int heads, int kv_heads, int dk, int dv, float scale, bool causal) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host never launches this below sm_80 (bf16 wmma needs it)
#else
  namespace wmma = nvcuda::wmma;
  using L = BwdSmem<DP>;
  using M = typename L::KV;
  constexpr int LDI = L::ld_in, LDS = L::ld_s, LDP = L::ld_p;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem + M::q);
  uint16_t* do_s = reinterpret_cast<uint16_t*>(smem + M::dout);
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem + M::k);
  uint16_t* v_s = reinterpret_cast<uint16_t*>(smem + M::v);
  float* s_s = reinterpret_cast<float*>(smem + M::s);
  float* dp_s = reinterpret_cast<float*>(smem + M::dp);
  WT* p_s = reinterpret_cast<WT*>(smem + M::p);
  WT* ds_s = reinterpret_cast<WT*>(smem + M::ds);
  float* lse_s = reinterpret_cast<float*>(smem + M::lse);
  float* delta_s = reinterpret_cast<float*>(smem + M::delta);

  const int kvh = blockIdx.z, group = heads / kv_heads;
  const int64_t q0 = cu_q[blockIdx.y], lq = cu_q[blockIdx.y + 1] - q0;
  const int64_t k0 = cu_k[blockIdx.y], lk = cu_k[blockIdx.y + 1] - k0;
  const int64_t shift = lk - lq;  // key j is visible to query i when j < i + shift + 1 (varlen::causal_key_end)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // elementwise step: lanes 2r, 2r+1 share the warp's key row r
  const float scale_log2 = scale * kLog2e;
  // q, dout, out are (total_q, H, D) contiguous; k, v, dk, dv (total_k, Hk, D)
  const int64_t sq_t = int64_t(heads) * dk, so_t = int64_t(heads) * dv;
  const int64_t sk_t = int64_t(kv_heads) * dk, sv_t = int64_t(kv_heads) * dv;

  for (int64_t n0 = int64_t(blockIdx.x) * kTile; n0 < lk; n0 += int64_t(gridDim.x) * kTile) {
    __syncthreads();  // the previous key tile's K and V are no longer read
    stage_tile<DP, kTile>(k_s, k + kvh * dk, k0 + n0, lk - n0, sk_t, dk);
    stage_tile<DP, kTile>(v_s, v + kvh * dv, k0 + n0, lk - n0, sv_t, dv);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dk[DP / 16], acc_dv[DP / 16];
#pragma unroll
    for (int f = 0; f < DP / 16; ++f) {
      wmma::fill_fragment(acc_dk[f], 0.f);
      wmma::fill_fragment(acc_dv[f], 0.f);
    }
    const int64_t j = n0 + warp * 16 + r;  // this lane's key (>= lk: a padding row, sees nothing, never stored)
    // the first query that sees key n0 (every key of the tile is seen only by queries from there on)
    const int64_t first_q = causal ? (n0 - shift > 0 ? n0 - shift : 0) : 0;

    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int64_t m0 = first_q; m0 < lq; m0 += kTile) {
        __syncthreads();  // the previous query tile is no longer read (and K / V are staged, on the first one)
        stage_tile<DP, kTile>(q_s, q + h * dk, q0 + m0, lq - m0, sq_t, dk);
        stage_tile<DP, kTile>(do_s, dout + h * dv, q0 + m0, lq - m0, so_t, dv);
        for (int idx = threadIdx.x; idx < kTile; idx += kThreads) {
          const bool in = m0 + idx < lq;
          lse_s[idx] = in ? lse[h * total_q + q0 + m0 + idx] * kLog2e : 0.f;
          delta_s[idx] = in ? delta[h * total_q + q0 + m0 + idx] : 0.f;
        }
        __syncthreads();

        // S^T (16 keys x 64 queries) = K Q^T and dP^T = V dO^T: Q / dO row-major (queries x DP) read as col-major B.
        // Column blocks one at a time (not unrolled): the 2 * DP/16 accumulators live across this loop.
#pragma unroll 1
        for (int nf = 0; nf < kTile / 16; ++nf) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
          wmma::fill_fragment(s_acc, 0.f);
          wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
          for (int kf = 0; kf < DP / 16; ++kf) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;
            wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(k_s) + warp * 16 * LDI + kf * 16, LDI);
            wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(q_s) + nf * 16 * LDI + kf * 16, LDI);
            wmma::mma_sync(s_acc, a, b, s_acc);
            wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(v_s) + warp * 16 * LDI + kf * 16, LDI);
            wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(do_s) + nf * 16 * LDI + kf * 16, LDI);
            wmma::mma_sync(dp_acc, a, b, dp_acc);
          }
          wmma::store_matrix_sync(s_s + warp * 16 * LDS + nf * 16, s_acc, LDS, wmma::mem_row_major);
          wmma::store_matrix_sync(dp_s + warp * 16 * LDS + nf * 16, dp_acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // P^T = exp2(S^T scale log2e - lse log2e) where visible, dS^T = P^T (dP^T - delta); columns 2c + half
        {
          const float* srow = s_s + (warp * 16 + r) * LDS + half;
          const float* dprow = dp_s + (warp * 16 + r) * LDS + half;
          WT* prow = p_s + (warp * 16 + r) * LDP + half;
          WT* dsrow = ds_s + (warp * 16 + r) * LDP + half;
          // query m0 + col sees key j when col is in [lo, hi): inside the sample, and i >= j - shift when causal
          int64_t lo64 = (causal ? j - shift : 0) - m0, hi64 = j < lk ? lq - m0 : 0;
          const int lo = static_cast<int>(lo64 < 0 ? 0 : (lo64 > kTile ? kTile : lo64));
          const int hi = static_cast<int>(hi64 > kTile ? kTile : hi64);
#pragma unroll 4
          for (int c = 0; c < kTile / 2; ++c) {
            const int col = 2 * c + half;
            const bool seen = col >= lo && col < hi;
            const float p = seen ? exp2f(srow[2 * c] * scale_log2 - lse_s[col]) : 0.f;
            const float ds = seen ? p * (dprow[2 * c] - delta_s[col]) : 0.f;
            prow[2 * c] = to_low(p, static_cast<WT*>(nullptr));
            dsrow[2 * c] = to_low(ds, static_cast<WT*>(nullptr));
          }
        }
        __syncwarp();

        // dV (16 x DP) += P^T dO, dK (16 x DP) += dS^T Q: Q / dO row-major (queries x DP) as row-major B
#pragma unroll 1
        for (int kf = 0; kf < kTile / 16; ++kf) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> pa, dsa;
          wmma::load_matrix_sync(pa, p_s + warp * 16 * LDP + kf * 16, LDP);
          wmma::load_matrix_sync(dsa, ds_s + warp * 16 * LDP + kf * 16, LDP);
#pragma unroll
          for (int df = 0; df < DP / 16; ++df) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> b;
            wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(do_s) + kf * 16 * LDI + df * 16, LDI);
            wmma::mma_sync(acc_dv[df], pa, b, acc_dv[df]);
            wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(q_s) + kf * 16 * LDI + df * 16, LDI);
            wmma::mma_sync(acc_dk[df], dsa, b, acc_dk[df]);
          }
        }
      }
    }

    // epilogue: dK = scale * sum dS^T Q, dV = sum P^T dO, rounded once; keys no query sees get exact zeros
    __syncwarp();
    const int64_t row0 = n0 + warp * 16;
    float* strip = s_s + warp * 16 * LDS;  // the warp's own rows: no other warp reads them
    store_rows<WT, DP>(dk_out + (k0 + row0) * sk_t + kvh * dk, sk_t, lk - row0, dk, scale, acc_dk, strip, lane);
    store_rows<WT, DP>(dv_out + (k0 + row0) * sv_t + kvh * dv, sv_t, lk - row0, dv, 1.f, acc_dv, strip, lane);
  }
#endif
}

// ------------------------------------------------------------------------------------------------ 3. dQ
template <typename WT, int DP>
__global__ void __launch_bounds__(kThreads, 1) varlen_bwd_dq_mma_kernel(
    const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
    const uint16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    WT* __restrict__ dq_out, const int* __restrict__ cu_q, const int* __restrict__ cu_k, int64_t total_q, int heads,
    int kv_heads, int dk, int dv, float scale, bool causal) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using L = BwdSmem<DP>;
  using M = typename L::Q;
  constexpr int LDI = L::ld_in, LDS = L::ld_s, LDP = L::ld_p;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem + M::k);
  uint16_t* v_s = reinterpret_cast<uint16_t*>(smem + M::v);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem + M::q);
  uint16_t* do_s = reinterpret_cast<uint16_t*>(smem + M::dout);
  float* s_s = reinterpret_cast<float*>(smem + M::s);    // shares memory with q_s / do_s
  float* dp_s = reinterpret_cast<float*>(smem + M::dp);
  WT* ds_s = reinterpret_cast<WT*>(smem + M::ds);

  const int h = blockIdx.z, kvh = h / (heads / kv_heads);
  const int64_t q0 = cu_q[blockIdx.y], lq = cu_q[blockIdx.y + 1] - q0;
  const int64_t k0 = cu_k[blockIdx.y], lk = cu_k[blockIdx.y + 1] - k0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // elementwise step: lanes 2r, 2r+1 share the warp's query row r
  const float scale_log2 = scale * kLog2e;
  const int64_t sq_t = int64_t(heads) * dk, so_t = int64_t(heads) * dv;
  const int64_t sk_t = int64_t(kv_heads) * dk, sv_t = int64_t(kv_heads) * dv;

  for (int64_t m0 = int64_t(blockIdx.x) * kTile; m0 < lq; m0 += int64_t(gridDim.x) * kTile) {
    __syncthreads();  // the previous query tile's scratch (which Q / dO now overwrite) is no longer read
    stage_tile<DP, kTile>(q_s, q + h * dk, q0 + m0, lq - m0, sq_t, dk);
    stage_tile<DP, kTile>(do_s, dout + h * dv, q0 + m0, lq - m0, so_t, dv);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> qa[DP / 16], doa[DP / 16];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DP / 16];
#pragma unroll
    for (int f = 0; f < DP / 16; ++f) {
      wmma::load_matrix_sync(qa[f], reinterpret_cast<const WT*>(q_s) + warp * 16 * LDI + f * 16, LDI);
      wmma::load_matrix_sync(doa[f], reinterpret_cast<const WT*>(do_s) + warp * 16 * LDI + f * 16, LDI);
      wmma::fill_fragment(acc[f], 0.f);
    }
    const int64_t i = m0 + warp * 16 + r;  // this lane's query (>= lq: a padding row, sees no key, never stored)
    const bool valid = i < lq;
    const float row_lse = valid ? lse[h * total_q + q0 + i] * kLog2e : 0.f;
    const float row_delta = valid ? delta[h * total_q + q0 + i] : 0.f;
    const int64_t n_vis = valid ? varlen::causal_key_end(i, lq, lk, causal) : 0;
    const int64_t last_q = (m0 + kTile < lq ? m0 + kTile : lq) - 1;
    const int64_t n_end = varlen::causal_key_end(last_q, lq, lk, causal);

    for (int64_t n0 = 0; n0 < n_end; n0 += kTile) {
      // the previous key tile is no longer read, and (first tile) every warp has its Q / dO fragments, so the
      // scratch that shares their staging memory may be written
      __syncthreads();
      stage_tile<DP, kTile>(k_s, k + kvh * dk, k0 + n0, n_end - n0, sk_t, dk);
      stage_tile<DP, kTile>(v_s, v + kvh * dv, k0 + n0, n_end - n0, sv_t, dv);
      __syncthreads();

      // S (16 queries x 64 keys) = Q K^T, dP = dO V^T: K / V row-major (keys x DP) read as col-major B
#pragma unroll 1
      for (int nf = 0; nf < kTile / 16; ++nf) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
        wmma::fill_fragment(s_acc, 0.f);
        wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
        for (int kf = 0; kf < DP / 16; ++kf) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(k_s) + nf * 16 * LDI + kf * 16, LDI);
          wmma::mma_sync(s_acc, qa[kf], b, s_acc);
          wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(v_s) + nf * 16 * LDI + kf * 16, LDI);
          wmma::mma_sync(dp_acc, doa[kf], b, dp_acc);
        }
        wmma::store_matrix_sync(s_s + warp * 16 * LDS + nf * 16, s_acc, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(dp_s + warp * 16 * LDS + nf * 16, dp_acc, LDS, wmma::mem_row_major);
      }
      __syncwarp();

      // dS = P (dP - delta), P = exp2(S scale log2e - lse log2e) where visible; columns 2c + half
      {
        const float* srow = s_s + (warp * 16 + r) * LDS + half;
        const float* dprow = dp_s + (warp * 16 + r) * LDS + half;
        WT* dsrow = ds_s + (warp * 16 + r) * LDP + half;
        // key n0 + col is visible to this query when col < hi
        const int64_t hi64 = n_vis - n0;
        const int hi = static_cast<int>(hi64 < 0 ? 0 : (hi64 > kTile ? kTile : hi64));
#pragma unroll 4
        for (int c = 0; c < kTile / 2; ++c) {
          const bool seen = 2 * c + half < hi;
          const float p = seen ? exp2f(srow[2 * c] * scale_log2 - row_lse) : 0.f;
          dsrow[2 * c] = to_low(seen ? p * (dprow[2 * c] - row_delta) : 0.f, static_cast<WT*>(nullptr));
        }
      }
      __syncwarp();

      // dQ (16 x DP) += dS K: K row-major (keys x DP) as row-major B
#pragma unroll 1
      for (int kf = 0; kf < kTile / 16; ++kf) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> dsa;
        wmma::load_matrix_sync(dsa, ds_s + warp * 16 * LDP + kf * 16, LDP);
#pragma unroll
        for (int df = 0; df < DP / 16; ++df) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(k_s) + kf * 16 * LDI + df * 16, LDI);
          wmma::mma_sync(acc[df], dsa, b, acc[df]);
        }
      }
    }

    // epilogue: dQ = scale * sum dS K, rounded once (zeros for a query that sees no key). Block-wide barrier first:
    // with no key tile at all, other warps may still be loading their fragments from the staging memory the strip
    // shares.
    __syncthreads();
    const int64_t row0 = m0 + warp * 16;
    store_rows<WT, DP>(dq_out + (q0 + row0) * sq_t + h * dk, sq_t, lq - row0, dk, scale, acc,
                       s_s + warp * 16 * LDS, lane);
  }
#endif
}

// ------------------------------------------------------------------------------------------------ host side
int64_t clamp_grid(int64_t blocks) { return blocks < 1 ? 1 : (blocks > 65535 * 32 ? 65535 * 32 : blocks); }

template <typename WT, int DP>
bool launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
            at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
            bool causal, int device) {
  using L = BwdSmem<DP>;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // decide before launching anything: false must leave the SIMT kernel a clean start
  if (L::KV::bytes > static_cast<size_t>(optin) || L::Q::bytes > static_cast<size_t>(optin)) {
    TORCH_WARN_ONCE("varlen_attention backward (CUDA): head dims padded to ", DP, " need ", L::KV::bytes,
                    " bytes of shared memory per block and this GPU allows ", optin,
                    "; using the slower SIMT kernel (LOOKFAST_CUDA_MMA=0 silences this)");
    return false;
  }
  auto dkdv_kernel = varlen_bwd_dkdv_mma_kernel<WT, DP>;
  auto dq_kernel = varlen_bwd_dq_mma_kernel<WT, DP>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(L::KV::bytes)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(L::Q::bytes)));

  const int64_t total_q = q.size(0), heads = q.size(1), kv_heads = k.size(1), batch = cu_q.numel() - 1;
  const int dk_dim = static_cast<int>(q.size(2)), dv_dim = static_cast<int>(v.size(2));
  const float fscale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* q_p = static_cast<const uint16_t*>(q.const_data_ptr());
  const auto* k_p = static_cast<const uint16_t*>(k.const_data_ptr());
  const auto* v_p = static_cast<const uint16_t*>(v.const_data_ptr());
  const auto* do_p = static_cast<const uint16_t*>(dout.const_data_ptr());
  const int* cu_q_p = cu_q.const_data_ptr<int>();
  const int* cu_k_p = cu_k.const_data_ptr<int>();

  at::Tensor delta = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  {
    const int64_t blocks = (total_q * heads + kWarps - 1) / kWarps;
    varlen_bwd_delta_kernel<WT><<<static_cast<unsigned>(clamp_grid(blocks)), kThreads, 0, stream>>>(
        static_cast<const WT*>(dout.const_data_ptr()), static_cast<const WT*>(out.const_data_ptr()),
        static_cast<const WT*>(q.const_data_ptr()), static_cast<const WT*>(k.const_data_ptr()),
        static_cast<const WT*>(v.const_data_ptr()), lse.const_data_ptr<float>(), cu_q_p, cu_k_p,
        delta.mutable_data_ptr<float>(), total_q, static_cast<int>(batch), static_cast<int>(heads),
        static_cast<int>(kv_heads), dk_dim, dv_dim, fscale, causal);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (k.size(0) > 0) {
    const dim3 grid(static_cast<unsigned>(clamp_grid((max_seqlen_k + kTile - 1) / kTile)),
                    static_cast<unsigned>(batch), static_cast<unsigned>(kv_heads));
    dkdv_kernel<<<grid, kThreads, L::KV::bytes, stream>>>(
        q_p, k_p, v_p, do_p, lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
        static_cast<WT*>(dk.mutable_data_ptr()), static_cast<WT*>(dv.mutable_data_ptr()), cu_q_p, cu_k_p, total_q,
        static_cast<int>(heads), static_cast<int>(kv_heads), dk_dim, dv_dim, fscale, causal);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    const dim3 grid(static_cast<unsigned>(clamp_grid((max_seqlen_q + kTile - 1) / kTile)),
                    static_cast<unsigned>(batch), static_cast<unsigned>(heads));
    dq_kernel<<<grid, kThreads, L::Q::bytes, stream>>>(
        q_p, k_p, v_p, do_p, lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
        static_cast<WT*>(dq.mutable_data_ptr()), cu_q_p, cu_k_p, total_q, static_cast<int>(heads),
        static_cast<int>(kv_heads), dk_dim, dv_dim, fscale, causal);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

template <typename WT>
bool dispatch_dp(int64_t width, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                 const at::Tensor& cu_k, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t mq, int64_t mk,
                 double scale, bool causal, int device) {
  if (width <= 16) return launch<WT, 16>(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, mq, mk, scale, causal, device);
  if (width <= 32) return launch<WT, 32>(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, mq, mk, scale, causal, device);
  if (width <= 64) return launch<WT, 64>(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, mq, mk, scale, causal, device);
  if (width <= 128)
    return launch<WT, 128>(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, mq, mk, scale, causal, device);
  return false;  // wider heads: the SIMT kernel
}

}  // namespace

bool varlen_attention_bwd_mma(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const auto dtype = q.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || !mma_common::enabled()) return false;
  if (dout.scalar_type() != dtype || out.scalar_type() != dtype || dq.scalar_type() != dtype ||
      dk.scalar_type() != dtype || dv.scalar_type() != dtype || lse.scalar_type() != at::kFloat)
    return false;
  const at::Tensor* all[] = {&dout, &q, &k, &v, &out, &lse, &cu_q, &cu_k, &dq, &dk, &dv};
  for (const at::Tensor* t : all)
    if (!t->is_contiguous()) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return false;
  const int64_t width = q.size(2) > v.size(2) ? q.size(2) : v.size(2);
  if (dtype == at::kHalf)
    return dispatch_dp<__half>(width, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, device);
  return dispatch_dp<__nv_bfloat16>(width, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, causal, device);
}

}  // namespace lookfast
