"""Dyn-Perceiver's fused inference pieces: the derived-weight cache (models/dyn_perceiver/derived.py), the oneDNN
conv + BatchNorm + activation (+ residual) path in bf16 (layers.onednn_conv_bn), the fused self-attention layer and
the bf16 exit-1 chunking.

Accuracy rule for the oneDNN path (FlashAttention's): error against float64 math at most 2x the error of plain
PyTorch in bf16 (conv, then BatchNorm, then add and ReLU, each in bf16)."""
import copy
import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from test_models_dyn_perceiver import small_model  # noqa: E402

from lookfast.models.dyn_perceiver import derived as derived_mod  # noqa: E402
from lookfast.models.dyn_perceiver.derived import derived  # noqa: E402
from lookfast.models.dyn_perceiver.layers import conv_bn_act, onednn_conv_bn, onednn_dtype  # noqa: E402
from lookfast.models.dyn_perceiver.perceiver import SelfAttentionLayer  # noqa: E402
from oracles import rel_err  # noqa: E402

BF16 = torch.bfloat16
ONEDNN_BF16 = onednn_dtype(torch.zeros(1, dtype=BF16)) is not None


def _err(out, truth):
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


# ------------------------------------------------------------------------------------------------ derived cache
def test_derived_is_reused_then_rebuilt_when_a_source_changes():
    lin = nn.Linear(3, 4)
    calls = []

    def build():
        calls.append(1)
        return lin.weight.detach() * 2

    with torch.no_grad():
        a = derived(lin, "w2", [lin.weight], torch.float32, build)
        b = derived(lin, "w2", [lin.weight], torch.float32, build)
        assert a is b and len(calls) == 1
        lin.weight.add_(1.0)                                      # in place: the version counter moves
        c = derived(lin, "w2", [lin.weight], torch.float32, build)
        assert len(calls) == 2 and torch.equal(c, lin.weight * 2)
        lin.load_state_dict({"weight": torch.randn(4, 3), "bias": torch.zeros(4)})
        d = derived(lin, "w2", [lin.weight], torch.float32, build)
        assert len(calls) == 3 and torch.equal(d, lin.weight * 2)
        lin.to(torch.float64)                                     # new storage
        e = derived(lin, "w2", [lin.weight], torch.float64, build)
        assert len(calls) == 4 and e.dtype == torch.float64
        derived(lin, "w2", [lin.weight], torch.float32, build)    # another compute dtype: another entry
        assert len(calls) == 5


def test_derived_not_cached_when_autograd_needs_it():
    lin = nn.Linear(3, 4)
    out = derived(lin, "w2", [lin.weight], torch.float32, lambda: lin.weight * 2)
    assert out.requires_grad                                      # built live: gradients reach the parameter
    out.sum().backward()
    assert torch.equal(lin.weight.grad, torch.full_like(lin.weight, 2.0))
    assert derived_mod._SLOT not in lin.__dict__


def test_derived_cache_is_not_copied_or_pickled():
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        derived(lin, "w2", [lin.weight], torch.float32, lambda: lin.weight * 2)
    assert len(lin.__dict__[derived_mod._SLOT]) == 1
    assert len(copy.deepcopy(lin).__dict__[derived_mod._SLOT]) == 0
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=False).__dict__[derived_mod._SLOT]) == 0


def test_clear_cached_weights_sees_an_unversioned_data_edit():
    """An edit through `param.data` moves no version counter: the cache keeps the old fold until
    `clear_cached_weights()`, after which the fused model equals the reference computation on the new weights."""
    model = small_model("reg800m_perceiver_t128", ops="fused", seed=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)                                                  # fills the cache
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)
        conv.weight.data.mul_(3.0)                                # not versioned
        stale = model(x)[-1]
        model.clear_cached_weights()
        fresh = model(x)[-1]
        model.set_ops("reference")
        truth = model(x)[-1]
    assert _err(fresh, truth.double()) < 1e-4
    assert _err(stale, truth.double()) > 1e-3                      # the edit mattered: the stale cache was visible


def test_derived_under_inference_mode_gives_ordinary_tensors():
    lin = nn.Linear(3, 4)
    with torch.inference_mode():
        w = derived(lin, "w2", [lin.weight], torch.float32, lambda: lin.weight * 2)
    assert not w.is_inference()
    with torch.no_grad():
        assert derived(lin, "w2", [lin.weight], torch.float32, lambda: 1 / 0) is w   # reused outside it


# --------------------------------------------------------------------------------------------- oneDNN conv path
def _bn_filled(block, seed):
    g = torch.Generator().manual_seed(seed)
    bn = block[1]
    with torch.no_grad():
        block[0].weight.copy_(torch.randn(block[0].weight.shape, generator=g) * 0.2)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return block.eval()


def _truth(block, x, residual=None, relu=True):
    conv, bn = block[0].double(), block[1].double()
    y = bn(F.conv2d(x.double(), conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups))
    block.float()
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN bf16 convolutions not available on this CPU")
@pytest.mark.parametrize("c_in,c_out,k,stride,groups,hw", [(5, 7, 1, 1, 1, 9), (16, 16, 3, 2, 4, 11),
                                                            (12, 12, 7, 1, 12, 6), (3, 8, 3, 2, 1, 1)])
