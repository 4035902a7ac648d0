// varlen_attention forward on tensor cores for bf16/fp16 (sm_80+): nvcuda::wmma 16x16x16 fragments (mma.sync
// m16n8k16 in the SASS) with fp32 accumulators; softmax statistics in fp32; the output rounded once.
//
// Design (FlashAttention-2 forward, simplified to wmma): a block of 4 warps owns 64 queries of one (sample, head),
// 16 per warp, and walks the sample's keys in tiles of 64. Per tile the block stages K and V (zero-padded to DP
// columns, a multiple of 16) in shared memory; each warp computes S = Q K^T for its 16 rows into an fp32 scratch,
// runs the online softmax on it (2 lanes per row, max/sum in fp32, exp2 with the scale folded in), writes P rounded
// to the input dtype (the operand of the second product, as FlashAttention does), rescales its fp32 output rows, and
// accumulates O += P V on the tensor cores. The wmma accumulator layout is opaque, so O lives in shared memory as fp32
// and is loaded into / stored from accumulator fragments around each P V product (cheap next to the mma work for
// head dims <= 128). Q's fragments stay in registers for the whole key loop.
//
// Roofline (H100 SXM: ~990 TFLOP/s dense bf16/fp16 mma, 3.35 TB/s HBM; A100: 312 TFLOP/s, 2.0 TB/s):
//   FLOPs = 2 * sum_b Lq_b * Lk_b * (Dh + Dv) * H, with the head dim padded to DP and keys to tiles of 64.
//   bytes = 2 * (q + out) + 2 * (k + v) * ceil(Lq / 64) (K/V re-read per query block, mostly from L2) + 4 * lse.
//   A3 (B 16, ~165 tokens, 12 heads, Dh 64, bf16): 1.58 GFLOP -> 1.6 us (H100) / 5 us (A100) of mma; ~16 MB -> 5 us /
//      8 us of HBM: memory bound, ~10 us expected (the fp32 SIMT kernel: ~24 us FMA bound).
//   A2 (B 16, 3136 queries x 64 keys, width 8 -> DP 16, bf16): 0.2 GFLOP padded, 1.7 MB: ~1 us either way; launch
//      and latency bound (one key tile per block, 784 blocks).
//   A1 (B 64, 128 queries x 49 keys, width 32): 0.1 GFLOP padded, 1.4 MB: launch bound (~5 us).
//   Shared memory per block (rows padded against bank conflicts): 3 * 64 * (DP + 8) * 2 (Q, K, V) + 64 * 68 * 4 (S)
//   + 64 * 72 * 2 (P) + 64 * (DP + 4) * 4 (O) + 512 bytes: 40.5 KB (DP 16) .. 110.5 KB (DP 128), above 48 KB through the
//   dynamic shared-memory opt-in.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "cuda/varlen_attention_mma.h"
#include "cuda/varlen_attention_mma_common.cuh"

