"""LookWhere model: the official compatibility vector with both ops settings, franca type, other resolutions, ragged k,
torch.compile, and the errors for bad input. The one full-size (518 px) forward per ops setting is shared through
module-scoped fixtures."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lookfast.models.lookwhere import LookWhere, k_from_mass
from lookfast.models.lookwhere.fill import fill_fused, fill_reference, nearest_kept

sys.path.insert(0, os.path.dirname(__file__))
from compat_weights import fill_state_dict  # noqa: E402
from oracles import rel_err

DATA = os.path.join(os.path.dirname(__file__), "data")
OPS = ("reference", "fused")
SMALL = dict(dim=64, num_heads=2, selector_depth=1, extractor_depth=2)



def official_keys(name):
    """{key: shape} of an official checkpoint listing."""
    keys = {}
    with open(os.path.join(DATA, name)) as f:
        for line in f:
            key, shape = line.split(" ", 1)
            keys[key] = tuple(int(s) for s in shape.strip().strip("()").split(",") if s.strip())
    return keys


def vector_checkpoint(model):
    """The vectors' weights: each part filled on its own (keys as inside the part), official nesting."""
    sd = model.state_dict()

    def part(prefix, salt):
        return fill_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, salt)

    return {"selector": {"backbone": part("selector.backbone.", 0), "head": part("selector.head.", 2000)},
            "extractor": part("extractor.", 1000), "head": part("head.", 3000)}


@pytest.fixture(scope="module")
def vector():
    return dict(np.load(os.path.join(DATA, "lw_dinov2_hr518_k136.npz")))


@pytest.fixture(scope="module")
def dinov2_checkpoint():
    with torch.device("meta"):  # shapes only: the weights come from the vectors' rule
        shape_model = LookWhere.from_config(lw_type="dinov2", high_res_size=518, k=136, num_classes=10)
    return vector_checkpoint(shape_model)


@pytest.fixture(scope="module")
def dinov2_model(dinov2_checkpoint):
    return LookWhere.from_official_state_dict(dinov2_checkpoint, 518, 136, 10, task="cls").eval()


@pytest.fixture(scope="module", params=OPS)
def vector_run(request, dinov2_model, vector):
    dinov2_model.ops = request.param
    with torch.no_grad():
        out = dinov2_model.forward_with_intermediates(torch.from_numpy(vector["x"]), task="both")
    return request.param, out


# ---------------------------------------------------------------- the official vector
def test_state_dict_keys_match_official_dinov2(dinov2_model):
    ours = {k: tuple(v.shape) for k, v in dinov2_model.state_dict().items()}
    assert ours == {**official_keys("lw_dinov2_checkpoint.txt"), "head.weight": (10, 768), "head.bias": (10,)}
    assert dinov2_model.config.num_reg_tokens == 4 and dinov2_model.config.mlp == "gelu"


@pytest.mark.parametrize("name", ["selector_map", "prefix_tokens", "cls_logits", "seg_logits"])
def test_vector_outputs(vector_run, vector, name):
    ops, out = vector_run
    ref = torch.from_numpy(vector[name])
    assert out[name].shape == ref.shape
    assert rel_err(out[name], ref) <= 1e-3, ops


def test_vector_keep(vector_run, vector):
    _, out = vector_run
    assert torch.equal(out["keep"], torch.from_numpy(vector["keep"]))


def test_forward_returns_task_logits(dinov2_model, vector):
    x = torch.from_numpy(vector["x"][:1])
    dinov2_model.ops, dinov2_model.task = "fused", "cls"
    with torch.no_grad():
        y = dinov2_model(x)
    assert rel_err(y, torch.from_numpy(vector["cls_logits"][:1])) <= 1e-3


