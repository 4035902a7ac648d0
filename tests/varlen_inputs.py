"""Random packed inputs for the varlen_attention tests (one maker shared by the float and low-precision files)."""
from __future__ import annotations

import torch


def cu_seqlens(lengths) -> torch.Tensor:
    """(B+1,) int32 offsets of a packed batch with these per-sample lengths."""
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def make_varlen(lens_q, lens_k, heads, kv_heads, dh, dv, dtype=torch.float32, std=1.0):
    """q (total_q, heads, dh), k (total_k, kv_heads, dh), v (total_k, kv_heads, dv) drawn in float64 then rounded to
    `dtype` (q and k scaled by `std`), with their cu_seqlens and max lengths."""
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = (torch.randn(int(cu_q[-1]), heads, dh, dtype=torch.float64) * std).to(dtype)
    k = (torch.randn(int(cu_k[-1]), kv_heads, dh, dtype=torch.float64) * std).to(dtype)
    v = torch.randn(int(cu_k[-1]), kv_heads, dv, dtype=torch.float64).to(dtype)
    return q, k, v, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0)


def check_outputs_fully_written(lens_q, lens_k, heads, kv_heads, dh, dv, dtype, device="cpu", ops=None):
    """Forward and backward of the library op (`ops`: torch.ops.lookfast unless given; scale 0.3, causal and not) over
    NaN-filled free memory of `device`:
    no NaN in out/lse/dq/dk/dv, so no element went unwritten; a sample with no keys gives zeros and -inf lse and zero
    dq (of the last call, causal), and the keys of a sample with no queries get zero gradients."""
    for n in (1 << 16, 1 << 18, 1 << 20):  # the allocator's free blocks (CPU, or the CUDA caching allocator), NaN first
        junk = [torch.full((n,), float("nan"), device=device) for _ in range(3)]
        del junk
    ops = torch.ops.lookfast if ops is None else ops
    q, k, v, cu_q, cu_k, mq, mk = make_varlen(lens_q, lens_k, heads, kv_heads, dh, dv, dtype)
    q, k, v, cu_q, cu_k = (t.to(device) for t in (q, k, v, cu_q, cu_k))
    for causal in (False, True):
        out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.3, causal)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        grads = ops.varlen_attention_bwd(out.clone(), q, k, v, out, lse, cu_q, cu_k, mq, mk, 0.3, causal)
        for g in grads:
            assert not torch.isnan(g).any()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        if lens_k[b] == 0:
            assert (out[cq[b] : cq[b + 1]] == 0).all() and torch.isneginf(lse[:, cq[b] : cq[b + 1]]).all()
            assert (grads[0][cq[b] : cq[b + 1]] == 0).all()
        if lens_q[b] == 0:
            assert (grads[1][ck[b] : ck[b + 1]] == 0).all() and (grads[2][ck[b] : ck[b + 1]] == 0).all()
