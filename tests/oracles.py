"""The tests' truth: float64 math for every op, written from the definitions (docs/ops.md) and sharing no code with
lookfast, plus the one error measure every test file uses. Kept plain and slow on purpose."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------------ error measure
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over the finite entries of ref, in float64 (0 for empty tensors).

    Non-finite entries (lse = -inf of a query that sees no key, NaN) must sit at the same places with the same values
    in both (asserted): they are compared exactly, not measured. An all-zero ref makes any difference huge."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ in place"
    assert torch.equal(out[~finite].nan_to_num(0.5), ref[~finite].nan_to_num(0.5)), "non-finite entries differ"
    if not finite.any():
        return 0.0
    diff = (out[finite] - ref[finite]).abs().max().item()
    return diff / max(ref[finite].abs().max().item(), 1e-30)


def flash_atol(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's tests' absolute slack: twice what adding and subtracting 0.3 in `dtype` changes the truth
    rounded to `dtype` (one to two ulps at the scale of values near 0.3-1; it matters only where torch's own
    low-precision result happens to be exact, as in rows with one or two keys), and never less than a quarter ulp of
    the largest value (for values of several units the +-0.3 round trip can be exact, leaving FlashAttention's slack
    at 0: one CPU seed in ~50 failed on a dv of width 1 so)."""
    ref = truth.detach().to(dtype)
    if not ref.numel():
        return 0.0
    quarter_ulp = 0.25 * torch.finfo(dtype).eps * truth.detach().double().abs().max().item()
    return max(2 * ((ref + 0.3 - 0.3) - ref).abs().max().item(), quarter_ulp)


def within_flash_rule(got, torch_same_dtype, truth, factor, what=""):
    """FlashAttention's accuracy rule: `got`'s max error against the float64 `truth` is at most `factor` x the error of
    plain torch in got's dtype (`torch_same_dtype`) plus flash_atol(truth, got.dtype)."""
    truth = truth.detach().double().cpu()
    err = (got.detach().double().cpu() - truth).abs().max().item() if truth.numel() else 0.0
    base = (torch_same_dtype.detach().double().cpu() - truth).abs().max().item() if truth.numel() else 0.0
    slack = flash_atol(truth, got.dtype)
    assert err <= factor * base + slack, f"{what}: error {err:.3e} > {factor} x torch's {base:.3e} (+{slack:.1e})"


# -------------------------------------------------------------------------------------------------- topk_patch_gather
def topk_order(row: torch.Tensor, k: int) -> list[int]:
    """The selection order of one row: larger first, ties to the lower index, NaN last (a Python sort)."""
    values = row.double().tolist()
    return sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not math.isnan(values[i]) else 0, i))[:k]


def patch_tokens(images, weight, bias, pos_embed, patch):
    """Every patch's token by the definition: conv2d(images, weight, bias, stride=p) (+ pos_embed), as (B, G, D)."""
    t = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    return t + pos_embed.reshape(1, t.shape[1], -1) if pos_embed is not None else t


def raw_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Every patch's pixels in (C, p, p) order, as (B, G, C*p*p), with unfold (row-major over the patch grid)."""
    return F.unfold(images, patch, stride=patch).transpose(1, 2)


# --------------------------------------------------------------------------------------------------- varlen_attention
def varlen_attention(q, k, v, cu_q, cu_k, scale, causal=False):
    """float64 per-sample softmax(q k^T * scale) v with bottom-right causal masking; rows that see no key give 0 and
    lse -inf. Returns (out (total_q, H, Dv), lse (H, total_q)); differentiable in q, k, v."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    outs = [q.new_zeros(0, heads, v.shape[2])]
    lses = [q.new_zeros(heads, 0)]
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = qe - qs, ke - ks
        qb = q[qs:qe].transpose(0, 1)                                      # (H, lq, Dh)
        kb = k[ks:ke].transpose(0, 1).repeat_interleave(group, dim=0)      # (H, lk, Dh)
        vb = v[ks:ke].transpose(0, 1).repeat_interleave(group, dim=0)
        s = qb @ kb.transpose(1, 2) * scale
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1) if lk > 0 else torch.full((heads, lq), float("-inf"), dtype=q.dtype,
                                                                    device=q.device)
        seen = torch.isfinite(lse)
        p = torch.exp(s - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
        p = torch.where(seen[..., None], p, torch.zeros_like(p))
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ------------------------------------------------------------------------------------------------------- exit_compact
def exit_confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """float64 confidence per row, one row at a time in Python: max softmax, entropy, or top1 - top2 probability.
    A row holding NaN or +inf, or only -inf, has NaN confidence."""
    out = []
    for row in logits.double():
        if torch.isnan(row).any() or torch.isposinf(row).any() or torch.isneginf(row).all():
            out.append(float("nan"))
            continue
        m = row.max()
        e = torch.exp(row - m)
        p = e / e.sum()
        if criterion == "max_softmax":
            out.append(p.max().item())
        elif criterion == "entropy":
            out.append(-sum(pi * math.log(pi) for pi in p.tolist() if pi > 0))
        else:
            ps = sorted(p.tolist(), reverse=True) + [0.0]
            out.append(ps[0] - ps[1])
    return torch.tensor(out, dtype=torch.float64)


def threshold_between(conf: torch.Tensor, rng: random.Random, gap: float = 1e-4) -> float:
    """A threshold that splits the finite confidences at a random rank, at least `gap` from each of them (so rounding
    in a lower precision cannot flip a decision)."""
    finite = sorted(c for c in conf.tolist() if not math.isnan(c))
    cuts = [finite[0] - 1.0] if finite else [0.5]
    cuts += [(a + b) / 2 for a, b in zip(finite, finite[1:]) if b - a > 2 * gap]
    cuts += [finite[-1] + 1.0] if finite else []
    return rng.choice(cuts)

