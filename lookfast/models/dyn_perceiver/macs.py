"""Counting multiply-accumulates per exit from the modules actually run (forward hooks), not from a table.

Counted: every Conv2d (output elements x input channels per group x kernel area), every Linear (output elements x
input features) and the two attention matmuls of every MultiHeadAttention (Lq x Lk x (qk + v channels)).
Normalisations, activations, pooling and additions are not counted (the usual MACs convention, and the official
counter's, up to its pooling term)."""
from __future__ import annotations

import torch
from torch import nn

from .perceiver import MultiHeadAttention


def _conv(m: nn.Conv2d, inputs, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return out.numel() * (m.in_channels // m.groups) * kh * kw


def _linear(m: nn.Linear, inputs, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def _attention(m: MultiHeadAttention, inputs, out: torch.Tensor) -> int:
    x_q, x_kv = inputs[0], inputs[1]
    lq, lk = x_q.shape[-2], x_kv.shape[-2]
    batch = x_q.numel() // (lq * x_q.shape[-1])
    return batch * lq * lk * (m.qk_channels + m.v_channels)


_COUNTERS = ((nn.Conv2d, _conv), (nn.Linear, _linear), (MultiHeadAttention, _attention))


@torch.no_grad()
def exit_macs(model, input_size: int | None = None) -> list[int]:
    """Cumulative MACs per image to reach exits 1..4 of `model` at `input_size` px (default: model.input_size).
    Each exit adds only the pieces it needs: exit 1 = stem, CNN stages 1-2 and the latent work through stage 3."""
    size = input_size or model.input_size
    total = [0]

    def hook(counter):
        def fn(m, inputs, out):
            total[0] += counter(m, inputs, out)
        return fn

    handles = [m.register_forward_hook(hook(counter))
               for m in model.modules() for cls, counter in _COUNTERS if isinstance(m, cls)]
    was_training, ops = model.training, model.ops
    model.eval()
    model.set_ops("reference")  # count the module-by-module path (fused blocks bypass the Linear / Conv modules)
    try:
        param = next(model.parameters())  # the probe image in the model's device and dtype (a bf16 model too)
        images = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        cumulative = []
        x, z, y1 = model.forward_exit1(images)
        cumulative.append(total[0])
        x, z, y2 = model.forward_exit2(x, z, y1)
        cumulative.append(total[0])
        x, _ = model.forward_exit3(x)
        cumulative.append(total[0])
        model.forward_exit4(x, z, y2)
        cumulative.append(total[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.set_ops(ops)
    return cumulative
