"""LookWhere's segmentation fill: every high-res grid cell takes the inverse-distance-weighted mean of its K = 5
nearest kept patches (Euclidean distance on (row, col), weights 1 / (d + 1e-8) normalised; a distance tie goes to
the patch earlier in the keep list, i.e. the higher-scored one).

Two implementations with identical neighbour choice:
- `fill_reference`: the official formulation, a dense (G*G, k) float distance matrix, fully sorted per cell.
- `fill_fused`: `lookfast.ops.nearest_patch_fill`: no sort and no float compare: the exact integer key
  d^2 * k_pad + position (distinct per cell, so ties resolve by keep-list position), the K smallest kept per cell
  and the weighted sum in one C++ pass (fp32 accumulation). Handles per-image ragged keep lists.
"""
from __future__ import annotations

import torch

from ...ops.nearest_patch_fill import EPS, NEIGHBOURS, nearest_kept, nearest_patch_fill

__all__ = ["fill_reference", "fill_fused", "nearest_kept", "NEIGHBOURS", "EPS"]


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
    filled = (values[batch, nearest] * weights[..., None]).sum(2)  # float32 weights: a float32 sum for bf16 values
    # Rounded once to the values' dtype (the official code hands its float32 sum on, which a bf16 head refuses).
    return filled.to(values.dtype).view(b, grid, grid, values.shape[-1])


def fill_fused(keep: torch.Tensor, values: torch.Tensor, grid: int, lengths: torch.Tensor | None = None
               ) -> torch.Tensor:
    """keep (B, k) int64, values (B, k, C) -> (B, C, grid, grid), channels first (ready as segmentation logits),
    through `lookfast.ops.nearest_patch_fill` (a C++ kernel on CPU). lengths: optional (B,) valid keep counts per
    row (ragged k, rows padded to the longest). Any float dtype; the weighted sum runs in float32 (float64 for
    float64) and is rounded once."""
    return nearest_patch_fill(keep, values, grid, lengths, NEIGHBOURS)
