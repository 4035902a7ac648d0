"""Dyn-Perceiver: official key layout, compatibility vectors, checkpoint loading, all configs, MACs, early exit,
fused ops. Full-size (224 px) forwards only for the stored vectors (batch 2); small inputs elsewhere."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from lookfast.models import dyn_perceiver as dp

sys.path.insert(0, os.path.dirname(__file__))
from compat_weights import fill_state_dict  # noqa: E402
from oracles import rel_err

DATA = os.path.join(os.path.dirname(__file__), "data")
TOL = 1e-3  # docs/models.md: max |diff| / max |ref|


def official_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    with open(os.path.join(DATA, f"dp_{name}.txt")) as f:
        for line in f.read().splitlines():
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows



_models: dict[str, torch.nn.Module] = {}


def vector_model(name: str) -> torch.nn.Module:
    """The released config with the vectors' weights (salt 0), built once per test session."""
    if name not in _models:
        m = dp.build(name)
        m.load_state_dict(fill_state_dict(m.state_dict(), 0), strict=True)
        _models[name] = m
    return _models[name]


def small_model(name: str = "reg800m_perceiver_t128", ops: str = "reference", seed: int = 0, **kw):
    """A model with rule-filled weights (salt `seed`), for tests at small input sizes."""
    m = dp.build(name, ops=ops, **kw)
    m.load_state_dict(fill_state_dict(m.state_dict(), seed), strict=True)
    return m


@pytest.mark.parametrize("name", dp.RELEASED)
def test_state_dict_keys_and_shapes_match_official(name):
    sd = dp.build(name).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_keys(name)


@pytest.mark.parametrize("name", dp.RELEASED)
def test_compat_vectors_reference(name):
    data = np.load(os.path.join(DATA, f"dp_{name}.npz"))
    assert f"model={name}" in str(data["meta"])
    m = vector_model(name)
    with torch.no_grad():
        ys = m(torch.from_numpy(data["x"]))
    for i, y in enumerate(ys):
        assert rel_err(y, torch.from_numpy(data[f"exit{i + 1}"])) <= TOL, f"exit {i + 1}"


@pytest.mark.parametrize("fmt", ["model", "model_ema", "bare", "ddp"])
def test_from_official_checkpoint_round_trip(tmp_path, fmt):
    name = "mobilenetV3_0x75_perceiver_t128"
    src = small_model(name, seed=3)
    sd = src.state_dict()
    obj = {"model": sd, "epoch": 3}
    if fmt == "model_ema":
        obj = {"model": fill_state_dict(sd, 99), "model_ema": sd}  # EMA weights win, as the README evaluates them
    elif fmt == "bare":
        obj = sd
    elif fmt == "ddp":
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    m = dp.from_official_checkpoint(path, name)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(m(x), src(x)):
            assert torch.equal(a, b)


class _Arbitrary:  # stands for any pickled object beyond tensors and training args
    pass


def test_checkpoint_unpickling_is_safe_unless_trusted(tmp_path):
    import argparse

    name = "mobilenetV3_0x75_perceiver_t128"
    sd = dp.build(name).state_dict()
    with_args = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, with_args)  # what the official trainer writes
    dp.from_official_checkpoint(with_args, name)
    risky = tmp_path / "risky.pth"
    torch.save({"model": sd, "extra": _Arbitrary()}, risky)
    with pytest.raises(ValueError, match="trusted=True"):
        dp.from_official_checkpoint(risky, name)
    dp.from_official_checkpoint(risky, name, trusted=True)