namespace lookfast {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kTileM = 16 * kMmaWarps;  // queries per block
constexpr int kTileN = 64;              // keys per tile
using mma_common::kLn2;
using mma_common::kLog2e;
using mma_common::to_low;

// Shared-memory layout. Rows are padded (wmma wants ldm a multiple of 16 bytes and fragment bases 32-byte aligned,
// which these keep) so that the softmax and rescale loops, where lane pairs walk rows 16 apart, hit at most 2-way bank
// conflicts instead of 32-way: the two lanes of a row take interleaved columns (2c + half).
template <int DP>
struct MmaSmem {
  static constexpr int ld_in = DP + 8;       // Q, K, V rows (16-bit elements)
  static constexpr int ld_s = kTileN + 4;    // S rows (fp32)
  static constexpr int ld_p = kTileN + 8;    // P rows (16-bit)
  static constexpr int ld_o = DP + 4;        // O rows (fp32)
  static constexpr size_t q = 0;                                        // kTileM x DP, input dtype
  static constexpr size_t k = q + size_t(kTileM) * ld_in * 2;           // kTileN x DP
  static constexpr size_t v = k + size_t(kTileN) * ld_in * 2;           // kTileN x DP
  static constexpr size_t s = v + size_t(kTileN) * ld_in * 2;           // kTileM x kTileN fp32 scores
  static constexpr size_t p = s + size_t(kTileM) * ld_s * 4;            // kTileM x kTileN probabilities, input dtype
  static constexpr size_t o = p + size_t(kTileM) * ld_p * 2;            // kTileM x DP fp32 output accumulator
  static constexpr size_t m = o + size_t(kTileM) * ld_o * 4;            // kTileM running max (log2 units)
  static constexpr size_t l = m + size_t(kTileM) * 4;                   // kTileM running sum
  static constexpr size_t bytes = l + size_t(kTileM) * 4;
  static_assert(k % 32 == 0 && v % 32 == 0 && s % 32 == 0 && p % 32 == 0 && o % 32 == 0, "wmma needs 32-byte bases");
  static_assert((16 * ld_in * 2) % 32 == 0 && (16 * ld_s * 4) % 32 == 0 && (16 * ld_p * 2) % 32 == 0 &&
                    (16 * ld_o * 4) % 32 == 0, "16-row steps keep 32-byte alignment");
};

template <int DP, int ROWS>
__device__ __forceinline__ void stage_tile(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0, int64_t count,
                                           int64_t stride_t, int dim) {
  mma_common::stage_tile<DP, ROWS, MmaSmem<DP>::ld_in, kMmaThreads>(dst, src, row0, count, stride_t, dim);
}

template <typename WT, int DP>
__global__ void __launch_bounds__(kMmaThreads, 1) varlen_fwd_mma_kernel(
    const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
    WT* __restrict__ out, float* __restrict__ lse, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    int64_t sq_t, int64_t sq_h, int64_t sk_t, int64_t sk_h, int64_t sv_t, int64_t sv_h, int64_t so_t, int64_t so_h,
    int64_t total_q, int group, int dk, int dv, float scale_log2, bool causal) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host never launches this below sm_80 (bf16 wmma needs it)
#else
  namespace wmma = nvcuda::wmma;
  using L = MmaSmem<DP>;
  constexpr int LDI = L::ld_in, LDS = L::ld_s, LDP = L::ld_p, LDO = L::ld_o;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem + L::q);
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem + L::k);
  uint16_t* v_s = reinterpret_cast<uint16_t*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  WT* p_s = reinterpret_cast<WT*>(smem + L::p);
  float* o_s = reinterpret_cast<float*>(smem + L::o);
  float* m_s = reinterpret_cast<float*>(smem + L::m);
  float* l_s = reinterpret_cast<float*>(smem + L::l);

  const int h = blockIdx.z, kvh = h / group;
  const int64_t q0 = cu_q[blockIdx.y], lq = cu_q[blockIdx.y + 1] - q0;
  const int64_t k0 = cu_k[blockIdx.y], lk = cu_k[blockIdx.y + 1] - k0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // softmax and epilogue: lanes 2r and 2r+1 share row r of the warp's 16, each taking half of the columns
  const int row = warp * 16 + lane / 2, half = lane % 2;
  const float neg_inf = -__int_as_float(0x7f800000);
  const uint16_t* q_head = q + h * sq_h;
  const uint16_t* k_head = k + kvh * sk_h;
  const uint16_t* v_head = v + kvh * sv_h;

  // block-uniform grid-stride loop over query tiles: a too-small max_seqlen_q only costs speed
  for (int64_t m0 = int64_t(blockIdx.x) * kTileM; m0 < lq; m0 += int64_t(gridDim.x) * kTileM) {
    __syncthreads();  // the previous query tile's Q and O are no longer read
    stage_tile<DP, kTileM>(q_s, q_head, q0 + m0, lq - m0, sq_t, dk);
    for (int idx = threadIdx.x; idx < kTileM * LDO; idx += kMmaThreads) o_s[idx] = 0.f;
    for (int idx = threadIdx.x; idx < kTileM; idx += kMmaThreads) {
      m_s[idx] = neg_inf;
      l_s[idx] = 0.f;
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> qa[DP / 16];
#pragma unroll
    for (int kf = 0; kf < DP / 16; ++kf)
      wmma::load_matrix_sync(qa[kf], reinterpret_cast<const WT*>(q_s) + warp * 16 * LDI + kf * 16, LDI);

    const int64_t i = m0 + row;  // this lane's query (>= lq: a padding row, sees no key, never stored)
    const int64_t shift = lk - lq;
    const int64_t n_vis = i >= lq ? 0 : (causal ? (i + shift + 1 < 0 ? 0 : (i + shift + 1 > lk ? lk : i + shift + 1)) : lk);
    const int64_t last_q = (m0 + kTileM < lq ? m0 + kTileM : lq) - 1;
    int64_t n_end = causal ? last_q + shift + 1 : lk;
    n_end = n_end < 0 ? 0 : (n_end > lk ? lk : n_end);

    for (int64_t n0 = 0; n0 < n_end; n0 += kTileN) {
      __syncthreads();  // the previous key tile is no longer read
      stage_tile<DP, kTileN>(k_s, k_head, k0 + n0, n_end - n0, sk_t, dk);
      stage_tile<DP, kTileN>(v_s, v_head, k0 + n0, n_end - n0, sv_t, dv);
      __syncthreads();

      // S (16 x 64, this warp's rows) = Q K^T: K row-major (keys x DP) read as a col-major B = K^T
#pragma unroll
      for (int nf = 0; nf < kTileN / 16; ++nf) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kf = 0; kf < DP / 16; ++kf) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> kb;
          wmma::load_matrix_sync(kb, reinterpret_cast<const WT*>(k_s) + nf * 16 * LDI + kf * 16, LDI);
          wmma::mma_sync(acc, qa[kf], kb, acc);
        }
        wmma::store_matrix_sync(s_s + warp * 16 * LDS + nf * 16, acc, LDS, wmma::mem_row_major);
      }
      __syncwarp();

      // online softmax on row `row`, columns 2c + half of the tile; scores in log2 units
      {
        constexpr int kCols = kTileN / 2;
        const float* srow = s_s + row * LDS + half;
        float x[kCols];
        float mx = neg_inf;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int64_t j = n0 + 2 * c + half;
          x[c] = j < n_vis ? srow[2 * c] * scale_log2 : neg_inf;
          mx = fmaxf(mx, x[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_old = m_s[row];
        const float m_new = fmaxf(m_old, mx);
        // nothing visible yet: subtract 0 so that exp2(-inf) = 0 and never NaN
        const float m_use = m_new == neg_inf ? 0.f : m_new;
        const float alpha = m_old == neg_inf ? 0.f : exp2f(m_old - m_use);
        float sum = 0.f;
        WT* prow = p_s + row * LDP + half;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float pv = exp2f(x[c] - m_use);
          sum += pv;
          prow[2 * c] = to_low(pv, static_cast<WT*>(nullptr));
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        float* orow = o_s + row * LDO + half;
#pragma unroll
        for (int d = 0; d < DP / 2; ++d) orow[2 * d] *= alpha;
        __syncwarp();  // both lanes of the row have read m_s / l_s
        if (half == 0) {
          m_s[row] = m_new;
          l_s[row] = l_s[row] * alpha + sum;
        }
      }
      __syncwarp();

      // O (16 x DP, this warp's rows, fp32 in shared memory) += P V
#pragma unroll
      for (int df = 0; df < DP / 16; ++df) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        float* o_tile = o_s + warp * 16 * LDO + df * 16;
        wmma::load_matrix_sync(acc, o_tile, LDO, wmma::mem_row_major);
#pragma unroll
        for (int kf = 0; kf < kTileN / 16; ++kf) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> pa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> vb;
          wmma::load_matrix_sync(pa, p_s + warp * 16 * LDP + kf * 16, LDP);
          wmma::load_matrix_sync(vb, reinterpret_cast<const WT*>(v_s) + kf * 16 * LDI + df * 16, LDI);
          wmma::mma_sync(acc, pa, vb, acc);
        }
        wmma::store_matrix_sync(o_tile, acc, LDO, wmma::mem_row_major);
      }
      __syncwarp();
    }

    // epilogue: out = O / l rounded once; lse = ln(sum exp(scale s)) = (m + log2 l) ln 2; -inf / 0 when no key
    __syncwarp();
    if (i < lq) {
      const float l = l_s[row];
      // no key: 0; keys whose scores are all -inf: NaN (softmax's 0 / 0), lse -inf in both
      const float inv = l > 0.f ? 1.f / l : (n_vis > 0 ? __int_as_float(0x7fc00000) : 0.f);
      const float* orow = o_s + row * LDO;
      WT* dst = out + (q0 + i) * so_t + h * so_h;
      for (int d = half; d < dv; d += 2) dst[d] = to_low(orow[d] * inv, static_cast<WT*>(nullptr));
      // (a NaN sum, from a NaN or +inf score, gives a NaN lse, as torch.logsumexp)
      if (half == 0) lse[h * total_q + q0 + i] = l == 0.f ? neg_inf : (m_s[row] + log2f(l)) * kLn2;
    }
  }
