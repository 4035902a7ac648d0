// CUDA kernels of the top-k patch gather (docs/ops.md section 1).
//
// Roofline (per call; R = total selected rows, K = C*p*p, D = embed width, N = Gh*Gw, e = element bytes):
// - topk_rank_kernel: rank-based selection, each score counts the scores ranked before it through a shared-memory
//   tile of its row: B*N^2 compares, B*N*e bytes from HBM. LookWhere 1036 px (B 4, N 5476): 1.2e8 compares over
//   ~86 blocks of 256 threads: ~10-20 us on an H100, compare bound; negligible next to the embed.
// - patch_gather_kernel / patch_scatter_kernel: pure copies, 2*R*K*e bytes, 0 FLOPs: memory bound. One thread per
//   output element; consecutive threads take consecutive pixels of a patch row, so the packed side is fully
//   coalesced and the image side reads runs of p contiguous elements.
// - embed: one cuBLAS GEMM (at::mm) over the packed (R, K) patches against weight.view(D, K).T, 2*R*K*D FLOPs
//   (G1: 0.99 GFLOP, 90 FLOP/B: compute bound in fp32, memory/launch bound with bf16 tensor cores), then
//   bias_pos_epilogue_kernel adds bias + pos_embed[index] in one pass (2*R*D*e + R*D*e bytes, memory bound).
//   bf16/fp16: cuBLAS's tensor-core GEMM (fp32 accumulation) writes an fp32 result (at::mm with out_dtype) that the
//   epilogue reads, adds bias and positions to in fp32 and rounds once: G1 bf16 = 0.99 GFLOP -> 1 us of mma on an
//   H100 (990 TFLOP/s), 3 us on an A100, vs ~6 MB (bf16 pixels and weight, the fp32 GEMM result written and read
//   back, bf16 tokens) -> 2-3 us of HBM: memory bound, ~3 launches of ~3-5 us each in practice.
// Safety: an index outside 0..N-1 gathers zeros and scatters nothing; image_of_row always returns an image in
// 0..B-1, so malformed cu_seqlens cannot send a thread out of bounds. cu_seqlens is not checked on the host here
// (that would need a device sync); the Python wrapper builds it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>

#include "common/topk_patch_gather.h"
#include "common/topk_patch_gather_host.h"

namespace lookfast {
namespace topk_patch_gather {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kRankTile = 256;  // scores staged in shared memory per step of the rank count (== kThreads)

int64_t blocks_for(int64_t work) {
  // Grid-stride loops cover the rest; 65535 * 8 blocks saturate any current GPU.
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535LL * 8));
}

template <typename scalar_t, typename acc_t>
__global__ void topk_rank_kernel(const scalar_t* __restrict__ scores, int64_t* __restrict__ out, int64_t n, int64_t k) {
  __shared__ acc_t tile[kRankTile];
  const int64_t row = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const scalar_t* s = scores + row * n;
  const acc_t a = i < n ? static_cast<acc_t>(s[i]) : acc_t(0);
  int64_t rank = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kRankTile) {
    const int64_t j = j0 + threadIdx.x;
    if (j < n) tile[threadIdx.x] = static_cast<acc_t>(s[j]);
    __syncthreads();
    const int64_t m = n - j0 < kRankTile ? n - j0 : kRankTile;
    if (i < n) {
      for (int64_t t = 0; t < m; ++t) rank += ranks_before(tile[t], j0 + t, a, i) ? 1 : 0;
    }
    __syncthreads();
  }
  // The order is total, so ranks form a permutation of 0..n-1 and each output slot is written exactly once.
  if (i < n && rank < k) out[row * k + rank] = i;
}

struct GatherParams {
  int64_t rows, images, grid_w, num_patches, patch, patch_dim;
  int64_t s_b, s_c, s_h, s_w;
};

GatherParams gather_params(const Geometry& g, const Tensor& image_like) {
  return GatherParams{g.rows,       g.images,         g.grid_w,         g.num_patches,    g.patch,
                      g.patch_dim,  image_like.stride(0), image_like.stride(1), image_like.stride(2),
                      image_like.stride(3)};
}