def test_bad_checkpoint_names_keys(tmp_path):
    name = "resnet50_0375_perceiver_t128"
    sd = dp.build(name).state_dict()
    sd.pop("cross_att2_z2x.cross_attn.attention.q_proj.weight")
    sd["not_a_module.weight"] = torch.zeros(3)
    sd["early_classifier3.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as info:
        dp.from_official_checkpoint(path, name)
    msg = str(info.value)
    assert "cross_att2_z2x.cross_attn.attention.q_proj.weight" in msg
    assert "not_a_module.weight" in msg
    assert "early_classifier3.bias" in msg and "(7,)" in msg
    torch.save({"optimizer": {}}, path)
    with pytest.raises(ValueError, match="missing keys"):
        dp.from_official_checkpoint(path, name)


def test_unknown_config_and_ops_rejected():
    with pytest.raises(ValueError, match="unknown Dyn-Perceiver config"):
        dp.build("reg900m_perceiver_t128")
    with pytest.raises(ValueError, match="ops"):
        dp.build("reg800m_perceiver_t128", ops="triton")


def test_every_official_name_builds():
    # Shapes only (meta device: no memory, no init), so all names are checked cheaply.
    with torch.device("meta"):
        for name in dp.CONFIGS:
            assert isinstance(dp.build(name), dp.DynPerceiver)


ONE_PER_BACKBONE = sorted({arch: name for name, (arch, _) in sorted(dp.CONFIGS.items(), reverse=True)}.values())


@pytest.mark.parametrize("name", ONE_PER_BACKBONE)
def test_every_backbone_runs(name):
    torch.manual_seed(0)
    m = dp.build(name, num_classes=10)
    with torch.no_grad():
        ys = m(torch.randn(1, 3, 32, 32))
    assert len(ys) == 4 and all(y.shape == (1, 10) and torch.isfinite(y).all() for y in ys)


def test_decomposition_equals_forward():
    m = small_model(seed=1)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full = m(x)
        h, z, y1 = m.forward_exit1(x)
        h, z, y2 = m.forward_exit2(h, z, y1)
        h, y3 = m.forward_exit3(h)
        y4 = m.forward_exit4(h, z, y2)
    for a, b in zip(full, (y1, y2, y3, y4)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name, expected", [
    ("reg800m_perceiver_t128", (0.459, 1.065, 1.228, 1.298)),        # docs/models.md (the official counter)
    ("mobilenetV3_0x75_perceiver_t128", (0.098, 0.182, 0.207, 0.266)),
])
def test_exit_macs_match_published(name, expected):
    with torch.device("meta"):  # shapes are all the hooks need
        m = dp.build(name)
    got = [v / 1e9 for v in m.exit_macs()]
    assert all(a < b for a, b in zip(got, got[1:]))
    for g, e in zip(got, expected):
        assert abs(g / e - 1) <= 0.03, (got, expected)


def test_exit_macs_scale_with_input_size():
    with torch.device("meta"):
        m = dp.build("resnet50_0375_perceiver_t128")
    small, full = m.exit_macs(112), m.exit_macs()
    # CNN work scales with pixels (4x); the latent branch does not, so the ratio stays below 4.
    assert 2.0 < full[-1] / small[-1] < 4.0


def _full_logits(m, x):
    with torch.no_grad():
        return torch.stack(m(x))  # (4, B, classes)


def _confidence(logits):
    return logits.softmax(-1).amax(-1)


@pytest.fixture(scope="module")
def ee_setup():
    m = small_model("reg800m_perceiver_t128", seed=5)
    torch.manual_seed(11)
    x = torch.randn(7, 3, 48, 48)
    return m, x, _full_logits(m, x)


def test_early_exit_all_at_first(ee_setup):
    m, x, full = ee_setup
    logits, idx = m.forward_early_exit(x, [0.0, 1.0, 1.0, 1.0])
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.zeros(7, dtype=torch.int64))
    torch.testing.assert_close(logits, full[0], rtol=1e-4, atol=1e-5)


def test_early_exit_none_before_last(ee_setup):
    m, x, full = ee_setup
    logits, idx = m.forward_early_exit(x, [float("inf")] * 3 + [0.0])
    assert torch.equal(idx, torch.full((7,), 3, dtype=torch.int64))
    torch.testing.assert_close(logits, full[3], rtol=1e-4, atol=1e-5)


