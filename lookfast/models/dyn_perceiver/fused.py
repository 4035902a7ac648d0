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

Precision: everything runs in one dtype `dt`, the pixels' dtype, or under torch.autocast the autocast dtype (the
layer's nn.Linear calls would run there); the folded weights are computed in float32 from the stored ones and
rounded once to `dt`, so a bf16 model's folds carry one rounding, as its unfolded weights do.
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
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    f32 = lambda t: t.float() if t.dtype != torch.float64 else t  # noqa: E731  folds in fp32 (fp64 stays)
    with torch.autocast(x.device.type, enabled=False):  # one explicit dtype below; autocast would re-cast each op
        rows = _pixels_last(x.to(dt))                                # (N, C), N = B*H*W

        # Query projection with the LayerNorm affine folded in (a plain LayerNorm pass, then one GEMM with bias).
        wq = (f32(att.q_proj.weight) * f32(ca.q_norm.weight)).to(dt)                # (d, C)
        bq = (f32(att.q_proj.weight) @ f32(ca.q_norm.bias)).to(dt)                  # (d,)
        q = torch.addmm(bq, F.layer_norm(rows, (c,), None, None, ca.q_norm.eps), wq.t())
        # Keys / values of the few latents: one GEMM on the normalised latents.
        zd = z.to(dt)
        zn = F.layer_norm(zd, (z.shape[-1],), ca.kv_norm.weight.to(dt), ca.kv_norm.bias.to(dt), ca.kv_norm.eps)
        d = att.qk_channels
        kv = F.linear(zn, torch.cat((att.k_proj.weight, att.v_proj.weight)).to(dt))
        k, v = kv[..., :d], kv[..., d:]
        a = attention_core(q.view(b, h * w, d), k.contiguous(), v.contiguous(), att.heads, fused=True)
        # Output projection + bias + residual in one GEMM: [a, 1] @ [Wo^T; bo] added to the pixels.
        a1 = torch.cat((a.reshape(-1, att.v_channels), a.new_ones(a.shape[0] * a.shape[1], 1)), 1)
        w_o = torch.cat((att.o_proj.weight.t(), att.o_proj.bias.unsqueeze(0)), 0).to(dt)
        out = torch.addmm(rows, a1, w_o)                             # (N, C) = x + o_proj(a)
        # MLP: LN affine folded into fc1, GELU in place, fc2 accumulated into the residual in place.
        ln = mlp.layernorm
        w1 = (f32(mlp.fc1.weight) * f32(ln.weight)).to(dt)
        b1 = torch.addmv(f32(mlp.fc1.bias), f32(mlp.fc1.weight), f32(ln.bias)).to(dt)
        hid = torch.addmm(b1, F.layer_norm(out, (c,), None, None, ln.eps), w1.t())
        hid = F.gelu(hid)
        out.addmm_(hid, mlp.fc2.weight.to(dt).t())
        out.add_(mlp.fc2.bias.to(dt))
    return out.view(b, h, w, c).permute(0, 3, 1, 2)
