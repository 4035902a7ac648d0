"""The fused z->x block: every pixel of the CNN map attends to the latent tokens, then an MLP, both residual.

This is the memory-bound part of Dyn-Perceiver (H*W queries of width C against L <= 256 keys of width C/8), so the
work around the attention core is arranged to touch the C-wide pixel tensor as few times as possible, with the same
math as the official layer (only float summation order changes):

- no NCHW <-> (B, HW, C) copies: the pixels are read as a channels-last view (free when the CNN runs channels-last,
  which `ops="fused"` arranges), and the result is written channels-last;
- the LayerNorm affines are folded into the following projections (query projection, fc1), so each LayerNorm is
  one plain normalisation pass (`lookfast.layer_norm_rows`: on the CPU a kernel that streams the C-wide rows once,
  about twice as fast as torch's LayerNorm on rows this short) and the affine costs nothing per pixel;
- keys and values of the L latents come from one projection (concatenated weights) of the normalised latents;
- attention runs in `lookfast.cross_attention` (streamed queries against resident keys);
- the output projection, its bias and the residual are one GEMM (addmm into the pixels, with the bias as an extra
  input column of ones);
- fc2 accumulates into the residual in place; for bf16 where oneDNN runs bf16, the MLP is two oneDNN linears
  instead (fc1 with GELU in its epilogue, fc2 + bias + residual with an add post-op, rounded once).

Precision: everything runs in one dtype `dt`, the pixels' dtype, or under torch.autocast the autocast dtype (the
layer's nn.Linear calls would run there); the folded weights are computed in float32 from the stored ones and
rounded once to `dt`, so a bf16 model's folds carry one rounding, as its unfolded weights do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops.layer_norm_rows import layer_norm_rows_validated
from .derived import derived
from .perceiver import CrossAttentionLayer, attention_core


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) rows, a view when x is channels-last (else one copy)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c)


def _z2x_weights(layer: CrossAttentionLayer, dt: torch.dtype):
    """The z->x layer's folded weights in `dt`, cached (derived.py): query projection with the q LayerNorm's affine
    folded in (+ bias), the kv LayerNorm's affine, k and v projections as one matrix, [Wo^T; bo], fc1 with the MLP
    LayerNorm's affine folded in (+ bias), fc2^T, fc2's bias."""
    ca, mlp = layer.cross_attn, layer.mlp
    att = ca.attention
    f32 = lambda t: t.float() if t.dtype != torch.float64 else t  # noqa: E731  folds in fp32 (fp64 stays)

    def build():
        wq = (f32(att.q_proj.weight) * f32(ca.q_norm.weight)).to(dt)                # (d, C)
        bq = (f32(att.q_proj.weight) @ f32(ca.q_norm.bias)).to(dt)                  # (d,)
        w_kv = torch.cat((att.k_proj.weight, att.v_proj.weight)).to(dt)
        w_o = torch.cat((att.o_proj.weight.t(), att.o_proj.bias.unsqueeze(0)), 0).to(dt)
        ln = mlp.layernorm
        w1 = (f32(mlp.fc1.weight) * f32(ln.weight)).to(dt)
        b1 = torch.addmv(f32(mlp.fc1.bias), f32(mlp.fc1.weight), f32(ln.bias)).to(dt)
        return (wq.t(), bq, ca.kv_norm.weight.to(dt), ca.kv_norm.bias.to(dt), w_kv, w_o, w1.t(), b1,
                mlp.fc2.weight.to(dt).t(), mlp.fc2.bias.to(dt))

    sources = [ca.q_norm.weight, ca.q_norm.bias, ca.kv_norm.weight, ca.kv_norm.bias, att.q_proj.weight,
               att.k_proj.weight, att.v_proj.weight, att.o_proj.weight, att.o_proj.bias, mlp.layernorm.weight,
               mlp.layernorm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    return derived(layer, "z2x", sources, dt, build)


def z2x_fused(layer: CrossAttentionLayer, x: torch.Tensor, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x (B, C, H, W) pixels, z (B, L, Cz) latents -> updated x (B, C, H, W), channels-last memory.
    Equals `layer` applied to x as (B, HW, C) tokens. With `inplace` (for a caller that owns x and drops it), a
    channels-last x of the compute dtype is used as scratch: the attention's residual is added into its memory (one
    pass over the pixels fewer), and x then holds an intermediate, not the result: use the returned tensor (x's
    memory itself on the addmm path, a new tensor on the oneDNN bf16 path)."""
    b, c, h, w = x.shape
    ca, mlp = layer.cross_attn, layer.mlp
    att = ca.attention
    dt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # one explicit dtype below; autocast would re-cast each op
        wq, bq, g_kv, b_kv, w_kv, w_o, w1, b1, w2, b2 = _z2x_weights(layer, dt)
        rows = _pixels_last(x.to(dt))                                # (N, C), N = B*H*W
        # Query projection with the LayerNorm affine folded in (a plain LayerNorm pass, then one GEMM with bias).
        q = torch.addmm(bq, layer_norm_rows_validated(rows, ca.q_norm.eps), wq)
        # Keys / values of the few latents: one GEMM on the normalised latents.
        zn = F.layer_norm(z.to(dt), (z.shape[-1],), g_kv, b_kv, ca.kv_norm.eps)
        d = att.qk_channels
        kv = F.linear(zn, w_kv)
        k, v = kv[..., :d], kv[..., d:]
        a = attention_core(q.view(b, h * w, d), k.contiguous(), v.contiguous(), att.heads, fused=True)
        # Output projection + bias + residual in one GEMM: [a, 1] @ [Wo^T; bo] added to the pixels.
        a1 = torch.cat((a.reshape(-1, att.v_channels), a.new_ones(a.shape[0] * a.shape[1], 1)), 1)
        if inplace:
            out = rows.addmm_(a1, w_o)                               # x += o_proj(a) (rows may be x's memory)
        else:
            out = torch.addmm(rows, a1, w_o)                         # (N, C) = x + o_proj(a)
        # MLP: LN affine folded into fc1, GELU, fc2 accumulated into the residual.
        normed = layer_norm_rows_validated(out, mlp.layernorm.eps)
        packed = _onednn_mlp_weights(layer, dt, w1, w2, normed)
        if packed is not None:
            # bf16 on oneDNN: fc1 with GELU in its epilogue, and fc2 + bias + residual as one GEMM with an add
            # post-op (out + hid @ W2^T + b2, summed in fp32 and rounded once): two passes over the pixel rows fewer
            # than addmm, gelu, addmm_ and add_ (bf16 (50176, 64) rows: ~10 against ~12.5 ms).
            w1_packed, w2_packed = packed
            hid = torch.ops.mkldnn._linear_pointwise(normed, w1_packed, b1, "gelu", [], "none")
            out = torch.ops.mkldnn._linear_pointwise.binary(hid, out, w2_packed, b2, "add")
        else:
            hid = F.gelu(torch.addmm(b1, normed, w1))
            out.addmm_(hid, w2)
            out.add_(b2)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def _onednn_mlp_weights(layer: CrossAttentionLayer, dt: torch.dtype, w1: torch.Tensor, w2: torch.Tensor,
                        rows: torch.Tensor):
    """fc1 and fc2 (the folded weights, (in, out) views) in oneDNN's blocked layout, cached beside them, when the
    fused linear ops apply: bf16 pixel rows on a CPU whose oneDNN runs bf16, eager, no gradient wanted. Else None."""
    from .layers import onednn_dtype

    if dt != torch.bfloat16 or onednn_dtype(rows) != dt or torch.is_grad_enabled() and (
            rows.requires_grad or w1.requires_grad or w2.requires_grad):
        return None
    mlp = layer.mlp

    def build():
        # (out, in) contiguous, as F.linear takes them; the batch hint only picks the blocking
        return tuple(torch.ops.mkldnn._reorder_linear_weight(t.t().contiguous(), rows.shape[0]) for t in (w1, w2))

    sources = [mlp.layernorm.weight, mlp.fc1.weight, mlp.fc2.weight]
    return derived(layer, "z2x_mlp_onednn", sources, dt, build)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or under torch.autocast the autocast dtype (what the layer's nn.Linear calls would run in)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _folds_norms(dt: torch.dtype) -> bool:
    """Whether the self-attention layer folds its LayerNorm affines into the next projections in compute dtype dt:
    in float32/float64 (free, and exact to rounding); not in 16-bit, where W * gamma rounded to bf16 adds an error of
    the size of the official LayerNorm output's rounding on top of it (up to ~2.1x the official bf16 layer's error
    on rare random layers), while applying the affine inside the LayerNorm call costs nothing."""
    return dt not in (torch.bfloat16, torch.float16)


def _self_attention_weights(layer, dt: torch.dtype):
    """The weights of a SelfAttentionLayer in `dt`, cached (derived.py): q/k/v as one (C, 3C) matrix (with the
    LayerNorm affine folded in, + its bias, where _folds_norms(dt); else the plain projections and no bias), the
    output projection, fc1 (with the MLP LayerNorm's affine folded in likewise) + bias, fc2; matrices transposed for
    `rows @ W`."""
    sa, mlp = layer.self_attn, layer.mlp
    att = sa.attention

    def build():
        f32 = lambda t: t.float() if t.dtype != torch.float64 else t  # noqa: E731  folds in fp32 (fp64 stays)
        w_in = f32(torch.cat((att.q_proj.weight, att.k_proj.weight, att.v_proj.weight)))   # (qk+qk+v, C)
        if not _folds_norms(dt):
            return (w_in.t().to(dt), None, att.o_proj.weight.t().to(dt), att.o_proj.bias.to(dt),
                    mlp.fc1.weight.t().to(dt), mlp.fc1.bias.to(dt), mlp.fc2.weight.t().to(dt), mlp.fc2.bias.to(dt))
        w_qkv = (w_in * f32(sa.norm.weight)).t().to(dt)
        b_qkv = (w_in @ f32(sa.norm.bias)).to(dt)
        ln = mlp.layernorm
        w1 = (f32(mlp.fc1.weight) * f32(ln.weight)).t().to(dt)
        b1 = torch.addmv(f32(mlp.fc1.bias), f32(mlp.fc1.weight), f32(ln.bias)).to(dt)
        return (w_qkv, b_qkv, att.o_proj.weight.t().to(dt), att.o_proj.bias.to(dt), w1, b1,
                mlp.fc2.weight.t().to(dt), mlp.fc2.bias.to(dt))

    return derived(layer, "self_attention", _self_attention_sources(layer), dt, build)


def _self_attention_sources(layer) -> list[torch.Tensor]:
    sa, mlp = layer.self_attn, layer.mlp
    att = sa.attention
    return [sa.norm.weight, sa.norm.bias, att.q_proj.weight, att.k_proj.weight, att.v_proj.weight,
            att.o_proj.weight, att.o_proj.bias, mlp.layernorm.weight, mlp.layernorm.bias, mlp.fc1.weight,
            mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]  # named, not layer.parameters(): that walk costs ~10 us


def _self_attention_packs(layer, x: torch.Tensor, dt: torch.dtype):
    """The four matrices of _self_attention_weights packed for lookfast's packed_linear (bf16 on a CPU with the
    brgemm micro-kernel: lookfast.models.packed_linear), cached; None where that path does not apply (another dtype
    or device, no micro-kernel, tracing, or autograd recording)."""
    from ..packed_linear import brgemm_available

    if (dt != torch.bfloat16 or x.dtype != dt or x.device.type != "cpu" or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or layer.mlp.fc1.weight.requires_grad))
            or not brgemm_available(dt)):
        return None
    weights = _self_attention_weights(layer, dt)

    def build():
        return tuple(torch.ops.lookfast.pack_linear_weight(w.t().contiguous()) for w in weights[0::2])

    return derived(layer, "self_attention_brgemm", _self_attention_sources(layer), dt, build)


