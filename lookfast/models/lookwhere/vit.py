"""Plain Vision Transformer pieces with timm's parameter names, so timm ViT state dicts load unchanged.

Covers the two ViT flavours LookWhere uses (both patch 14, pre-norm blocks, LayerNorm eps 1e-6, layer scale):
- dinov2 (`vit_base_patch14_reg4_dinov2`): CLS + 4 register tokens, GELU MLP (fc1 D->4D, fc2 4D->D);
- franca: CLS only, packed SwiGLU MLP (fc1 D->2H, SiLU on the first half times the second half, fc2 H->D).
The position embedding covers patch tokens only (timm's `no_embed_class`); prefix tokens get none.

Keys: patch_embed.proj.{weight,bias}, cls_token, reg_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm.

Besides the usual batched forward (B, N, D), every block runs on *packed* tokens (T, D) with FlashAttention-style
cu_seqlens, so images with different token counts share one pass. The caller validates the packed layout once per
forward (`check_cu_seqlens`); each block then runs the attention op's inner path (`varlen_attention_fwd`: no
re-validation, no host copy). The packed path's linear layers (and the batched path's with packed=True, which the
selector passes under ops="fused") run through `packed_linear.linear`: on weights packed once by
`LookWhere.pack_weights`, with each branch's layer scale and residual add in its last linear's epilogue.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.varlen_attention import varlen_attention_fwd
from ..packed_linear import linear

LN_EPS = 1e-6  # timm's ViT default (partial(nn.LayerNorm, eps=1e-6))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2's layer scale): x * gamma."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: qkv rows = [q; k; v], heads inside)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packed: bool = False, residual: torch.Tensor | None = None,
                layer_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> `residual + layer_scale * attn(x)` (B, N, D) (None: skipped). packed (ops="fused"): the
        projections run through `packed_linear.linear` (on the weights' packs when `pack_linears` made them), the
        residual and layer scale inside the output projection's epilogue, and the attention is lookfast's
        varlen_attention over the B images as packed sequences; else the official modules and SDPA."""
        b, n, d = x.shape
        if packed:  # the images as B packed sequences of n tokens: lookfast's attention (SDPA took ~3x longer here)
            cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * n
            q, k, v = linear(self.qkv, x).view(b * n, 3, self.num_heads, self.head_dim).unbind(1)
            out, _ = varlen_attention_fwd(q, k, v, cu, cu, n, n, 1.0 / math.sqrt(self.head_dim), False)
            return linear(self.proj, out.view(b, n, d), scale=layer_scale, residual=residual)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = out.transpose(1, 2).reshape(b, n, d)
        return _residual(self.proj(out), layer_scale, residual)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       query_rows: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                       layer_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens x (T, D) of B sequences (cu_seqlens (B+1,) int32, already validated) -> (T, D), with
        `residual + layer_scale * ...` in the output projection as in forward.

        query_rows: optional (B,) row of the one query kept per sequence (e.g. its CLS token): then the output is
        (B, D) for those rows only, while keys and values still cover every token (a last block feeding only CLS).
        """
        t, d = x.shape
        h, dh = self.num_heads, self.head_dim
        scale = 1.0 / math.sqrt(dh)  # varlen_attention's default scale, computed the same way
        if query_rows is None:
            q, k, v = linear(self.qkv, x).view(t, 3, h, dh).unbind(1)
            out, _ = varlen_attention_fwd(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale, False)
        else:
            # Queries only for the kept rows; keys and values for all (the qkv weight rows are [q; k; v]).
            b = query_rows.shape[0]
            q = linear(self.qkv, x[query_rows], slice(0, d)).view(b, h, dh)
            k, v = linear(self.qkv, x, slice(d, 3 * d)).view(t, 2, h, dh).unbind(1)
            cu_q = torch.arange(b + 1, dtype=torch.int32, device=x.device)
            out, _ = varlen_attention_fwd(q, k, v, cu_q, cu_seqlens, 1, max_seqlen, scale, False)
        return linear(self.proj, out.reshape(out.shape[0], d), scale=layer_scale, residual=residual)


class GeluMlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm Mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, packed: bool = False, residual: torch.Tensor | None = None,
                layer_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`residual + layer_scale * mlp(x)` (None: skipped), fused into fc2 when packed."""
        if packed:
            return linear(self.fc2, F.gelu(linear(self.fc1, x)), scale=layer_scale, residual=residual)
        return _residual(self.fc2(F.gelu(self.fc1(x))), layer_scale, residual)


