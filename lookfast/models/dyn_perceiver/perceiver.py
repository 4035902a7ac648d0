"""The latent (Perceiver) branch: multi-head attention, cross-/self-attention layers with MLPs, the token mixer.

Module names follow the official code so state-dict keys match (`cross_attn.{q_norm,kv_norm,attention.*}`,
`self_attn.{norm,attention.*}`, `mlp.{layernorm,fc1,fc2}`). `ops="reference"` computes attention as the official
einsum does (explicit scores, softmax, weighted sum); `ops="fused"` hands the attention core to
`lookfast.cross_attention`. The CNN-facing z->x layer has its own fused path in fused.py.
"""
from __future__ import annotations

import torch
from torch import nn


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, fused: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v per head. q (B, Lq, H*Dh), k (B, Lk, H*Dh), v (B, Lk, H*Dv) -> (B, Lq, H*Dv)."""
    b, lq, _ = q.shape
    lk = k.shape[1]
    q = q.view(b, lq, heads, -1)
    k = k.view(b, lk, heads, -1)
    v = v.view(b, lk, heads, -1)
    if fused:
        import lookfast

        if k.dtype != q.dtype or v.dtype != q.dtype:
            # Under autocast the projections run in the autocast dtype but a float32 key bias promotes k back to
            # float32; the attention then runs in the projections' dtype, as SDPA does under autocast.
            k, v = k.to(q.dtype), v.to(q.dtype)
        return lookfast.cross_attention(q, k, v).reshape(b, lq, -1)
    scale = q.shape[-1] ** -0.5
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, lq, -1)


class MultiHeadAttention(nn.Module):
    """q/k/v projections (no bias), optional learned bias added to the keys (`relative_position_bias`, one row per
    key token), attention, output projection (with bias)."""

    def __init__(self, heads: int, q_in: int, kv_in: int, qk: int | None = None, v: int | None = None,
                 key_bias_tokens: int = 0):
        super().__init__()
        qk = q_in if qk is None else qk
        v = qk if v is None else v
        if qk % heads or v % heads:
            raise ValueError(f"qk channels {qk} and v channels {v} must be divisible by heads {heads}")
        self.heads, self.qk_channels, self.v_channels = heads, qk, v
        if key_bias_tokens:
            self.relative_position_bias = nn.Parameter(torch.zeros(1, key_bias_tokens, qk))
        else:
            self.relative_position_bias = None
        self.q_proj = nn.Linear(q_in, qk, bias=False)
        self.k_proj = nn.Linear(kv_in, qk, bias=False)
        self.v_proj = nn.Linear(kv_in, v, bias=False)
        self.o_proj = nn.Linear(v, q_in)
        self.fused = False

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """x_q (B, Lq, q_in), x_kv (B, Lk, kv_in) -> (B, Lq, q_in)."""
        q = self.q_proj(x_q)
        k = self.k_proj(x_kv)
        if self.relative_position_bias is not None:
            k = k + self.relative_position_bias
        v = self.v_proj(x_kv)
        return self.o_proj(attention_core(q, k, v, self.heads, self.fused))


class MLP(nn.Module):
    """LayerNorm -> Linear (widening) -> GELU -> Linear."""

    def __init__(self, channels: int, widening: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, widening * channels)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(widening * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(self.layernorm(x))))


class CrossAttention(nn.Module):
    """Attention of LayerNorm(x_q) over LayerNorm(x_kv)."""

    def __init__(self, heads: int, q_in: int, kv_in: int, qk: int | None, v: int | None, key_bias_tokens: int):
        super().__init__()
        self.q_norm = nn.LayerNorm(q_in)
        self.kv_norm = nn.LayerNorm(kv_in)
        self.attention = MultiHeadAttention(heads, q_in, kv_in, qk, v, key_bias_tokens)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv))


class CrossAttentionLayer(nn.Module):
    """out = x_q + CA(x_q, x_kv); out = out + MLP(out). Used both ways: latents reading pooled CNN features (x->z,
    with key bias over the 7x7 tokens) and CNN pixels reading the latents (z->x, narrow qk/v width)."""

    def __init__(self, q_in: int, kv_in: int, qk: int | None = None, v: int | None = None, widening: int = 1,
                 key_bias_tokens: int = 0, heads: int = 1):
        super().__init__()
        self.cross_attn = CrossAttention(heads, q_in, kv_in, qk, v, key_bias_tokens)
        self.mlp = MLP(q_in, widening)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """x_q (B, Lq, q_in), x_kv (B, Lk, kv_in) -> (B, Lq, q_in)."""
        out = x_q + self.cross_attn(x_q, x_kv)
        return out + self.mlp(out)


class SelfAttention(nn.Module):
    def __init__(self, heads: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = MultiHeadAttention(heads, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.attention(x, x)


class SelfAttentionLayer(nn.Module):
    """x + SA(x), then + MLP."""

    def __init__(self, heads: int, channels: int, widening: int):
        super().__init__()
        self.self_attn = SelfAttention(heads, channels)
        self.mlp = MLP(channels, widening)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_attn.attention.fused and x.dim() == 3:
            from .fused import self_attention_layer_fused

            return self_attention_layer_fused(self, x)
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class SelfAttentionBlock(nn.Sequential):
    """`layers` SelfAttentionLayers in sequence (keys `<i>.self_attn...`)."""

    def __init__(self, layers: int, heads: int, channels: int, widening: int):
        super().__init__(*[SelfAttentionLayer(heads, channels, widening) for _ in range(layers)])


def layernorm_linear(c_in: int, c_out: int) -> nn.Sequential:
    """LayerNorm + Linear, keyed 0/1 (the official token mixer / expander entries)."""
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, c_out))
