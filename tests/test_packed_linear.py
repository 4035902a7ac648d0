"""lookfast.models.packed_linear: linears on oneDNN-prepacked bf16 weights give bitwise F.linear's results, re-pack
when the weight changes through the parameter, stay out of state_dict / deepcopy, and step aside for autograd,
other dtypes and unpacked modules. LookWhere.pack_weights: the same model outputs, packed or not."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookfast.models.packed_linear import is_packed, linear, pack_linears, packing_available, unpack_linears

BF16 = torch.bfloat16
needs_packing = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN bf16 kernels on this CPU")


def _layer(seed, d_in=72, d_out=136, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(BF16)


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear_bitwise(bias):
    layer = _layer(1, bias=bias)
    with torch.no_grad():
        expected = {shape: None for shape in [(0, 72), (1, 72), (5, 72), (279, 72), (2, 7, 72), (3, 0, 72)]}
        gen = torch.Generator().manual_seed(2)
        inputs = {shape: torch.randn(*shape, generator=gen).to(BF16) for shape in expected}
        for shape, x in inputs.items():
            expected[shape] = F.linear(x, layer.weight, layer.bias)
        assert pack_linears([layer], batch_hint=64) == 1 and is_packed(layer)
        for shape, x in inputs.items():
            got = linear(layer, x)
            assert got.shape == expected[shape].shape and got.dtype == BF16
            assert torch.equal(got, expected[shape]), shape
        # a non-contiguous input, and output-row slices (LookWhere's CLS-only qkv split)
        x = torch.randn(9, 144, generator=gen).to(BF16)[:, ::2]
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
        x3 = torch.randn(2, 9, 72, generator=gen).to(BF16)[:, 3:]  # N-D non-contiguous: F.linear's own path
        assert torch.equal(linear(layer, x3), F.linear(x3, layer.weight, layer.bias))
        for rows in (slice(0, 40), slice(40, 136)):
            b = None if layer.bias is None else layer.bias[rows]
            assert torch.equal(linear(layer, x, rows), F.linear(x, layer.weight[rows], b))


@needs_packing
def test_repacks_after_in_place_edit_and_state_dict_load():
    layer = _layer(3)
    pack_linears([layer])
    x = torch.randn(17, 72).to(BF16)
    with torch.no_grad():
        linear(layer, x)
        layer.weight.mul_(-2)  # in place through the parameter: the version counter moves
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
        linear(layer, x, slice(0, 8))
        layer.load_state_dict(_layer(4).state_dict())
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(linear(layer, x, slice(0, 8)), F.linear(x, layer.weight[:8], layer.bias[:8]))
        layer.weight = nn.Parameter(torch.randn(136, 72).to(BF16))  # replaced: new address
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))


@needs_packing
def test_dtype_change_autograd_and_copies_fall_back():
    layer = _layer(5)
    pack_linears([layer])
    x = torch.randn(6, 72).to(BF16)
    # autograd recording: the plain path, so gradients flow
    xg = x.clone().requires_grad_()
    linear(layer, xg).float().sum().backward()
    assert xg.grad is not None and layer.weight.grad is not None
    # deepcopy and state_dict never see the opaque packs; the copy starts unpacked
    twin = copy.deepcopy(layer)
    assert not is_packed(twin) and set(layer.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.equal(linear(twin, x), linear(layer, x))
        layer.float()  # packed as bf16, now float32: plain F.linear in float32
        assert torch.equal(linear(layer, x.float()), F.linear(x.float(), layer.weight, layer.bias))
    unpack_linears([layer])
    assert not is_packed(layer)


def test_float32_layers_are_not_packed():
    layer = nn.Linear(8, 4)
    assert pack_linears([layer, nn.ReLU()]) == 0 and not is_packed(layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))


@needs_packing
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_lookwhere_pack_weights_same_outputs(task):
    from lookfast.models.lookwhere import LookWhere

    torch.manual_seed(6)
    model = LookWhere.from_config(high_res_size=98, k=11, num_classes=5, task=task, dim=64, num_heads=2,
                                  selector_depth=1, extractor_depth=2).eval().to(BF16)
    x = torch.randn(2, 3, 98, 98).to(BF16)
    with torch.inference_mode():
        plain = {ops: model.forward_with_intermediates(x, task="both") for ops in ("reference", "fused")
                 if setattr(model, "ops", ops) is None}
        model.pack_weights()
        assert model.selector.packed_linears and is_packed(model.extractor.blocks[0].mlp.fc1)
        for ops in ("reference", "fused"):
            model.ops = ops
            packed = model.forward_with_intermediates(x, task="both")
            for name in ("cls_logits", "seg_logits", "keep", "selector_map", "prefix_tokens"):
                assert torch.equal(packed[name], plain[ops][name]), (ops, name)
        model.pack_weights(False)
        assert not model.selector.packed_linears and not is_packed(model.extractor.blocks[0].mlp.fc1)


@needs_packing
def test_torch_compile_traces_the_plain_linear():
    """Under torch.compile (fullgraph) a packed module traces as F.linear: same values, no graph break."""
    layer = _layer(7)
    pack_linears([layer])
    x = torch.randn(5, 72).to(BF16)
    compiled = torch.compile(lambda t: linear(layer, t), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), F.linear(x, layer.weight, layer.bias))