def self_attention_layer_fused(layer, x: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) latents -> `layer(x)` for a SelfAttentionLayer (x + SA(x), then + MLP), with the same math in
    fewer, larger ops: each LayerNorm's affine folded into the following projection (float32/float64; in 16-bit the
    LayerNorm applies it, see _folds_norms), q/k/v from one GEMM, the output projection accumulated onto the residual in its GEMM, fc2 accumulated into the
    residual in place. The latents are few (B x L <= a few thousand rows), so per-op overhead, not arithmetic,
    sets this block's time; this halves the op count. Precision as z2x_fused."""
    b, l, c = x.shape
    att = layer.self_attn.attention
    dt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        w_qkv, b_qkv, w_o, b_o, w1, b1, w2, b2 = _self_attention_weights(layer, dt)
        packs = _self_attention_packs(layer, x, dt)
        if packs is not None:
            return _self_attention_brgemm(layer, x, packs, (b_qkv, b_o, b1, b2), (w_qkv, w_o, w1, w2))
        # The residual stream keeps x's dtype: under autocast float32 latents stay float32, as the official adds
        # (float32 + autocast output) promote them; the normalised rows go into the GEMMs in `dt`.
        rows = x.reshape(b * l, c)
        h = _layer_norm(rows, layer.self_attn.norm, _folds_norms(dt)).to(dt)
        qkv = torch.mm(h, w_qkv) if b_qkv is None else torch.addmm(b_qkv, h, w_qkv)
        d, dv = att.qk_channels, att.v_channels
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        a = attention_core(q.reshape(b, l, d), k.reshape(b, l, d), v.reshape(b, l, dv), att.heads, fused=True)
        a = a.reshape(b * l, dv)
        if rows.dtype == dt:
            out = torch.addmm(rows, a, w_o).add_(b_o)                                  # x + o_proj(a)
        else:
            out = rows + torch.addmm(b_o, a, w_o)
        h = _layer_norm(out, layer.mlp.layernorm, _folds_norms(dt)).to(dt)
        hid = F.gelu(torch.addmm(b1, h, w1))
        if out.dtype == dt:
            out.addmm_(hid, w2).add_(b2)                                               # + fc2(hid), in place
        else:
            out = out + torch.addmm(b2, hid, w2)
    return out.view(b, l, c)


