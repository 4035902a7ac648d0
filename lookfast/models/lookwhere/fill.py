"""LookWhere's segmentation fill: every high-res grid cell takes the inverse-distance-weighted mean of its K = 5
nearest kept patches (Euclidean distance on (row, col), weights 1 / (d + 1e-8) normalised; a distance tie goes to
the patch earlier in the keep list, i.e. the higher-scored one).

Two implementations with identical neighbour choice:
- `fill_reference`: the official formulation, a dense (G*G, k) float distance matrix, fully sorted per cell.
- `fill_fused`: no sort and no float compare: the exact integer key d^2 * k_pad + position (distinct per cell,
  so ties resolve by keep-list position) and a partial selection of the K smallest (torch.topk). Handles packed,
  per-image ragged keep lists.
"""
from __future__ import annotations

import torch

NEIGHBOURS = 5
EPS = 1e-8


def _coords(ids: torch.Tensor, grid: int) -> torch.Tensor:
    return torch.stack([ids // grid, ids % grid], dim=-1)


def _cell_coords(grid: int, device) -> torch.Tensor:
    r = torch.arange(grid, device=device)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)


def fill_reference(keep: torch.Tensor, values: torch.Tensor, grid: int) -> torch.Tensor:
    """keep (B, k) int64 patch ids, values (B, k, C) -> filled (B, grid, grid, C), the official computation."""
    b, k = keep.shape
    diff = _cell_coords(grid, keep.device)[None, :, None, :] - _coords(keep, grid)[:, None, :, :]
    dists = torch.sqrt((diff ** 2).sum(-1))  # (B, G*G, k) float32, like the official code
    # A stable sort makes "ties go to the earlier kept patch" hold by construction.
    nearest = torch.argsort(dists, dim=-1, stable=True)[:, :, :NEIGHBOURS]
    weights = 1.0 / (torch.gather(dists, -1, nearest) + EPS)
    weights = weights / weights.sum(-1, keepdim=True)
    batch = torch.arange(b, device=keep.device)[:, None, None]
    filled = (values[batch, nearest] * weights[..., None]).sum(2)
    return filled.view(b, grid, grid, values.shape[-1])


def nearest_kept(keep: torch.Tensor, grid: int, lengths: torch.Tensor | None = None):
    """The K nearest kept patches of every cell, selected by exact integer keys.

    keep: (B, k) int64 patch ids (padded rows past `lengths` are ignored); lengths: optional (B,) valid counts.
    Returns (slot (B, G*G, K') int64 positions into each keep row, dist (B, G*G, K') float32 Euclidean distances),
    K' = min(K, k). A cell of an image with fewer than K' kept patches gets its missing slots at weight 0.
    """
    b, k = keep.shape
    kk = min(NEIGHBOURS, k)
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


def fill_fused(keep: torch.Tensor, values: torch.Tensor, grid: int, lengths: torch.Tensor | None = None
               ) -> torch.Tensor:
    """keep (B, k) int64, values (B, k, C) -> (B, C, grid, grid), channels first (ready as segmentation logits).

    lengths: optional (B,) valid keep counts per row (ragged k, rows padded to the longest).
    """
    b, k = keep.shape
    slot, dist = nearest_kept(keep, grid, lengths)
    weights = 1.0 / (dist + EPS)  # float32 and normalised in float32, as the official code
    if lengths is not None:
        # An image with fewer than K kept patches gets those K' - n padded slots at weight zero.
        rank = torch.arange(slot.shape[-1], device=keep.device)
        weights = weights * (rank < lengths.to(keep.device)[:, None, None])
    weights = (weights / weights.sum(-1, keepdim=True)).to(values.dtype)
    batch = torch.arange(b, device=keep.device)[:, None, None]
    filled = torch.einsum("bnkc,bnk->bcn", values[batch, slot], weights)
    return filled.reshape(b, values.shape[-1], grid, grid)