def test_early_exit_mixed_matches_full_model_per_sample(ee_setup):
    m, x, full = ee_setup
    conf = _confidence(full)  # (4, B)
    # Thresholds halfway between neighbouring confidences (never equal to one: batched and compacted runs round
    # differently), so that every exit takes some samples.
    def between(values, k):  # a threshold passed by exactly the k largest of `values`
        v = values.sort(descending=True).values
        return ((v[k - 1] + v[k]) / 2).item()

    t0 = between(conf[0], 2)
    t1 = between(conf[1][conf[0] < t0], 2)
    t2 = between(conf[2][(conf[0] < t0) & (conf[1] < t1)], 1)
    logits, idx = m.forward_early_exit(x, [t0, t1, t2, 0.0])
    expected = torch.full((7,), 3, dtype=torch.int64)
    for e, t in reversed(list(enumerate((t0, t1, t2)))):
        expected[conf[e] >= t] = e  # the first passing exit wins (assigned last)
    assert torch.equal(idx, expected)
    assert torch.bincount(idx, minlength=4).tolist() == [2, 2, 1, 2]
    torch.testing.assert_close(logits, full[idx, torch.arange(7)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", dp.RELEASED)
def test_compat_vectors_fused(name):
    data = np.load(os.path.join(DATA, f"dp_{name}.npz"))
    m = vector_model(name)
    try:
        m.set_ops("fused")
        with torch.no_grad():
            ys = m(torch.from_numpy(data["x"]))
    finally:
        m.set_ops("reference")
    for i, y in enumerate(ys):
        assert rel_err(y, torch.from_numpy(data[f"exit{i + 1}"])) <= TOL, f"exit {i + 1}"


@pytest.mark.parametrize("name", ["reg800m_perceiver_t128", "resnet50_0375_perceiver_t128"])
def test_fused_matches_reference_odd_size(name, seed):
    ref = small_model(name, seed=seed % 1000)
    fused = small_model(name, ops="fused", seed=seed % 1000)
    x = torch.randn(3, 3, 53, 71)  # odd, non-square: uneven 7x7 pooling bins, odd pixel counts in z->x
    with torch.no_grad():
        for a, b in zip(ref(x), fused(x)):
            assert rel_err(b, a) <= TOL


def test_z2x_fused_block_matches_layer(seed):
    from lookfast.models.dyn_perceiver.fused import z2x_fused
    from lookfast.models.dyn_perceiver.perceiver import CrossAttentionLayer

    layer = CrossAttentionLayer(40, 24, 5, 5).eval()
    sd = fill_state_dict(layer.state_dict(), seed % 997)
    sd = {k: v + 3.0 if k.endswith("bias") else v for k, v in sd.items()}  # non-trivial LayerNorm / bias terms
    layer.load_state_dict(sd)
    x = torch.randn(2, 40, 5, 7) * 2 + 1  # pixels with a mean: the folded LayerNorm must subtract it right
    z = torch.randn(2, 16, 24)
    with torch.no_grad():
        want = layer(x.flatten(2).transpose(1, 2), z).transpose(1, 2).reshape(2, 40, 5, 7)
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            got = z2x_fused(layer, xin, z)
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-5


def test_torch_compile_fused():
    from lookfast.models.dyn_perceiver.fused import z2x_fused
    from lookfast.models.dyn_perceiver.perceiver import CrossAttentionLayer

    torch._dynamo.reset()
    m = small_model("mobilenetV3_0x75_perceiver_t128", ops="fused", seed=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        # The whole model traces as one graph (no graph breaks around the lookfast ops).
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        # The fused z->x block through Inductor.
        layer = CrossAttentionLayer(40, 24, 5, 5).eval()
        xx = torch.randn(2, 40, 5, 7).contiguous(memory_format=torch.channels_last)
        zz = torch.randn(2, 16, 24)
        torch.testing.assert_close(torch.compile(z2x_fused, fullgraph=True)(layer, xx, zz), z2x_fused(layer, xx, zz))


def test_early_exit_fused_chunked_matches_full_model():
    # Fused ops with exit 1 run in chunks (exit1_chunk < B): same per-sample results as the full fused model.
    m = small_model("mobilenetV3_0x75_perceiver_t128", ops="fused", seed=8)
    m.exit1_chunk = 3
    torch.manual_seed(12)
    x = torch.randn(8, 3, 40, 40)
    full = _full_logits(m, x)
    conf = _confidence(full)
    v0 = conf[0].sort(descending=True).values
    t0 = ((v0[2] + v0[3]) / 2).item()                       # 3 samples leave at exit 1
    logits, idx = m.forward_early_exit(x, [t0, float("inf"), 0.0, 0.0])
    assert torch.bincount(idx, minlength=4).tolist() == [3, 0, 5, 0]
    torch.testing.assert_close(logits, full[idx, torch.arange(8)], rtol=1e-4, atol=1e-5)
