"""M1 (docs/benchmarks.md): Dyn-Perceiver reg800m_perceiver_t128 at 224 px, B 64 (quick: B 8).

Weights: the default initialisation under seed 0 (timing does not depend on the values); images: standard normal. Thresholds come from
`lookfast.calibrate_thresholds` on a separate random calibration batch, for 25/25/25/25 % exits and for a small
budget (`budget_proportions(4, 0.5)`: 53/27/13/7 %). Cases:

- M1-full:  the full model (all four exits, every sample) with ops="fused" vs ops="reference" (the official math).
- M1-ee25 / M1-eeB: `forward_early_exit` (fused ops, exit-masked: later stages run on survivors only) vs the full
  model. The bar: early-exit time / full time <= 1.1 x the MACs ratio, where the MACs ratio is the counted MACs of
  the exits the benchmark batch actually took (`exit_macs`) over the full model's MACs. The official code's ratio is
  1.0 whatever the exits, since it runs everything and picks exits afterwards ("official (full model, pick exits)").
"""
from __future__ import annotations

import torch

from ..case import Case

NAME = "reg800m_perceiver_t128"
SIZE = 224
BUDGETS = {"ee25": ("25/25/25/25 %", [0.25, 0.25, 0.25, 0.25]), "eeB": ("budget q=0.5", None)}
FULL, OFFICIAL = "full model (fused ops)", "official (full model, pick exits)"


def _model(ops: str):
    from lookfast.models import dyn_perceiver as dp

    torch.manual_seed(0)  # same random weights for every instance; timing does not depend on their values
    return dp.build(NAME, ops=ops)


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _full_case(batch: int, quick: bool) -> Case:
    def setup():
        fused, ref = _model("fused"), _model("reference")
        x = _images(batch, 1)

        def run(m):
            def fn():
                with torch.no_grad():
                    return m(x)
            return fn

        return {"lookfast model, ops=fused": run(fused), "ops=reference (official math)": run(ref)}

    return Case(id="M1-full", op="dyn_perceiver", shape=f"{NAME} B {batch} {SIZE}px, full model", setup=setup,
                quick=quick, multi_thread=False, turns=3)


def _ee_case(key: str, batch: int, calib: int, quick: bool) -> Case:
    label, proportions = BUDGETS[key]
    box: dict = {}
    bars: dict[str, float] = {}

    def setup():
        import lookfast

        m, ref = _model("fused"), _model("reference")
        x = _images(batch, 1)
        xc = x if calib == batch else _images(calib, 2)
        with torch.no_grad():
            calib_logits = torch.stack(m(xc))
        p = proportions if proportions is not None else lookfast.budget_proportions(4, 0.5).tolist()
        thresholds = lookfast.calibrate_thresholds(calib_logits, p)
        # Each threshold is a calibration sample's own confidence; the exit-masked run recomputes it on a smaller
        # batch, which can round it a few ulps lower. Lower the thresholds by 1e-4 relative (well inside the gaps
        # between these samples' confidences) so the timed run takes the calibrated exits.
        thresholds = torch.where(thresholds.isfinite(), thresholds * (1 - 1e-4), thresholds)
        macs = m.exit_macs()
        _, exit_index = m.forward_early_exit(x, thresholds)
        taken = torch.bincount(exit_index, minlength=4).double() / batch
        box["macs_ratio"] = float(lookfast.expected_cost(taken, macs)) / macs[-1]
        box["taken"] = taken.tolist()
        # The M1 bar (docs/benchmarks.md): time ratio <= 1.1 x MACs ratio, i.e. a speedup over the full model
        # >= 1 / (1.1 r).
        bars[FULL] = 1.0 / (1.1 * box["macs_ratio"])

        def early():
            return m.forward_early_exit(x, thresholds)

        def full():
            with torch.no_grad():
                return m(x)

        def official():  # the official procedure: every exit for every sample, then pick per sample
            with torch.no_grad():
                ys = torch.stack(ref(x))
            conf = ys.softmax(-1).amax(-1)
            passed = conf >= torch.as_tensor(thresholds, dtype=conf.dtype).unsqueeze(1)
            passed[-1] = True
            first = passed.int().argmax(0)
            return ys[first, torch.arange(batch)]

        return {"lookfast forward_early_exit (fused)": early, FULL: full, OFFICIAL: official}

    def summarize(times: dict[str, float]) -> list[str]:
        ours, full = times.get("lookfast forward_early_exit (fused)"), times.get(FULL)
        if not ours or not full or "macs_ratio" not in box:
            return []
        r = ours / full
        taken = "/".join(f"{100 * t:.0f}" for t in box["taken"])
        verdict = "met" if r <= 1.1 * box["macs_ratio"] else "NOT met"
        return [f"exits taken {taken} %: time ratio {r:.3f} vs MACs ratio {box['macs_ratio']:.3f} "
                f"(bar: <= {1.1 * box['macs_ratio']:.3f}, {verdict})"]

    return Case(id=f"M1-{key}", op="dyn_perceiver", shape=f"{NAME} B {batch} {SIZE}px, early exit {label}",
                setup=setup, bars=bars, quick=quick, multi_thread=False, summarize=summarize, turns=3)


def cases() -> list[Case]:
    out = []
    for batch, calib, quick in ((8, 8, True), (64, 64, False)):
        out.append(_full_case(batch, quick))
        out += [_ee_case(key, batch, calib, quick) for key in BUDGETS]
    return out
