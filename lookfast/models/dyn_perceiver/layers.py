"""Small CNN building blocks shared by the backbones (torchvision-style module layouts, so state-dict keys match)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import _backend
from .derived import derived


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
    weight, shift = folded_conv_bn(conv, bn, conv.weight.dtype)
    if conv.kernel_size == (1, 1) and conv.groups == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return pointwise_conv(x, weight, shift, conv.stride)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_bn_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[torch.Tensor]:
    """The parameters and statistics a conv + BatchNorm fold depends on (derived.py's cache keys)."""
    sources = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        sources.append(conv.bias)
    return sources


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv with the eval-mode BatchNorm folded in, rounded once to `dt` (channels-last
    weight), cached on the conv until one of the parameters or statistics changes (derived.py).

    The fold runs in float32 (float64 stays) and is rounded once to `dt`: a bf16 model's folded weights then carry
    one rounding, as its stored ones do (a bf16 fold would round at every step)."""
    sources = _conv_bn_sources(conv, bn)

    def build():
        f32 = (lambda t: t) if conv.weight.dtype == torch.float64 else (lambda t: t.float())
        scale = f32(bn.weight) * torch.rsqrt(f32(bn.running_var) + bn.eps)
        shift = f32(bn.bias) - f32(bn.running_mean) * scale
        if conv.bias is not None:
            shift = shift + f32(conv.bias) * scale
        weight = (f32(conv.weight) * scale.view(-1, 1, 1, 1)).to(dt)
        return weight.contiguous(memory_format=torch.channels_last), shift.to(dt)

    return derived(conv, f"bn_fold_{bn.eps}", sources, dt, build)


# oneDNN's fused convolution (what Inductor's freezing pass calls): conv + bias + [residual add] + activation in one
# pass over the output, accumulating in float32 and rounding once. Used by the fused (inference) path where the
# compute dtype is bf16 and the CPU runs oneDNN's bf16 kernels; elsewhere the plain ops run (same math).
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_ACT_NAMES = {nn.ReLU: "relu", nn.Hardswish: "hardswish"}
_onednn_bf16: bool | None = None


def onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused oneDNN convolution runs `x` in (the autocast dtype under CPU autocast), or None when that
    path does not apply (not CPU, tracing, oneDNN missing, or a dtype other than bf16 on a CPU with oneDNN bf16)."""
    global _onednn_bf16
    if not _ONEDNN or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dt != torch.bfloat16:
        return None
    if _onednn_bf16 is None:
        _onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dt if _onednn_bf16 else None


def act_name(acts) -> str | None:
    """oneDNN's name for the activation modules following a conv ("none" for none), None if it has no fused form."""
    acts = list(acts)
    if not acts:
        return "none"
    if len(acts) == 1:
        return _ACT_NAMES.get(type(acts[0]))
    return None


def onednn_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, act: str = "none",
                   residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """act(bn(conv(x)) [+ residual]) as one oneDNN convolution (BatchNorm folded, eval mode), channels-last output;
    None when the fused path does not apply (see onednn_dtype; a residual needs groups == 1), for the caller to run
    the plain ops."""
    if bn.training or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return None
    dt = onednn_dtype(x)
    if dt is None or (residual is not None and (conv.groups != 1 or residual.device != x.device)):
        return None
    x = x.to(dt).contiguous(memory_format=torch.channels_last)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    # oneDNN's own blocked weight layout, made once (per input size) instead of a reorder inside every call: the
    # reorder is most of the time of a late-stage conv on a few samples (784x784 1x1 at 7x7, B 1: 0.37 -> 0.16 ms).
    def build():
        # The fold in float32, the weight rounded once to dt; the shift stays float32 (oneDNN adds an f32 bias to
        # its f32 accumulator): rounding it to bf16 would add an error of up to half a bf16 ulp of the shift to
        # every output, on top of the output's own rounding.
        weight, bias = folded_conv_bn(conv, bn, torch.float32)
        weight = weight.to(dt).contiguous(memory_format=torch.channels_last)
        # the fused residual form takes the bias only in the input dtype: that copy is made here, once
        return torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape)), bias, bias.to(dt)

    sources = _conv_bn_sources(conv, bn)
    weight, bias, bias_dt = derived(conv, f"onednn_{bn.eps}_{x.shape[2]}x{x.shape[3]}", sources, dt, build)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, act, [], "")
    other = residual.to(dt).contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise(x, other, weight, bias_dt, *args, "add", 1.0,
                                                   None if act == "none" else act, [], "")


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


# lookfast's bf16 grouped 3x3 convolution (csrc/cpu/group_conv3x3.cpp, AVX512-BF16 CPUs): the stride-2 RegNetY
# bottleneck convs with 16-channel groups at up to this many channels, where oneDNN ran ~65 GFLOP/s and the kernel
# 170-230 (one Zen 5 core, B 16: 64 ch 112 -> 56 px 14.6 -> 5.1 ms, 144 ch 56 -> 28 px 7.3 -> 3.1 ms). oneDNN stays
# faster on the stride-1 ones and on the wider late stages (320 ch at 28 px: 1.6 vs 2.0-2.4 ms), which keep it.
GROUP_CONV3X3_MAX_CHANNELS = 160
_group_conv3x3: bool | None = None


