#pragma once
// Lets one helper be compiled by both the host compiler (CPU kernels) and nvcc (CUDA kernels), so the CPU tests
// cover the math the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOOKFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOOKFAST_HOST_DEVICE inline
#endif
