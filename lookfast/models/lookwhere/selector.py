"""LookWhere's selector: a shallow ViT on a low-res copy of the image that scores every high-res patch.

The image is resized to `img_size` (154 px: 11x11 patches; bilinear, align_corners=False, no antialias; under
ops="fused" with packed weights by `downsample_bilinear`, the same resampling computed from only the rows and
columns it reads), run through 3 ViT blocks and the final norm; an MLP head (D -> 4D, GELU -> m*m) turns each
low-res token into an m x m block of scores (m = ceil(37 / 11) = 4), laid out in pixel-shuffle order into a 44x44 map, which is resized bilinearly
(align_corners=False) to the high-res patch grid G x G. The final-normed prefix tokens (CLS, registers) are passed
on to the extractor in place of its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..packed_linear import cpu_bf16_autocast, linear
from .vit import VisionTransformer


class SelectorHead(nn.Module):
    """w1 (D -> 4D), exact GELU, w2 (4D -> m*m): per-token scores of an m x m block of high-res patches."""

    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim)
        self.w2 = nn.Linear(4 * dim, num_outputs)

    def forward(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        if packed:
            return linear(self.w2, F.gelu(linear(self.w1, x)))
        return self.w2(F.gelu(self.w1(x)))


class Selector(nn.Module):
    """Scores the high-res patches. Keys: backbone.* (timm ViT), head.w1.*, head.w2.*."""

    def __init__(self, *, dim: int, num_heads: int, depth: int, num_reg_tokens: int, mlp: str, patch_size: int,
                 img_size: int, pretrain_grid: int, mlp_hidden: int | None = None, layer_scale: bool = True):
        super().__init__()
        self.img_size = img_size
        self.in_grid = img_size // patch_size
        self.multiplier = math.ceil(pretrain_grid / self.in_grid)
        self.backbone = VisionTransformer(grid=self.in_grid, depth=depth, dim=dim, num_heads=num_heads,
                                          patch_size=patch_size, num_reg_tokens=num_reg_tokens, mlp=mlp,
                                          mlp_hidden=mlp_hidden, layer_scale=layer_scale)
        self.head = SelectorHead(dim, self.multiplier * self.multiplier)
        # Set by LookWhere.pack_weights: the linears run on their packs (see packed_linear) unless forward says not;
        # "autocast": float32 weights with autocast packs, used only under bf16 CPU autocast.
        self.packed_linears: bool | str = False

    def forward(self, images: torch.Tensor, grid: int, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> (scores (B, grid*grid) row-major, prefix tokens (B, P, D) after the final norm).
        packed=False runs the official computation even when `LookWhere.pack_weights` packed the linears (ops
        "reference" asks for it); packed=True uses the packs when there are some."""
        b = images.shape[0]
        packed = bool(packed and self.packed_linears)
        if packed and self.packed_linears == "autocast":  # outside bf16 CPU autocast: the unpacked float32 path
            packed = images.device.type == "cpu" and cpu_bf16_autocast()
        if packed:
            low = downsample_bilinear(images, self.img_size)
        else:
            low = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = torch.cat([self.backbone.prefix_tokens(b), self.backbone.embed_patches(low)], dim=1)
        x = self.backbone.forward_blocks(x, packed)
        p = self.backbone.num_prefix_tokens
        n, m = self.in_grid, self.multiplier
        blocks = self.head(x[:, p:], packed)  # (B, n*n, m*m)
        # pixel-shuffle order: token (h, w), output (i, j) -> map cell (h*m + i, w*m + j)
        fine = blocks.reshape(b, n, n, m, m).permute(0, 1, 3, 2, 4).reshape(b, 1, n * m, n * m)
        scores = F.interpolate(fine, size=(grid, grid), mode="bilinear", align_corners=False)
        return scores.reshape(b, grid * grid), x[:, :p]


def _bilinear_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of bilinear resampling (align_corners=False), computed as torch's CPU kernel does
    for float32/bf16 inputs: scale n_in / n_out in float32, source (i + 0.5) * scale - 0.5 clamped at 0, the upper
    tap clamped to the last pixel."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = src - i0.float()
    return i0, i1, 1 - w1, w1


def downsample_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """`F.interpolate(images, (size, size), mode="bilinear", align_corners=False)` (no antialias) for a bf16/fp16/
    float32 (B, C, H, W) batch, computed in float32 from the 2 * size source rows and columns it reads, rounded once.
    Why: torch's NCHW bilinear kernel took ~3 ms for LookWhere's 1036 -> 154 px bf16 downsample on one core, this
    ~1 ms. Equal to it up to the order of the four products (a bf16 output may differ by one unit in the last place;
    tests/test_models_lookwhere.py)."""
    _, _, h, w = images.shape
    y0, y1, a0, a1 = _bilinear_taps(h, size, images.device)
    x0, x1, b0, b1 = _bilinear_taps(w, size, images.device)
    rows = images.index_select(2, torch.cat([y0, y1]))  # (B, C, 2 * size, W): only the rows the output reads
    across = rows.index_select(3, x0).float() * b0 + rows.index_select(3, x1).float() * b1
    out = across[:, :, :size] * a0[:, None] + across[:, :, size:] * a1[:, None]
    return out.to(images.dtype)
