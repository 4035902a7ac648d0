// Kernels with the bugs the CUDA emulator must catch, and two correct ones it must run exactly, for
// tests/test_cuda_emulated.py (a check that cannot fail proves nothing). Written as CUDA and translated like
// csrc/cuda; compiled only into the emulator's own library (lookfast_cuda_emu_selftest::run).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kThreads = 64;

// out[t] = t + 1 read back from the neighbour's shared-memory slot: correct only with the barrier
__global__ void neighbour_kernel(int* out, bool barrier) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* slots = reinterpret_cast<int*>(smem);
  const int t = threadIdx.x;
  slots[t] = t;
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % kThreads] + (t + 1 == kThreads ? kThreads : 0);
}

// half the block waits at a barrier the other half never reaches
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}

// one thread returns before a barrier the others wait at
__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// writes one element past its dynamic shared memory
__global__ void smem_overflow_kernel(int* out, int elements) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* slots = reinterpret_cast<int*>(smem);
  if (threadIdx.x == 0) slots[elements] = 7;
  out[threadIdx.x] = 1;
}

// a shuffle that half of the warp has left
__global__ void shuffle_after_return_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// C (16 x 16, fp32) = A (16 x 16, fp16, row-major) B (16 x 16, fp16, column-major: B[k][n] at n * 16 + k), with the
// operands staged in shared memory at `offset` bytes (misaligned unless a multiple of 32) and, when `divergent`,
// only lanes < 16 taking part
__global__ void wmma_kernel(const uint16_t* a, const uint16_t* b, float* c, int offset, bool divergent) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* a_s = reinterpret_cast<uint16_t*>(smem + offset);
  uint16_t* b_s = a_s + 256;
  for (int i = threadIdx.x; i < 256; i += 32) {
    a_s[i] = a[i];
    b_s[i] = b[i];
  }
  __syncwarp();
  if (divergent && threadIdx.x >= 16) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, reinterpret_cast<const __half*>(a_s), 16);
  wmma::load_matrix_sync(fb, reinterpret_cast<const __half*>(b_s), 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// case 0: neighbours with the barrier (correct); 1: without (a race); 2: divergent barrier; 3: early return before a
// barrier; 4: shared-memory overflow; 5: 64 KB of dynamic shared memory without cudaFuncSetAttribute; 6: the same
// with it (correct); 7: shuffle after half the warp returned; 8: wmma (correct; a (16, 16) fp16 and b^T (16, 16)
// fp16 in `operands` (2, 16, 16)); 9: wmma from a misaligned pointer; 10: wmma by half a warp
at::Tensor run(int64_t which, const at::Tensor& operands) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::zeros({kThreads}, at::TensorOptions().dtype(at::kInt));
  int* o = out.mutable_data_ptr<int>();
  switch (which) {
    case 0:
    case 1:
      neighbour_kernel<<<1, kThreads, kThreads * sizeof(int), stream>>>(o, which == 0);
      return out;
    case 2:
      divergent_barrier_kernel<<<1, kThreads, 0, stream>>>(o);
      return out;
    case 3:
      early_return_kernel<<<1, kThreads, 0, stream>>>(o);
      return out;
    case 4:
      smem_overflow_kernel<<<1, kThreads, 16 * sizeof(int), stream>>>(o, 16);
      return out;
    case 5:
    case 6: {
      auto kernel = neighbour_kernel;
      if (which == 6)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
      kernel<<<1, kThreads, 64 * 1024, stream>>>(o, true);
      return out;
    }
    case 7:
      shuffle_after_return_kernel<<<1, kThreads, 0, stream>>>(o);
      return out;
    default: {
      TORCH_CHECK(which >= 8 && which <= 10, "selftest: no case ", which);
      TORCH_CHECK(operands.scalar_type() == at::kHalf && operands.numel() == 512 && operands.is_contiguous(),
                  "selftest: operands must be a contiguous (2, 16, 16) float16 tensor");
      at::Tensor c = at::empty({16, 16}, at::TensorOptions().dtype(at::kFloat));
      const auto* ab = static_cast<const uint16_t*>(operands.const_data_ptr());
      wmma_kernel<<<1, 32, 2048, stream>>>(ab, ab + 256, c.mutable_data_ptr<float>(), which == 9 ? 16 : 0,
                                           which == 10);
      return c;
    }
  }
}

}  // namespace

TORCH_LIBRARY(lookfast_cuda_emu_selftest, m) {
  m.def("run(int which, Tensor operands) -> Tensor", &run);
}
