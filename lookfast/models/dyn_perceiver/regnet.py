"""RegNetY backbones (torchvision layout: stem 3x3/2 + 4 stages of SE residual bottlenecks), as Dyn-Perceiver uses
them: `cnn_stem` and `cnn_body.block1..4`, keys `cnn_body.block{i}.block{i}-{j}.{proj,f.a,f.b,f.se,f.c}`."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .layers import SqueezeExcitation, conv_bn_act, make_divisible, onednn_conv_bn

# (depth, w_0, w_a, w_m, group_width): the design-space parameters of each RegNetY size (Radosavovic et al. 2020).
REGNET_Y = {
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24),
}


def stage_params(arch: str) -> list[tuple[int, int, int]]:
    """Per stage (width, depth, group_width) from the quantised linear width rule (widths multiples of 8)."""
    depth, w_0, w_a, w_m, group_width = REGNET_Y[arch]
    # Plain CPU math even when modules are built under torch.device("meta").
    widths_cont = torch.arange(depth, device="cpu", dtype=torch.float32) * w_a + w_0
    capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), 8)) * 8).int().tolist()
    stages: list[list[int]] = []  # [width, depth]
    for w in block_widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    out = []
    for w, d in stages:
        g = min(group_width, w)  # bottleneck multiplier is 1: bottleneck width == stage width
        out.append((make_divisible(w, g), d, g))
    return out


class ResBottleneck(nn.Module):
    """relu(f(x) + proj(x)); f = 1x1 -> grouped 3x3 (stride) -> SE -> 1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int, se_ratio: float = 0.25):
        super().__init__()
        self.proj = conv_bn_act(c_in, c_out, 1, stride, act=None) if (c_in != c_out or stride != 1) else None
        self.f = nn.Sequential(OrderedDict(
            a=conv_bn_act(c_in, c_out, 1),
            b=conv_bn_act(c_out, c_out, 3, stride, groups=c_out // group_width),
            se=SqueezeExcitation(c_out, int(round(se_ratio * c_in))),
            c=conv_bn_act(c_out, c_out, 1, act=None),
        ))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.proj is None else self.proj(x)
        if self.f.c.fold_bn:
            # Fused (inference): the last conv, its BatchNorm, the residual add and the ReLU are one oneDNN
            # convolution where it applies (layers.onednn_conv_bn), not three passes over the output.
            f = self.f
            y = f.se(f.b(f.a(x)), inplace=True)  # f.b's output is a temporary: gate it in place
            out = onednn_conv_bn(f.c[0], f.c[1], y, "relu", residual=identity)
            return out if out is not None else self.activation(f.c(y) + identity)
        return self.activation(self.f(x) + identity)


def build(arch: str, num_classes: int = 1000):
    """Returns (stem, [stage1..4], stage input widths [4], output width, classifier_cnn)."""
    stem_width = 32
    stem = conv_bn_act(3, stem_width, 3, 2)
    stages, widths_in = [], []
    c = stem_width
    for i, (w, d, g) in enumerate(stage_params(arch), start=1):
        widths_in.append(c)
        stages.append(nn.Sequential(OrderedDict(
            (f"block{i}-{j}", ResBottleneck(c if j == 0 else w, w, 2 if j == 0 else 1, g)) for j in range(d)
        )))
        c = w
    return stem, stages, widths_in, c, nn.Linear(c, num_classes)