// Offset of pixel e of packed row r inside the image tensor, or -1 when the row names no valid patch.
__device__ __forceinline__ int64_t pixel_offset(const int64_t* indices, const int32_t* cu, const GatherParams& q,
                                                int64_t r, int64_t e) {
  const int64_t index = indices[r];
  if (index < 0 || index >= q.num_patches) return -1;
  const int64_t b = image_of_row(cu, q.images, r);
  return b * q.s_b + patch_pixel_offset(e, patch_origin(index, q.grid_w, q.patch), q.patch, q.s_c, q.s_h, q.s_w);
}

template <typename scalar_t>
__global__ void patch_gather_kernel(const scalar_t* __restrict__ images, const int64_t* __restrict__ indices,
                                    const int32_t* __restrict__ cu, scalar_t* __restrict__ out, GatherParams q) {
  const int64_t total = q.rows * q.patch_dim;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / q.patch_dim;
    const int64_t off = pixel_offset(indices, cu, q, r, t - r * q.patch_dim);
    out[t] = off >= 0 ? images[off] : scalar_t(0);
  }
}

// Patches of one image are distinct and never overlap: a plain store into the zero-filled gradient image is exact.
template <typename scalar_t>
__global__ void patch_scatter_kernel(const scalar_t* __restrict__ grad_patches, const int64_t* __restrict__ indices,
                                     const int32_t* __restrict__ cu, scalar_t* __restrict__ grad_images,
                                     GatherParams q) {
  const int64_t total = q.rows * q.patch_dim;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / q.patch_dim;
    const int64_t off = pixel_offset(indices, cu, q, r, t - r * q.patch_dim);
    if (off >= 0) grad_images[off] = grad_patches[t];
  }
}

// tokens[t] = gemm[t] + bias + pos, summed in the accumulation type and rounded once. `gemm` is the GEMM's own
// output: fp32 for bf16/fp16 (cuBLAS's fp32 result, not yet rounded), else the tokens buffer itself (in place).
template <typename scalar_t, typename gemm_t>
__global__ void bias_pos_epilogue_kernel(scalar_t* tokens, const gemm_t* gemm, const scalar_t* __restrict__ bias,
                                         const scalar_t* __restrict__ pos, const int64_t* __restrict__ indices,
                                         int64_t rows, int64_t dim, int64_t num_patches) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < rows * dim;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / dim, d = t - r * dim;
    acc_t v = static_cast<acc_t>(gemm[t]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[d]);
    const int64_t index = indices[r];
    if (pos != nullptr && index >= 0 && index < num_patches) v += static_cast<acc_t>(pos[index * dim + d]);
    tokens[t] = static_cast<scalar_t>(v);
  }
}

Tensor topk_indices_cuda(const Tensor& scores, int64_t k) {
  check_topk_args(scores, k);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t rows = scores.size(0), n = scores.size(1);
  Tensor out = at::empty({rows, k}, scores.options().dtype(at::kLong));
  if (rows == 0 || k == 0) return out;
  TORCH_CHECK((n + kRankTile - 1) / kRankTile <= 65535, "topk_indices: rows longer than ", 65535LL * kRankTile,
              " scores are not supported on CUDA");
  const Tensor s = scores.contiguous();
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((n + kRankTile - 1) / kRankTile));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "topk_indices_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    topk_rank_kernel<scalar_t, acc_t><<<grid, kRankTile, 0, stream>>>(s.const_data_ptr<scalar_t>(),
                                                                       out.mutable_data_ptr<int64_t>(), n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor gather_rows(const Tensor& images, const Tensor& idx, const Tensor& cu, const Geometry& g) {
  Tensor packed = at::empty({g.rows, g.patch_dim}, images.options());
  if (g.rows == 0) return packed;
  const GatherParams q = gather_params(g, images);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_gather_cuda", [&] {
    patch_gather_kernel<scalar_t><<<blocks_for(g.rows * g.patch_dim), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), cu.const_data_ptr<int32_t>(),
        packed.mutable_data_ptr<scalar_t>(), q);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return packed;
}

