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
