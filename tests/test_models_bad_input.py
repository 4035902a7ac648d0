"""The reference models under bad input (issue 14): a NaN image, a wrong size, a truncated or corrupt checkpoint each
give a clear error naming the argument or file, and nothing is half-written: a model whose load failed is never
returned, and the outputs a caller passed in are untouched."""
import math

import pytest
import torch

from lookfast.models import dyn_perceiver as dp
from lookfast.models.lookwhere import LookWhere

DP_NAME = "mobilenetV3_0x75_perceiver_t128"
LW_SMALL = dict(dim=64, num_heads=2, selector_depth=1, extractor_depth=2)


@pytest.fixture(scope="module")
def dyn():
    torch.manual_seed(0)
    return dp.build(DP_NAME)


@pytest.fixture(scope="module")
def lw():
    torch.manual_seed(0)
    return LookWhere.from_config(lw_type="dinov2", high_res_size=70, k=10, num_classes=5, **LW_SMALL).eval()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_dyn_perceiver_refuses_non_finite_images(dyn, bad):
    x = torch.randn(2, 3, 64, 64)
    x[1, 2, 5, 7] = bad
    for call in (dyn, dyn.forward_exit1, lambda im: dyn.forward_early_exit(im, [0.5, 0.5, 0.5, 0.0])):
        with pytest.raises(ValueError, match="images holds 1 NaN or inf"):
            call(x)


@pytest.mark.parametrize("shape, exc, match", [
    ((2, 3, 16, 64), ValueError, "at least 32x32"),
    ((2, 1, 64, 64), ValueError, r"\(B, 3, H, W\)"),
    ((3, 64, 64), ValueError, r"\(B, 3, H, W\)"),
])
def test_dyn_perceiver_refuses_wrong_sizes(dyn, shape, exc, match):
    with pytest.raises(exc, match=match):
        dyn(torch.randn(shape))


def test_dyn_perceiver_refuses_integer_images(dyn):
    with pytest.raises(TypeError, match="floating point"):
        dyn(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_lookwhere_refuses_non_finite_images(lw, bad):
    x = torch.randn(1, 3, 70, 70)
    x[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="images holds 1 NaN or inf"):
        lw(x)


def test_lookwhere_wrong_size(lw):
    with pytest.raises(ValueError, match="70x70"):
        lw(torch.randn(1, 3, 84, 84))


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_truncated_dyn_perceiver_checkpoint(tmp_path, dyn, cut):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": dyn.state_dict()}, path)
    data = path.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated, corrupt or not a torch checkpoint") as info:
        dp.from_official_checkpoint(path, DP_NAME)
    assert "ckpt.pth" in str(info.value)


def test_corrupt_and_missing_checkpoint_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(ValueError, match="junk.pt"):
        dp.from_official_checkpoint(junk, DP_NAME)
    with pytest.raises(ValueError, match="junk.pt"):
        LookWhere.from_official_checkpoint(junk, 70, 10, 5, num_heads=2)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        dp.from_official_checkpoint(tmp_path / "nowhere.pt", DP_NAME)


def test_truncated_lookwhere_checkpoint(tmp_path):
    small = LookWhere.from_config(lw_type="dinov2", high_res_size=70, k=10, num_classes=5, **LW_SMALL)
    sd = small.state_dict()
    # The official layout: {"selector": {"backbone": ..., "head": ...}, "extractor": ...}
    ckpt = {"selector": {"backbone": {k[len("selector.backbone."):]: v for k, v in sd.items()
                                      if k.startswith("selector.backbone.")},
                         "head": {k[len("selector.head."):]: v for k, v in sd.items() if k.startswith("selector.head.")}},
            "extractor": {k[len("extractor."):]: v for k, v in sd.items() if k.startswith("extractor.")}}
    path = tmp_path / "lookwhere.pt"
    torch.save(ckpt, path)
    LookWhere.from_official_checkpoint(path, 70, 10, 5, num_heads=2)  # the intact file loads
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="lookwhere.pt"):
        LookWhere.from_official_checkpoint(path, 70, 10, 5, num_heads=2)


def test_failed_load_leaves_nothing_half_written(tmp_path, dyn):
    # A checkpoint with one wrongly shaped tensor: the error comes before any weight is copied, so a model the caller
    # loads into keeps its weights (load_strict checks everything first).
    from lookfast.models.dyn_perceiver.checkpoint import load_strict

    target = dp.build(DP_NAME)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in dyn.state_dict().items()}
    key = next(k for k in sd if k.endswith("weight"))
    sd[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="wrong shapes"):
        load_strict(target, sd)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_exit_scatter_failure_leaves_out_untouched():
    import lookfast

    out = torch.arange(12.0).reshape(4, 3)
    before = out.clone()
    with pytest.raises(RuntimeError, match="batch_index"):
        lookfast.exit_scatter(out, torch.tensor([0, 9]), torch.ones(2, 3))  # index 9 out of range: checked first
    assert torch.equal(out, before)
