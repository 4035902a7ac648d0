"""Triton kernels of the fused top-k patch gather (docs/ops.md section 1) and their launchers.

Roofline (per call; R = total selected rows, K = C*p*p, D = embed width, N = Gh*Gw patches, e = element bytes):
- topk_rank_kernel: rank-based selection, every score compared with every other in its row: B*N^2 compares, reads
  B*N*4 bytes from HBM (the rest hits L1/L2). LookWhere 1036 px (B 4, N 5476): 1.2e8 compares, about 10 us on an
  H100: compare-throughput bound, negligible next to the embed. Grid (B, N / BLOCK_I) keeps every SM busy even at B 1.
- patch_embed_kernel: fused gather + GEMM + bias + pos: 2*R*K*D FLOPs; bytes R*K*e (pixels, each read once, rows of p
  contiguous elements) + D*K*e (weight, L2 resident) + R*D*e (pos rows) + R*D*e (write). G1 (R 1096, K 588, D 768,
  fp32): 0.99 GFLOP over 11 MB, 90 FLOP/B: compute bound in fp32 (ieee, no TF32: ~15 us at 67 TFLOP/s). bf16/fp16
  (tl.dot on tensor cores, fp32 accumulation; ~990 TFLOP/s dense on an H100 SXM, ~312 on an A100): 1 us of
  tensor-core time vs 5.5 MB -> 1.7 us of HBM at 3.35 TB/s (the pixels are gathered in rows of p elements, ~28 B
  for p 14 bf16, so sectors are half used: ~3 us): memory/latency bound; ~5 us expected, launch latency included.
- patch_gather_kernel / patch_scatter_kernel: pure copies, 2*R*K*e bytes, no FLOPs: memory bound; each program moves
  BLOCK_R rows x BLOCK_E elements, consecutive lanes on consecutive pixels of a patch row (p contiguous elements).
Every load and store is masked; an index outside 0..N-1 reads zeros and leaves the image untouched (never out of
bounds). The launchers take torch tensors and launch through torch.library.wrap_triton so that torch.compile can
trace them inside the `lookfast::<op>_triton` ops defined at the end of this file; under TRITON_INTERPRET=1 they
run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lookfast.kernels._launch import launch as _launch
from lookfast.ops import topk_patch_gather as _family

# Launch configurations (also the ones tests/test_topk_patch_gather.py compiles ahead of time for sm_80 / sm_90).
# Chosen from ptxas reports (Triton 3.8 and 3.9, sm_80 / sm_90): no spills and <= ~190 registers per thread.
# BLOCK_J 32: the (BLOCK_I, BLOCK_J) compare tile at 64 needed ~124 registers, at 32 about 95.
TOPK_CONFIG = dict(BLOCK_I=128, BLOCK_J=32, num_warps=4, num_stages=2)
GATHER_CONFIG = dict(BLOCK_R=16, BLOCK_E=128, num_warps=4, num_stages=2)
# 8 warps and BLOCK_K 16: with 4 warps, or BLOCK_K 32 on sm_80, the fp32 (ieee, FMA) tile hits 255 registers.
EMBED_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)
# bf16/fp16 on tensor cores: the operands stay in registers as mma fragments (half the bytes of fp32), so a deeper
# K step (fewer loop trips, wider pixel loads) fits in 4 warps without spills.
EMBED_CONFIG_LOWP = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def embed_config(dtype: torch.dtype) -> dict:
    """Launch configuration of patch_embed_kernel for images of `dtype` (tensor-core tiles for bf16/fp16)."""
    return EMBED_CONFIG_LOWP if dtype in (torch.float16, torch.bfloat16) else EMBED_CONFIG


@triton.jit
def _ranks_before(a, ia, b, ib):
    """Elementwise "(a, ia) is selected before (b, ib)": larger first, ties to the lower index, NaN last."""
    a_nan = a != a
    b_nan = b != b
    numeric = (a > b) | ((a == b) & (ia < ib))
    return tl.where(a_nan | b_nan, tl.where(a_nan & b_nan, ia < ib, b_nan), numeric)


@triton.jit
def _image_of_rows(cu_ptr, num_images, rows):
    """Image b of each packed row: the last b with cu[b] <= row (binary search; cu has num_images + 1 entries)."""
    lo = tl.zeros_like(rows)
    hi = tl.zeros_like(rows) + num_images
    span = num_images
    while span > 1:  # ceil(log2(num_images)) + 1 halvings bound the search for every row
        open_ = (hi - lo) > 1
        mid = (lo + hi) // 2
        go_right = tl.load(cu_ptr + mid, mask=open_, other=0) <= rows
        lo = tl.where(open_ & go_right, mid, lo)
        hi = tl.where(open_ & (~go_right), mid, hi)
        span = (span + 1) // 2
    return lo


@triton.jit
def topk_rank_kernel(scores_ptr, out_ptr, n, k, stride_row, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[row, rank(i)] = i for every score i whose rank under the selection order is below k."""
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < n
    base = scores_ptr + row * stride_row
    a = tl.load(base + offs_i, mask=mask_i, other=0.0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < n
        b = tl.load(base + offs_j, mask=mask_j, other=0.0)
        before = _ranks_before(b[None, :], offs_j[None, :], a[:, None], offs_i[:, None]) & mask_j[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    # The order is total, so ranks are a permutation of 0..n-1: every slot below k is written exactly once.
    tl.store(out_ptr + row * k + rank, offs_i.to(tl.int64), mask=mask_i & (rank < k))


@triton.jit
def _patch_offsets(index, image, e, grid_w, s_b, s_c, s_h, s_w, P: tl.constexpr):
    """(rows, elements) offsets of pixel e of the (C, P, P)-flattened patch `index` of image `image`: a per-row base
    (image, patch origin) plus a per-element part (channel, row and column inside the patch), so the 2-D tile costs
    one add per element."""
    row_base = (image.to(tl.int64) * s_b + ((index // grid_w) * P).to(tl.int64) * s_h
                + ((index % grid_w) * P).to(tl.int64) * s_w)
    c = e // (P * P)
    i = (e // P) % P
    j = e % P
    elem = c.to(tl.int64) * s_c + i.to(tl.int64) * s_h + j.to(tl.int64) * s_w
    return row_base[:, None] + elem[None, :]


@triton.jit
def _patch_tile(idx_ptr, cu_ptr, rows, num_images, grid_w, num_patches, patch_dim, s_b, s_c, s_h, s_w,
                P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's (BLOCK_R packed rows, BLOCK_E patch elements) tile of the gather / scatter: the rows r and
    their bounds mask, which of them name a valid patch, the elements e and their mask, and the image offsets of
    every (row, element) pair."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < rows
    index = tl.load(idx_ptr + r, mask=mask_r, other=0)
    valid = mask_r & (index >= 0) & (index < num_patches)
    image = _image_of_rows(cu_ptr, num_images, r)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = e < patch_dim
    offsets = _patch_offsets(index, image, e, grid_w, s_b, s_c, s_h, s_w, P)
    return r, mask_r, valid, e, mask_e, offsets


@triton.jit
def patch_gather_kernel(img_ptr, idx_ptr, cu_ptr, out_ptr, rows, num_images, grid_w, num_patches, patch_dim,
                        s_b, s_c, s_h, s_w, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[r, e] = pixel e of patch idx[r] of its image (raw (C, P, P) patches), zeros for an invalid index."""
    r, mask_r, valid, e, mask_e, src = _patch_tile(idx_ptr, cu_ptr, rows, num_images, grid_w, num_patches, patch_dim,
                                                   s_b, s_c, s_h, s_w, P, BLOCK_R, BLOCK_E)
    pixels = tl.load(img_ptr + src, mask=valid[:, None] & mask_e[None, :], other=0.0)
    dst = r.to(tl.int64)[:, None] * patch_dim + e[None, :]
    tl.store(out_ptr + dst, pixels, mask=mask_r[:, None] & mask_e[None, :])


@triton.jit
def patch_scatter_kernel(grad_ptr, idx_ptr, cu_ptr, img_ptr, rows, num_images, grid_w, num_patches, patch_dim,
                         s_b, s_c, s_h, s_w, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """image pixel of (row r, element e) = grad[r, e]. The patches of one image are distinct and never overlap, so a
    plain store (into a zero-filled image) is the gradient, with no atomics."""
    r, mask_r, valid, e, mask_e, dst = _patch_tile(idx_ptr, cu_ptr, rows, num_images, grid_w, num_patches, patch_dim,
                                                   s_b, s_c, s_h, s_w, P, BLOCK_R, BLOCK_E)
    mask = valid[:, None] & mask_e[None, :]
    g = tl.load(grad_ptr + r.to(tl.int64)[:, None] * patch_dim + e[None, :], mask=mask, other=0.0)
    tl.store(img_ptr + dst, g, mask=mask)


@triton.jit
def patch_embed_kernel(img_ptr, idx_ptr, cu_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, rows, num_images, grid_w,
                       num_patches, patch_dim, embed_dim, s_b, s_c, s_h, s_w, P: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, ACC_FP64: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, :] = patch(idx[r]) @ W.T + bias + pos[idx[r]]: the patches are gathered tile by tile straight from the
    image into the GEMM's A operand (never materialised), W is (D, K) row-major.
    IEEE (fp32/fp64 images): exact products on the FMA units. Otherwise (bf16/fp16) the pixel and weight tiles feed
    the tensor cores in their own dtype (exact products, fp32 accumulation); bias and positions are added to the fp32
    accumulator and the sum is rounded once, on the store."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = r < rows
    mask_n = n < embed_dim
    index = tl.load(idx_ptr + r, mask=mask_r, other=0)
    valid = mask_r & (index >= 0) & (index < num_patches)
    image = _image_of_rows(cu_ptr, num_images, r)
    if ACC_FP64:  # float64 images accumulate in float64 (gradcheck-grade); everything else in float32
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, patch_dim, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)
        mask_e = e < patch_dim
        src = _patch_offsets(index, image, e, grid_w, s_b, s_c, s_h, s_w, P)
        a = tl.load(img_ptr + src, mask=valid[:, None] & mask_e[None, :], other=0.0)
        w = tl.load(w_ptr + n.to(tl.int64)[None, :] * patch_dim + e[:, None], mask=mask_n[None, :] & mask_e[:, None],
                    other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc += tl.dot(a, w, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + index.to(tl.int64)[:, None] * embed_dim + n[None, :],
                      mask=valid[:, None] & mask_n[None, :], other=0.0)
        acc += pos.to(acc.dtype)
    dst = r.to(tl.int64)[:, None] * embed_dim + n[None, :]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------------ launchers
def topk_indices(scores: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k) int64: the k best indices per row of scores (B, N), best first (ties to the lower index, NaN last).
    `out` (optional, contiguous (B, k) int64) receives the result."""
    rows, n = scores.shape
    if out is None:
        out = torch.empty((rows, k), dtype=torch.int64, device=scores.device)
    if rows == 0 or k == 0:
        return out
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # exact, and keeps the comparisons in one well-supported type
    scores = scores.contiguous()
    cfg = TOPK_CONFIG
    grid = (rows, triton.cdiv(n, cfg["BLOCK_I"]))
    _launch(topk_rank_kernel)[grid](scores, out, n, k, scores.stride(0), BLOCK_I=cfg["BLOCK_I"],
                                    BLOCK_J=cfg["BLOCK_J"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _geometry(images: torch.Tensor, patch_size: int):
    b, c, h, w = images.shape
    return dict(num_images=b, grid_w=w // patch_size, num_patches=(h // patch_size) * (w // patch_size),
                patch_dim=c * patch_size * patch_size, s_b=images.stride(0), s_c=images.stride(1),
                s_h=images.stride(2), s_w=images.stride(3))


def patch_gather(images: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """(total, C*p*p) raw patches: row r is patch indices[r] of the image b with cu[b] <= r < cu[b+1].
    `out` (optional, contiguous) receives the result."""
    g = _geometry(images, patch_size)
    rows = indices.shape[0]
    if out is None:
        out = torch.empty((rows, g["patch_dim"]), dtype=images.dtype, device=images.device)
    if rows == 0:
        return out
    cfg = GATHER_CONFIG
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(g["patch_dim"], cfg["BLOCK_E"]))
    _launch(patch_gather_kernel)[grid](images, indices, cu_seqlens, out, rows, **g, P=patch_size,
                                       BLOCK_R=cfg["BLOCK_R"], BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def patch_scatter(grad_patches: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                  image_shape) -> torch.Tensor:
    """Gradient of patch_gather: a zero image (B, C, H, W) with each grad row written back at its patch."""
    grad_images = torch.zeros(image_shape, dtype=grad_patches.dtype, device=grad_patches.device)
    rows = indices.shape[0]
    if rows == 0:
        return grad_images
    g = _geometry(grad_images, patch_size)
    cfg = GATHER_CONFIG
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(g["patch_dim"], cfg["BLOCK_E"]))
    _launch(patch_scatter_kernel)[grid](grad_patches.contiguous(), indices, cu_seqlens, grad_images, rows, **g,
                                        P=patch_size, BLOCK_R=cfg["BLOCK_R"], BLOCK_E=cfg["BLOCK_E"],
                                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return grad_images


def patch_embed(images: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                weight: torch.Tensor, bias, pos_embed, out: torch.Tensor | None = None) -> torch.Tensor:
    """(total, D) = gathered patches @ weight.view(D, -1).T + bias + pos_embed[indices], in one fused kernel.
    `out` (optional, contiguous) receives the result."""
    g = _geometry(images, patch_size)
    rows, d = indices.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty((rows, d), dtype=images.dtype, device=images.device)
    if rows == 0:
        return out
    w2d = weight.reshape(d, -1).contiguous()
    bias_t = bias.contiguous() if bias is not None else w2d  # placeholder pointer, never read (HAS_BIAS=False)
    pos_t = pos_embed.contiguous() if pos_embed is not None else w2d
    cfg = embed_config(images.dtype)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_N"]))
    _launch(patch_embed_kernel)[grid](images, indices, cu_seqlens, w2d, bias_t, pos_t, out, rows, g["num_images"],
                                      g["grid_w"], g["num_patches"], g["patch_dim"], d, g["s_b"], g["s_c"], g["s_h"],
                                      g["s_w"], P=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
                                      ACC_FP64=images.dtype == torch.float64,
                                      IEEE=images.dtype in (torch.float32, torch.float64),
                                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def patch_gather_embed(images, indices, cu_seqlens, patch_size, weight=None, bias=None, pos_embed=None):
    """Forward of lookfast::patch_gather_embed on Triton: raw patches without weight, else the fused embed."""
    if weight is None:
        return patch_gather(images, indices, cu_seqlens, patch_size)
    return patch_embed(images, indices, cu_seqlens, patch_size, weight, bias, pos_embed)


def patch_gather_embed_backward(grad_tokens, images, indices, cu_seqlens, patch_size, weight, pos_embed, output_mask):
    """Gradients (images, weight, bias, pos_embed) of patch_gather_embed; unrequested ones are empty (0,) tensors.
    The GEMMs go to cuBLAS (torch.mm); the pixel traffic runs in the gather / scatter kernels."""
    # Fresh empty tensors for the gradients not computed: outputs of one op must not alias one another.
    grad_images, grad_weight, grad_bias, grad_pos = (images.new_empty((0,)) for _ in range(4))
    grad = grad_tokens.contiguous()
    if output_mask[0]:
        grad_patches = grad @ weight.reshape(weight.shape[0], -1) if weight is not None else grad
        grad_images = patch_scatter(grad_patches, indices, cu_seqlens, patch_size, images.shape)
    if weight is not None:
        if output_mask[1]:
            grad_weight = (grad.T @ patch_gather(images, indices, cu_seqlens, patch_size)).reshape(weight.shape)
        if output_mask[2]:
            grad_bias = grad.sum(0)
        if output_mask[3] and pos_embed is not None:
            grad_pos = torch.zeros(pos_embed.shape, dtype=grad.dtype, device=grad.device).index_add_(0, indices, grad)
    return grad_images, grad_weight, grad_bias, grad_pos


# ------------------------------------------------------------------------------- registration: lookfast::<op>_triton
# The Triton backend of the library ops, one `<library op>_triton` op each, defined when lookfast._backend first
# picks Triton (importing this module). `triton_op`, not `custom_op`: torch.compile traces through them into the
# kernels (wrap_triton above). Fake kernels and autograd are the library ops' own (lookfast.ops.topk_patch_gather).
@torch.library.triton_op("lookfast::topk_indices_triton", mutates_args=())
def _topk_indices_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return topk_indices(scores, k)


@torch.library.triton_op("lookfast::patch_gather_embed_triton", mutates_args=())
def _patch_gather_embed_op(images: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    return patch_gather_embed(images, indices, cu_seqlens, patch_size, weight, bias, pos_embed)


@torch.library.triton_op("lookfast::patch_gather_embed_backward_triton", mutates_args=())
def _patch_gather_embed_backward_op(grad_tokens: torch.Tensor, images: torch.Tensor, indices: torch.Tensor,
                                    cu_seqlens: torch.Tensor, patch_size: int, weight: Optional[torch.Tensor],
                                    pos_embed: Optional[torch.Tensor], output_mask: list[bool]
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return patch_gather_embed_backward(grad_tokens, images, indices, cu_seqlens, patch_size, weight, pos_embed,
                                       output_mask)


_family.register_backend("_triton")
