"""Fused top-k patch gather (contract: docs/ops.md section 1): pick the k best patches of each image by score and turn
only those into tokens (raw pixels, or patch-embedded + bias + position embedding), never patchifying the whole image.

Public: `topk_indices`, `topk_patch_gather`. Library ops (csrc/lookfast.cpp): `lookfast::topk_indices`,
`lookfast::patch_gather_embed` (packed rows + cu_seqlens, so the uniform and ragged cases share one kernel) and
`lookfast::patch_gather_embed_backward`; their Triton twins `lookfast::<op>_triton` are defined by
`lookfast.kernels.topk_patch_gather`, imported the first time Triton runs (see `lookfast._backend`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, require_dim, require_dtype, require_int, require_same_device, require_shape, require_tensor

__all__ = ["topk_indices", "topk_patch_gather", "topk_indices_reference", "patch_gather_embed_reference"]

_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------- reference
def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Pure-PyTorch selection: (B, k) int64 indices, descending score, ties to the lower index, NaN last."""
    nan = torch.isnan(scores)
    # Two stable sorts: by score descending (NaN parked at -inf, where stability keeps index order among ties),
    # then NaNs after every number, keeping the previous order within both groups.
    order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    return order[:, :k].contiguous()


def patch_gather_embed_reference(images: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor, patch_size: int,
                                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                 pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch gather (+ embed) of packed rows: row r is patch indices[r] of image b, cu[b] <= r < cu[b+1].

    Patchifies the whole image (it is the oracle, not the fast path). pos_embed is (Gh*Gw, D). Returns (total, D) or
    (total, C*p*p)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    all_patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * p * p)
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    image_of_row = torch.repeat_interleave(torch.arange(b, device=images.device), counts, output_size=indices.shape[0])
    patches = all_patches[image_of_row * (gh * gw) + indices]
    if weight is None:
        return patches
    tokens = patches @ weight.reshape(weight.shape[0], -1).T
    if bias is not None:
        tokens = tokens + bias
    if pos_embed is not None:
        tokens = tokens + pos_embed[indices]
    return tokens


# ------------------------------------------------------------- fake kernels and autograd (library and Triton ops)
def _fake_topk_indices(scores, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


def _fake_patch_gather_embed(images, indices, cu_seqlens, patch_size, weight, bias, pos_embed):
    width = weight.shape[0] if weight is not None else images.shape[1] * patch_size * patch_size
    return images.new_empty((indices.shape[0], width))


def _fake_patch_gather_embed_backward(grad_tokens, images, indices, cu_seqlens, patch_size, weight, pos_embed, output_mask):
    none = lambda: images.new_empty((0,))  # a fresh tensor each: outputs must not alias one another
    gh, gw = images.shape[2] // patch_size, images.shape[3] // patch_size
    return (
        images.new_empty(images.shape) if output_mask[0] else none(),
        images.new_empty(weight.shape) if output_mask[1] and weight is not None else none(),
        images.new_empty((weight.shape[0],)) if output_mask[2] and weight is not None else none(),
        images.new_empty((gh * gw, weight.shape[0])) if output_mask[3] and pos_embed is not None else none(),
    )


def _setup_context(ctx, inputs, output):
    images, indices, cu_seqlens, patch_size, weight, bias, pos_embed = inputs
    ctx.save_for_backward(images, indices, cu_seqlens, weight, pos_embed)
    ctx.patch_size = patch_size
    ctx.has_bias = bias is not None


def _make_backward(backward_op):
    def backward(ctx, grad_tokens):
        images, indices, cu_seqlens, weight, pos_embed = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[4], ctx.has_bias and need[5], pos_embed is not None and need[6]]
        if not any(mask):
            return None, None, None, None, None, None, None
        grads = backward_op(grad_tokens, images, indices, cu_seqlens, ctx.patch_size, weight, pos_embed, mask)
        gi, gw, gb, gp = (g if m else None for g, m in zip(grads, mask))
        return gi, None, None, None, gw, gb, gp

    return backward


