"""The machine's ceilings, measured in the same run as the cases: copy bandwidth and fp32 matrix-multiply rate."""
from __future__ import annotations

import torch

from .timing import measure


def copy_bandwidth_gbs(megabytes: int = 256, min_seconds: float = 0.5) -> float:
    """GB/s of `dst.copy_(src)` on float32 buffers far larger than the caches, counting bytes read and written."""
    n = megabytes * (1 << 20) // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), min_seconds)["median"]
    return 2 * n * 4 / t / 1e9


def matmul_gflops(n: int = 2048, min_seconds: float = 0.5) -> float:
    """GFLOP/s of a large fp32 `torch.mm` (2 n^3 flops)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = measure(lambda: torch.mm(a, b, out=out), min_seconds)["median"]
    return 2 * n**3 / t / 1e9