class SwiGluPackedMlp(nn.Module):
    """fc1 to 2H, SiLU(first half) * second half, fc2 H -> D (timm SwiGLUPacked = GluMlp with gate_last=False)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if hidden % 2:
            raise ValueError(f"SwiGLU hidden width must be even, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, packed: bool = False, residual: torch.Tensor | None = None,
                layer_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`residual + layer_scale * mlp(x)` (None: skipped), fused into fc2 when packed."""
        if packed:
            gate, value = linear(self.fc1, x).chunk(2, dim=-1)
            return linear(self.fc2, F.silu(gate) * value, scale=layer_scale, residual=residual)
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return _residual(self.fc2(F.silu(gate) * value), layer_scale, residual)


MLPS = {"gelu": GeluMlp, "swiglu": SwiGluPackedMlp}


def _gamma(layer_scale: nn.Module) -> torch.Tensor | None:
    """A block's layer-scale vector; None for nn.Identity (no layer scale)."""
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


def _residual(y: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """`residual + y * scale` as the official block computes it (LayerScale's y * gamma, then the add)."""
    if scale is not None:
        y = y * scale
    return y if residual is None else residual + y


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, mlp: str, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPS[mlp](dim, mlp_hidden)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D). packed: linears through `packed_linear.linear`, each branch's layer scale and
        residual add inside its last linear (one rounding on the brgemm packs, see packed_linear)."""
        if packed:
            x = self.attn(self.norm1(x), True, residual=x, layer_scale=_gamma(self.ls1))
            return self.mlp(self.norm2(x), True, residual=x, layer_scale=_gamma(self.ls2))
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       query_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed x (T, D) -> (T, D); with query_rows (B,): only those rows' outputs, (B, D). Layer scales and
        residual adds run inside the branches' last linears (see forward)."""
        shortcut = x if query_rows is None else x[query_rows]
        x = self.attn.forward_packed(self.norm1(x), cu_seqlens, max_seqlen, query_rows, residual=shortcut,
                                     layer_scale=_gamma(self.ls1))
        return self.mlp(self.norm2(x), packed=True, residual=x, layer_scale=_gamma(self.ls2))


class VisionTransformer(nn.Module):
    """timm-compatible ViT trunk without a classifier: patch embedding, prefix tokens, position table, blocks, norm.

    grid: patches per side of the position table (pos_embed is (1, grid*grid, D), patch tokens only).
    """

    def __init__(self, *, grid: int, depth: int, dim: int = 768, num_heads: int = 12, patch_size: int = 14,
                 in_chans: int = 3, num_reg_tokens: int = 0, mlp: str = "gelu", mlp_hidden: int | None = None,
                 layer_scale: bool = True):
        super().__init__()
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {mlp!r}")
        if mlp_hidden is None:
            mlp_hidden = 4 * dim if mlp == "gelu" else swiglu_hidden(dim)
        self.patch_size, self.grid, self.dim = patch_size, grid, dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, dim)) if num_reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_hidden, mlp, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + (0 if self.reg_token is None else self.reg_token.shape[1])

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """CLS then registers, (batch, P, D)."""
        parts = [self.cls_token] + ([] if self.reg_token is None else [self.reg_token])
        return torch.cat(parts, dim=1).expand(batch, -1, -1)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> patch tokens plus positions (B, Gh*Gw, D), row-major over the patch grid."""
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return x + self.pos_embed

    def forward_blocks(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) through every block and the final norm (packed: see Block.forward)."""
        for block in self.blocks:
            x = block(x, packed) if packed else block(x)
        return self.norm(x)


def swiglu_hidden(dim: int) -> int:
    """fc1 width of franca's packed SwiGLU: timm's int(dim * mlp_ratio) with mlp_ratio 2.66667 * 2 (4096 at 768)."""
    return int(dim * 2.66667 * 2)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a square patch-position table (1, g*g, D) to (1, grid*grid, D): bicubic, align_corners=False (the
    official LookWhere/DINOv2 interpolation, no antialias). Returned unchanged when the size already matches."""
    n, d = pos_embed.shape[1], pos_embed.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"pos_embed must hold a square grid of positions, got {n}")
    if old == grid:
        return pos_embed
    table = pos_embed.reshape(1, old, old, d).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
