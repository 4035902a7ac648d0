// CPU kernels of the top-k patch gather (docs/ops.md section 1).
//
// topk_indices: partial selection per row (nth_element, then a sort of the k winners only) under the shared order
//   predicate, rows in parallel.
// patch_gather_embed: copies each selected patch straight from the image into a packed (rows, C*p*p) matrix (the
//   whole image is never patchified), writes bias + pos_embed[index] into the output in one pass, then embeds all
//   rows with ONE GEMM against weight.view(D, -1).T accumulating onto it (addmm_, beta = 1).
// patch_gather_embed_backward: grad weight / bias from one GEMM and one reduction over the re-gathered patches,
//   grad pos_embed by index_add, grad images by scattering grad patches back, parallel over images (the patches of
//   one image are distinct and never overlap, so no two threads touch the same pixel).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/topk_patch_gather.h"
#include "common/topk_patch_gather_host.h"

namespace lookfast {
namespace topk_patch_gather {
namespace {

using at::Tensor;

// Work (in elements touched) below which a parallel region costs more than it saves; on a loaded machine an
// OpenMP region over a few microseconds of work can stall for milliseconds.
constexpr int64_t kParallelGrainElements = 1 << 17;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t index;
};

Tensor topk_indices_cpu(const Tensor& scores, int64_t k) {
  check_topk_args(scores, k);
  const int64_t rows = scores.size(0), n = scores.size(1);
  Tensor out = at::empty({rows, k}, scores.options().dtype(at::kLong));
  if (rows == 0 || k == 0) return out;
  const Tensor s = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "topk_indices_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    int64_t* dst = out.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, grain_for(4 * n), [&](int64_t r0, int64_t r1) {
      std::vector<Candidate<acc_t>> buf(n);
      const auto before = [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
        return ranks_before(a.score, a.index, b.score, b.index);
      };
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * n;
        for (int64_t i = 0; i < n; ++i) buf[i] = {static_cast<acc_t>(row[i]), i};
        if (k < n) std::nth_element(buf.begin(), buf.begin() + k, buf.end(), before);
        std::sort(buf.begin(), buf.begin() + k, before);
        for (int64_t i = 0; i < k; ++i) dst[r * k + i] = buf[i].index;
      }
    });
  });
  return out;
}

// cu_seqlens must start at 0, never decrease and end at the row count; the kernels rely on it to stay in bounds.
void check_offsets(const int32_t* cu, const Geometry& g) {
  TORCH_CHECK(cu[0] == 0, "patch_gather_embed: cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < g.images; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "patch_gather_embed: cu_seqlens must be non-decreasing");
  }
  TORCH_CHECK(cu[g.images] == g.rows, "patch_gather_embed: cu_seqlens[-1] (", cu[g.images],
              ") must equal the number of indices (", g.rows, ")");
}

void check_index(int64_t index, const Geometry& g) {
  TORCH_CHECK(index >= 0 && index < g.num_patches, "patch_gather_embed: patch index ", index, " out of range 0..",
              g.num_patches - 1);
}

// Copies p elements of one patch row. Known widths get a fixed-size loop the compiler unrolls into vector moves:
// a libc memcpy call per 56-64 byte row costs about as much as the bytes it moves.
template <int64_t P, typename scalar_t>
inline void copy_row_fixed(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src) {
  for (int64_t j = 0; j < P; ++j) dst[j] = src[j];
}

template <typename scalar_t>
inline void copy_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t p) {
  switch (p) {
    case 8: copy_row_fixed<8>(dst, src); return;
    case 14: copy_row_fixed<14>(dst, src); return;
    case 16: copy_row_fixed<16>(dst, src); return;
    case 32: copy_row_fixed<32>(dst, src); return;
    default: std::memcpy(dst, src, p * sizeof(scalar_t));
  }
}

// Copies (or, with Scatter, adds) between the packed rows and the patches they name. Gather reads the image into
// `packed`; scatter adds `packed` into the image. Parallel over images, so scatter never races.
template <typename scalar_t, bool Scatter>
void move_patches(scalar_t* image, const std::array<int64_t, 4>& st, scalar_t* packed, const int64_t* indices,
                  const int32_t* cu, const Geometry& g) {
  const int64_t p = g.patch;
  const int64_t per_image = std::max<int64_t>(1, g.rows / std::max<int64_t>(1, g.images)) * g.patch_dim;
  at::parallel_for(0, g.images, grain_for(per_image), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = cu[b]; r < cu[b + 1]; ++r) {
        const int64_t index = indices[r];
        check_index(index, g);
        const PatchOrigin o = patch_origin(index, g.grid_w, p);
        scalar_t* base = image + b * st[0] + o.row0 * st[2] + o.col0 * st[3];
        scalar_t* row = packed + r * g.patch_dim;
        for (int64_t c = 0; c < g.channels; ++c) {
          for (int64_t i = 0; i < p; ++i, row += p) {
            scalar_t* line = base + c * st[1] + i * st[2];
            if (Scatter) {
              for (int64_t j = 0; j < p; ++j) line[j * st[3]] += row[j];
            } else if (st[3] == 1) {
              copy_row(row, line, p);
            } else {
              for (int64_t j = 0; j < p; ++j) row[j] = line[j * st[3]];
            }
          }
        }
      }
    }
  });
}

