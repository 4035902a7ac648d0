"""MobileNetV3-Large backbones (torchvision layout, width multiplier), split the way Dyn-Perceiver splits them:
features[0:3] stem, [3:5] stage 1, [5:8] stage 2, [8:14] stage 3, [14:17] stage 4 (the last is the 1x1 head conv)."""
from __future__ import annotations

import torch
from torch import nn

from .layers import SqueezeExcitation, conv_bn_act, make_divisible

BN_EPS = 1e-3  # torchvision's MobileNetV3 BatchNorm eps (not the 1e-5 default)

# input, kernel, expanded, output, squeeze-excite, activation ("RE"/"HS"), stride  (MobileNetV3 paper, Table 1)
LARGE = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]
WIDTHS = {
    "mobilenet_v3_large": 1.0, "mobilenet_v3_large_0x5": 0.5, "mobilenet_v3_large_0x75": 0.75,
    "mobilenet_v3_large_1x25": 1.25, "mobilenet_v3_large_1x5": 1.5, "mobilenet_v3_large_2x0": 2.0,
}
SPLITS = (0, 3, 5, 8, 14, 17)


class InvertedResidual(nn.Module):
    """[1x1 expand] -> kxk depthwise (stride) -> [SE] -> 1x1 project, + input when shapes allow."""

    def __init__(self, c_in: int, kernel: int, c_exp: int, c_out: int, se: bool, act: str, stride: int):
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if c_exp != c_in:
            layers.append(conv_bn_act(c_in, c_exp, 1, act=act_layer, bn_eps=BN_EPS))
        layers.append(conv_bn_act(c_exp, c_exp, kernel, stride, groups=c_exp, act=act_layer, bn_eps=BN_EPS))
        if se:
            layers.append(SqueezeExcitation(c_exp, make_divisible(c_exp // 4, 8), gate=nn.Hardsigmoid))
        layers.append(conv_bn_act(c_exp, c_out, 1, act=None, bn_eps=BN_EPS))
        self.block = nn.ModuleList(layers)
        self.use_res_connect = stride == 1 and c_in == c_out
        self.c_in = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return y + x if self.use_res_connect else y


def build(arch: str, num_classes: int = 1000):
    """Returns (stem, [stage1..4], stage input widths [4], output width, classifier_cnn, merge hidden width)."""
    mult = WIDTHS[arch]
    adjust = lambda c: make_divisible(c * mult, 8)  # noqa: E731
    features: list[nn.Module] = [conv_bn_act(3, adjust(16), 3, 2, act=nn.Hardswish, bn_eps=BN_EPS)]
    for c_in, k, c_exp, c_out, se, act, s in LARGE:
        features.append(InvertedResidual(adjust(c_in), k, adjust(c_exp), adjust(c_out), se, act, s))
    last_in = adjust(LARGE[-1][3])
    last_out = 6 * last_in
    features.append(conv_bn_act(last_in, last_out, 1, act=nn.Hardswish, bn_eps=BN_EPS))
    groups = [nn.Sequential(*features[a:b]) for a, b in zip(SPLITS[:-1], SPLITS[1:])]
    stem, stages = groups[0], groups[1:]
    widths_in = [stage[0].c_in for stage in stages]
    hidden = adjust(1280)
    classifier = nn.Sequential(
        nn.Linear(last_out, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return stem, stages, widths_in, last_out, classifier, hidden
