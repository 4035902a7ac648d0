#pragma once
// Host-side argument checks and shapes of the top-k patch gather ops, shared by the CPU (.cpp) and CUDA (.cu) kernels.
// The Python wrapper validates user input with friendly messages first; these checks guard direct calls of
// torch.ops.lookfast.* so that no kernel can read or write out of bounds, whatever it is given.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>

namespace lookfast {
namespace topk_patch_gather {

struct Geometry {
  int64_t images, channels, height, width, patch, grid_h, grid_w, num_patches, patch_dim, embed_dim, rows;
  bool embed() const { return embed_dim > 0; }
  int64_t token_dim() const { return embed() ? embed_dim : patch_dim; }
};

inline void check_topk_args(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2, "topk_indices: scores must be 2-D (B, N), got ", scores.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "topk_indices: scores must be a floating dtype, got ",
              scores.scalar_type());
  TORCH_CHECK(k >= 0 && k <= scores.size(1), "topk_indices: k must be in 0..", scores.size(1), ", got ", k);
}

inline Geometry check_gather_args(const at::Tensor& images, const at::Tensor& indices, const at::Tensor& cu_seqlens,
                                  int64_t patch, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(images.dim() == 4, "patch_gather_embed: images must be 4-D (B, C, H, W)");
  TORCH_CHECK(at::isFloatingType(images.scalar_type()), "patch_gather_embed: images must be floating point");
  TORCH_CHECK(patch > 0, "patch_gather_embed: patch_size must be positive, got ", patch);
  Geometry g{};
  g.images = images.size(0);
  g.channels = images.size(1);
  g.height = images.size(2);
  g.width = images.size(3);
  g.patch = patch;
  TORCH_CHECK(g.height % patch == 0 && g.width % patch == 0, "patch_gather_embed: H and W (", g.height, ", ",
              g.width, ") must be multiples of patch_size ", patch);
  g.grid_h = g.height / patch;
  g.grid_w = g.width / patch;
  g.num_patches = g.grid_h * g.grid_w;
  // C * p * p in checked arithmetic: a huge patch_size on an empty image must not overflow (undefined behaviour).
  int64_t pp = 0;
  TORCH_CHECK(!__builtin_mul_overflow(patch, patch, &pp) && !__builtin_mul_overflow(g.channels, pp, &g.patch_dim),
              "patch_gather_embed: channels * patch_size^2 overflows int64 (patch_size ", patch, ")");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "patch_gather_embed: indices must be (total,) int64");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.size(0) == g.images + 1,
              "patch_gather_embed: cu_seqlens must be (B + 1,) int32");
  TORCH_CHECK(indices.device() == images.device() && cu_seqlens.device() == images.device(),
              "patch_gather_embed: indices and cu_seqlens must be on the images' device");
  g.rows = indices.size(0);
  g.embed_dim = 0;
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 4 && w.size(1) == g.channels && w.size(2) == patch && w.size(3) == patch,
                "patch_gather_embed: weight must be (D, C, p, p) = (D, ", g.channels, ", ", patch, ", ", patch, ")");
    TORCH_CHECK(w.scalar_type() == images.scalar_type() && w.device() == images.device(),
                "patch_gather_embed: weight must match the images' dtype and device");
    g.embed_dim = w.size(0);
    TORCH_CHECK(g.embed_dim > 0, "patch_gather_embed: weight must have D > 0 output channels");
  } else {
    TORCH_CHECK(!bias.has_value() && !pos_embed.has_value(),
                "patch_gather_embed: bias and pos_embed need a weight (raw patches take neither)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.embed_dim && bias->scalar_type() == images.scalar_type() &&
                    bias->device() == images.device(),
                "patch_gather_embed: bias must be (D,) with the images' dtype and device");
  }
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->dim() == 2 && pos_embed->size(0) == g.num_patches && pos_embed->size(1) == g.embed_dim &&
                    pos_embed->scalar_type() == images.scalar_type() && pos_embed->device() == images.device(),
                "patch_gather_embed: pos_embed must be (Gh*Gw, D) = (", g.num_patches, ", ", g.embed_dim,
                ") with the images' dtype and device");
  }
  return g;
}

inline void check_grad_tokens(const at::Tensor& grad_tokens, const at::Tensor& images, const Geometry& g) {
  TORCH_CHECK(grad_tokens.dim() == 2 && grad_tokens.size(0) == g.rows && grad_tokens.size(1) == g.token_dim() &&
                  grad_tokens.scalar_type() == images.scalar_type() && grad_tokens.device() == images.device(),
              "patch_gather_embed_backward: grad_tokens must be (total, ", g.token_dim(),
              ") with the images' dtype and device");
}

// The embedding's parameter gradients (mask[1..3]: weight, bias, pos_embed) from the contiguous (total, D) `grad`;
// the same ATen ops on every device. `gather_patches()` returns the (total, K) patch rows through the backend's own
// gather kernel; it runs only when the weight gradient is asked for. Entries not asked for are left as given.
template <typename GatherPatches>
inline void embedding_param_grads(const at::Tensor& grad, const at::Tensor& idx, const Geometry& g,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_embed,
                                  const std::array<bool, 4>& mask, GatherPatches&& gather_patches,
                                  at::Tensor& grad_weight, at::Tensor& grad_bias, at::Tensor& grad_pos) {
  if (!g.embed()) return;
  if (mask[1]) grad_weight = at::mm(grad.t(), gather_patches()).view(weight->sizes());
  if (mask[2]) grad_bias = grad.sum(0);
  if (mask[3] && pos_embed.has_value()) {
    // Images share position rows: index_add_ accumulates them (serially on the CPU, with atomics on CUDA).
    grad_pos = at::zeros({g.num_patches, g.embed_dim}, grad.options());
    if (g.rows > 0) grad_pos.index_add_(0, idx, grad);
  }
}

}  // namespace topk_patch_gather
}  // namespace lookfast
