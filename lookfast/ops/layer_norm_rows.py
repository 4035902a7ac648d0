"""Row LayerNorm without affine: (x - mean) / sqrt(var + eps) over each row of a (N, C) matrix, the normalisation the
fused Dyn-Perceiver z->x block runs over every pixel (its LayerNorm affines are folded into the next projection).

Public: `layer_norm_rows`. Library op (csrc/lookfast.cpp): `lookfast::layer_norm_rows` (C++ CPU kernel in
csrc/cpu/layer_norm_rows.cpp); GPUs (a CPU-only op in `lookfast._backend.CPU_ONLY`) and `LOOKFAST_BACKEND=reference`
run `layer_norm_rows_reference`, i.e. `F.layer_norm`, which is fast there. On the CPU torch's LayerNorm spends several
times a copy of the data on rows this short (C 64-144); the kernel streams them once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend
from .._validate import FLOAT_DTYPES, require_dim, require_dtype, require_tensor

__all__ = ["layer_norm_rows", "layer_norm_rows_reference"]


def layer_norm_rows_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.layer_norm(x, (C,), None, None, eps)` as a contiguous (N, C) tensor (what the kernel returns)."""
    return F.layer_norm(x, (x.shape[1],), None, None, eps).contiguous()


# ---------------------------------------------------------------------------------------------- library op plumbing
def _fake(x, eps):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward(ctx, grad):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), in float32 (float64 for float64), rounded once."""
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    centred = xf - xf.mean(1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(1, keepdim=True) + ctx.eps)
    xhat, g = centred * rstd, grad.to(acc)
    dx = rstd * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    return dx.to(x.dtype), None


_backend.register("layer_norm_rows", _fake, _backward, _setup_context)


# --------------------------------------------------------------------------------------------------------- public
def layer_norm_rows(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of a (N, C) matrix, without affine: `F.layer_norm(x, (C,), None, None, eps)`.

    x:   (N, C) float64/float32/bfloat16/float16; rows may be any distance apart (e.g. the channels-last pixel rows
         of a (B, C, H, W) map, `x.permute(0, 2, 3, 1).reshape(-1, C)`); a row's elements are read in place when
         adjacent, else x is copied once.
    eps: added to the variance, finite and >= 0.

    Returns a new contiguous (N, C) tensor in x's dtype: y = (x - mean) / sqrt(var + eps) per row, with the mean and
    the biased variance (divisor C) from two passes over the row, in float64 for float64 and float32 x (outputs too),
    in float32 for bfloat16/float16 x, and each output rounded once to x's dtype. N = 0 or C = 0 gives an empty result. NaN or inf in a row makes that row NaN (as
    torch). Gradients flow to x. On CUDA (and under `LOOKFAST_BACKEND=reference`) this is `F.layer_norm`.
    Refuses: x not a 2-D floating-point tensor, eps negative or not finite.
    """
    require_tensor("x", x)
    require_dim("x", x, 2, "(N, C)")
    require_dtype("x", x, FLOAT_DTYPES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return _backend.call("layer_norm_rows", x.device, layer_norm_rows_reference, x, float(eps))


def layer_norm_rows_validated(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The inner path for callers that built x themselves (the fused models): no argument checks."""
    return _backend.call("layer_norm_rows", x.device, layer_norm_rows_reference, x, eps)
