"""lookfast::group_conv3x3 (csrc/cpu/group_conv3x3.cpp), the bf16 grouped 3x3 convolution of Dyn-Perceiver's fused
RegNetY path: against float64 math under the bf16 rule (at most 2x the error of torch's own bf16 convolution), on odd
sizes and borders (1-3 pixel images, both strides, widths around the 8-pixel blocks), any input layout, NaN kept by
the ReLU, opcheck, clear errors; and the model's dispatch (which convs take it)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lookfast.models.dyn_perceiver import layers
from oracles import rel_err

BF16 = torch.bfloat16
needs_kernel = pytest.mark.skipif(not layers.group_conv3x3_available(),
                                  reason="lookfast's grouped 3x3 kernel needs a CPU with AVX512-BF16")


def _case(gen, b, c, h, w):
    x = torch.randn(b, c, h, w, generator=gen).to(BF16)
    weight = (torch.randn(c, 16, 3, 3, generator=gen) / 12).to(BF16)
    bias = torch.randn(c, generator=gen)
    return x, weight, bias


def _truth(x, weight, bias, stride, relu):
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, 1, 1, x.shape[1] // 16)
    return F.relu(y) if relu else y


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_math(seed, stride, relu):
    gen = torch.Generator().manual_seed(seed)
    for b, c, h, w in [(1, 16, 1, 1), (2, 16, 2, 3), (1, 32, 3, 2), (3, 48, 5, 9), (2, 64, 17, 19), (1, 16, 4, 26),
                       (2, 144, 12, 11), (1, 64, 9, 18)]:
        x, weight, bias = _case(gen, b, c, h, w)
        got = torch.ops.lookfast.group_conv3x3(x, weight, bias, stride, relu)
        want = _truth(x, weight, bias, stride, relu)
        assert got.shape == want.shape and got.dtype == BF16
        assert got.is_contiguous(memory_format=torch.channels_last)
        plain = F.conv2d(x, weight, bias.to(BF16), stride, 1, 1, c // 16)
        plain = F.relu(plain) if relu else plain
        assert rel_err(got, want) <= 2 * rel_err(plain, want) + 1e-6, (b, c, h, w)


@needs_kernel
def test_layouts_empty_batches_and_nan():
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = _case(gen, 2, 32, 7, 10)
    want = torch.ops.lookfast.group_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, bias, 2, True)
    assert torch.equal(torch.ops.lookfast.group_conv3x3(x, weight, bias, 2, True), want)  # NCHW input: same values
    wide = torch.randn(2, 32, 7, 20, generator=gen).to(BF16)[..., ::2]  # strided view
    assert torch.equal(torch.ops.lookfast.group_conv3x3(wide, weight, bias, 1, False),
                       torch.ops.lookfast.group_conv3x3(wide.contiguous(), weight, bias, 1, False))
    assert torch.ops.lookfast.group_conv3x3(x[:0], weight, bias, 2, True).shape == (0, 32, 4, 5)
    assert torch.ops.lookfast.group_conv3x3(x[..., :0], weight, bias, 1, True).shape == (2, 32, 7, 0)
    x = x.clone()
    x[1, 5, 3, 4] = float("nan")  # reaches the outputs of group 0 whose window covers (3, 4), and no other
    got = torch.ops.lookfast.group_conv3x3(x, weight, bias, 1, True)
    nan = got.isnan()
    assert nan[1, :16, 2:5, 3:6].all() and nan.sum() == 16 * 9  # relu(NaN) stays NaN, as torch's


@needs_kernel
def test_opcheck_and_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = _case(gen, 2, 32, 6, 5)
    torch.library.opcheck(torch.ops.lookfast.group_conv3x3, (x, weight, bias, 2, True))
    torch.library.opcheck(torch.ops.lookfast.group_conv3x3, (x, weight, bias, 1, False))
    op = torch.ops.lookfast.group_conv3x3
    cases = [
        (lambda: op(x.float(), weight, bias, 1, True), "x and weight must be bfloat16"),
        (lambda: op(x, weight, bias.to(BF16), 1, True), "bias must be float32"),
        (lambda: op(x[:, :24], weight[:24], bias[:24], 1, True), "multiple of 16"),
        (lambda: op(x, weight[:, :8], bias, 1, True), "weight must be"),
        (lambda: op(x, weight, bias[:16], 1, True), "bias must be"),
        (lambda: op(x, weight, bias, 3, True), "stride must be 1 or 2"),
        (lambda: op(x[0], weight, bias, 1, True), "x must be"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_kernel
def test_model_dispatch_takes_only_the_convs_it_is_faster_on():
    torch.manual_seed(5)
    seen = []
    for c, stride, groups in [(64, 2, 4), (144, 2, 9), (144, 1, 9), (320, 2, 20), (64, 2, 2), (64, 2, 64)]:
        block = layers.conv_bn_act(c, c, 3, stride, groups=groups).eval().to(BF16)
        block.fold_bn = True
        with torch.no_grad():
            block[1].running_mean.uniform_(-1, 1)
            block[1].running_var.uniform_(0.5, 2)
            x = torch.randn(2, c, 9, 9).to(BF16).contiguous(memory_format=torch.channels_last)
            seen.append(layers.group_conv3x3_bn(block[0], block[1], x, "relu") is not None)
            exact = copy.deepcopy(block).double()
            exact.fold_bn = False
            assert rel_err(block(x), exact(x.double())) < 2e-2  # whichever path ran, the block's values
    # stride 2, 16-channel groups, up to 160 channels: the kernel; the rest: oneDNN (or the plain ops)
    assert seen == [True, True, False, False, False, False]
