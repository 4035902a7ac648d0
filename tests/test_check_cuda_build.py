"""lookfast.check_cuda_build's kernel resource check on tiny CUDA objects compiled here (nvcc only, no GPU): a kernel
with a stack frame (where register spills go) and a `_mma_kernel` without tensor-core instructions are reported, clean
kernels are not. Skipped where nvcc or cuobjdump is missing."""
import os
import shutil
import subprocess

import pytest

from lookfast import check_cuda_build

NVCC = next((p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                         shutil.which("nvcc")) if p and os.path.isfile(p)), None)
CUOBJDUMP = check_cuda_build.find_cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")

SOURCE = r"""
#include <mma.h>
__global__ void clean_kernel(float* x) { x[threadIdx.x] *= 2.f; }
__global__ void stack_kernel(float* x, const int* idx) {
  float local[256];  // indexed at run time: a stack frame in local memory, like register spills
  for (int j = 0; j < 256; ++j) local[idx[j] & 255] = x[j];
  x[threadIdx.x] = local[idx[threadIdx.x] & 255];
}
__global__ void plain_mma_kernel(float* x) { x[threadIdx.x] += 1.f; }  // named a tensor-core kernel, has no HMMA
__global__ void real_mma_kernel(const half* a, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, a, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}
"""


def test_report_names_spills_and_mma_kernels_without_hmma(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(SOURCE)
    obj = tmp_path / "k.o"
    subprocess.run([NVCC, "-O3", "-gencode", "arch=compute_80,code=sm_80", "-c", str(src), "-o", str(obj)],
                   check=True, capture_output=True)
    problems = check_cuda_build.kernel_report(str(obj), CUOBJDUMP)
    assert any("stack_kernel" in p and "stack 1024 bytes" in p for p in problems), problems
    assert any("plain_mma_kernel" in p and "no HMMA" in p for p in problems), problems
    assert not any("clean_kernel" in p or "real_mma_kernel" in p for p in problems), problems
