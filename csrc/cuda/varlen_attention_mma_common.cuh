#pragma once
// Helpers shared by the tensor-core forward (varlen_attention_mma.cu) and backward (varlen_attention_mma_bwd.cu) of
// varlen_attention: the on/off switch, the fp32 -> 16-bit rounding, and the zero-padded shared-memory tile loader.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace lookfast {
namespace mma_common {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// LOOKFAST_CUDA_MMA=0 selects the SIMT kernels (read at every call, so tests can switch it per case)
inline bool enabled() {
  const char* flag = std::getenv("LOOKFAST_CUDA_MMA");
  return flag == nullptr || std::strcmp(flag, "0") != 0;
}

__device__ __forceinline__ __half to_low(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 to_low(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// rows [row0, row0 + count) x [0, dim) of a (tokens, heads, dim) tensor (raw 16-bit elements, `src` already offset to
// the head) into a ROWS x DP tile with row stride LD, zeros elsewhere; consecutive threads take consecutive columns
// (coalesced). Every element of the ROWS x DP tile is written, so no stale value survives from an earlier tile.
template <int DP, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void stage_tile(uint16_t* dst, const uint16_t* __restrict__ src, int64_t row0,
                                           int64_t count, int64_t stride_t, int dim) {
  for (int idx = threadIdx.x; idx < ROWS * DP; idx += THREADS) {
    const int r = idx / DP, d = idx % DP;
    dst[r * LD + d] = (r < count && d < dim) ? src[(row0 + r) * stride_t + d] : uint16_t(0);
  }
}

}  // namespace mma_common
}  // namespace lookfast