def test_onednn_conv_bn_act_bf16_rule(seed, c_in, c_out, k, stride, groups, hw):
    block = _bn_filled(conv_bn_act(c_in, c_out, k, stride, groups=groups), seed % 1000)
    x = torch.randn(3, c_in, hw, hw + 2).to(BF16)
    xb = x.contiguous(memory_format=torch.channels_last)[:, :, :, 1:]   # non-contiguous input
    truth = _truth(block, xb)
    fused = copy.deepcopy(block).to(BF16)
    with torch.no_grad():
        plain = copy.deepcopy(block).to(BF16)(xb)                 # torch in bf16: conv, BN, ReLU, each rounded
        fused.fold_bn = True
        out = fused(xb)
        direct = onednn_conv_bn(fused[0], fused[1], xb, "relu")
    assert out.dtype == BF16 and out.shape == plain.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, direct)                               # ConvBNAct took the oneDNN path
    # FlashAttention's rule, with a floor of 4 bf16 ulps of the output's scale: on the smallest cases (24 outputs,
    # half of them zeroed by the ReLU) the rule compares the maxima of a handful of roundings, and the folded
    # weights' single rounding beat 2x torch's error by chance in ~3% of seeds; a wrong fold errs by far more.
    assert _err(out, truth) <= max(2 * _err(plain, truth) + 1e-6, 4 * 2.0**-8)


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN bf16 convolutions not available on this CPU")
def test_onednn_conv_bn_residual_relu_bf16_rule(seed):
    block = _bn_filled(conv_bn_act(24, 24, 1, act=None), seed % 1000)
    x = torch.randn(2, 24, 7, 5).to(BF16).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 24, 7, 5).to(BF16)                         # residual in the other layout
    truth = _truth(block, x, r)
    b16 = copy.deepcopy(block).to(BF16)
    with torch.no_grad():
        plain = (b16(x) + r).relu()
        out = onednn_conv_bn(b16[0], b16[1], x, "relu", residual=r)
    assert out is not None and out.dtype == BF16
    assert _err(out, truth) <= 2 * _err(plain, truth) + 1e-6


def test_onednn_path_declines_what_it_does_not_cover():
    block = conv_bn_act(4, 4, 3, groups=2).eval()
    x = torch.randn(1, 4, 5, 5)
    assert onednn_conv_bn(block[0], block[1], x, "relu") is None                        # float32
    assert onednn_conv_bn(block[0], block[1], x.double(), "relu") is None               # float64
    b16 = copy.deepcopy(block).to(BF16)
    assert onednn_conv_bn(b16[0], b16[1], x.to(BF16), "relu", residual=x.to(BF16)) is None   # grouped + residual
    b16.train()
    assert onednn_conv_bn(b16[0], b16[1], x.to(BF16), "relu") is None                   # BatchNorm in training