#endif
}

template <typename WT, int DP>
bool launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
            const at::Tensor& cu_k, at::Tensor& out, at::Tensor& lse, int64_t max_seqlen_q, double softmax_scale,
            bool causal, int device) {
  const size_t smem = MmaSmem<DP>::bytes;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem > static_cast<size_t>(optin)) {
    TORCH_WARN_ONCE("varlen_attention forward (CUDA): head dims padded to ", DP, " need ", smem,
                    " bytes of shared memory per block and this GPU allows ", optin,
                    "; using the slower SIMT kernel (LOOKFAST_CUDA_MMA=0 silences this)");
    return false;
  }
  auto kernel = varlen_fwd_mma_kernel<WT, DP>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t batch = cu_q.numel() - 1, heads = q.size(1);
  int64_t gx = (max_seqlen_q + kTileM - 1) / kTileM;
  gx = gx < 1 ? 1 : (gx > 65535 * 32 ? 65535 * 32 : gx);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(batch), static_cast<unsigned>(heads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<grid, kMmaThreads, smem, stream>>>(
      static_cast<const uint16_t*>(q.const_data_ptr()), static_cast<const uint16_t*>(k.const_data_ptr()),
      static_cast<const uint16_t*>(v.const_data_ptr()), static_cast<WT*>(out.mutable_data_ptr()),
      lse.mutable_data_ptr<float>(), cu_q.const_data_ptr<int>(), cu_k.const_data_ptr<int>(), q.stride(0), q.stride(1),
      k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), q.size(0),
      static_cast<int>(heads / k.size(1)), static_cast<int>(q.size(2)), static_cast<int>(v.size(2)),
      static_cast<float>(softmax_scale) * kLog2e, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename WT>
bool dispatch_dp(int64_t width, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                 const at::Tensor& cu_k, at::Tensor& out, at::Tensor& lse, int64_t max_seqlen_q, double scale,
                 bool causal, int device) {
  if (width <= 16) return launch<WT, 16>(q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, scale, causal, device);
  if (width <= 32) return launch<WT, 32>(q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, scale, causal, device);
  if (width <= 64) return launch<WT, 64>(q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, scale, causal, device);
  if (width <= 128) return launch<WT, 128>(q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, scale, causal, device);
  return false;  // wider heads: the SIMT kernel
}

}  // namespace

bool varlen_attention_fwd_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, at::Tensor& out, at::Tensor& lse, int64_t max_seqlen_q,
                              int64_t /*max_seqlen_k*/, double softmax_scale, bool causal) {
  const auto dtype = q.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || !mma_common::enabled()) return false;
  if (!q.is_contiguous() || !k.is_contiguous() || !v.is_contiguous() || !out.is_contiguous()) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return false;
  const int64_t width = q.size(2) > v.size(2) ? q.size(2) : v.size(2);
  if (dtype == at::kHalf)
    return dispatch_dp<__half>(width, q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, softmax_scale, causal, device);
  return dispatch_dp<__nv_bfloat16>(width, q, k, v, cu_q, cu_k, out, lse, max_seqlen_q, softmax_scale, causal, device);
}

}  // namespace lookfast
