// CPU kernels of the top-k patch gather (docs/ops.md section 1).
//
// topk_indices: partial selection per row (nth_element, then a sort of the k winners only) under the shared order
//   predicate (float, bf16 and fp16 scores as 64-bit integer keys in that order), rows in parallel.
// patch_gather_embed: copies each selected patch straight from the image into a packed (rows, C*p*p) matrix (the
//   whole image is never patchified), writes bias + pos_embed[index] into the output in one pass, then embeds all
//   rows with ONE GEMM against weight.view(D, -1).T accumulating onto it (addmm_, beta = 1). In bf16/fp16 the GEMM
//   (bf16 operands on the matrix engine: AMX / AVX512-BF16 through oneDNN's brgemm micro-kernel,
//   at::native::cpublas::brgemm on 64 x 64 blocks with the weight packed as the micro-kernel takes it: VNNI-2, or
//   row-major for fp16 on AVX512-FP16 CPUs without AMX-FP16, cpu/brgemm_layout.h) writes each 64-row block in
//   fp32 into a per-thread scratch that stays in L2, and an epilogue adds bias + pos (summed in fp32) and rounds
//   straight into the output: every token is rounded exactly once, and no (rows, D) fp32 buffer is made.
//   (cpublas' plain bf16 x bf16 -> fp32 gemm runs at the fp32 rate on x86: fallback only.)
//   Roofline (G1 bf16: 1096 rows, K 588, D 768): 1.0 GFLOP against ~4 MB moved (pixels, packed weight, positions,
//   tokens), compute-bound on the matrix engine; the weight's VNNI repack (0.9 MB) and the epilogue are a few percent.
// patch_gather_embed_backward: grad weight / bias from one GEMM and one reduction over the re-gathered patches,
//   grad pos_embed by index_add, grad images by scattering grad patches back, parallel over images (the patches of
//   one image are distinct and never overlap, so no two threads touch the same pixel).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/topk_patch_gather.h"
#include "common/topk_patch_gather_host.h"
#include "cpu/brgemm_layout.h"
#include "cpu/brgemm_pack.h"
#include "cpu/lowp_convert.h"
#include "vector_math.h"

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

// A float score and its index as one 64-bit key that sorts ascending in ranks_before's order: the high word maps
// larger scores to smaller words (-0 read as +0, so the two tie as they compare equal), every NaN to the largest
// word; the low word is the index, which breaks ties. Integer keys select ~4x faster than the (score, index)
// pairs under the branchy predicate (G1's 4 x 5476 scores: ~0.2 ms with pairs).
LF_INLINE uint64_t rank_key(float score, uint32_t index) {
  uint32_t u;
  const float s = score == 0.0f ? 0.0f : score;
  std::memcpy(&u, &s, 4);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  const uint32_t word = std::isnan(score) ? 0xFFFFFFFFu : ~ascending;
  return (uint64_t(word) << 32) | index;
}

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
    if constexpr (std::is_same_v<acc_t, float>) {
      if (n <= int64_t(UINT32_MAX)) {
        at::parallel_for(0, rows, grain_for(4 * n), [&](int64_t r0, int64_t r1) {
          std::vector<uint64_t> keys(n);
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* row = src + r * n;
            for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(static_cast<float>(row[i]), uint32_t(i));
            if (k < n) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
            std::sort(keys.begin(), keys.begin() + k);
            for (int64_t i = 0; i < k; ++i) dst[r * k + i] = int64_t(keys[i] & 0xFFFFFFFFu);
          }
        });
        return;
      }
    }
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

// The gather is bound by memory latency, not bandwidth: a patch is C * p short lines (p elements, 28 bytes for
// bf16 p 14), each in another row of the image, often in another 4 KB page, where the hardware prefetchers (which
// stay within a page) do not help. While a line is copied, the same line of the patch kPrefetchAhead rows ahead is
// requested: one prefetch per copied line keeps that many patches' misses in flight without bursts of requests.
constexpr int64_t kPrefetchAhead = 2;

template <typename scalar_t>
LF_INLINE void prefetch_line(const scalar_t* line, int64_t last) {
  __builtin_prefetch(line);
  if ((reinterpret_cast<uintptr_t>(line) ^ reinterpret_cast<uintptr_t>(line + last)) >= 64)
    __builtin_prefetch(line + last);  // the line's end is in the next cache line
}

