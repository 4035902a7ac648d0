"""M1 (docs/benchmarks.md): Dyn-Perceiver reg800m_perceiver_t128 at 224 px, B 64 (quick: B 8).

Weights: the default initialisation under seed 0 (timing does not depend on the values); images: standard normal. Thresholds come from
`lookfast.calibrate_thresholds` on a separate random calibration batch, for 25/25/25/25 % exits and for a small
budget (`budget_proportions(4, 0.5)`: 53/27/13/7 %). Cases:

- M1-full:  the full model (all four exits, every sample) with ops="fused" vs ops="reference" (the official math).
- M1-ee25 / M1-eeB: `forward_early_exit` (fused ops, exit-masked: later stages run on survivors only) vs the full
  model. The bar: early-exit time / full time <= 1.1 x the MACs ratio, where the MACs ratio is the counted MACs of
  the exits the benchmark batch actually took (`exit_macs`) over the full model's MACs. The official code's ratio is
  1.0 whatever the exits, since it runs everything and picks exits afterwards ("official (full model, pick exits)").

bf16 variants (ids ending in -bf16): M1-full-bf16 times lookfast fused with bf16 weights against the official
computation in bf16 both ways (weights cast; float32 weights under `torch.autocast("cpu", torch.bfloat16)`), bar
>= 2x each; M1-ee*-bf16 run the early-exit cases with bf16 weights (calibration on bf16 logits), same MACs bar.
"""
from __future__ import annotations

import torch

from ..case import Case, dtype_variants

NAME = "reg800m_perceiver_t128"
SIZE = 224
BUDGETS = {"ee25": ("25/25/25/25 %", [0.25, 0.25, 0.25, 0.25]), "eeB": ("budget q=0.5", None)}
FULL, OFFICIAL = "full model (fused ops)", "official (full model, pick exits)"


def _model(ops: str, dtype: torch.dtype = torch.float32):
    from lookfast.models import dyn_perceiver as dp

    torch.manual_seed(0)  # same random weights for every instance; timing does not depend on their values
    return dp.build(NAME, ops=ops).eval().to(dtype)


def _images(batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _full_case_bf16(batch: int, quick: bool) -> Case:
    bf16 = torch.bfloat16

    def setup():
        fused, ref = _model("fused", bf16), _model("reference", bf16)
        fused32, ref32 = _model("fused"), _model("reference")
        x32 = _images(batch, 1)
        x = x32.to(bf16)

        def run(m, images, autocast=False):
            def fn():
                with torch.no_grad(), torch.autocast("cpu", bf16, enabled=autocast):
                    return m(images)
            return fn

        return {"lookfast fused (bf16 weights)": run(fused, x),
                "official bf16 (cast weights)": run(ref, x),
                "official bf16 (autocast)": run(ref32, x32, True),
                "lookfast fused (autocast)": run(fused32, x32, True)}

    return Case(id="M1-full", op="dyn_perceiver", shape=f"{NAME} B {batch} {SIZE}px, full model, bf16", setup=setup,
                bars={"official bf16 (cast weights)": 2.0, "official bf16 (autocast)": 2.0},
                quick=quick, multi_thread=False, turns=3)


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


def _ee_case(key: str, batch: int, calib: int, quick: bool, dtype: torch.dtype = torch.float32) -> Case:
    label, proportions = BUDGETS[key]
    box: dict = {}
    bars: dict[str, float] = {}

    def setup():
        import lookfast

        m, ref = _model("fused", dtype), _model("reference", dtype)
        x = _images(batch, 1, dtype)
        xc = x if calib == batch else _images(calib, 2, dtype)
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

        def exit1():  # the piece every image runs, whatever the thresholds (stem, CNN stages 1-2, exit 1)
            with torch.no_grad():
                return m.forward_exit1(x)

        box["exit1"], box["full"], box["exit1_macs"] = exit1, full, macs[0] / macs[-1]

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
        notes = [f"exits taken {taken} %: time ratio {r:.3f} vs MACs ratio {box['macs_ratio']:.3f} "
                 f"(bar: <= {1.1 * box['macs_ratio']:.3f}, {verdict})"]
        # What bounds the ratio: every image runs exit 1's piece. Its share of the full model's time (alternating
        # calls), against its share of the MACs, gives the time ratio a runner with no cost of its own would reach
        # if the later pieces' time fell exactly with their MACs.
        from ..timing import paired_ratio

        share, macs1 = paired_ratio(box["full"], box["exit1"], 5), box["exit1_macs"]
        ideal = share + (1 - share) * (box["macs_ratio"] - macs1) / (1 - macs1)
        notes.append(f"exit 1's piece (every image runs it): {100 * share:.0f}% of the full model's time for "
                     f"{100 * macs1:.0f}% of its MACs; with the later pieces' time falling exactly with their MACs "
                     f"the time ratio would be {ideal:.3f}")
        return notes

    suffix = "" if dtype == torch.float32 else f", {str(dtype).replace('torch.', '')}"
    return Case(id=f"M1-{key}", op="dyn_perceiver", shape=f"{NAME} B {batch} {SIZE}px, early exit {label}{suffix}",
                setup=setup, bars=bars, quick=quick, multi_thread=False, summarize=summarize, turns=3)


def cases() -> list[Case]:
    out = []
    for batch, calib, quick in ((8, 8, True), (64, 64, False)):
        out += dtype_variants(lambda dt: _full_case(batch, quick) if dt == torch.float32 else _full_case_bf16(batch, quick))
        out += [case for key in BUDGETS
                for case in dtype_variants(lambda dt: _ee_case(key, batch, calib, quick, dt))]
    return out
