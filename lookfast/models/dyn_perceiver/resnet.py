"""ResNet backbones in timm's layout (conv1/bn1, layer1..4, optional channel multiplier), as Dyn-Perceiver uses them:
`cnn_stem` = (7x7/2 conv, BN, ReLU, 3x3/2 max pool), `cnn_body_stage1..4`."""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct, conv_bn

# name -> (block kind, blocks per stage, channel multiplier)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1.0),
    "resnet34": ("basic", (3, 4, 6, 3), 1.0),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1.0),
    "resnet50_0375": ("bottleneck", (3, 4, 6, 3), 0.375),
    "resnet50_050": ("bottleneck", (3, 4, 6, 3), 0.5),
    "resnet50_0625": ("bottleneck", (3, 4, 6, 3), 0.625),
    "resnet50_075": ("bottleneck", (3, 4, 6, 3), 0.75),
}


def _downsample(c_in: int, c_out: int, stride: int) -> ConvBNAct:
    return ConvBNAct(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1
    fold_bn = False  # set by the model for ops="fused": BatchNorms folded into the convs

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        f = self.fold_bn
        y = conv_bn(self.conv2, self.bn2, self.act1(conv_bn(self.conv1, self.bn1, x, f)), f)
        return self.act2(y + shortcut)


class Bottleneck(nn.Module):
    expansion = 4
    fold_bn = False

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        f = self.fold_bn
        y = self.act1(conv_bn(self.conv1, self.bn1, x, f))
        y = self.act2(conv_bn(self.conv2, self.bn2, y, f))
        y = conv_bn(self.conv3, self.bn3, y, f)
        return self.act3(y + shortcut)


def build(arch: str, num_classes: int = 1000):
    """Returns (stem, [stage1..4], stage input widths [4], output width, classifier_cnn)."""
    kind, repeats, mult = RESNETS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    c = int(mult * 64)
    stem = ConvBNAct(
        nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    )
    stages, widths_in = [], []
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), repeats)):
        planes = int(mult * planes)
        stride = 1 if i == 0 else 2
        widths_in.append(c)
        blocks = []
        for j in range(n):
            s = stride if j == 0 else 1
            down = None
            if j == 0 and (s != 1 or c != planes * block.expansion):
                down = _downsample(c, planes * block.expansion, s)
            blocks.append(block(c, planes, s, down))
            c = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stem, stages, widths_in, c, nn.Linear(c, num_classes)