def register_backend(suffix: str) -> None:
    """Fake kernels and autograd of this family's ops named `<library op><suffix>`: "" for the compiled library (done
    here, at import), "_triton" for the Triton ops (done by lookfast.kernels.topk_patch_gather when it defines them)."""
    backward_op = f"patch_gather_embed_backward{suffix}"
    _backend.register(f"topk_indices{suffix}", _fake_topk_indices)
    _backend.register(backward_op, _fake_patch_gather_embed_backward)
    _backend.register(f"patch_gather_embed{suffix}", _fake_patch_gather_embed,
                      _make_backward(lambda *a: getattr(torch.ops.lookfast, backward_op)(*a)), _setup_context)


register_backend("")


# ------------------------------------------------------------------------------------------------------- dispatch
def _select(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _backend.call("topk_indices", scores.device, topk_indices_reference, scores, k)


def _gather(images, indices, cu_seqlens, patch_size, weight, bias, pos_embed) -> torch.Tensor:
    return _backend.call("patch_gather_embed", images.device, patch_gather_embed_reference,
                         images, indices, cu_seqlens, patch_size, weight, bias, pos_embed)


# ----------------------------------------------------------------------------------------------------- validation
def _check_scores(scores, num_images: Optional[int], num_patches: Optional[int]) -> None:
    require_tensor("scores", scores)
    require_dim("scores", scores, 2, "(B, Gh*Gw)")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {str(scores.dtype).replace('torch.', '')}")
    if num_images is not None and scores.shape[0] != num_images:
        raise ValueError(f"scores has {scores.shape[0]} rows but images has batch size {num_images}")
    if num_patches is not None and scores.shape[1] != num_patches:
        raise ValueError(f"scores has {scores.shape[1]} columns but the patch grid has Gh*Gw = {num_patches} patches")


def _check_k(k, scores: torch.Tensor) -> Union[int, torch.Tensor]:
    """k as an int in 0..N, or a (B,) int32/int64 tensor of per-row counts in 0..N (checked on the host)."""
    rows, n = scores.shape
    if isinstance(k, torch.Tensor):
        require_dtype("k", k, _INDEX_DTYPES)
        require_shape("k", k, (rows,), "(B,)")
        require_same_device("scores", scores, k=k)
        if rows and (bool((k < 0).any()) or bool((k > n).any())):
            raise ValueError(f"every entry of k must be in 0..{n} (the number of patches), got min {int(k.min())}, max {int(k.max())}")
        return k
    require_int("k", k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..{n} (the number of patches), got {k}")
    return k


def _ragged_layout(order: torch.Tensor, counts: torch.Tensor):
    """Packs the first counts[b] entries of each row of order (B, kmax): (packed (total,), cu_seqlens (B+1,) int32)."""
    counts = counts.to(torch.int64)
    keep = torch.arange(order.shape[1], device=order.device) < counts[:, None]
    cu_seqlens = torch.zeros(order.shape[0] + 1, dtype=torch.int32, device=order.device)
    torch.cumsum(counts, 0, out=cu_seqlens[1:])
    return order[keep], cu_seqlens


# --------------------------------------------------------------------------------------------------------- public
def topk_indices(scores: torch.Tensor, k: Union[int, torch.Tensor]):
    """The k best entries of each row of `scores`, best first.

    scores: (B, N) floating point. Order: larger score first; equal scores go to the lower index; NaN ranks below
    every number (picked only when a row has fewer than k numbers). CPU uses a partial selection, not a full sort.

    k int in 0..N -> (B, k) int64 indices.
    k (B,) int32/int64 tensor of per-row counts -> (indices (total,) int64 packed row after row, cu_seqlens (B+1,) int32).
    """
    _check_scores(scores, None, None)
    k = _check_k(k, scores)
    if isinstance(k, torch.Tensor):
        kmax = int(k.max()) if scores.shape[0] else 0
        return _ragged_layout(_select(scores, kmax), k)
    return _select(scores, k)


def topk_patch_gather(images: torch.Tensor, scores: torch.Tensor, k: Union[int, torch.Tensor], patch_size: int,
                      weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                      pos_embed: Optional[torch.Tensor] = None):
    """Select the k best patches of each image by score and gather (and optionally embed) only those.

    images:     (B, C, H, W) float32/float16/bfloat16 (float64 too); H and W multiples of patch_size; any strides.
    scores:     (B, Gh*Gw) floating point, Gh = H // p, Gw = W // p, row-major over the patch grid.
    k:          int in 0..Gh*Gw, or a (B,) int32/int64 tensor of per-image counts (ragged).
    patch_size: p.
    weight:     (D, C, p, p) patch-embedding conv weight, images' dtype; None -> raw pixel patches.
    bias:       (D,) or None (needs weight).
    pos_embed:  (Gh*Gw, D) or (1, Gh*Gw, D) or None (needs weight); row idx is added to the token of patch idx.

    Returns, for int k: indices (B, k) int64 (descending score, ties to the lower index, NaN last) and tokens
    (B, k, D) = conv2d(images, weight, bias, stride=p) at those patches + pos_embed[indices], or (B, k, C*p*p) raw
    patches in (C, p, p) order without weight. For a k tensor: indices (total,), tokens (total, D or C*p*p) packed
    image after image, and cu_seqlens (B+1,) int32. Gradients flow to images, weight, bias and pos_embed.
    """
    require_tensor("images", images)
    require_dim("images", images, 4, "(B, C, H, W)")
    require_dtype("images", images, FLOAT_DTYPES)
    patch_size = require_int("patch_size", patch_size)
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    b, c, h, w = images.shape
    if c * patch_size * patch_size > 2**63 - 1:  # the patch width C*p*p must be an int64 (an empty image allows any p)
        raise ValueError(f"patch_size {patch_size} is too large: channels * patch_size**2 overflows int64")
    if h % patch_size or w % patch_size:
        raise ValueError(f"images height and width ({h}, {w}) must be multiples of patch_size {patch_size}")
    num_patches = (h // patch_size) * (w // patch_size)
    _check_scores(scores, b, num_patches)
    require_same_device("images", images, scores=scores, weight=weight, bias=bias, pos_embed=pos_embed)
    pos2d = _check_embedding(images, patch_size, num_patches, weight, bias, pos_embed)
    k = _check_k(k, scores)

    if isinstance(k, torch.Tensor):
        kmax = int(k.max()) if b else 0
        indices, cu_seqlens = _ragged_layout(_select(scores, kmax), k)
        tokens = _gather(images, indices, cu_seqlens, patch_size, weight, bias, pos2d)
        return indices, tokens, cu_seqlens
    order = _select(scores, k)
    cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=images.device) * k
    tokens = _gather(images, order.reshape(-1), cu_seqlens, patch_size, weight, bias, pos2d)
    return order, tokens.reshape(b, k, tokens.shape[-1])


def _check_embedding(images, p, num_patches, weight, bias, pos_embed) -> Optional[torch.Tensor]:
    """Validates weight / bias / pos_embed against images; returns pos_embed as (Gh*Gw, D) (or None)."""
    c = images.shape[1]
    if weight is None:
        for name, t in (("bias", bias), ("pos_embed", pos_embed)):
            if t is not None:
                raise ValueError(f"{name} needs weight: without weight the op returns raw pixel patches")
        return None
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None:
            require_tensor(name, t)
            if t.dtype != images.dtype:
                raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but images has "
                                f"{str(images.dtype).replace('torch.', '')}; they must match")
    require_dim("weight", weight, 4, "(D, C, p, p)")
    d = weight.shape[0]
    require_shape("weight", weight, (d, c, p, p), "(D, C, p, p)")
    if d == 0:
        raise ValueError("weight must have at least one output channel (D > 0)")
    if bias is not None:
        require_shape("bias", bias, (d,), "(D,)")
    if pos_embed is None:
        return None
    if pos_embed.dim() == 3:
        require_shape("pos_embed", pos_embed, (1, num_patches, d), "(1, Gh*Gw, D)")
        return pos_embed[0]
    require_shape("pos_embed", pos_embed, (num_patches, d), "(Gh*Gw, D)")
    return pos_embed