// tokens = gemm + bias + pos_embed[idx] (gemm is tokens itself, or the fp32 GEMM result for bf16/fp16 tokens)
void launch_epilogue(Tensor& tokens, const Tensor& gemm, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& pos_embed, const Tensor& idx, const Geometry& g) {
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor pe = pos_embed.has_value() ? pos_embed->contiguous() : Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "patch_embed_epilogue_cuda", [&] {
    using gemm_t = std::conditional_t<std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, scalar_t, float>;
    TORCH_INTERNAL_ASSERT(gemm.scalar_type() == c10::CppTypeToScalarType<gemm_t>::value);
    bias_pos_epilogue_kernel<scalar_t, gemm_t><<<blocks_for(g.rows * g.embed_dim), kThreads, 0, stream>>>(
        tokens.mutable_data_ptr<scalar_t>(), gemm.const_data_ptr<gemm_t>(),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
        idx.const_data_ptr<int64_t>(), g.rows, g.embed_dim, g.num_patches);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor patch_gather_embed_cuda(const Tensor& images, const Tensor& indices, const Tensor& cu_seqlens, int64_t patch,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& pos_embed) {
  const Geometry g = check_gather_args(images, indices, cu_seqlens, patch, weight, bias, pos_embed);
  const c10::cuda::CUDAGuard guard(images.device());
  const Tensor idx = indices.contiguous();
  const Tensor cu = cu_seqlens.contiguous();
  Tensor patches = gather_rows(images, idx, cu, g);
  if (!g.embed()) return patches;
  const Tensor w = weight->reshape({g.embed_dim, g.patch_dim}).t();
  const bool low = images.scalar_type() == at::kHalf || images.scalar_type() == at::kBFloat16;
  const bool epilogue = g.rows > 0 && (bias.has_value() || pos_embed.has_value());
  if (!low) {
    Tensor tokens = at::mm(patches, w);  // cuBLAS
    if (!epilogue) return tokens;
    launch_epilogue(tokens, tokens, bias, pos_embed, idx, g);
    return tokens;
  }
  // bf16/fp16: cuBLAS's tensor-core GEMM with fp32 accumulation and an fp32 result (mm.dtype), so that bias and
  // positions are added to the unrounded products and the token is rounded once, like the Triton and CPU kernels
  const Tensor gemm = at::mm(patches, w, at::kFloat);
  if (!epilogue) return gemm.to(images.scalar_type());
  Tensor tokens = at::empty({g.rows, g.embed_dim}, images.options());
  launch_epilogue(tokens, gemm, bias, pos_embed, idx, g);
  return tokens;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> patch_gather_embed_backward_cuda(
    const Tensor& grad_tokens, const Tensor& images, const Tensor& indices, const Tensor& cu_seqlens, int64_t patch,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& pos_embed, std::array<bool, 4> mask) {
  const Geometry g = check_gather_args(images, indices, cu_seqlens, patch, weight, std::nullopt, pos_embed);
  check_grad_tokens(grad_tokens, images, g);
  const c10::cuda::CUDAGuard guard(images.device());
  const Tensor idx = indices.contiguous();
  const Tensor cu = cu_seqlens.contiguous();
  const Tensor grad = grad_tokens.contiguous();
  const auto none = [&] { return at::empty({0}, images.options()); };
  Tensor grad_images = none(), grad_weight = none(), grad_bias = none(), grad_pos = none();

  if (mask[0]) {
    const Tensor grad_patches =
        g.embed() ? at::mm(grad, weight->reshape({g.embed_dim, g.patch_dim})) : grad;
    grad_images = at::zeros({g.images, g.channels, g.height, g.width}, images.options());
    if (g.rows > 0) {
      const GatherParams q = gather_params(g, grad_images);
      auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_scatter_cuda", [&] {
        patch_scatter_kernel<scalar_t><<<blocks_for(g.rows * g.patch_dim), kThreads, 0, stream>>>(
            grad_patches.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), cu.const_data_ptr<int32_t>(),
            grad_images.mutable_data_ptr<scalar_t>(), q);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  embedding_param_grads(grad, idx, g, weight, pos_embed, mask, [&] { return gather_rows(images, idx, cu, g); },
                        grad_weight, grad_bias, grad_pos);
  return {grad_images, grad_weight, grad_bias, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CUDA, m) {
  m.impl("topk_indices", &topk_indices_cuda);
  m.impl("patch_gather_embed", &patch_gather_embed_cuda);
  m.impl("patch_gather_embed_backward", &patch_gather_embed_backward_cuda);
}

}  // namespace topk_patch_gather
}  // namespace lookfast
