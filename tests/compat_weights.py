"""The deterministic weight rule of the compatibility vectors (docs/models.md): every float tensor of a state dict is
filled from a generator seeded with crc32(f"{salt}:{key}"); integer buffers stay as they are."""
from __future__ import annotations

import zlib

import torch


def fill_state_dict(state_dict: dict, salt: int) -> dict:
    """A new state dict with the same keys, shapes and dtypes, float entries replaced by the rule."""
    out = {}
    for key in sorted(state_dict):
        t = state_dict[key]
        if not t.is_floating_point():
            out[key] = t.clone()
            continue
        g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{key}".encode()))
        n = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if key.endswith("running_var"):
            v = 1 + 0.5 * n.abs()
        elif key.endswith("weight") and t.dim() == 1:
            v = 1 + 0.1 * n
        elif key.endswith("weight"):
            v = n / t[0].numel() ** 0.5
        else:
            v = 0.02 * n
        out[key] = v.to(t.dtype)
    return out