def _fake_group_conv3x3(x, weight, bias, stride, relu):
    b, c, h, w = x.shape
    return x.new_empty((b, c, (h - 1) // stride + 1 if h else 0, (w - 1) // stride + 1 if w else 0)).contiguous(
        memory_format=torch.channels_last)


_backend.register("group_conv3x3", _fake_group_conv3x3)


def group_conv3x3_available() -> bool:
    """Whether lookfast's compiled library is loaded and this CPU runs its bf16 grouped 3x3 kernel (AVX512-BF16)."""
    global _group_conv3x3
    if _group_conv3x3 is None:
        _group_conv3x3 = _backend.loaded and _backend.op_exists("group_conv3x3")
        if _group_conv3x3:
            try:
                x = torch.zeros(1, 16, 1, 1, dtype=torch.bfloat16)
                torch.ops.lookfast.group_conv3x3(x, torch.zeros(16, 16, 3, 3, dtype=torch.bfloat16),
                                                 torch.zeros(16), 1, False)
            except RuntimeError:
                _group_conv3x3 = False
    return _group_conv3x3


def group_conv3x3_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(bn(conv(x))) on lookfast's grouped 3x3 kernel (BatchNorm folded, eval mode, channels-last bf16 output)
    for the convs it is faster on (stride 2, 16-channel groups, at most GROUP_CONV3X3_MAX_CHANNELS channels) where
    the compute dtype is bf16 and the CPU has AVX512-BF16; None elsewhere, for the caller's other paths."""
    c = conv.in_channels
    if (act not in ("relu", "none") or bn.training or conv.kernel_size != (3, 3) or conv.stride != (2, 2)
            or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
            or conv.out_channels != c or c > GROUP_CONV3X3_MAX_CHANNELS or conv.groups * 16 != c):
        return None
    if onednn_dtype(x) != torch.bfloat16 or not group_conv3x3_available():
        return None

    def build():  # the fold in float32, the weight rounded once to bf16, the shift kept in float32 (as oneDNN's)
        weight, shift = folded_conv_bn(conv, bn, torch.float32)
        return weight.to(torch.bfloat16).contiguous(), shift.contiguous()

    sources = _conv_bn_sources(conv, bn)
    weight, shift = derived(conv, f"group_conv3x3_{bn.eps}", sources, torch.bfloat16, build)
    return torch.ops.lookfast.group_conv3x3(x.to(torch.bfloat16), weight, shift, 2, act == "relu")


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) + BatchNorm + optional activation, keyed 0/1/2 like torchvision's
    ConvNormActivation. `fold_bn` (set by the model for ops="fused") folds the BatchNorm into the conv."""

    fold_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_bn:
            act = act_name(list(self)[2:])
            y = None if act is None else group_conv3x3_bn(self[0], self[1], x, act)
            if y is None and act is not None:
                y = onednn_conv_bn(self[0], self[1], x, act)
            if y is not None:
                return y
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
    """x * gate(fc2(act(fc1(avgpool(x))))), with 1x1 convs fc1/fc2 (torchvision.ops.SqueezeExcitation keys).
    `fused` (set by the model for ops="fused"): the pooling as an average pool (a bf16 `mean` first copies the whole
    map to float32; the pool accumulates in float32 without that copy) and fc1/fc2 as linears on (B, C) rows."""

    fused = False

    def __init__(self, channels: int, squeeze: int, act: Callable[..., nn.Module] = nn.ReLU,
                 gate: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """`inplace` (fused mode only; for a caller that owns x and drops it): the gate multiplies x in place,
        the same values without allocating a new map (a fresh large tensor costs page faults on every call)."""
        if self.fused:
            s = global_avg_pool(x)
            s = F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)
            s = self.scale_activation(F.linear(self.activation(s), self.fc2.weight.flatten(1), self.fc2.bias))
            s = s.to(x.dtype)[:, :, None, None]
            return x.mul_(s) if inplace else x * s
        scale = x.mean((2, 3), keepdim=True)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C) spatial means. For bf16/fp16 an average pool (float32 accumulation, one rounding)
    rather than `x.mean((2, 3))`, which first copies the whole map to float32 on the CPU. The pool is `avg_pool2d`
    with the whole map as its window, not `adaptive_avg_pool2d(x, 1)`: the adaptive one with output 1 calls `mean`,
    i.e. the same float32 copy (bf16, channels-last, 1 thread: [16, 64, 56, 56] 7.5 -> 0.5 ms, same values)."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
        return F.avg_pool2d(x, x.shape[-2:]).flatten(1)
    return x.mean((2, 3))