# ---------------------------------------------------------------- other resolutions and the franca type
def test_dinov2_other_resolution_fused_matches_reference(dinov2_checkpoint, seed):
    size = 126
    g = size // 14
    model = LookWhere.from_official_state_dict(dinov2_checkpoint, size, g * g // 3, 10, task="seg").eval()
    want = F.interpolate(dinov2_checkpoint["extractor"]["pos_embed"].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
                         size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, g * g, -1)
    torch.testing.assert_close(model.extractor.pos_embed.data, want, rtol=0, atol=0)
    x = torch.randn(2, 3, size, size)
    outs = {}
    for ops in OPS:
        model.ops = ops
        with torch.no_grad():
            outs[ops] = model.forward_with_intermediates(x, task="both")
    assert torch.equal(outs["fused"]["keep"], outs["reference"]["keep"])
    for name in ("cls_logits", "seg_logits"):
        assert rel_err(outs["fused"][name], outs["reference"][name]) <= 1e-3


def test_franca_type_from_contents(tmp_path, seed):
    with torch.device("meta"):
        shape_model = LookWhere.from_config(lw_type="franca", high_res_size=518, k=136, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in shape_model.state_dict().items()}
    assert ours == official_keys("lw_franca_checkpoint.txt")
    ckpt = vector_checkpoint(shape_model)
    ckpt.pop("head")
    del shape_model
    model = LookWhere.from_official_state_dict(ckpt, 182, 40, 7, task="seg").eval()
    assert model.config.lw_type == "franca" and model.config.mlp == "swiglu" and model.config.num_reg_tokens == 0
    assert model.extractor.num_prefix_tokens == 1
    x = torch.randn(2, 3, 182, 182)
    outs = {}
    for ops in OPS:
        model.ops = ops
        with torch.no_grad():
            outs[ops] = model.forward_with_intermediates(x, task="both")
    assert outs["fused"]["prefix_tokens"].shape == (2, 1, 768)
    assert outs["fused"]["seg_logits"].shape == (2, 7, 13, 13)
    for name in ("cls_logits", "seg_logits"):
        assert rel_err(outs["fused"][name], outs["reference"][name]) <= 1e-3


# ---------------------------------------------------------------- the selector's downsample (fused, packed)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size_in,size_out", [(1036, 154), (518, 154), (154, 154), (155, 7), (9, 20), (1, 3)])
def test_downsample_bilinear_matches_interpolate(dtype, size_in, size_out, seed):
    from lookfast.models.lookwhere.selector import downsample_bilinear

    x = torch.randn(2, 3, size_in, size_in + 5)[..., 5:].to(dtype)  # a strided view, as a crop would give
    want = F.interpolate(x, size=(size_out, size_out), mode="bilinear", align_corners=False)
    truth = F.interpolate(x.double(), size=(size_out, size_out), mode="bilinear", align_corners=False)
    got = downsample_bilinear(x, size_out)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        assert rel_err(got, want) < 1e-6
    else:  # a float32 sum rounded once, as torch's: the bf16/fp16 accuracy rule, and next to torch's own output
        assert rel_err(got, truth) <= 2 * rel_err(want, truth) + 1e-6
        assert rel_err(got, want) <= 2 * torch.finfo(dtype).eps


# ---------------------------------------------------------------- the fill
@pytest.mark.parametrize("grid,k", [(7, 1), (9, 4), (13, 30), (20, 400)])
def test_fill_fused_selects_like_the_stable_sort(grid, k, seed):
    b = 3
    keep = torch.stack([torch.randperm(grid * grid)[:k] for _ in range(b)])
    values = torch.randn(b, k, 6, dtype=torch.float64)
    ref = fill_reference(keep, values, grid).permute(0, 3, 1, 2)
    # Same neighbours and float32 weights; the fused fill (a C++ kernel) takes correctly rounded float32 square
    # roots where torch's vectorised sqrt can be one ulp off (sqrt(34): 5.8309522 vs 5.8309517), so the weights may
    # differ in the last float32 bit: 1e-6, where a different neighbour would be off by O(0.1).
    torch.testing.assert_close(fill_fused(keep, values, grid), ref, rtol=1e-6, atol=1e-6)
    # the neighbour choice itself, ties included (lattice distances tie often)
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    d = ((r.reshape(-1, 1) - keep[:, None] // grid) ** 2 + (c.reshape(-1, 1) - keep[:, None] % grid) ** 2).float()
    want = torch.argsort(d.sqrt(), dim=-1, stable=True)[..., :min(5, k)]
    assert torch.equal(nearest_kept(keep, grid)[0], want)
    # ... and the kernel's: one-hot values make each output cell the weight of every kept slot; its nonzero slots
    # must be exactly `want` (k < 5: every slot)
    weights = fill_fused(keep, torch.eye(k, dtype=torch.float64).expand(b, k, k).contiguous(), grid)
    chosen = weights.reshape(b, k, grid * grid).transpose(1, 2) > 0
    expected = torch.zeros_like(chosen).scatter_(2, want, True)
    assert torch.equal(chosen, expected)


def test_fill_fused_ragged_rows_equal_unpadded(seed):
    grid, ks = 11, [1, 3, 17, 5]
    rows = [torch.randperm(grid * grid)[:n] for n in ks]
    vals = [torch.randn(n, 4, dtype=torch.float64) for n in ks]
    keep_pad = torch.zeros(len(ks), max(ks), dtype=torch.int64)
    val_pad = torch.full((len(ks), max(ks), 4), float("nan"), dtype=torch.float64)
    for i, (kr, vr) in enumerate(zip(rows, vals)):
        keep_pad[i, :len(kr)], val_pad[i, :len(kr)] = kr, vr
    val_pad = val_pad.nan_to_num(0.0)
    out = fill_fused(keep_pad, val_pad, grid, lengths=torch.tensor(ks))
    for i, (kr, vr) in enumerate(zip(rows, vals)):
        torch.testing.assert_close(out[i], fill_fused(kr[None], vr[None], grid)[0])


# ---------------------------------------------------------------- ragged k
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return LookWhere.from_config(lw_type="dinov2", high_res_size=182, k=20, num_classes=5, **SMALL).eval()


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_ragged_k_equals_per_image_runs(small_model, ops, task, seed):
    small_model.ops, small_model.task = ops, task
    x = torch.randn(4, 3, 182, 182)
    k = torch.tensor([3, 169, 1, 40])
    with torch.no_grad():
        out = small_model.forward_with_intermediates(x, k=k)
        for i in range(4):
            alone = small_model.forward_with_intermediates(x[i:i + 1], k=int(k[i]))
            torch.testing.assert_close(out[f"{task}_logits"][i], alone[f"{task}_logits"][0], rtol=1e-4, atol=1e-5)
            lo, hi = out["cu_seqlens"][i], out["cu_seqlens"][i + 1]
            assert torch.equal(out["keep"][lo:hi], alone["keep"][0])


def test_ragged_fused_matches_reference(small_model, seed):
    x = torch.randn(3, 3, 182, 182)
    outs = {}
    for ops in OPS:
        small_model.ops = ops
        with torch.no_grad():
            outs[ops] = small_model.forward_with_intermediates(x, k=torch.tensor([7, 2, 100]), task="both")
    for name in ("cls_logits", "seg_logits"):
        assert rel_err(outs["fused"][name], outs["reference"][name]) <= 1e-3


def test_k_mass_rule(small_model, seed):
    small_model.ops, small_model.task = "fused", "cls"
    x = torch.randn(3, 3, 182, 182)
    with torch.no_grad():
        out = small_model.forward_with_intermediates(x, k_mass=0.3, k_min=2, k_max=150)
        probs = torch.softmax(out["selector_map"], -1)
        for i, n in enumerate(out["k"].tolist()):
            top = probs[i].sort(descending=True).values
            assert 2 <= n <= 150
            if 2 < n < 150:  # the fewest patches reaching the mass
                assert top[:n].sum() >= 0.3 - 1e-6 and top[:n - 1].sum() < 0.3 + 1e-6
            alone = small_model(x[i:i + 1], k=n)
            torch.testing.assert_close(out["cls_logits"][i], alone[0], rtol=1e-4, atol=1e-5)
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    assert k_from_mass(scores, 0.5, 1, 4).tolist() == [2, 1]
    assert k_from_mass(scores, 1.0, 1, 3).tolist() == [3, 3]


@pytest.mark.parametrize("ops", OPS)
def test_select_then_extract_on_regrouped_rows_equals_forward(small_model, ops, seed):
    """The two stages the serving engine runs separately: select on one batch, extract on rows of several selects
    regrouped in another order (as the engine packs them) gives each image forward's own result."""
    small_model.ops, small_model.task = ops, "cls"
    a, b = torch.randn(3, 3, 182, 182), torch.randn(2, 3, 182, 182)
    with torch.no_grad():
        (sa, pa), ka = small_model.select(a, k_mass=0.4, k_min=2, k_max=60)
        (sb, pb), kb = small_model.select(b, k_mass=0.4, k_min=2, k_max=60)
        assert ka.dtype == kb.dtype == torch.int64 and ka.shape == (3,) and kb.shape == (2,)
        order = [(b, sb, pb, kb, 1), (a, sa, pa, ka, 2), (a, sa, pa, ka, 0)]
        pick = lambda j: torch.stack([o[j][o[4]] for o in order])  # noqa: E731
        out = small_model.extract(pick(0), pick(1), pick(2), pick(3))
        for row, (x, _, _, _, i) in enumerate(order):
            alone = small_model(x[i:i + 1], k_mass=0.4, k_min=2, k_max=60)
            torch.testing.assert_close(out["cls_logits"][row], alone[0], rtol=1e-4, atol=1e-5)
        (_, _), k = small_model.select(a)
        assert k == small_model.k  # no k given: the model's int k (the dense path)
    with pytest.raises(ValueError, match="k_mass"):
        small_model.select(a, k_mass=1.5)
    with pytest.raises(ValueError, match="182x182"):
        small_model.select(torch.randn(1, 3, 196, 196))


# ---------------------------------------------------------------- compile and checkpoints
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_torch_compile_fused(small_model, task, seed):
    small_model.ops, small_model.task = "fused", task
    x = torch.randn(2, 3, 182, 182)
    with torch.no_grad():
        want = small_model(x)
        # aot_eager: the whole graph is captured and traced (fullgraph, the custom ops' fake kernels) without
        # inductor's C++ code generation, which costs minutes on a 2-core CI machine.
        got = torch.compile(small_model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_from_official_checkpoint_file(tmp_path, seed):
    small = LookWhere.from_config(lw_type="dinov2", high_res_size=518, k=8, **SMALL)
    ckpt = vector_checkpoint(small)
    ckpt.pop("head")
    path = tmp_path / "lookwhere_weights.pt"  # any file name: the type comes from the contents
    torch.save(ckpt, path)
    model = LookWhere.from_official_checkpoint(path, 140, 12, 3, task="seg", ops="fused", num_heads=2)
    assert model.config.extractor_depth == 2 and model.config.selector_depth == 1
    torch.testing.assert_close(model.selector.backbone.blocks[0].attn.qkv.weight,
                               ckpt["selector"]["backbone"]["blocks.0.attn.qkv.weight"])
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.shape == (3, 64)
    assert model(torch.randn(1, 3, 140, 140)).shape == (1, 3, 10, 10)
    del ckpt["extractor"]["blocks.1.mlp.fc2.bias"], ckpt["selector"]["head"]["w1.weight"]
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=r"extractor\.blocks\.1\.mlp\.fc2\.bias") as info:
        LookWhere.from_official_checkpoint(path, 140, 12, 3, num_heads=2)
    assert "selector.head.w1.weight" in str(info.value)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors(small_model):
    with pytest.raises(ValueError, match="high_res_size"):
        LookWhere.from_config(high_res_size=150, k=10, **SMALL)
    with pytest.raises(ValueError, match="task"):
        LookWhere.from_config(high_res_size=140, k=10, task="det", **SMALL)
    with pytest.raises(ValueError, match="ops"):
        LookWhere.from_config(high_res_size=140, k=10, ops="fast", **SMALL)
    with pytest.raises(ValueError, match="k must be in 1..100"):
        LookWhere.from_config(high_res_size=140, k=101, **SMALL)
    x = torch.randn(1, 3, 182, 182)
    with pytest.raises(ValueError, match="multiples of 14"):
        small_model(torch.randn(1, 3, 180, 180))
    with pytest.raises(ValueError, match="182x182"):
        small_model(torch.randn(1, 3, 196, 196))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small_model(torch.randn(3, 182, 182))
    with pytest.raises(TypeError, match="images"):
        small_model(np.zeros((1, 3, 182, 182)))
    for bad in (0, 170, -1):
        with pytest.raises(ValueError, match="k must be in 1..169"):
            small_model(x, k=bad)
    with pytest.raises(ValueError, match="k must be in 1..169"):
        small_model(x, k=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        small_model(x, k=torch.tensor([3, 4]))
    with pytest.raises(TypeError, match="integer"):
        small_model(x, k=torch.tensor([3.0]))
    with pytest.raises(TypeError, match="k must be an int"):
        small_model(x, k=2.5)
    with pytest.raises(ValueError, match="k_mass"):
        small_model(x, k_mass=1.5)
    with pytest.raises(ValueError, match="not both"):
        small_model(x, k=3, k_mass=0.5)
    with pytest.raises(ValueError, match="k_min"):
        small_model(x, k_mass=0.5, k_min=50, k_max=10)
    with pytest.raises(KeyError, match="selector"):
        LookWhere.from_official_state_dict({"extractor": {}}, 140, 10, 0)
    assert math.isfinite(small_model(x, k=169).sum().item())


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_fused_gradients_match_reference(small_model, task, seed):
    """Fine-tuning goes through the fused ops' backward: extractor and head gradients equal the reference's."""
    x = torch.randn(2, 3, 182, 182)
    grads = {}
    for ops in OPS:
        small_model.ops, small_model.task = ops, task
        small_model.zero_grad(set_to_none=True)
        small_model(x, k=torch.tensor([9, 30]) if task == "seg" else None).square().mean().backward()
        grads[ops] = {n: p.grad.clone() for n, p in small_model.named_parameters() if p.grad is not None}
    small_model.zero_grad(set_to_none=True)
    assert grads["fused"].keys() == grads["reference"].keys()
    assert not any(n.startswith("selector.") for n in grads["fused"])  # the selector runs without gradient
    for name, g in grads["reference"].items():
        assert rel_err(grads["fused"][name], g) <= 1e-3, name
