"""Both models in bf16, with ops="reference" and ops="fused", two ways: bf16 weights (`model.to(torch.bfloat16)`,
bf16 images) and float32 weights under `torch.autocast("cpu", torch.bfloat16)`.

The accuracy rule (FlashAttention's, for models): against the float32 official result (the compatibility vectors in
tests/data/), lookfast's error in bf16 is at most 2x the error of the official computation in bf16 (ops="reference"
run the same way). LookWhere's selection (top-k of a bf16 selector map) flips near-tied patches in bf16, which moves
whole grid cells of the segmentation map whatever the arithmetic; its seg (and cls) rule is therefore also checked
with the float32 official selection handed to both runs, which isolates the extractor, the head and the fill.
Also: early exit and calibration in bf16."""
import copy
import os
import sys

import numpy as np
import pytest
import torch

import lookfast

sys.path.insert(0, os.path.dirname(__file__))
from test_models_dyn_perceiver import DATA, small_model, vector_model  # noqa: E402
from test_models_lookwhere import vector_checkpoint  # noqa: E402

from lookfast.models.lookwhere import LookWhere  # noqa: E402

MODES = ("cast", "autocast")
BF16 = torch.bfloat16


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def run(model, x, mode, fn):
    with torch.no_grad(), torch.autocast("cpu", BF16, enabled=mode == "autocast"):
        return fn(model, x.to(BF16) if mode == "cast" else x)


# --------------------------------------------------------------------------------------------------- Dyn-Perceiver
DP = "reg800m_perceiver_t128"


@pytest.fixture(scope="module")
def dp_vector():
    return dict(np.load(os.path.join(DATA, f"dp_{DP}.npz")))


@pytest.fixture(scope="module")
def dp_models():
    m32 = vector_model(DP).eval()
    return {"cast": copy.deepcopy(m32).to(BF16), "autocast": copy.deepcopy(m32)}


@pytest.mark.parametrize("mlp", ["onednn", "addmm"])
@pytest.mark.parametrize("mode", MODES)
def test_dyn_perceiver_bf16_rule(dp_models, dp_vector, mode, mlp, monkeypatch):
    """mlp: the fused z->x MLP on oneDNN's fused linears (where this CPU's oneDNN runs bf16), or forced onto the
    addmm / gelu / addmm_ path that CPUs without it take."""
    from lookfast.models.dyn_perceiver import fused

    from lookfast.models.dyn_perceiver.layers import onednn_dtype

    packed = []
    if mlp == "addmm":
        monkeypatch.setattr(fused, "_onednn_mlp_weights", lambda *args: None)
    else:
        original = fused._onednn_mlp_weights
        monkeypatch.setattr(fused, "_onednn_mlp_weights", lambda *args: packed.append(original(*args)) or packed[-1])
    model = dp_models[mode]
    x = torch.from_numpy(dp_vector["x"])
    outs = {}
    for ops in ("reference", "fused"):
        model.set_ops(ops)
        outs[ops] = run(model, x, mode, lambda m, xx: m(xx))
    model.set_ops("reference")
    for i in range(4):
        truth = torch.from_numpy(dp_vector[f"exit{i + 1}"])
        official, ours = rel_err(outs["reference"][i], truth), rel_err(outs["fused"][i], truth)
        assert outs["fused"][i].dtype == BF16
        # The vectors' rule-filled weights make a chaotic network: the official computation itself is off by
        # 20-50% (max-norm) in bf16, so this bound only says the bf16 run is not NaN / inf / unrelated.
        assert official < 1.0, (i, official)
        assert ours <= 2 * official, (mode, i, ours, official)
    if mlp == "onednn":  # the oneDNN path ran wherever this CPU's oneDNN has bf16
        on_onednn = onednn_dtype(torch.zeros(1, dtype=BF16)) == BF16
        assert packed and all((p is not None) == on_onednn for p in packed)


def test_dyn_perceiver_early_exit_and_calibration_bf16(seed):
    """forward_early_exit / calibrate_thresholds with bf16 weights: per sample, the early-exit logits equal the
    full bf16 model's logits at the exit taken (to bf16 batch-composition noise) and the calibrated proportions hold."""
    model = small_model(DP, ops="fused", seed=5).eval().to(BF16)
    x = torch.randn(12, 3, 64, 64).to(BF16)
    with torch.no_grad():
        full = torch.stack(model(x))                                  # (4, B, C) bf16
    thresholds = lookfast.calibrate_thresholds(full, [0.25, 0.25, 0.25, 0.25])
    assert thresholds.dtype == torch.float32 and thresholds.shape == (4,)
    thresholds = torch.where(thresholds.isfinite(), thresholds * (1 - 1e-3), thresholds)
    logits, exit_index = model.forward_early_exit(x, thresholds)
    assert logits.dtype == BF16
    # The exits the rule gives, from the full model's logits in float64: at exit e the samples still in whose max
    # softmax reaches thresholds[e] leave. The 1e-3 margin lets a sample within 0.1% of a quantile leave with it,
    # so the counts are the calibrated 3 per exit unless such a near-tie was drawn (a fresh seed can draw one).
    confidence = full.double().softmax(-1).amax(-1)
    expected, left = torch.full((12,), 3), torch.ones(12, dtype=torch.bool)
    for e in range(3):
        leave = left & (confidence[e] >= thresholds[e].double())
        expected[leave], left = e, left & ~leave
    assert torch.equal(exit_index, expected)
    near_ties = int(((confidence[:3] < thresholds[:3, None].double() / (1 - 1e-3))
                     & (confidence[:3] >= thresholds[:3, None].double())).sum())
    counts = torch.bincount(exit_index, minlength=4).tolist()
    assert counts == [3, 3, 3, 3] or near_ties > 0, (counts, near_ties)
    assert model.exit_macs() == small_model(DP, ops="fused", seed=5).exit_macs()  # the MACs probe runs in bf16 too
    picked = full[exit_index, torch.arange(12)]
    assert rel_err(logits, picked.float()) <= 3e-2


