"""Exit-masked execution: E1 (docs/benchmarks.md) and a synthetic 4-exit model run through EarlyExitRunner (EX-*).

E1: n 256, 1000 classes, states (256, 144, 28, 28) and (256, 32, 144) fp32, half the rows exit. Peers: the plain
PyTorch formulation (softmax, max, mask, nonzero, index_select per state) eager and compiled, and one preallocated
`dst.copy_` of the survivors' bytes (the bar: lookfast within 1.2x of it, i.e. speedup >= 1/1.2).

EX-<rate> and EX-conv-<rate>: synthetic 4-exit models on B 64 (token-MLP stages, or small conv stages; see
EX_MODELS), heads = pooled linear; thresholds calibrated so that 0 / 50 / 90 % of the samples leave before the last
exit. The runner's time over the full model's time is reported beside the work ratio (stage-rows run / all
stage-rows): skipping work should save time in proportion.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..case import Case

E1_N, E1_CLASSES = 256, 1000
E1_STATES = ((256, 144, 28, 28), (256, 32, 144))


def _e1_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(E1_N, E1_CLASSES, generator=g) * 3
    states = [torch.randn(shape, generator=g) for shape in E1_STATES]
    conf = torch.softmax(logits, -1).amax(-1)
    threshold = float(conf.sort().values[E1_N // 2 - 1: E1_N // 2 + 1].mean())  # exactly half exit
    return logits, threshold, states


def _survivor_bytes() -> int:
    per_row = sum(torch.Size(s[1:]).numel() * 4 for s in E1_STATES)
    return E1_N // 2 * per_row


def _plain_torch(logits, threshold, states):
    conf = torch.softmax(logits, -1).amax(-1)
    leaves = conf >= threshold
    keep = torch.nonzero(~leaves).squeeze(1)
    exited = torch.nonzero(leaves).squeeze(1)
    return (keep, exited, *(s.index_select(0, keep) for s in states))


def _e1_setup():
    import lookfast

    logits, threshold, states = _e1_inputs()
    m = E1_N // 2
    dst = [torch.empty((m, *s.shape[1:])) for s in states]
    src = [s[:m] for s in states]

    def copy_survivors():
        for d, s in zip(dst, src):
            d.copy_(s)

    return {
        "lookfast.exit_compact": lambda: lookfast.exit_compact(logits, threshold, *states),
        "torch eager (softmax,max,nonzero,index_select)": lambda: _plain_torch(logits, threshold, states),
        "one copy of the survivors' bytes": copy_survivors,
    }


def _e1_compile_setup():
    import torch._dynamo.config as dcfg

    import lookfast

    logits, threshold, states = _e1_inputs()
    compiled = torch.compile(_plain_torch, dynamic=False)

    def run_compiled():
        with dcfg.patch(capture_dynamic_output_shape_ops=True):
            return compiled(logits, threshold, states)

    return {
        "lookfast.exit_compact": lambda: lookfast.exit_compact(logits, threshold, *states),
        "torch.compile (softmax,max,nonzero,index_select)": run_compiled,
    }


# ------------------------------------------------------------------------------------ synthetic multi-exit models
EX_BATCH, EX_CLASSES, EX_EXITS = 64, 10, 4
EX_EARLY = {0: [0.0, 0.0, 0.0, 1.0], 50: [1 / 6, 1 / 6, 1 / 6, 0.5], 90: [0.3, 0.3, 0.3, 0.1]}
# "mlp": 4 residual token-MLP stages (49 tokens x 192 wide, hidden 384), a latent-transformer-like branch. Every stage
#   is a GEMM over survivors x 49 rows, which stays efficient down to a handful of samples, so the time each sample
#   costs does not depend on how many run with it: the case that shows whether the runner turns skipped work into
#   saved time. "conv": 4 stages of two 3x3 convs (16 channels, 16x16), whose per-sample cost on a CPU grows as the
#   batch shrinks (less work per oneDNN call); it shows what a small conv trunk keeps of the saving.
EX_BAR = 1.1  # docs/benchmarks.md's M1 bar, applied to the synthetic model: time ratio <= 1.1 x work ratio
EX_MODELS = {
    "mlp": dict(tokens=49, width=192, hidden=384),
    "conv": dict(channels=16, size=16),
}


def _ex_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        m = EX_MODELS["mlp"]
        return torch.randn(EX_BATCH, m["tokens"], m["width"], generator=g)
    m = EX_MODELS["conv"]
    return torch.randn(EX_BATCH, m["channels"], m["size"], m["size"], generator=g)


def _ex_flops(kind: str) -> int:
    """Floating-point operations of the full model (every stage on every sample)."""
    if kind == "mlp":
        m = EX_MODELS["mlp"]
        per_stage = 2 * 2 * m["tokens"] * m["width"] * m["hidden"]
    else:
        m = EX_MODELS["conv"]
        per_stage = 2 * 2 * m["channels"] * m["channels"] * 9 * m["size"] * m["size"]
    return EX_EXITS * EX_BATCH * per_stage


def _ex_model(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        m = EX_MODELS["mlp"]
        w1 = [torch.randn(m["width"], m["hidden"], generator=g) / m["width"] ** 0.5 for _ in range(EX_EXITS)]
        w2 = [torch.randn(m["hidden"], m["width"], generator=g) / m["hidden"] ** 0.5 for _ in range(EX_EXITS)]
        heads = [torch.randn(m["width"], EX_CLASSES, generator=g) for _ in range(EX_EXITS)]

        def stage(i):
            return lambda s: (s[0] + torch.relu(s[0] @ w1[i]) @ w2[i],)

        def head(i):
            return lambda s: s[0].mean(1) @ heads[i]
    else:
        m = EX_MODELS["conv"]
        ch = m["channels"]
        convs = [[torch.nn.Conv2d(ch, ch, 3, padding=1) for _ in range(2)] for _ in range(EX_EXITS)]
        for pair in convs:
            for c in pair:
                with torch.no_grad():
                    c.weight.copy_(torch.randn(c.weight.shape, generator=g) / (3 * ch**0.5))
        heads = [torch.randn(ch, EX_CLASSES, generator=g) * 4 for _ in range(EX_EXITS)]

        def stage(i):
            return lambda s: (torch.relu(convs[i][1](torch.relu(convs[i][0](s[0])))) + s[0],)

        def head(i):
            return lambda s: s[0].mean((2, 3)) @ heads[i]

    return [stage(i) for i in range(EX_EXITS)], [head(i) for i in range(EX_EXITS)]


def _ex_case(rate: int, kind: str) -> Case:
    box: dict = {}

    def setup():
        import lookfast

        stages, heads = _ex_model(kind)
        x = _ex_input(kind)

        def full_model():
            with torch.no_grad():
                state, outs = (x,), []
                for st, hd in zip(stages, heads):
                    state = st(state)
                    outs.append(hd(state))
                return outs

        thresholds = lookfast.calibrate_thresholds(torch.stack(full_model()), EX_EARLY[rate])
        runner = lookfast.EarlyExitRunner(stages, heads)

        def early():
            with torch.no_grad():
                return runner((x,), thresholds)

        for _ in range(3):  # warm both (oneDNN primitives per batch size, allocator arenas) before either is timed
            full_model()
            _, exit_index = early()
        box["work"] = float((exit_index + 1).sum()) / (EX_BATCH * EX_EXITS)  # stage-rows run / all stage-rows
        box["early"] = float((exit_index < EX_EXITS - 1).float().mean())
        box["cpu"] = {}

        def with_cpu_time(name, fn):
            # The process CPU time as well as the wall time: on a shared, oversubscribed machine the wall time of a
            # 1-thread run includes waiting for a core, the CPU time does not.
            def run():
                start = time.process_time()
                result = fn()
                box["cpu"].setdefault(name, []).append(time.process_time() - start)
                return result
            return run

        return {name: with_cpu_time(name, fn) for name, fn in
                (("lookfast.EarlyExitRunner", early), ("full model (every stage, every sample)", full_model))}

    def summarize(times: dict[str, float]) -> list[str]:
        ours, full = times.get("lookfast.EarlyExitRunner"), times.get("full model (every stage, every sample)")
        if not ours or not full or "work" not in box:
            return []
        ratio = ours / full
        verdict = "met" if ratio <= EX_BAR * box["work"] else "NOT met"
        notes = [f"early exits {box['early']:.0%}: wall time ratio {ratio:.3f} vs work ratio {box['work']:.3f} "
                 f"(time/work {ratio / box['work']:.2f}; 1.0 = time falls exactly with the work skipped; "
                 f"bar as M1: <= {EX_BAR}, {verdict})"]
        cpu = {k: statistics.median(v) for k, v in box.get("cpu", {}).items() if v}
        if len(cpu) == 2:
            c = cpu["lookfast.EarlyExitRunner"] / cpu["full model (every stage, every sample)"]
            notes.append(f"CPU-time ratio {c:.3f} (time/work {c / box['work']:.2f})")
        return notes

    if kind == "mlp":
        m = EX_MODELS["mlp"]
        shape = f"B {EX_BATCH}, 4 stages x token MLP ({m['tokens']} tokens, {m['width']}->{m['hidden']}->{m['width']})"
    else:
        m = EX_MODELS["conv"]
        shape = f"B {EX_BATCH}, 4 stages x 2 conv3x3 {m['channels']}ch {m['size']}x{m['size']}"
    return Case(
        id=f"EX-{rate}" if kind == "mlp" else f"EX-conv-{rate}", op="EarlyExitRunner",
        shape=f"{shape}, {rate}% exit early",
        setup=setup, flops=_ex_flops(kind), quick=kind == "mlp", multi_thread=False, summarize=summarize, turns=5,
    )


def cases() -> list[Case]:
    survivors = _survivor_bytes()
    shape = f"n {E1_N}, {E1_CLASSES} classes, states {E1_STATES[0]} + {E1_STATES[1]} fp32, 50% exit"
    return [
        Case(id="E1", op="exit_compact", shape=shape, setup=_e1_setup,
             bytes=2 * survivors + E1_N * E1_CLASSES * 4, bars={"one copy of the survivors' bytes": 1 / 1.2}),
        Case(id="E1-compile", op="exit_compact", shape=shape, setup=_e1_compile_setup,
             bytes=2 * survivors + E1_N * E1_CLASSES * 4, quick=False),
    ] + [_ex_case(rate, kind) for kind in ("mlp", "conv") for rate in (0, 50, 90)]
