"""Nearest-patch fill: turn the values of the k kept patches of a G x G grid into a dense map, every cell taking the
inverse-distance-weighted mean of its K nearest kept patches (LookWhere's segmentation fill).

Public: `nearest_patch_fill`. Library op (csrc/lookfast.cpp): `lookfast::nearest_patch_fill` (C++ CPU kernel in
csrc/cpu/nearest_patch_fill.cpp); GPUs (a CPU-only op in `lookfast._backend.CPU_ONLY`) and `LOOKFAST_BACKEND=reference`
run `nearest_patch_fill_reference`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, require_dim, require_dtype, require_int, require_same_device, require_tensor

__all__ = ["nearest_patch_fill", "nearest_patch_fill_reference", "nearest_kept"]

NEIGHBOURS = 5
MAX_NEIGHBOURS = 16
EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------- reference
def nearest_kept(keep: torch.Tensor, grid: int, lengths: Optional[torch.Tensor] = None,
                 neighbours: int = NEIGHBOURS):
    """The K nearest kept patches of every cell, selected by exact integer keys.

    keep: (B, k) int64 patch ids (padded rows past `lengths` are ignored); lengths: optional (B,) valid counts.
    Returns (slot (B, G*G, K') int64 positions into each keep row, dist (B, G*G, K') float32 Euclidean distances),
    K' = min(K, k). A cell of an image with fewer than K' kept patches gets its missing slots at weight 0.
    """
    b, k = keep.shape
    kk = min(neighbours, k)
    # key = d^2 * k + slot: distinct per cell, ordered by distance then keep position (the official tie rule).
    # d^2 = dr^2 + dc^2 is separable, so the (B, G*G, k) keys are one broadcast add of two (B, G, k) tables.
    dtype = torch.int32 if (2 * (grid - 1) ** 2 + 1) * k < 2 ** 31 - 1 else torch.int64
    line = torch.arange(grid, device=keep.device, dtype=dtype)
    rows, cols = (keep // grid).to(dtype), (keep % grid).to(dtype)
    dr2 = (line[None, :, None] - rows[:, None, :]) ** 2  # (B, G, k)
    dc2 = (line[None, :, None] - cols[:, None, :]) ** 2
    pos = torch.arange(k, device=keep.device, dtype=dtype)
    key = ((dr2 * k)[:, :, None, :] + (dc2 * k + pos)[:, None, :, :]).reshape(b, grid * grid, k)
    if lengths is not None:
        key = key.masked_fill(pos >= lengths.to(keep.device)[:, None, None], torch.iinfo(dtype).max)
    key_near = torch.topk(key, kk, dim=-1, largest=False, sorted=True).values
    slot = (key_near % k).long()
    dist = torch.sqrt((key_near // k).to(torch.float32))  # exact: d^2 < 2^24
    return slot, dist


def _fill_weights(slot, dist, lengths):
    """float32 weights 1 / (d + eps), zero past `lengths`, normalised (all-zero rows stay zero)."""
    weights = 1.0 / (dist + EPS)
    if lengths is not None:
        rank = torch.arange(slot.shape[-1], device=slot.device)
        weights = weights * (rank < lengths.to(slot.device)[:, None, None])
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def nearest_patch_fill_reference(keep: torch.Tensor, values: torch.Tensor, grid: int,
                                 lengths: Optional[torch.Tensor] = None, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """Pure-PyTorch fill (same neighbours, weights and accumulation precision as the kernel): (B, C, G, G)."""
    b, k, c = values.shape
    if k == 0:
        return values.new_zeros(b, c, grid, grid)
    slot, dist = nearest_kept(keep, grid, lengths, neighbours)
    weights = _fill_weights(slot, dist, lengths)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    batch = torch.arange(b, device=keep.device)[:, None, None]
    filled = torch.einsum("bnkc,bnk->bcn", values[batch, slot].to(acc), weights.to(acc))
    return filled.to(values.dtype).reshape(b, c, grid, grid)


# ---------------------------------------------------------------------------------------------- library op plumbing
def _fake(keep, values, grid, lengths, neighbours):
    return values.new_empty((values.shape[0], values.shape[2], grid, grid))


def _setup_context(ctx, inputs, output):
    keep, values, grid, lengths, neighbours = inputs
    ctx.save_for_backward(keep, lengths)
    ctx.grid, ctx.neighbours, ctx.values_shape, ctx.values_dtype = grid, neighbours, values.shape, values.dtype


def _backward(ctx, grad):
    """grad_values[b, slot] += w * grad_out[b, :, cell], in fp32 (fp64 for fp64), over the same neighbours."""
    keep, lengths = ctx.saved_tensors
    b, k, c = ctx.values_shape
    if not ctx.needs_input_grad[1]:
        return None, None, None, None, None
    acc = torch.float64 if ctx.values_dtype == torch.float64 else torch.float32
    if k == 0:
        return None, grad.new_zeros(ctx.values_shape, dtype=ctx.values_dtype), None, None, None
    slot, dist = nearest_kept(keep, ctx.grid, lengths, ctx.neighbours)
    weights = _fill_weights(slot, dist, lengths).to(acc)           # (B, N, K)
    g = grad.reshape(b, c, -1).transpose(1, 2).to(acc)              # (B, N, C)
    src = (weights[..., None] * g[:, :, None, :]).reshape(b, -1, c)
    out = torch.zeros(b, k, c, dtype=acc, device=grad.device)
    out.scatter_add_(1, slot.reshape(b, -1, 1).expand(-1, -1, c), src)
    return None, out.to(ctx.values_dtype), None, None, None


_backend.register("nearest_patch_fill", _fake, _backward, _setup_context)


# --------------------------------------------------------------------------------------------------------- public
def nearest_patch_fill(keep: torch.Tensor, values: torch.Tensor, grid: int, lengths: Optional[torch.Tensor] = None,
                       neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """Dense G x G map from the values of kept patches: each cell takes the inverse-distance-weighted mean of its
    `neighbours` nearest kept patches (LookWhere's segmentation fill, with its exact neighbour rule).

    keep:       (B, k) int64 patch ids in 0..grid*grid-1, row-major over the grid (id = row * grid + col).
    values:     (B, k, C) float64/float32/bfloat16/float16, the value of each kept patch (any strides).
    grid:       G, the side of the square patch grid.
    lengths:    optional (B,) int64/int32 valid counts per row (ragged keep lists padded to k; slots past the count
                are ignored). Default: all k.
    neighbours: K in 1..16 (5 in LookWhere).

    Returns (B, C, G, G) in values' dtype (channels first, ready as segmentation logits). Neighbours: smallest
    Euclidean distance on (row, col) first; equal distances go to the earlier slot of the keep list. Weights
    1 / (d + 1e-8), normalised, in float32 as the official code; the weighted sum runs in float32 (float64 for
    float64 values) and is rounded once. An image with no valid kept patch gets zeros. Gradients flow to values.
    Refuses: keep not (B, k) int64, values not (B, k, C) floating point, grid < 1, ids out of range (raised by the
    kernel), lengths outside 0..k, neighbours outside 1..16.
    """
    require_tensor("keep", keep)
    require_dim("keep", keep, 2, "(B, k)")
    require_dtype("keep", keep, (torch.int64,))
    require_tensor("values", values)
    require_dim("values", values, 3, "(B, k, C)")
    require_dtype("values", values, FLOAT_DTYPES)
    if values.shape[:2] != keep.shape:
        raise ValueError(f"values must be (B, k, C) with keep's (B, k) = {tuple(keep.shape)}, got {tuple(values.shape)}")
    grid = require_int("grid", grid)
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    neighbours = require_int("neighbours", neighbours)
    if not 1 <= neighbours <= MAX_NEIGHBOURS:
        raise ValueError(f"neighbours must be in 1..{MAX_NEIGHBOURS}, got {neighbours}")
    require_same_device("keep", keep, values=values, lengths=lengths)
    if lengths is not None:
        require_tensor("lengths", lengths)
        require_dtype("lengths", lengths, (torch.int32, torch.int64))
        if lengths.shape != (keep.shape[0],):
            raise ValueError(f"lengths must be (B,) = ({keep.shape[0]},), got shape {tuple(lengths.shape)}")
        lengths = lengths.to(torch.int64)
    return _backend.call("nearest_patch_fill", values.device, nearest_patch_fill_reference, keep, values, grid,
                         lengths, neighbours)