# -------------------------------------------------------------------------------------------------------- LookWhere
@pytest.fixture(scope="module")
def lw_vector():
    return dict(np.load(os.path.join(DATA, "lw_dinov2_hr518_k136.npz")))


@pytest.fixture(scope="module")
def lw_models():
    with torch.device("meta"):
        shape_model = LookWhere.from_config(lw_type="dinov2", high_res_size=518, k=136, num_classes=10)
    m32 = LookWhere.from_official_state_dict(vector_checkpoint(shape_model), 518, 136, 10, task="cls").eval()
    # "packed": bf16 weights packed for the matrix engine (pack_weights: the brgemm packed_linear where this CPU has
    # the micro-kernel, with layer scale and residual in its epilogue; oneDNN's bitwise packs elsewhere).
    # "autocast packed": float32 weights with autocast packs (bf16 copies used only under CPU autocast).
    return {"cast": copy.deepcopy(m32).to(BF16), "autocast": m32, "packed": copy.deepcopy(m32).to(BF16).pack_weights(),
            "autocast packed": copy.deepcopy(m32).pack_weights()}


def _lw_run(model, x, mode, ops, selection=None):
    """forward_with_intermediates(task="both"); `selection` (scores, prefix) replaces the selector's output."""
    model.ops = ops
    original = model.selector.forward
    autocast = mode.startswith("autocast")
    if selection is not None:
        scores, prefix = selection
        model.selector.forward = lambda images, grid, packed=True: (scores, prefix if autocast else prefix.to(BF16))
    try:
        return run(model, x, "autocast" if autocast else "cast",
                   lambda m, xx: m.forward_with_intermediates(xx, task="both"))
    finally:
        model.selector.forward = original


@pytest.mark.parametrize("mode", MODES + ("packed", "autocast packed"))
def test_lookwhere_bf16_rule_given_the_official_selection(lw_models, lw_vector, mode):
    x = torch.from_numpy(lw_vector["x"])
    selection = (torch.from_numpy(lw_vector["selector_map"]), torch.from_numpy(lw_vector["prefix_tokens"]))
    outs = {ops: _lw_run(lw_models[mode], x, mode, ops, selection) for ops in ("reference", "fused")}
    for ops in outs:
        assert torch.equal(outs[ops]["keep"], torch.from_numpy(lw_vector["keep"]))
    for name in ("cls_logits", "seg_logits"):
        truth = torch.from_numpy(lw_vector[name])
        official, ours = rel_err(outs["reference"][name], truth), rel_err(outs["fused"][name], truth)
        assert outs["fused"][name].dtype == BF16 and outs["reference"][name].dtype == BF16
        assert official < 0.1, (name, official)
        assert ours <= 2 * official, (mode, name, ours, official)


@pytest.mark.parametrize("mode", MODES + ("packed", "autocast packed"))
def test_lookwhere_bf16_end_to_end(lw_models, lw_vector, mode):
    """The whole model in bf16 (its own bf16 selection): cls within the rule; seg runs, has the official shape and
    dtype, and agrees with the official bf16 seg wherever both selected the same neighbours (here: the same keep)."""
    x = torch.from_numpy(lw_vector["x"])
    outs = {ops: _lw_run(lw_models[mode], x, mode, ops) for ops in ("reference", "fused")}
    truth = torch.from_numpy(lw_vector["cls_logits"])
    official, ours = rel_err(outs["reference"]["cls_logits"], truth), rel_err(outs["fused"]["cls_logits"], truth)
    assert ours <= 2 * official, (mode, ours, official)
    seg = {ops: outs[ops]["seg_logits"] for ops in outs}
    assert seg["fused"].shape == seg["reference"].shape == lw_vector["seg_logits"].shape
    assert seg["fused"].dtype == seg["reference"].dtype == BF16
    same = [i for i in range(x.shape[0]) if torch.equal(outs["fused"]["keep"][i], outs["reference"]["keep"][i])]
    for i in same:
        truth_i = torch.from_numpy(lw_vector["seg_logits"][i])
        assert rel_err(seg["fused"][i], truth_i) <= 2 * rel_err(seg["reference"][i], truth_i) + 1e-2
