"""Small CNN building blocks shared by the backbones (torchvision-style module layouts, so state-dict keys match)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round `value` to a multiple of `divisor`, never going more than 10% below it (MobileNet/RegNet width rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """bn(conv(x)). With `fold` (inference), one convolution with the BatchNorm folded into its weights and bias:
    the same affine map, without a separate pass over the output."""
    if not fold or bn.training:
        return bn(conv(x))
    # The fold runs in float32 (float64 stays) and is rounded once to the weights' dtype: a bf16 model's folded
    # weights then carry one rounding, as its stored ones do (a bf16 fold would round at every step).
    dt = conv.weight.dtype
    f32 = (lambda t: t) if dt == torch.float64 else (lambda t: t.float())
    scale = f32(bn.weight) * torch.rsqrt(f32(bn.running_var) + bn.eps)
    shift = f32(bn.bias) - f32(bn.running_mean) * scale
    if conv.bias is not None:
        shift = shift + f32(conv.bias) * scale
    weight = (f32(conv.weight) * scale.view(-1, 1, 1, 1)).to(dt)
    shift = shift.to(dt)
    if conv.kernel_size == (1, 1) and conv.groups == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return pointwise_conv(x, weight, shift, conv.stride)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride=(1, 1)) -> torch.Tensor:
    """A 1x1 convolution of a channels-last x as one GEMM over its (N*H*W, C) rows (+ bias in the GEMM).
    PyTorch's CPU convolution sends 1x1 convs with batch < 16 on one thread to a slow im2col path that also
    writes the bias in a separate pass; the GEMM is the same sum, done once. Returns channels-last (N, Co, H', W')."""
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels-last and unstrided
    out = torch.addmm(bias, rows, weight.view(weight.shape[0], c).t())
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) + BatchNorm + optional activation, keyed 0/1/2 like torchvision's
    ConvNormActivation. `fold_bn` (set by the model for ops="fused") folds the BatchNorm into the conv."""

    fold_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn(self[0], self[1], x, self.fold_bn)
        for layer in list(self)[2:]:
            x = layer(x)
        return x


def conv_bn_act(
    c_in: int,
    c_out: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: Callable[..., nn.Module] | None = nn.ReLU,
    bn_eps: float = 1e-5,
) -> ConvBNAct:
    """A ConvBNAct; padding (kernel - 1) // 2."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=bn_eps),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return ConvBNAct(*layers)


class SqueezeExcitation(nn.Module):
    """x * gate(fc2(act(fc1(avgpool(x))))), with 1x1 convs fc1/fc2 (torchvision.ops.SqueezeExcitation keys)."""

    def __init__(self, channels: int, squeeze: int, act: Callable[..., nn.Module] = nn.ReLU,
                 gate: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale
