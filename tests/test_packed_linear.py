"""lookfast.models.packed_linear, both kernels.

brgemm (lookfast::packed_linear on this CPU's matrix-engine micro-kernel): against float64 math, at most 2x the error
of plain PyTorch in bf16 (F.linear, then the official separately rounded `* scale` and `residual +`), on odd sizes
around the 64 x 64 blocks, K off the 32 multiple, strided and N-D inputs, both thread counts; opcheck; clear errors.
onednn (oneDNN's own packs): bitwise F.linear's results; autocast packs (float32 weights, used under bf16 CPU
autocast): bitwise autocast's F.linear results. All: re-pack when the weight changes through the parameter,
stay out of state_dict / deepcopy, step aside for autograd, other dtypes and unpacked modules.
LookWhere.pack_weights: ops="reference" keeps the official outputs bitwise; ops="fused" stays within the bf16 rule
(tests/test_models_bf16.py checks it against the official vectors)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookfast.models.packed_linear import (_PACKS, brgemm_available, is_packed, linear, pack_linears,
                                           packing_available, unpack_linears)
from oracles import rel_err

BF16 = torch.bfloat16
needs_onednn = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN bf16 kernels on this CPU")
needs_brgemm = pytest.mark.skipif(not brgemm_available(), reason="no bf16 brgemm micro-kernel on this CPU")
KERNELS = [pytest.param("onednn", marks=needs_onednn), pytest.param("brgemm", marks=needs_brgemm)]


def _layer(seed, d_in=72, d_out=136, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(BF16)


def _truth(layer, x, rows=None, scale=None, residual=None):
    """float64 math on the bf16 values: residual + scale * (x @ W[rows]^T + b[rows])."""
    w = layer.weight.double() if rows is None else layer.weight.double()[rows]
    y = x.double() @ w.T
    if layer.bias is not None:
        y = y + (layer.bias.double() if rows is None else layer.bias.double()[rows])
    if scale is not None:
        y = y * scale.double()
    return y if residual is None else residual.double() + y


def _official(layer, x, rows=None, scale=None, residual=None):
    """Plain PyTorch in bf16, each step rounded (the official block's F.linear, LayerScale and residual add)."""
    y = F.linear(x, layer.weight, layer.bias) if rows is None else F.linear(
        x, layer.weight[rows], None if layer.bias is None else layer.bias[rows])
    if scale is not None:
        y = y * scale
    return y if residual is None else residual + y


def _check_rule(got, layer, x, **kw):
    want = _truth(layer, x, **kw)
    assert got.shape == want.shape and got.dtype == BF16
    if got.numel():
        assert rel_err(got, want) <= 2 * rel_err(_official(layer, x, **kw), want) + 1e-6


# ------------------------------------------------------------------------------------------------ brgemm: the op
@needs_brgemm
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_in,d_out", [(72, 136), (64, 1), (32, 64), (768, 200), (5, 65)])
def test_brgemm_matches_float64_math(seed, bias, d_in, d_out):
    layer = _layer(seed % 1000, d_in, d_out, bias)
    assert pack_linears([layer], kernel="brgemm") == 1 and is_packed(layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rows in (0, 1, 5, 63, 64, 65, 130, 279):
            x = torch.randn(rows, d_in, generator=gen).to(BF16)
            _check_rule(linear(layer, x), layer, x)
            scale = torch.rand(d_out, generator=gen).to(BF16) + 0.05
            residual = torch.randn(rows, d_out, generator=gen).to(BF16)
            _check_rule(linear(layer, x, scale=scale, residual=residual), layer, x, scale=scale, residual=residual)
            _check_rule(linear(layer, x, scale=scale), layer, x, scale=scale)
            _check_rule(linear(layer, x, residual=residual), layer, x, residual=residual)


@needs_brgemm
def test_brgemm_strided_nd_sliced_inputs_and_threads(seed):
    layer = _layer(seed % 1000, 64, 136)
    pack_linears([layer], kernel="brgemm")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        wide = torch.randn(70, 160, generator=gen).to(BF16)
        for x in (wide[:, :64],            # dense rows 160 apart: read in place
                  wide[:, 1:65],           # in place from an offset
                  wide[:, ::2][:, :64],    # strided columns: copied
                  wide.t()[:64].t(),       # column-major (70, 64): copied
                  wide[:1, :64]):          # one row
            _check_rule(linear(layer, x), layer, x)
        x3 = torch.randn(2, 9, 64, generator=gen).to(BF16)[:, 3:]  # N-D, not contiguous
        res3 = torch.randn(2, 6, 136, generator=gen).to(BF16)
        got = linear(layer, x3, residual=res3)
        assert got.shape == (2, 6, 136)
        _check_rule(got, layer, x3, residual=res3)
        for rows in (slice(0, 40), slice(40, 136)):  # LookWhere's CLS-only qkv split: packs per row range
            _check_rule(linear(layer, wide[:, :64], rows), layer, wide[:, :64], rows=rows)
        # Every 64 x 64 block is computed by one thread in one order: any thread count gives the same bits.
        x = torch.randn(300, 64, generator=gen).to(BF16)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = linear(layer, x)
            torch.set_num_threads(2)
            assert torch.equal(linear(layer, x), one)
        finally:
            torch.set_num_threads(threads)


@needs_brgemm
def test_brgemm_nan_and_inf_propagate_per_row():
    layer = _layer(11, 64, 70)
    pack_linears([layer], kernel="brgemm")
    x = torch.randn(66, 64).to(BF16)
    x[3, 7] = float("nan")
    x[65, 0] = float("inf")
    with torch.no_grad():
        got = linear(layer, x)
    assert got[3].isnan().all() and not got[torch.arange(66) != 3][:-1].isnan().any()
    assert not torch.isfinite(got[65]).any()


@needs_brgemm
def test_brgemm_op_refuses_bad_arguments():
    w = torch.randn(136, 72).to(BF16)
    packed = torch.ops.lookfast.pack_linear_weight(w)
    assert packed.shape == (136 * 96,) and packed.dtype == BF16
    x = torch.randn(5, 72).to(BF16)
    op = torch.ops.lookfast.packed_linear
    cases = [
        (lambda: torch.ops.lookfast.pack_linear_weight(w.float()), "weight must be bfloat16 or float16"),
        (lambda: torch.ops.lookfast.pack_linear_weight(w[0]), "weight must be 2-D"),
        (lambda: torch.ops.lookfast.pack_linear_weight(w[:0]), "must not be empty"),
        (lambda: op(x.float(), packed, 136, None, None, None), "x must be bfloat16 or float16"),
        (lambda: op(x[None], packed, 136, None, None, None), "x must be 2-D"),
        (lambda: op(x, packed, 135, None, None, None), "packed_weight must be pack_linear_weight's"),
        (lambda: op(x[:, :64], packed, 136, None, None, None), "packed_weight must be pack_linear_weight's"),
        (lambda: op(x, packed, 0, None, None, None), "out_features must be positive"),
        (lambda: op(x, packed, 136, torch.zeros(136), None, None), "bias has dtype float"),
        (lambda: op(x, packed, 136, None, torch.zeros(135, dtype=BF16), None), "scale must have shape (136,)"),
        (lambda: op(x, packed, 136, None, None, torch.zeros(5, 135, dtype=BF16)), "residual must have shape (5, 136)"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


@needs_brgemm
def test_brgemm_opcheck():
    w = torch.randn(70, 40).to(BF16)
    packed = torch.ops.lookfast.pack_linear_weight(w)
    torch.library.opcheck(torch.ops.lookfast.pack_linear_weight, (w,))
    args = (torch.randn(9, 40).to(BF16), packed, 70, torch.randn(70).to(BF16), torch.rand(70).to(BF16),
            torch.randn(9, 70).to(BF16))
    torch.library.opcheck(torch.ops.lookfast.packed_linear, args)
    torch.library.opcheck(torch.ops.lookfast.packed_linear, (args[0], packed, 70, None, None, None))


def test_kernel_name_is_checked():
    with pytest.raises(ValueError, match="kernel must be one of"):
        pack_linears([_layer(1)], kernel="fastest")


# ------------------------------------------------------------------------------------------------ onednn: bitwise
@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_packs_equal_linear_bitwise(bias):
    layer = _layer(1, bias=bias)
    with torch.no_grad():
        expected = {shape: None for shape in [(0, 72), (1, 72), (5, 72), (279, 72), (2, 7, 72), (3, 0, 72)]}
        gen = torch.Generator().manual_seed(2)
        inputs = {shape: torch.randn(*shape, generator=gen).to(BF16) for shape in expected}
        for shape, x in inputs.items():
            expected[shape] = F.linear(x, layer.weight, layer.bias)
        assert pack_linears([layer], batch_hint=64, kernel="onednn") == 1 and is_packed(layer)
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
        # scale and residual: the official separately rounded steps after the packed GEMM
        scale, residual = torch.rand(136, generator=gen).to(BF16), torch.randn(9, 136, generator=gen).to(BF16)
        assert torch.equal(linear(layer, x, scale=scale, residual=residual), _official(layer, x, None, scale, residual))


# ------------------------------------------------------------------------------------------------ both kernels
def _same_layer_output(got, layer, x, rows=None):
    """Bitwise F.linear for onednn; within the bf16 rule for brgemm (a stale pack would miss by O(1))."""
    if is_packed(layer) and _PACKS[layer]["kernel"] == "brgemm":
        _check_rule(got, layer, x, rows=rows)
    else:
        assert torch.equal(got, _official(layer, x, rows))


@pytest.mark.parametrize("kernel", KERNELS)
def test_repacks_after_in_place_edit_and_state_dict_load(kernel):
    layer = _layer(3)
    pack_linears([layer], kernel=kernel)
    x = torch.randn(17, 72).to(BF16)
    with torch.no_grad():
        linear(layer, x)
        layer.weight.mul_(-2)  # in place through the parameter: the version counter moves
        _same_layer_output(linear(layer, x), layer, x)
        linear(layer, x, slice(0, 8))
        layer.load_state_dict(_layer(4).state_dict())
        _same_layer_output(linear(layer, x), layer, x)
        _same_layer_output(linear(layer, x, slice(0, 8)), layer, x, slice(0, 8))
        layer.weight = nn.Parameter(torch.randn(136, 72).to(BF16))  # replaced: new address
        _same_layer_output(linear(layer, x), layer, x)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dtype_change_autograd_and_copies_fall_back(kernel):
    layer = _layer(5)
    pack_linears([layer], kernel=kernel)
    x = torch.randn(6, 72).to(BF16)
    # autograd recording: the plain path, so gradients flow
    xg = x.clone().requires_grad_()
    linear(layer, xg).float().sum().backward()
    assert xg.grad is not None and layer.weight.grad is not None
    # deepcopy and state_dict never see the packs; the copy starts unpacked
    twin = copy.deepcopy(layer)
    assert not is_packed(twin) and set(layer.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.equal(linear(twin, x), F.linear(x, layer.weight, layer.bias))
        layer.float()  # packed as bf16, now float32: plain F.linear in float32
        assert torch.equal(linear(layer, x.float()), F.linear(x.float(), layer.weight, layer.bias))
    unpack_linears([layer])
    assert not is_packed(layer)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packs_step_aside_when_onednn_is_switched_off(kernel):
    layer = _layer(8)
    pack_linears([layer], kernel=kernel)
    x = torch.randn(7, 72).to(BF16)
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() also sets a TF32 flag, which warns on CPU builds)
    try:
        with torch.no_grad():
            assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
    finally:
        torch.backends.mkldnn.enabled = before


def test_float32_layers_get_autocast_packs_only_when_asked():
    layer = nn.Linear(8, 4)
    assert pack_linears([layer, nn.ReLU()], autocast=False) == 0 and not is_packed(layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias))
    if packing_available():
        assert pack_linears([layer, nn.ReLU()]) == 1 and _PACKS[layer].get("autocast")
        with torch.no_grad():  # outside autocast: plain float32
            got = linear(layer, x)
            assert got.dtype == torch.float32 and torch.equal(got, F.linear(x, layer.weight, layer.bias))


def _autocast_official(layer, x, rows=None, scale=None, residual=None):
    with torch.autocast("cpu", BF16):
        return _official(layer, x, rows, scale, residual)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_packs_equal_autocast_linear_bitwise(bias):
    """float32 weights packed for CPU autocast: autocast's own F.linear results, bitwise, on every input kind; the
    layer scale and residual as the official float32 layers apply them (type promotion to float32)."""
    torch.manual_seed(9)
    layer = nn.Linear(72, 136, bias=bias)
    gen = torch.Generator().manual_seed(10)
    inputs = [torch.randn(*shape, generator=gen) for shape in [(0, 72), (1, 72), (5, 72), (279, 72), (2, 7, 72),
                                                                 (3, 0, 72)]]
    inputs += [torch.randn(9, 144, generator=gen)[:, ::2], torch.randn(2, 9, 72, generator=gen)[:, 3:],
               torch.randn(4, 72, generator=gen).to(BF16)]
    with torch.no_grad():
        expected = [_autocast_official(layer, x) for x in inputs]
        assert pack_linears([layer], batch_hint=64) == 1 and _PACKS[layer].get("autocast")
        with torch.autocast("cpu", BF16):
            for x, want in zip(inputs, expected):
                got = linear(layer, x)
                assert got.dtype == BF16 and got.shape == want.shape and torch.equal(got, want), tuple(x.shape)
            x = inputs[3]
            for rows in (slice(0, 40), slice(40, 136)):
                assert torch.equal(linear(layer, x, rows), _autocast_official(layer, x, rows))
            scale, residual = torch.rand(136, generator=gen), torch.randn(279, 136, generator=gen)
            got = linear(layer, x, scale=scale, residual=residual)
            want = _autocast_official(layer, x, None, scale, residual)
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
        # edits through the parameter are seen: the weight re-packed, the bias cast per call (outside the autocast
        # region above: autocast itself caches its weight casts until its outermost region ends)
        layer.weight.mul_(-0.5)
        if bias:
            layer.bias.add_(1.0)
        with torch.autocast("cpu", BF16):
            got = linear(layer, x)
        assert torch.equal(got, _autocast_official(layer, x))
        # float16 autocast is not what the packs hold: plain (autocast's own) F.linear
        with torch.autocast("cpu", torch.float16):
            want = F.linear(x, layer.weight, layer.bias)
            assert torch.equal(linear(layer, x), want)
    # autograd recording: the plain path, gradients flow to the float32 weight
    xg = inputs[3].clone().requires_grad_()
    with torch.autocast("cpu", BF16):
        linear(layer, xg).float().sum().backward()
    assert xg.grad is not None and layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    # a dtype change drops the autocast packs (bf16 weights need a pack_linears call of their own)
    with torch.no_grad(), torch.autocast("cpu", BF16):
        layer.to(BF16)
        x = inputs[3].to(BF16)
        assert torch.equal(linear(layer, x), F.linear(x, layer.weight, layer.bias)) and not is_packed(layer)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_lookwhere_pack_weights(task, kernel, monkeypatch):
    from lookfast.models import packed_linear
    from lookfast.models.lookwhere import LookWhere

    if kernel == "onednn":  # pack_weights takes "auto": make it choose oneDNN's packs
        monkeypatch.setattr(packed_linear, "brgemm_available", lambda dtype=BF16: False)
    torch.manual_seed(6)
    model = LookWhere.from_config(high_res_size=98, k=11, num_classes=5, task=task, dim=64, num_heads=2,
                                  selector_depth=1, extractor_depth=2).eval().to(BF16)
    with torch.no_grad():
        for block in list(model.selector.backbone.blocks) + list(model.extractor.blocks):
            block.ls1.gamma.uniform_(0.5, 1.5)  # layer scales that matter (1e-5 at init would hide a wrong one)
            block.ls2.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 98, 98).to(BF16)
    with torch.inference_mode():
        plain = {ops: model.forward_with_intermediates(x, task="both") for ops in ("reference", "fused")
                 if setattr(model, "ops", ops) is None}
        model.pack_weights()
        fc1 = model.extractor.blocks[0].mlp.fc1
        assert model.selector.packed_linears and is_packed(fc1)
        assert packed_linear._PACKS[fc1]["kernel"] == kernel
        model.ops = "reference"  # the official computation, packs or not
        packed = model.forward_with_intermediates(x, task="both")
        for name in ("cls_logits", "seg_logits", "keep", "selector_map", "prefix_tokens"):
            assert torch.equal(packed[name], plain["reference"][name]), name
        model.ops = "fused"
        packed = model.forward_with_intermediates(x, task="both")
        for name in ("cls_logits", "seg_logits", "selector_map", "prefix_tokens"):
            # The packed fused selector also runs lookfast's attention and downsample (not SDPA, F.interpolate),
            # and brgemm packs round once: close to the unpacked fused outputs (the bf16 rule: test_models_bf16).
            assert rel_err(packed[name], plain["fused"][name]) < 5e-2, name
        model.pack_weights(False)
        assert not model.selector.packed_linears and not is_packed(fc1)


@needs_onednn
def test_lookwhere_float32_pack_weights_act_only_under_autocast():
    """A float32 LookWhere with autocast packs: outside autocast every output is bitwise the unpacked model's (the
    packs and the packed selector path stay out of the way); under bf16 autocast the fused run uses them, close to
    the unpacked autocast run (the bf16 rule against the official vectors: test_models_bf16, "autocast packed")."""
    from lookfast.models.lookwhere import LookWhere

    torch.manual_seed(11)
    model = LookWhere.from_config(high_res_size=98, k=11, num_classes=5, task="cls", dim=64, num_heads=2,
                                  selector_depth=1, extractor_depth=2).eval()
    x = torch.randn(2, 3, 98, 98)
    names = ("cls_logits", "seg_logits", "keep", "selector_map", "prefix_tokens")
    with torch.inference_mode():
        plain = {}
        for ops in ("reference", "fused"):
            model.ops = ops
            plain[ops] = model.forward_with_intermediates(x, task="both")
            with torch.autocast("cpu", BF16):
                plain[ops, "autocast"] = model.forward_with_intermediates(x, task="both")
        model.pack_weights()
        fc1 = model.extractor.blocks[0].mlp.fc1
        assert model.selector.packed_linears == "autocast" and is_packed(fc1) and _PACKS[fc1].get("autocast")
        for ops in ("reference", "fused"):
            model.ops = ops
            packed = model.forward_with_intermediates(x, task="both")
            for name in names:
                assert torch.equal(packed[name], plain[ops][name]), (ops, name)
        model.ops = "reference"  # the official computation under autocast too, packs or not
        with torch.autocast("cpu", BF16):
            packed = model.forward_with_intermediates(x, task="both")
        for name in names:
            assert torch.equal(packed[name], plain["reference", "autocast"][name]), name
        model.ops = "fused"
        with torch.autocast("cpu", BF16):
            packed = model.forward_with_intermediates(x, task="both")
        for name in ("cls_logits", "selector_map", "prefix_tokens"):
            assert packed[name].dtype == plain["fused", "autocast"][name].dtype
            assert rel_err(packed[name], plain["fused", "autocast"][name]) < 5e-2, name
        model.pack_weights(False)
        assert not model.selector.packed_linears and not is_packed(fc1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_compile_traces_the_plain_linear(kernel):
    """Under torch.compile (fullgraph) a packed module traces as F.linear: same values, no graph break."""
    layer = _layer(7)
    pack_linears([layer], kernel=kernel)
    x = torch.randn(5, 72).to(BF16)
    compiled = torch.compile(lambda t: linear(layer, t), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), F.linear(x, layer.weight, layer.bias))
