"""The fused z->x block: every pixel of the CNN map attends to the latent tokens, then an MLP, both residual.

This is the memory-bound part of Dyn-Perceiver (H*W queries of width C against L <= 256 keys of width C/8), so the
work around the attention core is arranged to touch the C-wide pixel tensor as few times as possible, with the same
math as the official layer (only float summation order changes):

- no NCHW <-> (B, HW, C) copies: the pixels are read as a channels-last view (free when the CNN runs channels-last,
  which `ops="fused"` arranges), and the result is written channels-last;
- the LayerNorm affines are folded into the following projections (query projection, fc1), so each LayerNorm is
  one plain normalisation pass and the affine costs nothing per pixel;
- keys and values of the L latents come from one projection (concatenated weights) of the normalised latents;
- attention runs in `lookfast.cross_attention` (streamed queries against resident keys);
- the output projection, its bias and the residual are one GEMM (addmm into the pixels, with the bias as an extra
  input column of ones);
- fc2 accumulates into the residual in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .perceiver import CrossAttentionLayer, attention_core


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) rows, a view when x is channels-last (else one copy)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c)


def z2x_fused(layer: CrossAttentionLayer, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) pixels, z (B, L, Cz) latents -> updated x (B, C, H, W), channels-last memory.
    Equals `layer` applied to x as (B, HW, C) tokens."""
    b, c, h, w = x.shape
    ca, mlp = layer.cross_attn, layer.mlp
    att = ca.attention
    rows = _pixels_last(x)                                           # (N, C), N = B*H*W

    # Query projection with the LayerNorm affine folded in (a plain LayerNorm pass, then one GEMM with bias).
    wq = att.q_proj.weight * ca.q_norm.weight                        # (d, C)
    bq = att.q_proj.weight @ ca.q_norm.bias                          # (d,)
    q = torch.addmm(bq, F.layer_norm(rows, (c,), None, None, ca.q_norm.eps), wq.t())
    # Keys / values of the few latents: one GEMM on the normalised latents.
    zn = F.layer_norm(z, (z.shape[-1],), ca.kv_norm.weight, ca.kv_norm.bias, ca.kv_norm.eps)
    d = att.qk_channels
    kv = F.linear(zn, torch.cat((att.k_proj.weight, att.v_proj.weight)))
    k, v = kv[..., :d], kv[..., d:]
    a = attention_core(q.view(b, h * w, d), k.contiguous(), v.contiguous(), att.heads, fused=True)
    # Output projection + bias + residual in one GEMM: [a, 1] @ [Wo^T; bo] added to the pixels.
    a1 = torch.cat((a.reshape(-1, att.v_channels), a.new_ones(a.shape[0] * a.shape[1], 1)), 1)
    w_o = torch.cat((att.o_proj.weight.t(), att.o_proj.bias.unsqueeze(0)), 0)
    out = torch.addmm(rows, a1, w_o)                                 # (N, C) = x + o_proj(a)
    # MLP: LN affine folded into fc1, GELU in place, fc2 accumulated into the residual in place.
    ln = mlp.layernorm
    w1 = mlp.fc1.weight * ln.weight
    b1 = torch.addmv(mlp.fc1.bias, mlp.fc1.weight, ln.bias)
    hid = torch.addmm(b1, F.layer_norm(out, (c,), None, None, ln.eps), w1.t())
    hid = F.gelu(hid)
    out.addmm_(hid, mlp.fc2.weight.t())
    out.add_(mlp.fc2.bias)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)