def _layer_norm(rows: torch.Tensor, norm: torch.nn.LayerNorm, folded: bool) -> torch.Tensor:
    """The LayerNorm over rows: the plain normalisation when its affine is folded into the next weights, else the
    official LayerNorm call (affine included)."""
    if folded:
        return F.layer_norm(rows, norm.normalized_shape, None, None, norm.eps)
    return F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _self_attention_brgemm(layer, x, packs, biases, weights) -> torch.Tensor:
    """self_attention_layer_fused on the brgemm packs (bf16 latents): each linear one lookfast packed_linear call
    with its bias, and the output projection and fc2 adding the residual in their epilogues (fp32 sums, one
    rounding where addmm's route rounds the product, then the bias add)."""
    b, l, c = x.shape
    att = layer.self_attn.attention
    linear = torch.ops.lookfast.packed_linear
    rows = x.reshape(b * l, c)
    h = _layer_norm(rows, layer.self_attn.norm, False)  # bf16: the affine applied here (_folds_norms)
    qkv = linear(h, packs[0], weights[0].shape[1], biases[0], None, None)
    d, dv = att.qk_channels, att.v_channels
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    a = attention_core(q.reshape(b, l, d), k.reshape(b, l, d), v.reshape(b, l, dv), att.heads, fused=True)
    out = linear(a.reshape(b * l, dv), packs[1], c, biases[1], None, rows)                # x + o_proj(a)
    h = _layer_norm(out, layer.mlp.layernorm, False)
    hid = F.gelu(linear(h, packs[2], weights[2].shape[1], biases[2], None, None))
    return linear(hid, packs[3], c, biases[3], None, out).view(b, l, c)                  # + fc2(hid)