// Copies (or, with Scatter, adds) between the packed rows and the patches they name. Gather reads the image into
// `packed` (rows `ld` elements apart, ld >= patch_dim; columns from patch_dim on are written as zeros); scatter adds
// `packed` into the image. Parallel over images, so scatter never races.
template <typename scalar_t, bool Scatter>
void move_patches(scalar_t* image, const std::array<int64_t, 4>& st, scalar_t* packed, const int64_t* indices,
                  const int32_t* cu, const Geometry& g, int64_t ld) {
  const int64_t p = g.patch;
  const int64_t per_image = std::max<int64_t>(1, g.rows / std::max<int64_t>(1, g.images)) * g.patch_dim;
  at::parallel_for(0, g.images, grain_for(per_image), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = cu[b]; r < cu[b + 1]; ++r) {
        const int64_t index = indices[r];
        check_index(index, g);
        const PatchOrigin o = patch_origin(index, g.grid_w, p);
        scalar_t* base = image + b * st[0] + o.row0 * st[2] + o.col0 * st[3];
        // The patch kPrefetchAhead rows ahead, if any (an index out of range is refused when its row comes).
        const scalar_t* ahead = nullptr;
        if (!Scatter && r + kPrefetchAhead < cu[b + 1]) {
          const int64_t next = indices[r + kPrefetchAhead];
          if (next >= 0 && next < g.num_patches) {
            const PatchOrigin n = patch_origin(next, g.grid_w, p);
            ahead = image + b * st[0] + n.row0 * st[2] + n.col0 * st[3];
          }
        }
        scalar_t* row = packed + r * ld;
        if (!Scatter && ld > g.patch_dim) std::fill(row + g.patch_dim, row + ld, scalar_t(0));
        for (int64_t c = 0; c < g.channels; ++c) {
          for (int64_t i = 0; i < p; ++i, row += p) {
            scalar_t* line = base + c * st[1] + i * st[2];
            if (ahead) prefetch_line(ahead + c * st[1] + i * st[2], (p - 1) * st[3]);
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

// The packed patches (rows, ld): ld = patch_dim, or more for the matrix engine (zero columns after patch_dim).
Tensor gather_rows(const Tensor& images, const Tensor& indices, const Tensor& cu, const Geometry& g, int64_t ld = 0) {
  ld = std::max(ld, g.patch_dim);
  Tensor packed = at::empty({g.rows, ld}, images.options());
  if (g.rows == 0) return packed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_gather_cpu", [&] {
    move_patches<scalar_t, false>(const_cast<scalar_t*>(images.const_data_ptr<scalar_t>()), strides_of(images),
                                  packed.mutable_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
                                  cu.const_data_ptr<int32_t>(), g, ld);
  });
  return packed;
}

// tokens[r, :] = bias + pos_embed[indices[r], :]: the GEMM then accumulates into it (beta = 1), so the additions
// cost one write pass before the GEMM instead of a read-modify-write pass after it, and the output's pages are
// touched here rather than inside the GEMM. (float32 / float64; bf16/fp16 add them in the GEMM's epilogue.)
void fill_bias_and_positions(Tensor& tokens, const std::optional<Tensor>& bias, const std::optional<Tensor>& pos,
                             const Tensor& indices, const Geometry& g) {
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor pe = pos.has_value() ? pos->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "patch_embed_prologue_cpu", [&] {
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

using brgemm_pack::kBlockM;
using brgemm_pack::kBlockN;
using brgemm_pack::pack_b_slabs;

// tokens[r, :] = round(acc[r, :] + (bias + pos_embed[idx[r], :])) for rows [r0, r1): the fp32 GEMM result (acc row
// r - r0, leading dimension ld) plus bias and position summed in fp32, rounded once. Same sum order as the float32
// path's prologue (bias + pos first, then the products onto it).
template <typename scalar_t>
LF_INLINE void embed_epilogue_impl(scalar_t* __restrict__ tokens, const float* __restrict__ acc, int64_t ld,
                                   const scalar_t* __restrict__ bias, const scalar_t* __restrict__ pos,
                                   const int64_t* __restrict__ idx, int64_t r0, int64_t r1, int64_t d) {
  using namespace cpu_vec;
  constexpr int64_t kLanes = Vec<float>::size;
  constexpr bool kVector = kVectorWidens<scalar_t>;  // bf16: explicit 16-lane conversions
  const int64_t dv = kVector ? d / kLanes * kLanes : 0;
  // Position rows are read at random from a table of Gh*Gw rows (8.4 MB in bf16 at 1036 px), so each row's first
  // lines missed: ~0.3 ms of G1's ~3.4 ms went to the bias + position pass, ~0.05 ms with this prefetch.
  constexpr int64_t kPosAhead = 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = acc + (r - r0) * ld;
    scalar_t* out = tokens + r * d;
    const scalar_t* prow = pos ? pos + idx[r] * d : nullptr;  // idx[r] was range-checked by the gather
    if (pos && r + kPosAhead < r1) {  // rows of a large table at random: each one's first lines miss
      const char* ahead = reinterpret_cast<const char*>(pos + idx[r + kPosAhead] * d);
      for (int64_t off = 0; off < d * int64_t(sizeof(scalar_t)); off += 64) __builtin_prefetch(ahead + off);
    }
    if (bias && prow) {
      if constexpr (kVector) {
        for (int64_t j = 0; j < dv; j += kLanes)
          vstore_narrow(out + j, vload(a + j) + (vload_widen(bias + j) + vload_widen(prow + j)));
      }
      for (int64_t j = dv; j < d; ++j) out[j] = narrow<scalar_t>(a[j] + (widen(bias[j]) + widen(prow[j])));
    } else if (bias || prow) {
      const scalar_t* add = bias ? bias : prow;
      if constexpr (kVector) {
        for (int64_t j = 0; j < dv; j += kLanes) vstore_narrow(out + j, vload(a + j) + vload_widen(add + j));
      }
      for (int64_t j = dv; j < d; ++j) out[j] = narrow<scalar_t>(a[j] + widen(add[j]));
    } else {
      if constexpr (kVector) {
        for (int64_t j = 0; j < dv; j += kLanes) vstore_narrow(out + j, vload(a + j));
      }
      for (int64_t j = dv; j < d; ++j) out[j] = narrow<scalar_t>(a[j]);
    }
  }
}

// One target clone set per dtype (GCC's target_clones does not apply to templates).
#define LF_DEFINE_EPILOGUE(scalar_t)                                                                              \
  LF_MULTIVERSION void embed_epilogue(scalar_t* tokens, const float* acc, int64_t ld, const scalar_t* bias,      \
                                      const scalar_t* pos, const int64_t* idx, int64_t r0, int64_t r1, int64_t d) { \
    embed_epilogue_impl<scalar_t>(tokens, acc, ld, bias, pos, idx, r0, r1, d);                                   \
  }
LF_DEFINE_EPILOGUE(at::BFloat16)
LF_DEFINE_EPILOGUE(at::Half)
#undef LF_DEFINE_EPILOGUE

// The B layout oneDNN's brgemm micro-kernel (the matrix engine) takes for scalar_t on this CPU (brgemm_layout.h:
// VNNI-2, or row-major for fp16 on AVX512-FP16 without AMX-FP16); kNone without one, or with mkldnn turned off.
template <typename scalar_t>
BrgemmLayout embed_layout() {
  return enabled_brgemm_b_layout<scalar_t>();
}

// Row stride (elements) of the gathered patches for the bf16/fp16 embedding: on the matrix engine, K rounded up to
// 32 (64 bytes, the AMX tile's bf16 depth), the extra columns zero. Every row of A then starts on a cache line and K
// has no tail: with K = 588 (rows 1176 bytes apart) and a D-wide B oneDNN's AMX micro-kernel calls took ~4x longer
// than with the rows padded to 608 (Sapphire Rapids, 1 thread, G1's 1096 x 588 x 768: 2.2-3.3 ms against 0.8 ms,
// where torch.mm takes 0.85 ms).
int64_t embed_row_stride(at::ScalarType dtype, int64_t k) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return k;
  const BrgemmLayout layout =
      dtype == at::kBFloat16 ? embed_layout<at::BFloat16>() : embed_layout<at::Half>();
  return layout == BrgemmLayout::kNone ? k : brgemm_pack::padded_depth(k);
}

// bf16/fp16: tokens = round(patches @ W^T + bias + pos) with the products and sums in fp32 (see the header note).
// patches (rows, ld), ld = embed_row_stride(dtype, K) (zero columns after K). Row blocks of 64 in parallel; each
// block's fp32 result lives in a per-thread 64 x D scratch (196 KB at D 768, in L2) and is rounded into the output
// right after its GEMM: no (rows, D) fp32 buffer, no separate prologue pass.
Tensor embed_reduced_precision(const Tensor& patches, const Tensor& idx, const Tensor& weight2d,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& pos_embed,
                               const Geometry& g) {
  Tensor tokens = at::empty({g.rows, g.embed_dim}, patches.options());
  if (g.rows == 0) return tokens;
  const int64_t m = g.rows, n = g.embed_dim, k = g.patch_dim, ld = patches.size(1);
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor pe = pos_embed.has_value() ? pos_embed->contiguous() : Tensor();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(patches.scalar_type(), "patch_embed_gemm_cpu", [&] {
    const scalar_t* a = patches.const_data_ptr<scalar_t>();
    scalar_t* out = tokens.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const BrgemmLayout layout = embed_layout<scalar_t>();
    if (layout != BrgemmLayout::kNone && ld % 32 == 0) {
      // The matrix-engine path: the micro-kernel on 64 x 64 blocks of C over the padded depth ld, fp32 accumulation.
      const Tensor packed = pack_b_slabs(weight2d, ld, layout == BrgemmLayout::kVnni2);  // zero rows after K
      const scalar_t* wp = packed.const_data_ptr<scalar_t>();
      const int64_t blocks_m = (m + kBlockM - 1) / kBlockM;
      at::parallel_for(0, blocks_m, 1, [&](int64_t i0, int64_t i1) {
        const Tensor scratch_t = at::empty({kBlockM, n}, tokens.options().dtype(at::kFloat));  // 64-byte aligned
        float* scratch = scratch_t.mutable_data_ptr<float>();
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t m0 = i * kBlockM, mm = std::min(kBlockM, m - m0);
          for (int64_t n0 = 0; n0 < n; n0 += kBlockN) {
            const int64_t width = std::min(kBlockN, n - n0);
            at::native::cpublas::brgemm(mm, width, ld, ld, width, n, /*add_C=*/false, a + m0 * ld, wp + n0 * ld,
                                        scratch + n0, /*is_vnni=*/true);
          }
          embed_epilogue(out, scratch, n, bp, pp, ip, m0, m0 + mm, n);
        }
        at::native::cpublas::brgemm_release(true);
      });
    } else {
      // No micro-kernel for this dtype on this CPU: cpublas' row-major bf16 x bf16 -> fp32 GEMM, exact but at the
      // fp32 FMA rate on x86.
      TORCH_WARN_ONCE("lookfast topk_patch_gather: no ", (std::is_same_v<scalar_t, at::BFloat16> ? "bf16" : "fp16"),
                      " matrix-engine micro-kernel on this CPU; the embedding GEMM runs on the portable "
                      "fp32-accumulating path, several times slower");
      const Tensor weight_t = weight2d.t().contiguous();  // (K, D)
      Tensor acc = at::empty({m, n}, patches.options().dtype(at::kFloat));
      float* c = acc.mutable_data_ptr<float>();
      at::native::cpublas::brgemm(m, n, k, ld, n, n, /*add_C=*/false, a, weight_t.const_data_ptr<scalar_t>(), c,
                                  /*is_vnni=*/false);
      embed_epilogue(out, c, n, bp, pp, ip, 0, m, n);
    }
  });
  return tokens;
}

Tensor patch_gather_embed_cpu(const Tensor& images, const Tensor& indices, const Tensor& cu_seqlens, int64_t patch,
                              const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                              const std::optional<Tensor>& pos_embed) {
  const Geometry g = check_gather_args(images, indices, cu_seqlens, patch, weight, bias, pos_embed);
  const Tensor idx = indices.contiguous();
  const Tensor cu = cu_seqlens.contiguous();
  check_offsets(cu.const_data_ptr<int32_t>(), g);
  const bool low = images.scalar_type() == at::kBFloat16 || images.scalar_type() == at::kHalf;
  const int64_t ld = g.embed() && low ? embed_row_stride(images.scalar_type(), g.patch_dim) : 0;
  Tensor patches = gather_rows(images, idx, cu, g, ld);
  if (!g.embed()) return patches;
  if (low) {
    return embed_reduced_precision(patches, idx, weight->reshape({g.embed_dim, g.patch_dim}), bias, pos_embed, g);
  }
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
                                     idx.const_data_ptr<int64_t>(), cu.const_data_ptr<int32_t>(), g, g.patch_dim);
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