# ------------------------------------------------------------------------------- x->z keys: dwc + pool as one conv
@pytest.mark.parametrize("mode", ["cast", "autocast", "float16"])
@pytest.mark.parametrize("c,h,w", [(8, 28, 28), (5, 14, 21), (6, 7, 7)])
def test_dwc_pooled_bf16_rule(seed, mode, c, h, w):
    """_dwc_pooled (adaptive_avg_pool2d(dwc(x) + x, 7) as one strided depthwise conv) in bf16 / fp16: error against the
    float64 two-step math at most 2x that of the plain bf16 ops (conv, add, pool); float32 / float64 and maps that
    do not split into 7x7 equal windows decline (None)."""
    from lookfast.models.dyn_perceiver.model import _dwc_pooled

    g = torch.Generator().manual_seed(seed % 1000)
    dwc = nn.Conv2d(c, c, 7, 1, 3, groups=c)
    with torch.no_grad():
        dwc.weight.copy_(torch.randn(dwc.weight.shape, generator=g) * 0.2)
        dwc.bias.copy_(torch.randn(c, generator=g))
    lp = torch.float16 if mode == "float16" else BF16
    x = torch.randn(2, c, h, w, generator=g).to(lp).contiguous(memory_format=torch.channels_last)
    d = copy.deepcopy(dwc).double()
    with torch.no_grad():
        truth = F.adaptive_avg_pool2d(d(x.double()) + x.double(), 7)
        m = dwc if mode == "autocast" else copy.deepcopy(dwc).to(lp)
        with torch.autocast("cpu", BF16, enabled=mode == "autocast"):
            plain = F.adaptive_avg_pool2d(m(x) + x, 7)
            out = _dwc_pooled(m, x, lp)
        assert _dwc_pooled(dwc.float(), x.float(), torch.float32) is None
        assert _dwc_pooled(d, x.double(), torch.float64) is None
        assert _dwc_pooled(m, x[:, :, 1:], lp) is None                   # one row fewer: no equal 7x7 windows
    assert out.dtype == lp and out.shape == (2, c, 7, 7)
    assert _err(out, truth) <= 2 * _err(plain, truth) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_squeeze_excitation_inplace_matches(dtype):
    """SqueezeExcitation(inplace=True) in fused mode: the same values as the out-of-place gate, written into x."""
    from lookfast.models.dyn_perceiver.layers import SqueezeExcitation

    se = SqueezeExcitation(12, 3).to(dtype)
    se.fused = True
    x = torch.randn(2, 12, 5, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = se(x)
        y = x.clone()
        got = se(y, inplace=True)
    assert got.data_ptr() == y.data_ptr() and torch.equal(got, want)


def test_global_avg_pool_bf16_matches_mean():
    """layers.global_avg_pool on a bf16 map: the float32-accumulated mean rounded once (as `x.float().mean`), for
    channels-last and contiguous maps."""
    from lookfast.models.dyn_perceiver.layers import global_avg_pool

    x = torch.randn(3, 10, 13, 9).to(BF16)
    want = x.float().mean((2, 3)).to(BF16)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        out = global_avg_pool(xx)
        assert out.dtype == BF16 and out.shape == (3, 10)
        torch.testing.assert_close(out, want, rtol=2 ** -8, atol=0)   # summation order: at most 1 ulp


# --------------------------------------------------------------------------------------- fused self-attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_attention_layer_fused_matches_layer(seed, dtype):
    layer = SelfAttentionLayer(2, 12, 3).eval().to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    x = (torch.randn(3, 5, 12) * 2 + 1).to(dtype)
    with torch.no_grad():
        want = layer(x)
        layer.self_attn.attention.fused = True
        got = layer(x)
        again = layer(x)                                          # second call: cached weights
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
    assert torch.equal(got, again)


@pytest.mark.parametrize("brgemm", [False, True])
def test_self_attention_layer_fused_bf16_rule(seed, brgemm, monkeypatch):
    """bf16 latents: the fused layer (addmm route, or lookfast's packed_linear where the CPU has the brgemm
    micro-kernel) within 2x the error of the official layer in bf16, against the float64 layer."""
    from lookfast.models.dyn_perceiver import fused
    from lookfast.models.packed_linear import brgemm_available

    if brgemm and not brgemm_available():
        pytest.skip("no bf16 brgemm micro-kernel on this CPU")
    if not brgemm:
        monkeypatch.setattr(fused, "_self_attention_packs", lambda *args: None)
    calls = []
    original = fused._self_attention_brgemm
    monkeypatch.setattr(fused, "_self_attention_brgemm", lambda *a: calls.append(1) or original(*a))
    layer = SelfAttentionLayer(2, 72, 2).eval()  # 72 channels: not a multiple of 32 (the padded-depth path)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    x = torch.randn(5, 7, 72).to(BF16)
    exact = copy.deepcopy(layer).double()
    layer.to(BF16)
    with torch.no_grad():
        truth = exact(x.double())
        official = layer(x)
        layer.self_attn.attention.fused = True
        got = layer(x)
    assert got.dtype == BF16 and len(calls) == int(brgemm)
    assert rel_err(got, truth) <= 2 * rel_err(official, truth) + 1e-6


# ------------------------------------------------------------------------------------------- bf16 exit-1 chunks
def test_bf16_exit1_chunks_match_one_batch():
    m = small_model("reg800m_perceiver_t128", ops="fused", seed=3).eval().to(BF16)
    x = torch.randn(7, 3, 40, 40).to(BF16)
    with torch.no_grad():
        whole = m.forward_exit1(x)                                # 7 <= 2 x 8: one piece
        m.exit1_chunk = 2                                         # bf16: pieces of 4 images
        parts = m.forward_exit1(x)
    for a, b in zip(whole, parts):
        assert a.shape == b.shape and a.dtype == b.dtype == BF16
        assert _err(b, a.double()) <= 3e-2                        # bf16 batch-composition noise only


# ------------------------------------------------------------------------------------------------ z->x in place
def test_z2x_inplace_matches_and_public_pieces_leave_inputs_alone():
    from lookfast.models.dyn_perceiver.fused import z2x_fused
    from lookfast.models.dyn_perceiver.perceiver import CrossAttentionLayer

    layer = CrossAttentionLayer(40, 24, 5, 5).eval()
    x = torch.randn(2, 40, 5, 7).contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 16, 24)
    x0 = x.clone()
    with torch.no_grad():
        want = z2x_fused(layer, x, z)
        assert torch.equal(x, x0)                                 # not in place unless asked
        xi = x.clone()
        got = z2x_fused(layer, xi, z, inplace=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.data_ptr() == xi.data_ptr()                        # written into the caller's pixels
    m = small_model("reg800m_perceiver_t128", ops="fused", seed=4).eval()
    with torch.no_grad():
        x1, z1, y1 = m.forward_exit1(torch.randn(2, 3, 64, 64))
        x2, z2, y2 = m.forward_exit2(x1, z1, y1)
        x3, _ = m.forward_exit3(x2)
        kept = [t.clone() for t in (x1, x2, x3)]
        m.forward_exit2(x1, z1, y1)
        m.forward_exit4(x3, z2, y2)
    for a, b in zip((x1, x2, x3), kept):
        assert torch.equal(a, b)                                  # the public pieces never touch their inputs
