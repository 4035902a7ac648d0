"""The lookfast ops the models call, resolved through lookfast's public functions only.

`topk_patch_gather` and `varlen_attention` are built on their own branches (OPS.md §1-2). Until they are merged
into the package, the functions below fall back to small plain-PyTorch versions of the *documented* API (same
arguments, same outputs), so the models run and test the same way before and after the merge. Once
`lookfast.<op>` exists, it is always the one called.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lookfast


def topk_patch_gather(images, scores, k, patch_size, weight=None, bias=None, pos_embed=None):
    """OPS.md §1: top-k patches by score, embedded without touching unselected pixels.

    Returns (indices (B, k), tokens (B, k, D)) for an int k, or packed (indices (T,), tokens (T, D),
    cu_seqlens (B+1,) int32) for a (B,) tensor k.
    """
    op = getattr(lookfast, "topk_patch_gather", None)
    if op is not None:
        return op(images, scores, k, patch_size, weight=weight, bias=bias, pos_embed=pos_embed)
    return _interim_topk_patch_gather(images, scores, k, patch_size, weight, bias, pos_embed)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """OPS.md §2: packed (total, H, Dh) attention of B sequences delimited by cu_seqlens (B+1,) int32."""
    op = getattr(lookfast, "varlen_attention", None)
    if op is not None:
        return op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _interim_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _interim_topk_patch_gather(images, scores, k, p, weight, bias, pos_embed):
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    ragged = isinstance(k, torch.Tensor)
    k_top = int(k.max()) if ragged else k
    indices = torch.topk(scores, k_top, dim=1, sorted=True).indices
    if ragged:
        keep = torch.arange(k_top, device=scores.device) < k.to(scores.device)[:, None]
        batch = torch.arange(b, device=scores.device)[:, None].expand(b, k_top)[keep]
        indices = indices[keep]
    else:
        batch = torch.arange(b, device=scores.device)[:, None].expand(b, k_top)
    # A strided view of the image as a patch grid: advanced indexing then copies only the selected patches.
    grid = images.view(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    tokens = grid[batch, indices // gw, indices % gw].flatten(-3)
    if weight is not None:
        tokens = F.linear(tokens, weight.reshape(weight.shape[0], -1), bias)
        if pos_embed is not None:
            tokens = tokens + pos_embed.reshape(-1, tokens.shape[-1])[indices]
    if ragged:
        cu = F.pad(torch.cumsum(k.to(device=scores.device, dtype=torch.int32), 0, dtype=torch.int32), (1, 0))
        return indices, tokens, cu
    return indices, tokens


def _interim_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    b = cu_q.shape[0] - 1
    if q.shape[0] == b * max_q and k.shape[0] == b * max_k:
        # Every sequence is full length: one batched SDPA (lengths are implied by the shapes, no host sync).
        def batched(t, n):
            return t.reshape(b, n, t.shape[1], t.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(batched(q, max_q), batched(k, max_k), batched(v, max_k))
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(b):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 > q0 and k1 > k0:
            att = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1))
            out[q0:q1] = att.transpose(0, 1)
    return out