std::array<int64_t, 4> strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

Tensor gather_rows(const Tensor& images, const Tensor& indices, const Tensor& cu, const Geometry& g) {
  Tensor packed = at::empty({g.rows, g.patch_dim}, images.options());
  if (g.rows == 0) return packed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_gather_cpu", [&] {
    move_patches<scalar_t, false>(const_cast<scalar_t*>(images.const_data_ptr<scalar_t>()), strides_of(images),
                                  packed.mutable_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
                                  cu.const_data_ptr<int32_t>(), g);
  });
  return packed;
}

// tokens[r, :] = bias + pos_embed[indices[r], :]: the GEMM then accumulates into it (beta = 1), so the additions
// cost one write pass before the GEMM instead of a read-modify-write pass after it, and the output's pages are
// touched here rather than inside the GEMM.
void fill_bias_and_positions(Tensor& tokens, const std::optional<Tensor>& bias, const std::optional<Tensor>& pos,
                             const Tensor& indices, const Geometry& g) {
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor pe = pos.has_value() ? pos->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "patch_embed_prologue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* out = tokens.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    const int64_t d = g.embed_dim;
    at::parallel_for(0, g.rows, grain_for(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = out + r * d;
        if (!pp) {
          std::memcpy(row, bp, d * sizeof(scalar_t));
          continue;
        }
        const scalar_t* prow = pp + idx[r] * d;  // idx[r] was range-checked by the gather
        if (!bp) {
          std::memcpy(row, prow, d * sizeof(scalar_t));
          continue;
        }
        for (int64_t j = 0; j < d; ++j) {
          row[j] = static_cast<scalar_t>(static_cast<acc_t>(bp[j]) + static_cast<acc_t>(prow[j]));
        }
      }
    });
  });
}

Tensor patch_gather_embed_cpu(const Tensor& images, const Tensor& indices, const Tensor& cu_seqlens, int64_t patch,
                              const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                              const std::optional<Tensor>& pos_embed) {
  const Geometry g = check_gather_args(images, indices, cu_seqlens, patch, weight, bias, pos_embed);
  const Tensor idx = indices.contiguous();
  const Tensor cu = cu_seqlens.contiguous();
  check_offsets(cu.const_data_ptr<int32_t>(), g);
  Tensor patches = gather_rows(images, idx, cu, g);
  if (!g.embed()) return patches;
  const Tensor weight_t = weight->reshape({g.embed_dim, g.patch_dim}).t();  // (K, D) view: the GEMM reads it transposed
  if (!bias.has_value() && !pos_embed.has_value()) return at::mm(patches, weight_t);
  Tensor tokens = at::empty({g.rows, g.embed_dim}, images.options());
  if (g.rows == 0) return tokens;
  fill_bias_and_positions(tokens, bias, pos_embed, idx, g);
  tokens.addmm_(patches, weight_t);  // in place: one GEMM with beta = 1 onto bias + positions
  return tokens;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> patch_gather_embed_backward_cpu(
    const Tensor& grad_tokens, const Tensor& images, const Tensor& indices, const Tensor& cu_seqlens, int64_t patch,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& pos_embed, std::array<bool, 4> mask) {
  const Geometry g = check_gather_args(images, indices, cu_seqlens, patch, weight, std::nullopt, pos_embed);
  check_grad_tokens(grad_tokens, images, g);
  const Tensor idx = indices.contiguous();
  const Tensor cu = cu_seqlens.contiguous();
  check_offsets(cu.const_data_ptr<int32_t>(), g);
  const Tensor grad = grad_tokens.contiguous();
  const auto none = [&] { return at::empty({0}, images.options()); };
  Tensor grad_images = none(), grad_weight = none(), grad_bias = none(), grad_pos = none();

  if (mask[0]) {
    Tensor grad_patches = g.embed() ? at::mm(grad, weight->reshape({g.embed_dim, g.patch_dim})) : grad;
    grad_images = at::zeros({g.images, g.channels, g.height, g.width}, images.options());
    if (g.rows > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_scatter_cpu", [&] {
        move_patches<scalar_t, true>(grad_images.mutable_data_ptr<scalar_t>(), strides_of(grad_images),
                                     const_cast<scalar_t*>(grad_patches.const_data_ptr<scalar_t>()),
                                     idx.const_data_ptr<int64_t>(), cu.const_data_ptr<int32_t>(), g);
      });
    }
  }
  embedding_param_grads(grad, idx, g, weight, pos_embed, mask, [&] { return gather_rows(images, idx, cu, g); },
                        grad_weight, grad_bias, grad_pos);
  return {grad_images, grad_weight, grad_bias, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(lookfast, CPU, m) {
  m.impl("topk_indices", &topk_indices_cpu);
  m.impl("patch_gather_embed", &patch_gather_embed_cpu);
  m.impl("patch_gather_embed_backward", &patch_gather_embed_backward_cpu);
}

}  // namespace topk_patch_gather
}  // namespace lookfast
